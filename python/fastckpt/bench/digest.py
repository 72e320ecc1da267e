"""A correctness fingerprint of a loaded checkpoint, cheap to compare across processes.

Two hashes: `tensors` covers every tensor's flattened path, dtype, shape, stride and value checksum
and ignores container types and key order, so a safetensors file (flat, keys sorted) can be checked
against the .pt it mirrors; `structure` additionally covers container types, key order, non-tensor
leaves, storage offsets, storage sharing, container sharing and Parameter-ness, which a drop-in
torch.load must match.

The graph is walked by :mod:`fastckpt._graph` (each container once, cycles included, bounded), so
a tiny hostile file (40 nested ``[x, x]`` lists: 2^40 paths) is fingerprinted in milliseconds.
"""

from __future__ import annotations

import hashlib
import zlib

from fastckpt import _graph
from fastckpt.errors import LimitError


def flatten(obj):
    """Yield (dotted path, leaf) in pickling order: dicts in insertion order, lists/tuples by index.

    A container met again (saved twice, or holding itself) is walked once, at its first path, as
    torch.save pickles it once (``fastckpt._graph``'s naming rule); a leaf is yielded wherever it
    sits. torch.save assigns storage keys in this same order, so writing the tensors of this walk
    one after the other reproduces the .pt file's data order (the generator relies on it).
    LimitError for a graph over ``_graph``'s bounds.
    """
    for event in _graph.walk(obj):
        if event.kind == _graph.LEAF:
            yield event.node.path(), event.node.obj
        elif event.kind == _graph.TRUNCATED:
            raise LimitError(f"the object graph has more than {_graph.MAX_ENTRIES:,d} entries or "
                             f"{_graph.MAX_CHARS:,d} bytes of paths")


def tensor_bytes(t):
    """The tensor's logical values as a flat uint8 CPU tensor (copied only when not contiguous on CPU)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def _prefix(node: _graph.Node) -> str:
    """A container's path as its entries' paths start ("" at the top, else "a.b.")."""
    return "" if node.parent is None else node.path() + "."


def _text(leaf) -> str:
    try:
        return repr(leaf)
    except RecursionError:  # (a frozenset nested deeper than repr goes)
        return "<nested too deep to show>"


def digest(obj) -> dict:
    """The fingerprint of `obj`. A graph over ``_graph``'s bounds is fingerprinted up to them (both
    hashes then say so), never walked without end."""
    import torch

    tensor_lines = []
    structure = hashlib.sha256()
    storages: dict[tuple, int] = {}
    devices = set()
    nbytes = 0
    leaves = []
    truncated = False
    # Containers first, then leaves: the order of the hashed lines the manifests were made with.
    for event in _graph.walk(obj):
        node, kind = event.node, event.kind
        if kind == _graph.CONTAINER:
            what = f"D {_prefix(node)}|{type(node.obj).__name__}|{list(map(repr, node.obj))}" \
                if isinstance(node.obj, dict) else f"S {_prefix(node)}|{type(node.obj).__name__}|{len(node.obj)}"
            structure.update(f"{what}\n".encode())
        elif kind == _graph.SEEN:  # the same container object as at `first` (torch.load keeps that)
            structure.update(f"R {_prefix(node)}|{_prefix(event.first)}\n".encode())
        elif kind == _graph.LEAF:
            leaves.append((node.path(), node.obj))
        elif kind == _graph.TRUNCATED:
            truncated = True
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            values = tensor_bytes(leaf)
            crc = zlib.crc32(values.numpy())
            tensor_lines.append(f"{path}|{leaf.dtype}|{tuple(leaf.shape)}|{leaf.stride()}|{crc:08x}")
            storage = leaf.untyped_storage()
            key = (leaf.device.type, leaf.device.index, storage.data_ptr(), storage.nbytes())
            if key not in storages:
                storages[key] = len(storages)
                nbytes += storage.nbytes()
            devices.add(str(leaf.device))
            structure.update(
                f"T {path}|{type(leaf).__name__}|{leaf.requires_grad}|{tensor_lines[-1]}|"
                f"storage {storages[key]}+{leaf.storage_offset()}\n".encode()
            )
        else:
            structure.update(f"L {path}|{type(leaf).__name__}|{_text(leaf)}\n".encode())
    tensor_lines.sort()
    if truncated:
        tensor_lines.append("truncated")
        structure.update(b"truncated\n")
    return {
        "tensors": hashlib.sha256("\n".join(tensor_lines).encode()).hexdigest(),
        "structure": structure.hexdigest(),
        "n_tensors": len(tensor_lines) - truncated,
        "n_storages": len(storages),
        "storage_bytes": nbytes,
        "devices": sorted(devices),
    }
