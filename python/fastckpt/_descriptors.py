"""What the torch-free reader makes of a data pickle: descriptors, by name only.

``_native.read_tree(pickle, kit, archive)`` runs the restricted pickle machine
with this module as its `kit`: the globals in ``known`` are the only ones it
understands (nothing is imported), storages become :class:`StorageInfo`,
tensors :class:`TensorInfo`, and the rare calls go through :func:`call`.
Nothing here imports torch.
"""

from __future__ import annotations

from collections import OrderedDict  # noqa: F401  (kit.OrderedDict: the state-dict container)

# torch dtype name -> (bytes per storage element, bits per tensor element)
DTYPES = {
    "float64": (8, 64), "float32": (4, 32), "float16": (2, 16), "bfloat16": (2, 16),
    "complex128": (16, 128), "complex64": (8, 64), "complex32": (4, 32),
    "int64": (8, 64), "int32": (4, 32), "int16": (2, 16), "int8": (1, 8),
    "uint64": (8, 64), "uint32": (4, 32), "uint16": (2, 16), "uint8": (1, 8), "bool": (1, 8),
    "float8_e4m3fn": (1, 8), "float8_e5m2": (1, 8), "float8_e4m3fnuz": (1, 8), "float8_e5m2fnuz": (1, 8),
    "float8_e8m0fnu": (1, 8), "float4_e2m1fn_x2": (1, 8),
    "qint8": (1, 8), "quint8": (1, 8), "qint32": (4, 32), "quint4x2": (1, 4), "quint2x4": (1, 2),
    "bits1x8": (1, 8), "bits2x4": (1, 8), "bits4x2": (1, 8), "bits8": (1, 8), "bits16": (2, 16),
}

# The legacy typed-storage classes torch.save names in persistent ids.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QUInt8Storage": "quint8", "QInt8Storage": "qint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}

# Calls that make tensors numpy cannot hold; read with framework="pt".
_UNSUPPORTED = {
    "torch._utils._rebuild_qtensor": "quantized",
    "torch._utils._rebuild_sparse_tensor": "sparse",
    "torch._utils._rebuild_nested_tensor": "nested",
    "torch._utils._rebuild_meta_tensor_no_storage": "meta",
}


def _known() -> dict:
    known = {
        "torch._utils._rebuild_tensor_v2": ("rebuild_v2",),
        "torch._utils._rebuild_tensor_v3": ("rebuild_v3",),
        "torch._utils._rebuild_tensor": ("rebuild",),
        "torch.storage.UntypedStorage": ("storage", "uint8", 1, 8),
        "torch.UntypedStorage": ("storage", "uint8", 1, 8),
    }
    for cls, dtype in _STORAGE_CLASSES.items():
        for module in ("torch", "torch.cuda"):
            known[f"{module}.{cls}"] = ("storage", dtype, *DTYPES[dtype])
    for dtype, sizes in DTYPES.items():
        known[f"torch.{dtype}"] = ("dtype", dtype, *sizes)
    for name in (*_CALLS, *_UNSUPPORTED):
        known[name] = ("call",)
    for name in ("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric", "per_channel_symmetric",
                 "per_channel_affine_float_qparams"):
        known[f"torch.{name}"] = ("constant",)
    return known


class Global:
    """A torch global the reader knows by name (a dtype, a qscheme...) where it appears as a value."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return type(other) is Global and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class StorageInfo:
    """A storage record: ``data/<key>``, checked to exist, be stored and hold exactly `nbytes`."""

    __slots__ = ("key", "dtype", "nbytes", "record", "data_offset", "crc32", "location")

    def __init__(self, key, dtype, nbytes, record, data_offset, crc32, location):
        self.key, self.dtype, self.nbytes, self.record = key, dtype, nbytes, record
        self.data_offset, self.crc32, self.location = data_offset, crc32, location

    def __repr__(self) -> str:
        return f"StorageInfo(key={self.key!r}, dtype={self.dtype}, nbytes={self.nbytes}, location={self.location!r})"


class TensorInfo:
    """A strided tensor over a storage: dtype name, shape, strides and offset in elements (bounds checked)."""

    __slots__ = ("storage", "dtype", "shape", "strides", "offset", "requires_grad", "metadata", "parameter")
    kind = "strided"

    def __init__(self, storage, dtype, shape, strides, offset, requires_grad, metadata, parameter=False):
        self.storage, self.dtype, self.shape, self.strides = storage, dtype, shape, strides
        self.offset, self.requires_grad, self.metadata, self.parameter = offset, requires_grad, metadata, parameter

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's own elements (contiguous)."""
        n = 1
        for s in self.shape:
            n *= s
        bits = DTYPES[self.dtype][1]
        return (n * bits + 7) // 8

    def __repr__(self) -> str:
        return f"TensorInfo({self.dtype}{list(self.shape)}, storage={self.storage.key!r})"


class Unsupported:
    """A tensor numpy cannot hold (quantized, sparse, nested, meta): only framework="pt" reads it."""

    __slots__ = ("kind", "name", "dtype", "shape")

    def __init__(self, kind: str, name: str, dtype=None, shape=None):
        self.kind, self.name, self.dtype, self.shape = kind, name, dtype, shape

    def __repr__(self) -> str:
        return f"<{self.kind} tensor>"


class Placeholder:
    """An object of a global the reader does not understand (`fastckpt inspect`); nothing was run."""

    __slots__ = ("name", "args", "state")

    def __init__(self, name: str, args=None):
        self.name, self.args, self.state = name, args, None

    def __repr__(self) -> str:
        return f"<{self.name}{'' if self.args is None else '(...)'}{'' if self.state is None else ' with state'}>"


def _size(shape):
    return tuple(shape)


def _device(kind, index=None):
    return kind if index is None else f"{kind}:{index}"


def _parameter(data, requires_grad=False, hooks=None, state=None):
    if type(data) is not TensorInfo:
        raise_metadata(f"_rebuild_parameter of {type(data).__name__}, not a tensor")
    return TensorInfo(data.storage, data.dtype, data.shape, data.strides, data.offset, requires_grad, data.metadata,
                      parameter=True)


def _encode(text, encoding="latin1"):
    if type(text) is not str or encoding != "latin1":
        raise_metadata("_codecs.encode is read only for latin1 strings")
    return text.encode("latin1")


def _layout(name):
    if type(name) is not str:  # torch's _get_layout looks the name up: anything else fails there too
        raise_metadata(f"torch.serialization._get_layout of a {type(name).__name__}, not a layout name")
    return Global(name)


def raise_metadata(message: str):
    from fastckpt.errors import MetadataError

    raise MetadataError(message)


_CALLS = {
    "torch.Size": _size,
    "torch.device": _device,
    "collections.OrderedDict": lambda *items: OrderedDict(*items),
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
    "_codecs.encode": _encode,
    "torch.serialization._get_layout": _layout,
}
known = _known()


def call(name: str, args: tuple):
    """A REDUCE (or NEWOBJ of a Placeholder) the native reader hands to Python; `args` is a tuple."""
    if name in _UNSUPPORTED:
        return Unsupported(_UNSUPPORTED[name], name)
    fn = _CALLS.get(name)
    if fn is None:
        return Placeholder(name, args)
    try:
        return fn(*args)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. OrderedDict([[1]]): not (key, value) pairs
        raise_metadata(f"{name} with the file's arguments failed: {e}")
