"""`fastckpt inspect` and get_unsafe_globals_in_checkpoint: look inside a checkpoint without running it."""

from __future__ import annotations

import os
import pickletools

from fastckpt.archive import open_archive, read_record

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def python3_name(module: str, name: str) -> tuple[str, str]:
    """A Python 2 global's Python 3 (module, name), as pickle's fix_imports maps it."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def globals_in_pickle(data: bytes) -> list[str]:
    """Every "module.name" a pickle's GLOBAL / STACK_GLOBAL opcodes name, in first-seen order.

    STACK_GLOBAL operands are followed through the memo where they are plain
    strings; anything else is reported as "<dynamic>" rather than guessed.
    """
    found: dict[str, None] = {}
    recent: list = []  # the strings most recently pushed, for STACK_GLOBAL
    memo: dict[int, object] = {}
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, qualname = arg.split(" ", 1)
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and all(isinstance(x, str) for x in recent[-2:]):
                module, qualname = recent[-2], recent[-1]
            else:
                module, qualname = "<dynamic>", "<dynamic>"
        else:
            if name in _STRING_OPS:
                recent.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(arg))
            elif name not in ("FRAME", "PROTO"):
                recent.append(None)
            continue
        module, qualname = python3_name(module, qualname)
        found[f"{module}.{qualname}"] = None
        recent.append(None)
    return list(found)


def get_unsafe_globals_in_checkpoint(f) -> list[str]:
    """Like torch.serialization.get_unsafe_globals_in_checkpoint: the globals weights_only would refuse."""
    from torch import _weights_only_unpickler as wo

    archive = _archive_or_value_error(f)
    allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    return [g for g in globals_in_pickle(read_record(archive, "data.pkl")) if g not in allowed]


def _archive_or_value_error(f):
    from fastckpt.errors import FormatError

    try:
        archive = open_archive(f)
    except FormatError:
        raise ValueError("Expected input to be a checkpoint returned by torch.save") from None
    if "constants.pkl" in archive:
        raise ValueError("Expected input to be a checkpoint returned by torch.save but got a torchscript checkpoint")
    return archive


# What `torch.save(..., _use_new_zipfile_serialization=False)` starts with: protocol 2, LONG1 of torch's magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def identify(path) -> tuple[str, str]:
    """(kind, what to say about it) for any path: "checkpoint", "sharded", "torchscript", "legacy", "tar",
    "safetensors", "truncated" or "unknown". Only reads headers; raises OSError for a missing file."""
    import json
    import tarfile

    from fastckpt.errors import CheckpointError
    from fastckpt.reader import find_index

    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(".index.json"):
        index = find_index(path)
        if index is None:
            return "unknown", f"{path}: a folder with no *.index.json of a sharded torch checkpoint"
        return "sharded", f"{index}: a sharded torch checkpoint"
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        try:
            archive = open_archive(path)
        except CheckpointError as e:
            return "truncated", f"{path}: a zip archive fastckpt cannot read, truncated or damaged ({type(e).__name__}: {e})"
        if "constants.pkl" in archive:
            return "torchscript", (f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
                                   "load it with torch.jit.load (`fastckpt verify` checks its CRC-32s)")
        return "checkpoint", f"{path}: a torch.save checkpoint"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy", (f"{path}: a legacy (non-zip, before torch 1.6) torch.save file; fastckpt.load hands it to "
                          "torch.load, but it has no records or CRC-32s to inspect or verify: re-save it with "
                          "torch.save to get a zip checkpoint")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        with open(path, "rb") as f:
            f.seek(8)
            try:
                header = json.loads(f.read(int.from_bytes(head[:8], "little")))
                count = len([k for k in header if k != "__metadata__"])
            except ValueError:
                count = None
        if count is not None:
            return "safetensors", (f"{path}: a safetensors file ({count} tensors), not a torch checkpoint; "
                                   "read it with safetensors.safe_open (it has no CRC-32s to verify)")
    if tarfile.is_tarfile(path):
        return "tar", f"{path}: a tar-format torch.save file (torch < 0.4); only torch.load reads it"
    if size == 0:
        return "unknown", f"{path}: an empty file"
    return "unknown", f"{path}: not a torch checkpoint (no zip, legacy or safetensors header)"


def _leaf_text(obj) -> str | None:
    """One-line text of a tensor descriptor or placeholder; None for containers."""
    from fastckpt._descriptors import Placeholder, TensorInfo, Unsupported

    if type(obj) is TensorInfo:
        kind = "parameter" if obj.parameter else "tensor"
        return (f"{kind} {obj.dtype}{list(obj.shape)} stride={obj.strides} storage_offset={obj.offset}"
                f" storage={obj.storage.key} storage_bytes={obj.storage.nbytes}")
    if type(obj) is Unsupported:
        return f"{obj.kind} tensor ({obj.name})"
    if type(obj) is Placeholder and not isinstance(obj.state, dict):
        return f"{obj!r}  (not run)"
    return None


def _append_tree_lines(obj, label: str, indent: str, lines: list[str], max_items: int) -> None:
    """Appends `label` + obj to lines: containers as nested blocks, leaves on one line."""
    leaf = _leaf_text(obj)
    if leaf is not None:
        lines.append(f"{indent}{label}{leaf}")
        return
    from fastckpt._descriptors import Placeholder

    if type(obj) is Placeholder and isinstance(obj.state, dict):  # an object's attributes, e.g. argparse.Namespace
        lines.append(f"{indent}{label}<{obj.name}>  (not run: its attributes as stored)")
        for key, value in list(obj.state.items())[:max_items]:
            _append_tree_lines(value, f"{key}=", indent + "  ", lines, max_items)
        return
    if isinstance(obj, dict):
        items = [(f"{k!r}: ", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple, set)):
        items = [("", v) for v in obj]
    else:
        text = repr(obj)
        lines.append(f"{indent}{label}{text if len(text) <= 120 else text[:117] + '...'}")
        return
    lines.append(f"{indent}{label}{type(obj).__name__} ({len(items)} items)")
    for key, value in items[:max_items]:
        _append_tree_lines(value, key, indent + "  ", lines, max_items)
    if len(items) > max_items:
        lines.append(f"{indent}  ... {len(items) - max_items} more")


def read_tree(path, placeholders: bool = True):
    """(archive, object tree) of a torch.save checkpoint, with descriptors for tensors; no torch, nothing run."""
    archive = _archive_or_value_error(path)
    return archive, tree_of(archive, placeholders)


def tree_of(archive, placeholders: bool = True):
    """The object tree of an opened archive, tensors as descriptors (see read_tree)."""
    from fastckpt import _descriptors, _native
    from fastckpt.archive import check_version, read_data_pickle

    check_version(archive)
    return _native.read_tree(read_data_pickle(archive), _descriptors, archive, placeholders)


def tensors_by_record(tree) -> dict[str, list[str]]:
    """{"data/<key>": [tensor names]} for the tensors of a tree (fastckpt.open's names)."""
    from fastckpt._descriptors import TensorInfo
    from fastckpt.reader import flatten

    out: dict[str, list[str]] = {}
    for name, t in flatten(tree, lambda x: type(x) is TensorInfo).items():
        out.setdefault(t.storage.record, []).append(name)
    return out


def _allowlist_marks(pickle_globals: list[str]) -> dict[str, bool]:
    """{global: allowed by torch's weights_only}; empty without torch."""
    try:
        from torch import _weights_only_unpickler as wo
    except ImportError:
        return {}
    allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    return {g: g in allowed for g in pickle_globals}


def inspect_report(path, max_items: int = 200) -> dict:
    """Records, globals, the object tree (tensors with dtype, shape, storage, bytes) and totals, as a dict.

    Nothing in the file is executed and torch is not needed: the tree is read
    by the torch-free reader, objects of other globals shown as placeholders.
    """
    from fastckpt._descriptors import TensorInfo, Unsupported
    from fastckpt.reader import flatten

    archive, tree = read_tree(path)
    records = archive.records()
    data = [r for r in records if r.name.startswith("data/")]
    pickle_globals = globals_in_pickle(read_record(archive, "data.pkl"))
    marks = _allowlist_marks(pickle_globals)
    lines: list[str] = []
    _append_tree_lines(tree, "", "  ", lines, max_items)
    tensors = flatten(tree, lambda x: type(x) in (TensorInfo, Unsupported))
    return {
        "path": os.fspath(path), "prefix": archive.prefix, "size": archive.size, "records": len(records),
        "storages": len(data), "storage_bytes": sum(r.size for r in data),
        "min_alignment": min((r.alignment for r in data), default=0),
        "globals": [{"name": g, "weights_only": marks.get(g)} for g in pickle_globals],
        "tensors": len(tensors), "tensor_bytes": sum(t.nbytes for t in tensors.values() if type(t) is TensorInfo),
        "tree": lines,
    }


def inspect_checkpoint(path, max_items: int = 200) -> str:
    """`fastckpt inspect`'s text report (see inspect_report)."""
    r = inspect_report(path, max_items)
    lines = [f"{r['path']}: {r['records']} records, prefix '{r['prefix']}/', {r['size']:,d} bytes",
             f"storages: {r['storages']} records, {r['storage_bytes']:,d} bytes, "
             f"data aligned to {r['min_alignment']} bytes or better", "globals:"]
    lines += [f"  {g['name']}{'  (not allowed by weights_only)' if g['weights_only'] is False else ''}"
              for g in r["globals"]]
    lines += ["objects:", *r["tree"]]
    lines.append(f"totals: {r['tensors']} tensors ({r['tensor_bytes']:,d} bytes of elements), {r['storages']} storages, "
                 f"{r['storage_bytes']:,d} bytes of tensor data")
    return "\n".join(lines)
