"""The torch-free object tree of a checkpoint: read it, name its tensors, group them by record.

Used by fastckpt.open, ``inspect``/``verify`` and the loader's integrity messages; torch-free and
numpy-free (tensors are :mod:`fastckpt._descriptors`, nothing the file names is imported).
"""

from __future__ import annotations

from fastckpt import _descriptors, _graph, _native
from fastckpt._descriptors import TensorInfo, Unsupported
from fastckpt._graph import flatten  # noqa: F401  (fastckpt.open's naming rule, defined in _graph)
from fastckpt.archive import check_version, read_data_pickle


def tree_of(archive, placeholders: bool = True):
    """The object tree of an opened archive, tensors as descriptors, objects of globals the reader
    does not know as placeholders (or refused, with `placeholders=False`); nothing is run."""
    check_version(archive)
    return _native.read_tree(read_data_pickle(archive), _descriptors, archive, placeholders)


def is_descriptor(obj) -> bool:
    """A tensor of the tree: numpy-readable (TensorInfo) or not (Unsupported)."""
    return type(obj) is TensorInfo or type(obj) is Unsupported


# names of the tensors of a bad record, in messages: the first ones of a huge graph are enough
_MAX_NAMED_ENTRIES = 100_000


def tensors_by_record(tree) -> dict[str, list[str]]:
    """{"data/<key>": [tensor names]} for the tensors of a tree (fastckpt.open's names; from the first
    entries of a huge graph only: the names are there to help, not to list)."""
    out: dict[str, list[str]] = {}
    for name, t in _graph.leaves(tree, lambda x: type(x) is TensorInfo, max_entries=_MAX_NAMED_ENTRIES)[0].items():
        out.setdefault(t.storage.record, []).append(name)
    return out
