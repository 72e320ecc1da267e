"""fastckpt.open: a safe_open-style lazy reader of torch checkpoints that needs no torch.

The data pickle runs on the native machine with the torch-free builder
(``_native.read_tree``): tensors are descriptors, nothing the file names is
imported. Tensors are read on demand from a private mapping of the file:
numpy arrays are zero-copy read-only views where the bytes allow it.
torch is imported only for ``framework="pt"``; numpy, ml_dtypes (bfloat16,
float8) and mlx only when first needed.
"""

from __future__ import annotations

import os

from fastckpt import _formats, _graph, _native
from fastckpt._descriptors import TensorInfo, Unsupported
from fastckpt._options import resolve_verify
from fastckpt._source import Source
from fastckpt._tree import flatten, is_descriptor, tree_of
from fastckpt.archive import byteorder_record, check_storage_crc
from fastckpt.errors import CheckpointError, FormatError, MetadataError, MissingDtypeError

FRAMEWORKS = ("numpy", "pt", "mlx")
_NUMPY_NAMES = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "complex128": "<c16", "complex64": "<c8",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "?",
}
_WHOLE = object()  # get_tensor's index: the whole tensor (None is numpy's newaxis)
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_ML_DTYPE_BYTES = {name: 2 if name == "bfloat16" else 1 for name in _ML_DTYPES}


def numpy_dtype(dtype: str, key: str):
    """The numpy dtype of a torch dtype name; bfloat16 / float8 via ml_dtypes. TypeError naming `key` for
    dtypes numpy cannot hold; MissingDtypeError (an ImportError) naming `key` when ml_dtypes is missing."""
    import numpy as np

    if dtype in _NUMPY_NAMES:
        return np.dtype(_NUMPY_NAMES[dtype])
    if dtype in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise MissingDtypeError(
                f"tensor '{key}' has dtype torch.{dtype}, which numpy holds only with the ml_dtypes package: "
                "pip install fastckpt[bf16] (or pip install ml_dtypes)", name="ml_dtypes") from None
        return np.dtype(getattr(ml_dtypes, dtype))
    raise TypeError(f"tensor '{key}' has dtype torch.{dtype}, which numpy cannot hold; open with framework=\"pt\"")


def element_dtype(dtype: str, key: str):
    """A numpy dtype whose items are `dtype`'s elements bit for bit, for copying and byte-swapping
    them, never for arithmetic: numpy's own where it has one, else (bfloat16, float8) the unsigned
    integer of the same size, so moving elements never needs (or imports) ml_dtypes."""
    import numpy as np

    if dtype in _ML_DTYPES:
        return np.dtype(f"<u{_ML_DTYPE_BYTES[dtype]}")
    return numpy_dtype(dtype, key)


def _is_ml_dtype(dtype) -> bool:
    return dtype.num >= 256  # numpy numbers user-defined types (ml_dtypes') from 256 on




class _Slice:
    """``reader.get_slice(key)[...]``: only the bytes the index selects are read."""

    def __init__(self, reader, key):
        self._reader, self._key = reader, key

    def get_shape(self) -> list[int]:
        return list(self._reader.info(self._key)["shape"])

    def get_dtype(self) -> str:
        return self._reader.info(self._key)["dtype"]

    def __getitem__(self, index):  # numpy's indexing: None (newaxis), Ellipsis, negative steps...
        return self._reader._read(self._key, index)


class CheckpointReader:
    """One checkpoint file, opened by :func:`open`."""

    def __init__(self, path, framework: str = "numpy", *, verify=None):
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
        self.path = os.fspath(path)
        self.framework = framework
        self._verify = resolve_verify(verify, mapped=True)
        self.source = Source(self.path)  # convert reads bytes through its descriptor
        self.archive = self.source.archive
        if _formats.is_torchscript(self.archive):
            raise FormatError(f"{self.path} is a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
        self.tree = tree_of(self.archive, placeholders=False)
        self.big_endian = byteorder_record(self.archive) == b"big"
        self._tensors = flatten(self.tree, is_descriptor)
        self._checked: set[str] = set()  # records whose CRC-32 was verified
        self._torch_tensors = None  # framework="pt": fastckpt.load's tensors, by key

    # ---- safe_open's interface ------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Drops the reader's mapping; arrays already returned keep theirs alive."""
        self.archive = self.tree = self._torch_tensors = None
        self.source.close()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def get_tensor(self, key: str):
        return self._read(key, _WHOLE)

    def get_slice(self, key: str) -> _Slice:
        self.descriptor(key)
        return _Slice(self, key)

    def info(self, key: str) -> dict:
        """dtype, shape, strides and offset (in elements), storage key and size, bytes of the tensor's elements."""
        t = self.descriptor(key)
        if type(t) is Unsupported:
            return {"kind": t.kind, "dtype": None, "shape": None}
        return {
            "kind": t.kind, "dtype": t.dtype, "shape": t.shape, "strides": t.strides, "offset": t.offset,
            "storage_key": t.storage.key, "storage_nbytes": t.storage.nbytes, "nbytes": t.nbytes,
            "requires_grad": t.requires_grad, "parameter": t.parameter, "location": t.storage.location,
        }

    def metadata(self):
        """The non-tensor values of the tree (epoch, config, optimizer param_groups...); None when there are none."""
        kept = _graph.without_leaves(self.tree, is_descriptor)
        return None if kept is _graph.DROPPED else kept

    # ---- reading ----------------------------------------------------------------
    def descriptor(self, key: str):
        """The tensor's descriptor (TensorInfo, or Unsupported for tensors numpy cannot hold)."""
        if self.archive is None:
            raise ValueError("the reader is closed")
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"no tensor named {key!r} in {self.path}") from None

    def _read(self, key: str, index):
        t = self.descriptor(key)
        if self.framework == "pt":
            tensor = self._torch()[key]
            return tensor if index is _WHOLE else tensor[index]
        if type(t) is Unsupported:
            raise TypeError(f"tensor '{key}' is a {t.kind} tensor, which numpy cannot hold; open with framework=\"pt\"")
        array = self.raw_array(key)
        if index is not _WHOLE:
            array = array[index]
        array = self.finish(array, t)
        return array if self.framework == "numpy" else _to_mlx(array, key)

    def raw_array(self, key: str):
        """A zero-copy read-only numpy view of the tensor's bytes as stored (file byte order, no conj/neg)."""
        import numpy as np

        t = self.descriptor(key)
        dtype = numpy_dtype(t.dtype, key)
        record = t.storage.record
        buffer = self.archive.view(record)
        if self._verify and record not in self._checked:
            self._check_crc(key, t.storage, buffer)
        item = dtype.itemsize
        try:
            if 0 in t.shape:
                return np.empty(t.shape, dtype)
            # a dimension of size 1 never steps: its stride (any value torch accepts) is not numpy's business
            strides = [0 if n == 1 else s * item for n, s in zip(t.shape, t.strides)]
            array = np.ndarray(t.shape, dtype, buffer=buffer, offset=t.offset * item, strides=strides)
        except (ValueError, OverflowError) as e:  # sizes torch accepts but numpy cannot index (> 2^63 bytes)
            raise MetadataError(f"tensor '{key}' of shape {tuple(t.shape)} and strides {tuple(t.strides)} cannot be "
                                f"a numpy array ({e}); open with framework=\"pt\"") from None
        array.flags.writeable = False
        return array

    def finish(self, array, t: TensorInfo):
        """`array` (the tensor's elements as stored) in native byte order, with its conj/neg bits applied."""
        import numpy as np

        if self.big_endian and array.dtype.itemsize > 1:
            if not _is_ml_dtype(array.dtype):
                array = array.view(array.dtype.newbyteorder(">")).astype(array.dtype)
            else:  # ml_dtypes types: swap the bit patterns
                array = array.view(f"u{array.dtype.itemsize}").byteswap().view(array.dtype)
        metadata = t.metadata or {}
        if metadata.get("conj"):
            array = np.conj(array)
        if metadata.get("neg"):
            array = np.negative(array)
        return array

    def _check_crc(self, key: str, storage, buffer) -> None:
        check_storage_crc(self.archive, storage.record, _native.crc32(buffer), key)
        self._checked.add(storage.record)

    def _torch(self) -> dict:
        if self._torch_tensors is None:
            import torch

            from fastckpt.loader import load

            tree = load(self.path, mmap=True, weights_only=True, verify=self._verify)
            self._torch_tensors = flatten(tree, lambda x: isinstance(x, torch.Tensor))
        return self._torch_tensors


def _to_mlx(array, key: str):
    import mlx.core as mx
    import numpy as np

    name = array.dtype.name
    if name == "bfloat16":
        return mx.array(np.ascontiguousarray(array).view(np.uint16)).view(mx.bfloat16)
    if _is_ml_dtype(array.dtype):
        raise TypeError(f"tensor '{key}' has dtype {name}, which mlx cannot hold")
    return mx.array(array)


class ShardedReader:
    """A transformers-style sharded checkpoint (``*.index.json`` + its ``weight_map``) as one reader.

    Each shard is checked against the index when it is first read (:func:`_formats.check_shard`):
    the same rule as ``fastckpt.load_sharded``'s, so both return the same tensors or both refuse.
    """

    def __init__(self, index, framework: str = "numpy", *, verify=None):
        self.index = index if isinstance(index, _formats.ShardIndex) else _formats.read_index(index)
        self.path = os.fspath(self.index.path)
        self._framework, self._verify = framework, resolve_verify(verify, mapped=True)
        self._readers: dict[str, CheckpointReader] = {}

    @property
    def shards(self) -> list[str]:
        """The shard files' paths, in name order."""
        return [os.fspath(self.index.shard_path(name)) for name in self.index.shards()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def keys(self) -> list[str]:
        return list(self.index.weight_map)

    def __contains__(self, key) -> bool:
        return key in self.index.weight_map

    def __len__(self) -> int:
        return len(self.index.weight_map)

    def shard_reader(self, key: str) -> CheckpointReader:
        """The reader of the shard holding `key` (opened, and checked against the index, on first use)."""
        try:
            shard = self.index.weight_map[key]
        except KeyError:
            raise KeyError(f"no tensor named {key!r} in {self.path}") from None
        reader = self._readers.get(shard)
        if reader is None:
            reader = CheckpointReader(self.index.shard_path(shard), self._framework, verify=self._verify)
            try:
                _formats.check_shard(self.index, shard, reader.tree)
            except BaseException:
                reader.close()
                raise
            self._readers[shard] = reader
        if key not in reader:
            raise CheckpointError(f"{self.path} maps '{key}' to {shard}, which holds it, but not as a tensor")
        return reader

    def get_tensor(self, key: str):
        return self.shard_reader(key).get_tensor(key)

    def get_slice(self, key: str) -> _Slice:
        return self.shard_reader(key).get_slice(key)

    def info(self, key: str) -> dict:
        return dict(self.shard_reader(key).info(key), shard=self.index.weight_map[key])

    def metadata(self):
        """The index's "metadata" object (total_size...)."""
        return self.index.metadata


def open(path, framework: str = "numpy", *, verify=None):  # noqa: A001  (safe_open's counterpart)
    """Open a torch checkpoint lazily, like safetensors' ``safe_open``; works without torch installed.

    `path` is a ``torch.save`` file, a sharded checkpoint's ``*.index.json``, or
    the folder holding either. Use as a context manager::

        with fastckpt.open("pytorch_model.bin") as f:
            for key in f.keys():
                array = f.get_tensor(key)   # numpy, zero-copy and read-only where the layout allows

    ``framework``: ``"numpy"`` (bfloat16/float8 need ml_dtypes: ``pip install fastckpt[bf16]``),
    ``"mlx"``, or ``"pt"`` (torch tensors as fastckpt.load returns them). ``verify=True`` checks
    the CRC-32 of every storage record read; by default (and with ``FASTCKPT_VERIFY=0``) lazy reads
    are not checked, with ``FASTCKPT_VERIFY=1`` they are.

    Keys are dotted paths: a tensor saved under several names (tied weights) has each of them; a
    container saved under several names (or holding itself) is one object, as torch.load returns
    it, and its tensors are named by its first path in tree order (see ``fastckpt._graph``).
    """
    verify = resolve_verify(verify, mapped=True)
    index = _formats.find_index(path)
    if index is not None:
        return ShardedReader(index, framework, verify=verify)
    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
        if len(files) != 1:
            raise FormatError(f"{os.fspath(path)} has no *.index.json and {len(files)} .bin/.pt/.pth files; open a file")
        path = os.path.join(path, files[0])
    return CheckpointReader(path, framework, verify=verify)
