"""`fastckpt inspect` and get_unsafe_globals_in_checkpoint: look inside a checkpoint without running it."""

from __future__ import annotations

import os

from fastckpt import _formats, _graph
from fastckpt._descriptors import Placeholder, TensorInfo, Unsupported
from fastckpt._formats import Kind
from fastckpt._graph import leaves
from fastckpt._pickles import WEIGHTS_ONLY_DEFAULTS, globals_in_pickle
from fastckpt._tree import is_descriptor, tree_of
from fastckpt.archive import open_archive, read_record
from fastckpt.errors import CheckpointError, FormatError


def get_unsafe_globals_in_checkpoint(f) -> list[str]:
    """Like torch.serialization.get_unsafe_globals_in_checkpoint: the globals weights_only would refuse."""
    from torch import _weights_only_unpickler as wo

    archive = _archive_or_value_error(f)
    allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    return [g for g in globals_in_pickle(read_record(archive, "data.pkl")) if g not in allowed]


def _archive_or_value_error(f):
    try:
        archive = open_archive(f)
    except FormatError:
        raise ValueError("Expected input to be a checkpoint returned by torch.save") from None
    if _formats.is_torchscript(archive):
        raise ValueError("Expected input to be a checkpoint returned by torch.save but got a torchscript checkpoint")
    return archive


def identify(path) -> tuple[str, str]:
    """(kind, what to say about it) for any path: "checkpoint", "sharded", "torchscript", "legacy", "tar",
    "safetensors", "truncated" or "unknown". Only reads headers; raises OSError for a missing file."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(_formats.INDEX_SUFFIX):
        index = _formats.find_index(path)
        if index is None:
            return "unknown", f"{path}: a folder with no *.index.json of a sharded torch checkpoint"
        return "sharded", f"{index}: a sharded torch checkpoint"
    head, size = _formats.head_of(path)
    kind = _formats.kind_of_head(head, size)
    if kind is Kind.ZIP:
        try:
            archive = open_archive(path)
        except CheckpointError as e:
            return "truncated", f"{path}: a zip archive fastckpt cannot read, truncated or damaged ({type(e).__name__}: {e})"
        if _formats.is_torchscript(archive):
            return "torchscript", (f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
                                   "load it with torch.jit.load (`fastckpt verify` checks its CRC-32s)")
        return "checkpoint", f"{path}: a torch.save checkpoint"
    if kind is Kind.LEGACY:
        return "legacy", (f"{path}: a legacy (non-zip, before torch 1.6) torch.save file; fastckpt.load hands it to "
                          "torch.load, but it has no records or CRC-32s to inspect or verify: re-save it with "
                          "torch.save to get a zip checkpoint")
    if kind is Kind.SAFETENSORS:
        try:
            count = f"{len([k for k in _formats.safetensors_header(path) if k != '__metadata__'])} tensors"
        except CheckpointError:
            count = "its header is not valid JSON"
        return "safetensors", (f"{path}: a safetensors file ({count}), not a torch checkpoint; read it with "
                               "safetensors.safe_open (it has no CRC-32s to verify)")
    if kind is Kind.TAR:
        return "tar", f"{path}: a tar-format torch.save file (torch < 0.4); only torch.load reads it"
    if kind is Kind.EMPTY:
        return "unknown", f"{path}: an empty file"
    return "unknown", f"{path}: not a torch checkpoint (no zip, legacy or safetensors header)"


def _leaf_text(obj) -> str | None:
    """One-line text of a tensor descriptor or placeholder; None for containers."""
    if type(obj) is TensorInfo:
        kind = "parameter" if obj.parameter else "tensor"
        return (f"{kind} {obj.dtype}{list(obj.shape)} stride={obj.strides} storage_offset={obj.offset}"
                f" storage={obj.storage.key} storage_bytes={obj.storage.nbytes}")
    if type(obj) is Unsupported:
        return f"{obj.kind} tensor ({obj.name})"
    if type(obj) is Placeholder and not isinstance(obj.state, dict):
        return f"{obj!r}  (not run)"
    return None


_MAX_TREE_ENTRIES = 100_000  # lines of the object tree, whatever the file holds
_MAX_INDENT = 32  # deeper levels say their depth instead of indenting further


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def _tree_children(obj):
    """The entries `inspect` shows under obj (key text, value); None for a one-line leaf."""
    if _leaf_text(obj) is not None:
        return None
    if type(obj) is Placeholder and isinstance(obj.state, dict):  # an object's attributes, e.g. argparse.Namespace
        return [(_short(str(k)), v) for k, v in obj.state.items()]
    if isinstance(obj, dict):
        return [(_short(repr(k)), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(str(i), v) for i, v in enumerate(obj)]
    return None


def describe_tree(tree, max_items: int) -> list[str]:
    """The object tree as indented lines: containers as blocks (each shown once: a container met again
    names where it was shown), leaves on one line, at most `max_items` entries per container."""
    lines: list[str] = []
    for event in _graph.walk(tree, _tree_children, max_items=max_items, max_entries=_MAX_TREE_ENTRIES):
        node = event.node
        indent = "  " * (node.depth + 1) if node.depth < _MAX_INDENT else f"{'  ' * _MAX_INDENT}[depth {node.depth}] "
        parent = node.parent.obj if node.parent is not None else None
        label = ("" if parent is None or isinstance(parent, (list, tuple, set, frozenset))
                 else f"{node.key}: " if isinstance(parent, dict) else f"{node.key}=")
        obj = node.obj
        if event.kind == _graph.CONTAINER:
            if type(obj) is Placeholder:
                lines.append(f"{indent}{label}<{obj.name}>  (not run: its attributes as stored)")
            else:
                lines.append(f"{indent}{label}{type(obj).__name__} ({event.size} items)")
        elif event.kind == _graph.SEEN:
            where = event.first.path() or "the top-level object"
            lines.append(f"{indent}{label}{type(obj).__name__}: the same object as {_short(where)} (shown there)")
        elif event.kind == _graph.MORE:
            lines.append(f"{indent}  ... {event.size} more")
        elif event.kind == _graph.TRUNCATED:
            lines.append(f"  ... the tree is cut here: more than {_MAX_TREE_ENTRIES:,d} entries")
        else:
            leaf = _leaf_text(obj)
            lines.append(f"{indent}{label}{leaf if leaf is not None else _short(repr(obj))}")
    return lines


def read_tree(path, placeholders: bool = True):
    """(archive, object tree) of a torch.save checkpoint, with descriptors for tensors; no torch, nothing run."""
    archive = _archive_or_value_error(path)
    return archive, tree_of(archive, placeholders)


def _allowlist_marks(pickle_globals: list[str]) -> dict[str, bool]:
    """{global: allowed by torch's weights_only}, leaving out globals that cannot be judged without
    torch when it is not installed. torch is imported only for a global outside its default
    allowlist's stable part (the answer then depends on torch's version and safe globals)."""
    marks = {g: True for g in pickle_globals if g in WEIGHTS_ONLY_DEFAULTS}
    others = [g for g in pickle_globals if g not in marks]
    if others:
        try:
            from torch import _weights_only_unpickler as wo
        except ImportError:
            return marks
        allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
        marks.update((g, g in allowed) for g in others)
    return marks


def inspect_report(path, max_items: int = 200) -> dict:
    """Records, globals, the object tree (tensors with dtype, shape, storage, bytes) and totals, as a dict.

    Nothing in the file is executed and torch is not needed: the tree is read
    by the torch-free reader, objects of other globals shown as placeholders.
    """
    archive, tree = read_tree(path)
    records = archive.records()
    data = [r for r in records if r.name.startswith("data/")]
    pickle_globals = globals_in_pickle(read_record(archive, "data.pkl"))
    marks = _allowlist_marks(pickle_globals)
    lines = describe_tree(tree, max_items)
    tensors, cut = leaves(tree, is_descriptor)
    return {
        "path": os.fspath(path), "prefix": archive.prefix, "size": archive.size, "records": len(records),
        "storages": len(data), "storage_bytes": sum(r.size for r in data),
        "min_alignment": min((r.alignment for r in data), default=0),
        "globals": [{"name": g, "weights_only": marks.get(g)} for g in pickle_globals],
        "tensors": len(tensors), "tensors_truncated": cut,
        "tensor_bytes": sum(t.nbytes for t in tensors.values() if type(t) is TensorInfo),
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
    at_least = "at least " if r["tensors_truncated"] else ""
    lines.append(f"totals: {at_least}{r['tensors']} tensors ({r['tensor_bytes']:,d} bytes of elements), "
                 f"{r['storages']} storages, {r['storage_bytes']:,d} bytes of tensor data")
    return "\n".join(lines)
