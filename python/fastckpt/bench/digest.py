"""A correctness fingerprint of a loaded checkpoint, cheap to compare across processes.

Two hashes: `tensors` covers every tensor's flattened path, dtype, shape, stride and value checksum
and ignores container types and key order, so a safetensors file (flat, keys sorted) can be checked
against the .pt it mirrors; `structure` additionally covers container types, key order, non-tensor
leaves, storage offsets, storage sharing and Parameter-ness, which a drop-in torch.load must match.
"""

from __future__ import annotations

import hashlib
import zlib


def flatten(obj, prefix: str = ""):
    """Yield (dotted path, leaf) in pickling order: dicts in insertion order, lists/tuples by index.

    torch.save assigns storage keys in this same order, so writing the tensors of this walk one after
    the other reproduces the .pt file's data order (the generator relies on it).
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from flatten(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def tensor_bytes(t):
    """The tensor's logical values as a flat uint8 CPU tensor (copied only when not contiguous on CPU)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def digest(obj) -> dict:
    import torch

    tensor_lines = []
    structure = hashlib.sha256()
    storages: dict[tuple, int] = {}
    devices = set()
    nbytes = 0
    _walk_containers(obj, structure)
    for path, leaf in flatten(obj):
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
            structure.update(f"L {path}|{type(leaf).__name__}|{leaf!r}\n".encode())
    tensor_lines.sort()
    return {
        "tensors": hashlib.sha256("\n".join(tensor_lines).encode()).hexdigest(),
        "structure": structure.hexdigest(),
        "n_tensors": len(tensor_lines),
        "n_storages": len(storages),
        "storage_bytes": nbytes,
        "devices": sorted(devices),
    }


def _walk_containers(obj, h, path: str = "") -> None:
    """Hash container types and key order (flatten() alone loses both)."""
    if isinstance(obj, dict):
        h.update(f"D {path}|{type(obj).__name__}|{list(map(repr, obj))}\n".encode())
        for key, value in obj.items():
            _walk_containers(value, h, f"{path}{key}.")
    elif isinstance(obj, (list, tuple)):
        h.update(f"S {path}|{type(obj).__name__}|{len(obj)}\n".encode())
        for i, value in enumerate(obj):
            _walk_containers(value, h, f"{path}{i}.")
