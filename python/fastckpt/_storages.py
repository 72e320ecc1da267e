"""The storages the native builder leaves to Python (other devices, meta, byte-swapped, a callable
map_location, torch's own unpickler), made like torch 2.13's ``persistent_load`` + ``load_tensor``
over the bytes the load's StoragePlan reads; and the dtype facts the native builder asks for."""

from __future__ import annotations

import sys

import numpy
import torch
from torch.serialization import StorageType, _get_restore_location, _maybe_decode_ascii

from fastckpt import _native
from fastckpt.errors import CheckpointError, MetadataError, UnsafeGlobalError

Source = _native.StoragePlan.Source
_PACKED_BITS = {torch.quint4x2: 4, torch.quint2x4: 2}
# DLPack type codes: 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool.
_DLPACK_TYPES = {
    torch.bool: (6, 8),
    torch.uint8: (1, 8),
    torch.int8: (0, 8),
    torch.int16: (0, 16),
    torch.int32: (0, 32),
    torch.int64: (0, 64),
    torch.float16: (2, 16),
    torch.float32: (2, 32),
    torch.float64: (2, 64),
    torch.bfloat16: (4, 16),
    torch.complex64: (5, 64),
    torch.complex128: (5, 128),
}


def torch_deserializers_first() -> bool:
    """True when torch's own deserializers come before any registered by others, so every tag
    torch restores (cpu, cuda, mps, ...) is restored by torch: storages may then be made natively."""
    own = [getattr(fn, "func", fn).__module__ == "torch.serialization" for _, _, fn in torch.serialization._package_registry]
    return bool(own) and own[0] and sorted(own, reverse=True) == own  # some are partials


def _storage_from_buffer(buffer, nbytes: int):
    """A CPU storage over bytes in place; never resizable (as torch's), so no set_ can grow it."""
    if nbytes == 0:
        return torch.from_numpy(numpy.empty(0, numpy.uint8)).untyped_storage()
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).untyped_storage()


class Storages:
    """Makes the storages the native builder leaves to Python, like torch's ``persistent_load`` +
    ``load_tensor``: over bytes the load's plan (a ``_native.StoragePlan``) reads, or from the
    device stager for staged ones, then restored where map_location says.
    """

    def __init__(self, plan, map_location, *, byteswap: bool, stager=None, keep_on_cpu=frozenset()):
        self._plan = plan
        self._keep_on_cpu = keep_on_cpu  # keys the plan leaves on the CPU whatever map_location says
        self._stager = stager
        self._restore_location = _get_restore_location(map_location)
        self._byteswap = byteswap
        self._loaded: dict[str, torch.storage.TypedStorage] = {}

    @staticmethod
    def storage_dtype(storage_type):
        if storage_type is torch.UntypedStorage:
            return torch.uint8, 1
        if isinstance(storage_type, StorageType):
            return storage_type.dtype, storage_type.dtype.itemsize
        raise MetadataError(f"persistent id names {storage_type!r}, which is not a storage type")

    @staticmethod
    def dlpack_dtype(dtype):
        """(DLPack type code, bits) for dtypes torch imports through DLPack, else None."""
        return _DLPACK_TYPES.get(dtype)

    @staticmethod
    def dtype_bits(dtype) -> int:
        """Bits per tensor element; quint4x2 and quint2x4 pack 2 and 4 elements per byte."""
        if not isinstance(dtype, torch.dtype):
            raise MetadataError(f"tensor dtype is {dtype!r}, not a torch.dtype")
        return _PACKED_BITS.get(dtype, dtype.itemsize * 8)

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise UnsafeGlobalError(f"persistent id must be a 5-tuple ('storage', type, key, location, numel), got {saved_id!r}")
        typename, storage_type, key, location, numel = saved_id
        if _maybe_decode_ascii(typename) != "storage":
            raise UnsafeGlobalError(f"only persistent ids of storages are allowed, got {typename!r}")
        dtype, itemsize = self.storage_dtype(storage_type)
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise MetadataError(f"malformed persistent id {saved_id!r}")
        if not isinstance(location, (str, bytes)):
            raise MetadataError(f"persistent id of storage '{key}' has location {location!r}, not a string")
        nbytes = numel * itemsize
        if key in self._loaded:
            loaded = self._loaded[key]
            if loaded.dtype is not dtype or loaded._size() * loaded._element_size() != nbytes:
                raise MetadataError(
                    f"storage '{key}' is read as {numel} × {dtype} here but as {loaded._size()} × {loaded.dtype} "
                    "before: one non-empty record cannot hold both"
                )
            return loaded
        location = _maybe_decode_ascii(location)
        source = self._plan.source(key, nbytes)
        if source == Source.meta:
            storage = torch.UntypedStorage(nbytes, device="meta")
            storage._checkpoint_offset = self._plan.data_offset(key)
        elif source == Source.staged:
            storage = self._stager.storage(key, nbytes)
        else:
            storage = _storage_from_buffer(self._plan.bytes(key, nbytes), nbytes)
            if self._byteswap:
                storage.byteswap(dtype)
            try:
                if key not in self._keep_on_cpu:
                    storage = self._restore_location(storage, location)
            except RuntimeError as e:  # no deserializer for the tag, or its device is absent: torch's text
                if isinstance(e, CheckpointError):
                    raise
                raise MetadataError(str(e)) from e
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        if typed._data_ptr() != 0:  # torch does not cache meta or empty storages
            self._loaded[key] = typed
        return typed




def native_byteorder_differs(byteorder: bytes | None) -> bool:
    return byteorder is not None and byteorder.decode() != sys.byteorder
