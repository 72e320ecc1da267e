"""The torch-free object tree of a checkpoint: read it, name its tensors, group them by record.

Used by fastckpt.open, ``inspect``/``verify`` and the loader's integrity messages; torch-free and
numpy-free (tensors are :mod:`fastckpt._descriptors`, nothing the file names is imported).
"""

from __future__ import annotations

from fastckpt import _descriptors, _native
from fastckpt._descriptors import TensorInfo, Unsupported
from fastckpt.archive import check_version, read_data_pickle
from fastckpt.errors import CheckpointError


def tree_of(archive, placeholders: bool = True):
    """The object tree of an opened archive, tensors as descriptors, objects of globals the reader
    does not know as placeholders (or refused, with `placeholders=False`); nothing is run."""
    check_version(archive)
    return _native.read_tree(read_data_pickle(archive), _descriptors, archive, placeholders)


def is_descriptor(obj) -> bool:
    """A tensor of the tree: numpy-readable (TensorInfo) or not (Unsupported)."""
    return type(obj) is TensorInfo or type(obj) is Unsupported


def flatten(tree, is_tensor) -> dict:
    """{dotted path: tensor} in tree order: dict keys as str, list/tuple indices as numbers."""
    out: dict = {}
    stack = [("", tree)]
    while stack:
        path, obj = stack.pop()
        if is_tensor(obj):
            if path in out and out[path] is not obj:
                raise CheckpointError(f"two tensors are both named '{path}' (keys with dots in them?)")
            out[path] = obj
            continue
        if isinstance(obj, dict):
            items = [(str(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(obj)]
        else:
            continue
        stack.extend((f"{path}.{k}" if path else k, v) for k, v in reversed(items))
    return out


def tensors_by_record(tree) -> dict[str, list[str]]:
    """{"data/<key>": [tensor names]} for the tensors of a tree (fastckpt.open's names)."""
    out: dict[str, list[str]] = {}
    for name, t in flatten(tree, lambda x: type(x) is TensorInfo).items():
        out.setdefault(t.storage.record, []).append(name)
    return out
