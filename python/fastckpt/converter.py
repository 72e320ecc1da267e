"""fastckpt.convert: a torch checkpoint (or a sharded one) to safetensors, streaming, without torch.

The safetensors format is written here: an 8-byte little-endian header length,
a JSON header (``__metadata__`` = ``{"format": "pt"}``, then per tensor its
dtype, shape and ``data_offsets``), then the tensors' bytes, contiguous and
little-endian. Contiguous tensors are copied with ``pread`` in bounded chunks,
each storage record's CRC-32 checked on the way; others are made contiguous
from their storage read into memory, in bounded blocks. Memory is bounded by the
largest strided storage and the chunk size, never by the checkpoint. No numpy
dtype is needed (bfloat16 and float8 convert without ml_dtypes).

Every byte is read through the descriptor the source was indexed from. Outputs
are published atomically (:mod:`fastckpt._atomic`); a sharded output is a new
set of shard files, named with a token of this convert, made visible by
replacing its index last, after which the shards only the old index named are
removed: readers see the old set or the new one, never a mix.
"""

from __future__ import annotations

import errno
import json
import os
import re

from fastckpt import _atomic, _formats, _native
from fastckpt._descriptors import DTYPES, Unsupported
from fastckpt._options import resolve_verify
from fastckpt.archive import check_storage_crc
from fastckpt.errors import CheckpointError, LimitError
from fastckpt.reader import CheckpointReader
from fastckpt.reader import open as open_checkpoint

CHUNK_BYTES = 64 << 20
# Without allow_expansion, the tensors written may hold at most this many times the source's bytes (plus
# EXPANSION_SLACK): tied weights and views of one storage legitimately repeat bytes, a stride-0 view of a
# tiny storage declaring terabytes does not.
EXPANSION_FACTOR = 4
EXPANSION_SLACK = 16 << 20
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """Bytes from 5000000, "5GB", "500MiB" (as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB or 500MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])


class _Job:
    """One tensor to write: its source reader, descriptor, element size and byte count."""

    def __init__(self, key, reader: CheckpointReader):
        self.key, self.reader, self.source = key, reader, reader.source
        self.info = reader.descriptor(key)
        if type(self.info) is Unsupported:
            raise CheckpointError(f"tensor '{key}' is a {self.info.kind} tensor; safetensors cannot store it")
        if self.info.dtype not in _SAFETENSORS_DTYPES or (self.info.metadata or {}):
            what = f"dtype torch.{self.info.dtype}" if not self.info.metadata else "conj/neg metadata"
            raise CheckpointError(f"tensor '{key}' has {what}, which this converter cannot write to safetensors")
        self.itemsize = DTYPES[self.info.dtype][0]
        # The unit a big-endian file's bytes are swapped in: a complex number is two floats.
        self.swap = (self.itemsize // 2 if self.info.dtype.startswith("complex") else self.itemsize) \
            if reader.big_endian else 1
        self.nbytes = self.info.nbytes

    def contiguous(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.info.shape, self.info.strides))):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def convert(src, dst, *, max_shard_size=None, drop_non_tensors: bool = False, progress=None,
            allow_expansion: bool = False, verify=None) -> list[str]:
    """Write the tensors of checkpoint `src` (a file, a sharded index or its folder) to safetensors `dst`.

    Keys are fastckpt.open's (state-dict keys, dotted paths for nested
    checkpoints). With `max_shard_size` (bytes or "5GB") and more data than
    that, `dst` ("model.safetensors") becomes shards
    "model-00001-of-0000N-<token>.safetensors" (the token is new on every
    convert) and "model.safetensors.index.json" next to it, replaced last; `dst`
    may also be a folder. Non-tensor values are refused unless `drop_non_tensors`.
    Expanded (stride-0) views are written whole; output over
    ``EXPANSION_FACTOR`` times the source's bytes is refused (LimitError naming
    the tensor) unless `allow_expansion`. A `dst` that is the source (or one of
    its shards) is refused. `progress(nbytes)` is called as bytes are written.
    ``verify`` (default: FASTCKPT_VERIFY, else True): check each storage's CRC-32.
    Returns the paths written.
    """
    dst = os.fspath(dst)
    if os.path.isdir(dst) or dst.endswith(os.sep):
        dst = os.path.join(dst, "model.safetensors")
    folder = os.path.dirname(dst)
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "the destination folder does not exist", folder)
    check_crc = resolve_verify(verify)
    with open_checkpoint(src) as reader:
        if isinstance(reader, CheckpointReader):
            extra = reader.metadata()
            if extra and not drop_non_tensors:
                names = ", ".join(repr(k) for k in list(extra)[:5]) if isinstance(extra, dict) else type(extra).__name__
                raise CheckpointError(
                    f"{src} holds values that are not tensors ({names}); safetensors stores tensors only. "
                    "Pass drop_non_tensors=True (--drop-non-tensors) to leave them out."
                )
            jobs = [_Job(k, reader) for k in reader.keys()]
            sources = [reader.source.stat]
        else:
            jobs = [_Job(k, reader.shard_reader(k)) for k in reader.keys()]
            sources = [os.stat(reader.path)] + list({id(j.source): j.source.stat for j in jobs}.values())
        if not allow_expansion:
            _check_expansion(jobs, sum(st.st_size for st in sources))
        protected = {(st.st_dev, st.st_ino) for st in sources}
        shards = _split_into_shards(jobs, None if max_shard_size is None else parse_size(max_shard_size))
        if len(shards) == 1:
            _refuse_source(dst, protected)
            _write_file(dst, shards[0], progress, check_crc)
            return [dst]
        return _write_set(dst, shards, progress, protected, check_crc)


def _check_expansion(jobs: list[_Job], source_bytes: int) -> None:
    total = sum(j.nbytes for j in jobs)
    if total <= EXPANSION_FACTOR * source_bytes + EXPANSION_SLACK:
        return
    worst = max(jobs, key=lambda j: j.nbytes / max(j.info.storage.nbytes, 1))
    raise LimitError(
        f"the tensors would take {total} bytes as safetensors, over {EXPANSION_FACTOR}x the {source_bytes} bytes "
        f"of the checkpoint: tensor '{worst.key}' (shape {list(worst.info.shape)}, strides "
        f"{list(worst.info.strides)}) is {worst.nbytes} bytes over a {worst.info.storage.nbytes}-byte storage "
        "(an expanded view). Pass allow_expansion=True (--allow-expansion) to write it anyway."
    )


def _refuse_source(path: str, protected: set) -> None:
    """Refuses to replace a file that is the source (or one of its shards) under another name."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) in protected:
        raise ValueError(f"the destination {path} is the source checkpoint (or one of its files); "
                         "convert into another file")


def _split_into_shards(jobs: list[_Job], max_bytes: int | None) -> list[list[_Job]]:
    """The jobs in consecutive groups (one safetensors file each) of at most `max_bytes` (or one job)."""
    shards: list[list[_Job]] = [[]]
    size = 0
    for job in jobs:
        if max_bytes is not None and shards[-1] and size + job.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


def _header(jobs: list[_Job]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.key] = {"dtype": _SAFETENSORS_DTYPES[job.info.dtype], "shape": list(job.info.shape),
                           "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it


# --------------------------------------------------------------------------- a sharded output


def _shard_pattern(stem: str):
    return re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}-(?P<token>[0-9a-f]{12})\.safetensors")


def _index_names(index_path: str) -> set[str] | None:
    """The shard names an existing output index maps to; None when it cannot be read (then nothing is
    removed on its account)."""
    try:
        return set(_formats.read_index(index_path).weight_map.values())
    except FileNotFoundError:
        return set()
    except (OSError, CheckpointError):
        return None


def _remove_shards(folder: str, names, protected: set) -> None:
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) not in protected:
                os.unlink(path)
        except FileNotFoundError:
            pass


def _remove_leftovers(folder: str, stem: str, index_path: str, protected: set) -> None:
    """Removes what killed converts to this destination left: their temporaries, and their shards that
    no index names. A shard whose convert may still run (its claim, the index temporary carrying its
    token, is live) is kept. Listed before the claims, which are looked at before the index is read:
    a live convert makes its claim before its shards and replaces the index before dropping its claim."""
    pattern = _shard_pattern(stem)
    shards = [(n, m["token"]) for n in os.listdir(folder or ".") if (m := pattern.fullmatch(n))]
    _atomic.remove_stale(folder)
    live = _atomic.live_tokens(folder)
    current = _index_names(index_path)
    if current is not None:
        _remove_shards(folder, [n for n, token in shards if token not in live and n not in current], protected)


def _write_set(dst: str, shards: list[list[_Job]], progress, protected: set, check_crc: bool) -> list[str]:
    folder = os.path.dirname(dst)
    stem = os.path.basename(dst.removesuffix(".safetensors"))
    index_path = os.path.join(folder, stem + ".safetensors.index.json")
    _refuse_source(index_path, protected)
    if os.path.exists(index_path):
        _atomic.check_replaceable(index_path)
    _remove_leftovers(folder, stem, index_path, protected)
    written: list[str] = []
    with _atomic.Temporary(index_path) as claim:  # held (locked) until the index is replaced
        try:
            names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}-{claim.token}.safetensors" for i in range(len(shards))]
            for name, shard in zip(names, shards):
                path = os.path.join(folder, name)
                _write_file(path, shard, progress, check_crc)
                written.append(path)
            index = {
                "metadata": {"total_size": sum(j.nbytes for shard in shards for j in shard)},
                "weight_map": {j.key: name for name, shard in zip(names, shards) for j in shard},
            }
            with open(claim.fd, "wb", closefd=False) as f:
                f.write(json.dumps(index, indent=2).encode())
            old = _index_names(index_path)  # read just before it is replaced
            claim.publish(fsync=True)
        except BaseException:
            _remove_shards(folder, [os.path.basename(p) for p in written], set())
            raise
    if old:
        _remove_shards(folder, [n for n in old - set(names) if _shard_pattern(stem).fullmatch(n)], protected)
    return written + [index_path]


# --------------------------------------------------------------------------- one safetensors file


def _write_file(path: str, jobs: list[_Job], progress, check_crc: bool) -> None:
    header = _header(jobs)
    # (source, record) whose CRC-32 was checked, or None when none is to be.
    checked: set[tuple[int, str]] | None = set() if check_crc else None
    # At least 16 bytes: a chunk holds whole swap units (8 at most).
    chunk = bytearray(max(min(CHUNK_BYTES, max((j.nbytes for j in jobs), default=0)), 16))

    def write(fd: int) -> None:
        with open(fd, "wb", closefd=False) as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for job in jobs:
                _write_tensor(out, job, chunk, checked, progress)

    _atomic.write_file(path, True, True, write)


def _write_tensor(out, job: _Job, chunk: bytearray, checked: set | None, progress) -> None:
    storage = job.info.storage
    record = (id(job.source), storage.record)
    to_check = checked is not None and record not in checked
    start = storage.data_offset + job.info.offset * job.itemsize
    whole = job.info.offset == 0 and job.nbytes == storage.nbytes
    if job.contiguous():
        crc = _copy(out, job, start, job.nbytes, chunk, progress)
        if to_check and whole:
            _check(job, crc)
            checked.add(record)
        elif to_check:
            _check(job, _copy(None, job, storage.data_offset, storage.nbytes, chunk, None))
            checked.add(record)
        return
    # Strided: the storage in memory, then its elements in blocks, contiguous and little-endian.
    import numpy as np

    data = bytearray(storage.nbytes)
    job.source.read_into(data, storage.data_offset)
    if to_check:
        _check(job, _native.crc32(data))
        checked.add(record)
    if not job.nbytes:
        return
    item = job.itemsize
    array = np.ndarray(job.info.shape, f"V{item}", buffer=data, offset=job.info.offset * item,
                       strides=[s * item for s in job.info.strides])
    for block in _blocks(array):
        out.write(_little_endian(np.ascontiguousarray(block).view(np.uint8).reshape(-1), job.swap))
        if progress:
            progress(block.nbytes)


def _blocks(array):
    """`array` in C order as sub-arrays of at most ~CHUNK_BYTES each (a row over that is split further)."""
    if array.ndim == 0 or array.nbytes <= CHUNK_BYTES:
        yield array
        return
    row = array[0].nbytes
    step = max(1, CHUNK_BYTES // max(row, 1))
    for i in range(0, array.shape[0], step):
        if step == 1 and row > CHUNK_BYTES:
            yield from _blocks(array[i])
        else:
            yield array[i:i + step]


def _little_endian(data, swap: int):
    """`data` (uint8, a whole number of elements) with each `swap`-byte unit reversed (swap > 1)."""
    if swap == 1:
        return data
    import numpy as np

    return np.frombuffer(data, f"u{swap}").byteswap().view(np.uint8)


def _copy(out, job: _Job, offset: int, nbytes: int, chunk: bytearray, progress) -> int:
    """Copies [offset, +nbytes) of the job's source to `out` (or only reads it with out=None), swapped to
    little-endian; returns the CRC-32 of the bytes as stored."""
    view = memoryview(chunk)
    step = len(view) - len(view) % job.swap
    crc = 0
    done = 0
    while done < nbytes:
        n = min(step, nbytes - done)
        job.source.read_into(view[:n], offset + done)
        crc = _native.crc32(view[:n], crc)
        if out is not None:
            out.write(_little_endian(view[:n], job.swap) if job.swap > 1 else view[:n])
            if progress:
                progress(n)
        done += n
    return crc


def _check(job: _Job, computed: int) -> None:
    check_storage_crc(job.source.archive, job.info.storage.record, computed, job.key)
