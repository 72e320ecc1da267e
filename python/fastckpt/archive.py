"""Opening archives (paths or file-like objects) and verifying their CRC-32s."""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import zlib

from fastckpt import _native
from fastckpt.errors import FormatError, LimitError, RecordError

# A deflated record (a re-zipped checkpoint) is inflated into owned memory, but
# never beyond this many bytes nor beyond what its header declares.
MAX_INFLATED_BYTES = 1 << 30
# data.pkl is read whole into memory; a larger one is refused before reading.
MAX_PICKLE_BYTES = 1 << 30


def open_archive(f) -> _native.Archive:
    """Index the checkpoint at path `f`, or in file-like `f` from its current position."""
    if isinstance(f, (str, os.PathLike)):
        return _native.Archive.open(os.fspath(f))
    if type(f) in (io.FileIO, io.BufferedReader, io.BufferedRandom) and _is_regular(f):
        # A file opened by open(): map its descriptor from the current position, as a path is
        # mapped (no whole-file read into memory; eager loads pread straight into storages).
        if f.writable():
            f.flush()
        return _native.Archive.open_fd(f.fileno(), f.tell(), getattr(f, "name", "<file object>").__str__())
    start = f.tell()
    f.seek(0, os.SEEK_END)
    end = f.tell()  # not seek's return value: some file views return another position there
    f.seek(start)
    buffer = _native.allocate(max(end - start, 0))
    _read_exactly(f, memoryview(buffer))
    return _native.Archive.from_buffer(buffer)


def _is_regular(f) -> bool:
    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, ValueError):
        return False


def _read_exactly(f, view: memoryview) -> None:
    """Fill `view` from `f`; a read that returns anything but 1..len(asked) bytes is an error, never progress."""
    readinto = getattr(f, "readinto", None)
    filled = 0
    while filled < len(view):
        asked = len(view) - filled
        if readinto is not None:
            n = readinto(view[filled:])
        else:
            chunk = f.read(asked)
            n = len(chunk) if isinstance(chunk, (bytes, bytearray, memoryview)) else chunk
            if isinstance(n, int) and 0 < n <= asked:
                view[filled : filled + n] = chunk
        if type(n) is not int or n < 0 or n > asked:
            method = "readinto" if readinto is not None else "read"
            raise FormatError(f"{type(f).__name__}.{method}() returned {n!r} when asked for {asked} bytes")
        if n == 0:
            raise FormatError(
                f"the file ended after {filled} of the {len(view)} bytes it had when opened (truncated while reading?)"
            )
        filled += n


def read_record(archive: _native.Archive, name: str, check_crc: bool = True) -> bytes:
    """The bytes of a (small) record: stored records are copied, deflated ones inflated under a cap."""
    info = archive.record(name)
    if info.method == _native.Method.stored:
        return archive.read(name, check_crc)
    return _inflate(archive, info, check_crc)


def _inflate(archive: _native.Archive, info: _native.Record, check_crc: bool) -> bytes:
    name = info.name
    if info.size > MAX_INFLATED_BYTES:
        raise LimitError(f"record '{name}' declares {info.size} inflated bytes, over the {MAX_INFLATED_BYTES}-byte cap")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(archive.compressed_view(name), info.size + 1)
    except zlib.error as e:
        raise RecordError(f"record '{name}' is not valid deflate data: {e}") from None
    if len(data) != info.size or not inflater.eof:
        raise RecordError(f"record '{name}' inflates to a size other than the {info.size} bytes its header declares")
    if check_crc:
        archive.check_crcs([name], [zlib.crc32(data)])
    return data


def check_storage_crc(archive: _native.Archive, record: str, computed: int, tensor: str) -> None:
    """The core's CRC verdict for a storage read outside a load; the error names its tensor (``.keys``)."""
    archive.check_crc(record, computed, [tensor])


def check_version(archive: _native.Archive) -> None:
    """Refuses archives without torch.save's version record, or of a version torch does not read."""
    name = ".data/version" if ".data/version" in archive else "version"
    if name not in archive:
        raise RecordError("the archive has no 'version' record; it was not written by torch.save")
    text = read_record(archive, name).decode("ascii", "replace").strip()
    if not text.isdigit() or not 1 <= int(text) <= 10:
        raise RecordError(f"unsupported file format version {text!r} (torch reads versions 1 to 10)")


def read_data_pickle(archive: _native.Archive) -> bytes:
    """data.pkl, CRC-checked; refused before reading when over MAX_PICKLE_BYTES."""
    size = archive.record("data.pkl").size
    if size > MAX_PICKLE_BYTES:
        raise LimitError(f"data.pkl is {size} bytes, over the {MAX_PICKLE_BYTES}-byte cap")
    return read_record(archive, "data.pkl")


def byteorder_record(archive: _native.Archive) -> bytes | None:
    """b"little" or b"big" from the 'byteorder' record; None when there is none (old files)."""
    if "byteorder" not in archive:
        return None
    mark = read_record(archive, "byteorder")
    if mark not in (b"little", b"big"):  # torch raises ValueError with this text
        raise RecordError("Unknown endianness type: " + mark.decode("ascii", "replace"))
    return mark


def check_storage_alignment(archive: _native.Archive) -> None:
    """torch.save writes `config.save.storage_alignment` (any positive integer) as decimal text."""
    if ".storage_alignment" in archive:
        text = read_record(archive, ".storage_alignment")
        if not (text.isdigit() and int(text) > 0):
            raise RecordError(f"record '.storage_alignment' holds {text[:32]!r}, not a positive decimal integer")


@dataclasses.dataclass
class RecordStatus:
    name: str
    size: int
    stored_crc32: int
    computed_crc32: int | None
    status: str  # "ok", "mismatch", "unrecorded" (CRC 0 written by compute_crc32=False), "invalid"
    data_offset: int
    alignment: int


@dataclasses.dataclass(repr=False)
class VerifyReport:
    path: str
    prefix: str
    records: list[RecordStatus]
    crc32_implementation: str

    def __repr__(self) -> str:
        """One line: the verdict, counts by status and bytes; the records themselves are `.records`."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.status] = counts.get(r.status, 0) + 1
        by_status = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        failed = self.failures
        named = f"; failed: {', '.join(r.name for r in failed[:3])}{', ...' if len(failed) > 3 else ''}" if failed else ""
        return (f"<VerifyReport {self.path!r}: {'ok' if self.ok else 'FAILED'}, {len(self.records)} records "
                f"({by_status or 'none'}), {sum(r.size for r in self.records):,} bytes{named}>")

    @property
    def ok(self) -> bool:
        return all(r.status in ("ok", "unrecorded") for r in self.records)

    @property
    def failures(self) -> list[RecordStatus]:
        return [r for r in self.records if r.status not in ("ok", "unrecorded")]


# With a progress callback, records are checked in batches of about this many bytes.
_PROGRESS_BATCH_BYTES = 256 << 20


def _checked(archive, threads: int, progress):
    """archive.verify's result for every record: in one call, or in batches, reporting bytes done."""
    if progress is None:
        return archive.verify(None, threads)
    results, batch, batch_bytes = [], [], 0
    records = archive.records()
    for i, r in enumerate(records):
        batch.append(r.name)
        batch_bytes += r.compressed_size
        if batch_bytes >= _PROGRESS_BATCH_BYTES or i == len(records) - 1:
            results += archive.verify(batch, threads)
            progress(batch_bytes)
            batch, batch_bytes = [], 0
    return results


def verify(path, *, threads: int | None = None, progress=None) -> VerifyReport:
    """Check every record's CRC-32 in parallel; returns a per-record report.

    A structurally malformed file raises a :class:`fastckpt.CheckpointError`
    subclass; CRC mismatches are reported (``report.ok`` is False), not raised.
    ``progress(nbytes)``, if given, is called as records are checked (batches of ~256 MiB).
    """
    archive = open_archive(path)
    statuses = []
    for r, status, computed in _checked(archive, threads or 0, progress):
        if status == "compressed":
            try:
                computed = zlib.crc32(_inflate(archive, r, check_crc=False))
                status = _native.judge_crc(r, computed)
            except RecordError:
                status = "invalid"
        statuses.append(
            RecordStatus(r.name, r.size, r.crc32, computed, status, r.data_offset, r.alignment)
        )
    name = path if isinstance(path, (str, os.PathLike)) else "<file object>"
    return VerifyReport(os.fspath(name) if not isinstance(name, str) else name, archive.prefix, statuses,
                        _native.crc32_implementation())
