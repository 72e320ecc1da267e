"""What a file is, and what a sharded checkpoint's index says: one rule for every surface.

Torch-free and numpy-free: the loader, the torch-free reader, the converter, the distributed
loader, ``inspect``/``verify`` and the CLI all ask here.

- :func:`sniff` tells a file's kind (:class:`Kind`) from its first bytes and, for a zip, its
  records (:func:`is_torchscript`: a TorchScript archive or a ``torch.save`` checkpoint).
- :func:`find_index` finds a sharded checkpoint's ``*.index.json``; :func:`read_index` reads it
  strictly (size-capped before reading, strict UTF-8 and JSON, shard names confined to the index's
  folder) and :func:`check_shard_keys` is the one rule for what a shard must hold.
"""

from __future__ import annotations

import enum
import json
import os
import pathlib
import re
import stat

from fastckpt import _native
from fastckpt.errors import FormatError, LimitError

# torch.serialization.MAGIC_NUMBER, which a legacy torch.save stream pickles first.
TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocols 2+: PROTO n, then LONG1 of the magic number (after a FRAME from protocol 4 on).
_LEGACY_MAGIC = b"\x8a\x0a" + TORCH_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_MAGIC_TEXT = b"L%dL\n" % TORCH_MAGIC_NUMBER  # pickle protocols 0 and 1
# safetensors refuses headers over 100 MB; a larger declared header is not one.
MAX_SAFETENSORS_HEADER = 100_000_000
# A sharded checkpoint's index is read whole, under this cap (checked before reading).
MAX_INDEX_BYTES = 64 << 20
SNIFF_BYTES = 64 << 10
# JSON nested deeper than this is refused before json.loads sees it (an index nests 3 deep).
_MAX_INDEX_DEPTH = 64


class Kind(enum.Enum):
    ZIP = "zip"  # a zip archive: a torch.save checkpoint unless is_torchscript(its records)
    TORCHSCRIPT = "torchscript"  # a zip with TorchScript's records (torch.jit.save)
    LEGACY = "legacy"  # torch.save's pickle stream from before torch 1.6 (_use_new_zipfile_serialization=False)
    TAR = "tar"  # torch.save's tar format (torch < 0.4)
    SAFETENSORS = "safetensors"
    EMPTY = "empty"  # 0 bytes
    UNKNOWN = "unknown"  # not a checkpoint

    @property
    def torch_reads(self) -> bool:
        """Formats torch.load reads that fastckpt hands to it rather than reading natively."""
        return self in (Kind.LEGACY, Kind.TAR, Kind.TORCHSCRIPT)


def _is_path(f) -> bool:
    return isinstance(f, (str, bytes, os.PathLike))


def head_of(f, nbytes: int = SNIFF_BYTES) -> tuple[bytes, int]:
    """Up to `nbytes` from the start (paths) or the current position (file objects, which are left
    there), and the size from there. OSError for a missing or unreadable path."""
    if _is_path(f):
        with open(f, "rb") as fh:
            return fh.read(nbytes), os.fstat(fh.fileno()).st_size
    start = f.tell()
    head = f.read(nbytes)
    f.seek(0, os.SEEK_END)
    size = f.tell() - start
    f.seek(start)
    return head, size


def kind_of_head(head: bytes, size: int) -> Kind:
    """The kind of a file whose first bytes are `head` and whose size is `size`."""
    if head.startswith(ZIP_MAGIC):
        return Kind.ZIP
    if _is_legacy_pickle(head):
        return Kind.LEGACY
    if head[257:262] == b"ustar":  # POSIX and GNU tar headers, as tarfile writes torch's
        return Kind.TAR
    if size == 0:
        return Kind.EMPTY
    if len(head) >= 9 and head[8:9] == b"{":
        declared = int.from_bytes(head[:8], "little")
        if declared <= min(size - 8, MAX_SAFETENSORS_HEADER):
            return Kind.SAFETENSORS
    return Kind.UNKNOWN


def _is_legacy_pickle(head: bytes) -> bool:
    if head.startswith(_LEGACY_MAGIC_TEXT):
        return True
    if len(head) < 2 or head[0] != 0x80:  # PROTO
        return False
    body = head[2:]
    if body[:1] == b"\x95":  # FRAME (protocol 4+) and its 8-byte length
        body = body[9:]
    return body.startswith(_LEGACY_MAGIC)


def sniff(f, *, records: bool = True) -> Kind:
    """The kind of the file at path `f` (or of file object `f` from its current position).

    A zip at a path is opened (strictly: a damaged zip raises its CheckpointError) to tell
    :attr:`Kind.TORCHSCRIPT` from :attr:`Kind.ZIP`; with ``records=False``, or for a file object,
    only the first bytes are read and every zip is :attr:`Kind.ZIP` (callers that open the
    archive anyway then ask :func:`kind_of_archive`)."""
    kind = kind_of_head(*head_of(f))
    if kind is Kind.ZIP and records and _is_path(f):
        return kind_of_archive(_native.Archive.open(os.fspath(f)))
    return kind


def is_torchscript(names) -> bool:
    """Whether an archive with these record names (a list, or the archive itself) is a TorchScript
    archive (torch.jit.save), which torch.load hands to torch.jit.load."""
    return "constants.pkl" in names


def kind_of_archive(archive) -> Kind:
    """:attr:`Kind.TORCHSCRIPT` or :attr:`Kind.ZIP` for an opened archive."""
    return Kind.TORCHSCRIPT if is_torchscript(archive) else Kind.ZIP


def not_a_checkpoint(head: bytes, size: int, what: str = "the file") -> FormatError:
    """The error for a file of kind EMPTY or UNKNOWN: what its first bytes are, and what was expected."""
    if size == 0:
        return FormatError(f"{what} is empty (0 bytes): not a checkpoint")
    found = head.find(ZIP_MAGIC)
    hint = f"; a zip signature is at offset {found}, not at 0 (bytes in front of the archive?)" if found > 0 else ""
    return FormatError(
        f"not a checkpoint: {what} is {size} bytes starting {head[:16].hex(' ')}; expected a zip archive "
        f"(PK\\x03\\x04 at offset 0), a legacy torch.save pickle or a legacy tar archive{hint}"
    )


def safetensors_header(path) -> dict:
    """The JSON header of a file of kind SAFETENSORS (read under MAX_SAFETENSORS_HEADER); FormatError
    when it is not a JSON object."""
    with open(path, "rb") as f:
        declared = int.from_bytes(f.read(8), "little")
        if declared > MAX_SAFETENSORS_HEADER:
            raise LimitError(f"{path} declares a {declared}-byte safetensors header, over the "
                             f"{MAX_SAFETENSORS_HEADER}-byte cap")
        data = f.read(declared)
    try:
        header = json.loads(data)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    return header


# --------------------------------------------------------------------------- sharded checkpoints

INDEX_SUFFIX = ".index.json"
# A folder's safetensors index (model.safetensors.index.json) names safetensors shards, not torch's.
_SAFETENSORS_INDEX_SUFFIX = ".safetensors" + INDEX_SUFFIX


def find_index(path) -> pathlib.Path | None:
    """The ``*.index.json`` of the sharded checkpoint at `path`, or None when `path` is not one.

    `path` is an index file (returned as it is), a folder (its one torch index:
    ``*.index.json`` other than ``*.safetensors.index.json``; several are a FormatError), or
    anything else (None: a single checkpoint file, or a folder without an index).
    """
    p = pathlib.Path(os.fspath(path))
    if p.name.endswith(INDEX_SUFFIX) and not p.is_dir():
        return p
    if not p.is_dir():
        return None
    found = sorted(n for n in os.listdir(p) if n.endswith(INDEX_SUFFIX) and not n.endswith(_SAFETENSORS_INDEX_SUFFIX))
    if len(found) > 1:
        raise FormatError(f"{p} holds several index files ({', '.join(found[:4])}); pass the one to read")
    return p / found[0] if found else None


class ShardIndex:
    """A sharded checkpoint's index: which shard file (beside the index) holds each tensor."""

    def __init__(self, path: pathlib.Path, weight_map: dict[str, str], metadata):
        self.path = path
        self.folder = path.parent
        self.weight_map = weight_map
        self.metadata = metadata

    def shards(self) -> dict[str, list[str]]:
        """{shard file name: its keys in index order}, shards in name order (the order torch's
        readers merge them)."""
        by_shard: dict[str, list[str]] = {name: [] for name in sorted(set(self.weight_map.values()))}
        for key, shard in self.weight_map.items():
            by_shard[shard].append(key)
        return by_shard

    def shard_path(self, shard: str) -> pathlib.Path:
        """The path of shard file `shard` (a name from the weight map)."""
        return self.folder / shard

    def __repr__(self) -> str:
        return f"ShardIndex({str(self.path)!r}, {len(self.weight_map)} keys in {len(set(self.weight_map.values()))} shards)"


def read_index(path) -> ShardIndex:
    """Read and check the index file at `path` (see :func:`find_index` for folders).

    Refused with FormatError (naming the index file): not a regular file, invalid UTF-8 or JSON,
    JSON nested deeper than an index is, a key given twice, no ``weight_map`` object mapping
    names to shard file names, a shard name that is not a plain file name in the index's folder
    (absolute, ``.``/``..``, separators, NUL), ``metadata`` that is not an object. Over
    ``MAX_INDEX_BYTES``: LimitError, before anything is read. OSError for a missing file.
    """
    path = pathlib.Path(os.fspath(path))
    data = _read_capped(path)
    # Content is quoted in messages only when the index is a file of its own folder (not a
    # link to a file elsewhere, whose bytes are not the checkpoint's to show).
    quote = _quoting(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}): not an index") from None
    depth = _nesting(text)
    if depth > _MAX_INDEX_DEPTH:
        raise FormatError(f"{path} nests JSON {depth} levels deep (an index nests 3): not an index")
    try:
        index = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{path} gives the key {quote(e.key)} twice in one object: ambiguous, not read") from None
    except (ValueError, RecursionError) as e:
        where = f": line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise FormatError(f"{path} is not valid JSON ({reason}{where}): not an index") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise FormatError(f"{path} is not an index: expected a JSON object with a 'weight_map' object")
    weight_map = index["weight_map"]
    for i, (key, shard) in enumerate(weight_map.items()):
        if not isinstance(shard, str):
            raise FormatError(f"{path}: 'weight_map' entry {i} ({quote(key)}) maps to a value of type {type(shard).__name__}, "
                              "not a shard file name")
        if not _is_plain_name(shard):
            raise FormatError(f"{path}: 'weight_map' entry {i} ({quote(key)}) names shard {quote(shard)}, which is "
                              "not a file name in the index's folder (absolute, '..' or a path separator)")
    metadata = index.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise FormatError(f"{path}: 'metadata' is of type {type(metadata).__name__}, not an object")
    return ShardIndex(path, weight_map, metadata)


def check_shard_keys(index: ShardIndex, shard: str, keys) -> None:
    """The one consistency rule for a shard: it holds exactly the keys the index maps to it.

    FormatError (naming the shard and up to 3 keys) when shard `shard` (a file name of the
    index) holds a key the index maps to another shard or does not name, or misses a key the
    index maps to it. `keys`: the shard's top-level state-dict keys.
    """
    held = list(keys)
    held_set = set(held)
    problems = []
    for key in held:
        owner = index.weight_map.get(key) if isinstance(key, str) else None
        if owner is None:
            problems.append(f"holds {key!r}, which the index does not name")
        elif owner != shard:
            problems.append(f"holds {key!r}, which the index maps to {owner}")
    problems += [f"lacks {k!r}, which the index maps to it" for k, s in index.weight_map.items()
                 if s == shard and k not in held_set]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FormatError(f"shard {index.shard_path(shard)} does not match its index {index.path.name}: "
                          f"{'; '.join(problems[:3])}{more}")


def check_shard(index: ShardIndex, shard: str, obj) -> None:
    """What a shard's unpickled (or read) object must be: a state dict (a dict) whose keys pass
    :func:`check_shard_keys`."""
    if not isinstance(obj, dict):
        raise FormatError(f"shard {index.shard_path(shard)} holds a {type(obj).__name__}, not a state dict")
    check_shard_keys(index, shard, obj.keys())


def _read_capped(path: pathlib.Path) -> bytes:
    # O_NONBLOCK: a FIFO planted under the index's name must not block the open.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path} is not a regular file: not an index")
        if st.st_size > MAX_INDEX_BYTES:
            raise LimitError(f"{path} is {st.st_size} bytes, over the {MAX_INDEX_BYTES}-byte cap for an index")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)  # bounded even if the file grew since fstat
    finally:
        os.close(fd)
    if len(data) > MAX_INDEX_BYTES:
        raise LimitError(f"{path} grew over the {MAX_INDEX_BYTES}-byte cap for an index while being read")
    return data


def _quoting(path: pathlib.Path):
    try:
        inside = path.resolve().parent == path.absolute().parent.resolve()
    except OSError:
        inside = False

    def quote(value) -> str:
        if not inside:
            return "(not quoted: the index links outside its folder)"
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    return quote


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings not counted); stops
    counting past _MAX_INDEX_DEPTH."""
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > _MAX_INDEX_DEPTH:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _is_plain_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and os.path.basename(name) == name and not os.path.isabs(name))
