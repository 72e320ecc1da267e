"""Shared helpers for the load tests.

* ``assert_same(a, b)``: field-by-field comparison of two loaded object graphs (a from
  fastckpt, b from torch.load), including identity and storage-sharing structure.
* ``call(fn, ...)``: run a loader, capture its result or exception and its warnings.
* Checkpoint surgery on the bytes of a ``torch.save`` file: list/rewrite zip records
  (stored, 64-byte aligned like torch writes them, CRCs right), edit strings in ``data.pkl``,
  find a record's data offset, flip a byte.
* A tiny pickle assembler (``P``) for hand-built ``data.pkl`` streams.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
import pickletools
import struct
import warnings
import zipfile

import torch

import fastckpt

_patch = importlib.import_module("fastckpt.patching")
loader_module = _patch.loader_module()


def fc_load(f, *args, **kwargs):
    """fastckpt's load, looked up at call time (tests spy on it by replacing loader_module.load)."""
    return loader_module.load(f, *args, **kwargs)


def fc_api(name):
    """A public fastckpt function (``fastckpt.<name>``)."""
    fn = getattr(fastckpt, name)
    assert callable(fn), f"fastckpt.{name} is {fn!r}"
    return fn


# --------------------------------------------------------------------------- running loaders


@dataclasses.dataclass
class Outcome:
    value: object = None
    exc: BaseException | None = None
    warnings: list = dataclasses.field(default_factory=list)  # [(category, message)]

    def get(self):
        if self.exc is not None:
            raise self.exc
        return self.value


def call(fn, *args, **kwargs) -> Outcome:
    """fn(*args, **kwargs) with warnings recorded (the suite turns stray warnings into errors)."""
    out = Outcome()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out.value = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the outcome is what we compare
            out.exc = e
    out.warnings = [(w.category, str(w.message)) for w in caught]
    return out


def torch_load(f, *args, **kwargs) -> Outcome:
    """The reference: torch's own load, even while torch.load is patched."""
    if hasattr(f, "seek"):
        f.seek(0)
    return call(_patch.original_load(), f, *args, **kwargs)


def fastckpt_load(f, *args, **kwargs) -> Outcome:
    if hasattr(f, "seek"):
        f.seek(0)
    return call(fc_load, f, *args, **kwargs)


def weights_only_core(message: str) -> str:
    """The part of torch's weights_only refusal text that names the global and the fix."""
    core = message.split("WeightsUnpickler error: ", 1)[-1]
    return core.split("\n\nCheck the documentation", 1)[0].strip()


def assert_same_outcome(got: Outcome, ref: Outcome, *, warnings_equal=False):
    """fastckpt's outcome equals torch's: same value, or an exception of torch's type with its message.

    Run torch first: warnings torch emits once per process then cannot be blamed on fastckpt.
    """
    if ref.exc is None:
        if got.exc is not None:
            raise AssertionError(f"torch loaded, fastckpt raised {type(got.exc).__name__}: {got.exc}") from got.exc
        assert_same(got.value, ref.value)
    else:
        assert got.exc is not None, f"torch raised {type(ref.exc).__name__}: {ref.exc}, fastckpt returned {got.value!r}"
        assert isinstance(got.exc, type(ref.exc)), (type(got.exc).__mro__, type(ref.exc))
        if isinstance(ref.exc, pickle.UnpicklingError) and "WeightsUnpickler error" in str(ref.exc):
            assert isinstance(got.exc, fastckpt.UnpicklingError), type(got.exc).__mro__
            assert weights_only_core(str(ref.exc)) in str(got.exc), (str(got.exc), str(ref.exc))
        else:
            assert str(got.exc) == str(ref.exc)
    if warnings_equal:
        assert got.warnings == ref.warnings
    else:
        extra = [w for w in got.warnings if w not in ref.warnings]
        assert not extra, f"fastckpt warned where torch did not: {extra}"


# --------------------------------------------------------------------------- object graphs


def assert_same(a, b, path="obj"):
    """Assert that object graph `a` (fastckpt) equals `b` (torch.load) in every observable way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation etc. from inspecting, not loading
        cmp = _Comparer()
        cmp.same(a, b, path)
        cmp.check_sharing()


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _storage_bytes(s: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)  # set_ needs a tensor on its device


_SCALARS = (type(None), bool, int, str, bytes, bytearray, torch.dtype, torch.device, torch.layout, torch.qscheme,
            torch.memory_format)


class _Comparer:
    def __init__(self):
        self.seen_a: dict[int, object] = {}
        self.seen_b: dict[int, object] = {}
        self.keep = []  # keep compared objects alive so ids are not reused
        self.storages = []  # (path, storage of a, storage of b)

    # identity: an object seen twice in `a` must be the same object twice in `b`, and vice versa
    def _first_visit(self, a, b, path) -> bool:
        ia, ib = id(a), id(b)
        if ia in self.seen_a or ib in self.seen_b:
            assert self.seen_a.get(ia) is b and self.seen_b.get(ib) is a, f"{path}: object identity differs"
            return False
        self.seen_a[ia], self.seen_b[ib] = b, a
        self.keep.append((a, b))
        return True

    def same(self, a, b, path):
        assert type(a) is type(b), f"{path}: type {type(a)} != {type(b)}"
        if isinstance(a, _SCALARS):
            assert a == b, f"{path}: {a!r} != {b!r}"
        elif isinstance(a, float):
            assert _float_bits(a) == _float_bits(b), f"{path}: {a!r} != {b!r}"
        elif isinstance(a, complex):
            assert _float_bits(a.real) + _float_bits(a.imag) == _float_bits(b.real) + _float_bits(b.imag), path
        elif isinstance(a, tuple):  # incl. torch.Size and namedtuples
            assert len(a) == len(b), f"{path}: len {len(a)} != {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                self.same(x, y, f"{path}[{i}]")
        elif not self._first_visit(a, b, path):
            return
        elif isinstance(a, torch.Tensor):
            self.tensor(a, b, path)
        elif isinstance(a, torch.storage.TypedStorage):
            assert a.dtype == b.dtype, f"{path}: storage dtype {a.dtype} != {b.dtype}"
            self.storage(a._untyped_storage, b._untyped_storage, path)
        elif isinstance(a, torch.UntypedStorage):
            self.storage(a, b, path)
        elif isinstance(a, list):
            assert len(a) == len(b), f"{path}: len {len(a)} != {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                self.same(x, y, f"{path}[{i}]")
        elif isinstance(a, dict):
            assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
            for k in a:
                self.same(a[k], b[k], f"{path}[{k!r}]")
            self.attrs(a, b, path)  # OrderedDict._metadata
        elif isinstance(a, (set, frozenset)):
            assert a == b, f"{path}: {a!r} != {b!r}"
        elif type(a).__module__ == "numpy" and hasattr(a, "tobytes"):
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), path
        elif hasattr(a, "__dict__") or hasattr(type(a), "__slots__"):
            self.attrs(a, b, path)
        else:
            assert a == b, f"{path}: {a!r} != {b!r}"

    def attrs(self, a, b, path, skip=()):
        da, db = getattr(a, "__dict__", {}), getattr(b, "__dict__", {})
        keys_a, keys_b = [k for k in da if k not in skip], [k for k in db if k not in skip]
        assert keys_a == keys_b, f"{path}: attributes {keys_a} != {keys_b}"
        for k in keys_a:
            self.same(da[k], db[k], f"{path}.{k}")
        for slot in getattr(type(a), "__slots__", ()):
            self.same(getattr(a, slot, None), getattr(b, slot, None), f"{path}.{slot}")

    def storage(self, a: torch.UntypedStorage, b: torch.UntypedStorage, path):
        assert a.device == b.device, f"{path}: storage device {a.device} != {b.device}"
        assert a.nbytes() == b.nbytes(), f"{path}: storage nbytes {a.nbytes()} != {b.nbytes()}"
        if a.device.type != "meta":
            assert torch.equal(_storage_bytes(a), _storage_bytes(b)), f"{path}: storage bytes differ"
        self.storages.append((path, a, b))

    def tensor(self, a: torch.Tensor, b: torch.Tensor, path):
        njt = type(a).__name__ == "NestedTensor"  # jagged: its ragged size is a fresh symbol per load
        for attr in ("dtype", "layout", "device", "requires_grad", "is_leaf", "is_quantized", "is_nested") + (
                () if a.is_nested else ("shape",)):
            assert getattr(a, attr) == getattr(b, attr), f"{path}.{attr}: {getattr(a, attr)} != {getattr(b, attr)}"
        assert a.grad is None and b.grad is None, path
        hooks_a, hooks_b = a._backward_hooks, b._backward_hooks
        assert type(hooks_a) is type(hooks_b) and (hooks_a is None or list(hooks_a) == list(hooks_b)), (
            f"{path}._backward_hooks: {hooks_a!r} != {hooks_b!r}")
        self.attrs(a, b, path, skip=("_size", "_strides") if njt else ())  # Python attributes, Parameter state
        if hasattr(a, "__tensor_flatten__") and type(a) is not torch.nn.Parameter:  # wrapper subclasses (NJT)
            names_a, ctx_a = a.__tensor_flatten__()
            names_b, ctx_b = b.__tensor_flatten__()
            assert names_a == names_b, path
            self.same(ctx_a, ctx_b, f"{path}.<ctx>")
            for n in names_a:
                self.same(getattr(a, n), getattr(b, n), f"{path}.{n}")
            return
        if a.layout == torch.sparse_coo:
            for attr in ("sparse_dim", "dense_dim", "is_coalesced"):
                assert getattr(a, attr)() == getattr(b, attr)(), f"{path}.{attr}()"
            self.same(a._indices(), b._indices(), f"{path}._indices()")
            self.same(a._values(), b._values(), f"{path}._values()")
            return
        if a.layout in (torch.sparse_csr, torch.sparse_bsr, torch.sparse_csc, torch.sparse_bsc):
            row = a.layout in (torch.sparse_csr, torch.sparse_bsr)
            parts = ("crow_indices", "col_indices", "values") if row else ("ccol_indices", "row_indices", "values")
            for part in parts:
                self.same(getattr(a, part)(), getattr(b, part)(), f"{path}.{part}()")
            return
        if a.is_nested:
            for part in ("_nested_tensor_size", "_nested_tensor_strides", "_nested_tensor_storage_offsets"):
                self.same(getattr(a, part)(), getattr(b, part)(), f"{path}.{part}()")
            self.storage(a.untyped_storage(), b.untyped_storage(), f"{path}.untyped_storage()")
            return
        assert a.stride() == b.stride(), f"{path}.stride(): {a.stride()} != {b.stride()}"
        assert a.storage_offset() == b.storage_offset(), (
            f"{path}.storage_offset(): {a.storage_offset()} != {b.storage_offset()}")
        if a.is_quantized:
            assert a.qscheme() == b.qscheme(), path
            if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                assert _float_bits(a.q_scale()) == _float_bits(b.q_scale()), path
                assert a.q_zero_point() == b.q_zero_point(), path
            else:
                assert a.q_per_channel_axis() == b.q_per_channel_axis(), path
                self.same(a.q_per_channel_scales(), b.q_per_channel_scales(), f"{path}.q_per_channel_scales()")
                self.same(a.q_per_channel_zero_points(), b.q_per_channel_zero_points(), f"{path}.q_zero_points()")
        else:
            assert (a.is_conj(), a.is_neg()) == (b.is_conj(), b.is_neg()), f"{path}: conj/neg bits differ"
        self.storage(a.untyped_storage(), b.untyped_storage(), f"{path}.untyped_storage()")

    def check_sharing(self):
        """The partition of storages (by StorageImpl, and by data_ptr+nbytes) is the same on both sides."""
        live = [(p, a, b) for p, a, b in self.storages if a.data_ptr() and b.data_ptr()]
        for key in (lambda s: s._cdata, lambda s: (s.device, s.data_ptr(), s.nbytes())):
            groups_a, groups_b = {}, {}
            for path, a, b in live:
                ga = groups_a.setdefault(key(a), path)
                gb = groups_b.setdefault(key(b), path)
                assert ga == gb, f"storage sharing differs: {path} shares with {ga} in fastckpt, with {gb} in torch"
        # meta / empty storages compare by number of distinct storages only
        for path, a, b in self.storages:
            assert bool(a.data_ptr()) == bool(b.data_ptr()) or (a.nbytes() == 0 and a.device.type == "cpu"), (
                f"{path}: data_ptr nullness differs")  # an empty device storage has none, as torch's


def assert_tensors_equal(a: torch.Tensor, b: torch.Tensor):
    """Values only (bit-exact), for tensors that are not meant to share anything."""
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# --------------------------------------------------------------------------- checkpoint surgery


def save_bytes(obj, save=None, **kwargs) -> bytes:
    """What `save` (default: torch.save as it is at call time) writes for `obj`, as bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (save or torch.save)(obj, buf, **kwargs)
    return buf.getvalue()


def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of every record, in archive order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def prefix_of(data: bytes) -> str:
    return zip_entries(data)[0][0].split("/", 1)[0]


def write_zip(entries, align=64, compress=zipfile.ZIP_STORED) -> bytes:
    """A zip like torch writes: stored records whose data starts at a multiple of `align` (FB extra)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for name, payload in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            header_end = buf.tell() + 30 + len(name.encode())
            pad = (-(header_end + 4)) % align if align > 1 else 0
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad if align > 1 else b""
            z.writestr(info, payload)
    return buf.getvalue()


def rezip(data: bytes, *, replace=None, drop=(), rename=None, align=64, compress=zipfile.ZIP_STORED) -> bytes:
    """Rewrite a checkpoint. Names are relative to the archive prefix ('data.pkl', 'data/0', 'byteorder').

    replace: {name: new bytes}; drop: names to leave out; rename: {old: new}.
    """
    replace, rename = replace or {}, rename or {}
    prefix = prefix_of(data)
    out = []
    for full, payload in zip_entries(data):
        name = full.split("/", 1)[1]
        if name in drop:
            continue
        out.append((f"{prefix}/{rename.get(name, name)}", replace.get(name, payload)))
    return write_zip(out, align=align, compress=compress)


def record(data: bytes, name: str) -> bytes:
    prefix = prefix_of(data)
    return dict(zip_entries(data))[f"{prefix}/{name}"]


def record_span(data: bytes, name: str) -> tuple[int, int]:
    """(offset of the record's data in the file, its size), from the local header."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(f"{prefix_of(data)}/{name}")
    off = info.header_offset
    assert data[off:off + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
    return off + 30 + name_len + extra_len, info.file_size


def flip_byte(data: bytes, name: str, index: int = 0, mask: int = 0xFF) -> bytes:
    """The same file with one byte of record `name` xor-ed with `mask` (CRCs left as they were)."""
    off, size = record_span(data, name)
    assert 0 <= index < size
    out = bytearray(data)
    out[off + index] ^= mask
    return bytes(out)


def edit_pickle_strings(pkl: bytes, fn) -> bytes:
    """Re-emit a protocol-2 pickle with every unicode string s replaced by fn(s)."""
    ops = list(pickletools.genops(pkl))
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else pos + 1
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE") and fn(arg) != arg:
            out += P.str(fn(arg))
        else:
            assert op.name != "FRAME", "edit_pickle_strings handles protocol 2/3 only"
            out += pkl[pos:end]
    return bytes(out)


def retag(data: bytes, strings: dict, records: dict | None = None) -> bytes:
    """Replace pickle strings (pid keys, location tags) and rename records accordingly."""
    pkl = edit_pickle_strings(record(data, "data.pkl"), lambda s: strings.get(s, s))
    return rezip(data, replace={"data.pkl": pkl}, rename=records)


# --------------------------------------------------------------------------- pickle assembler


class P:
    """Opcode builders for hand-written pickles (protocol 2 unless a payload says otherwise)."""

    PROTO2 = b"\x80\x02"
    MARK, STOP, TUPLE, REDUCE, BUILD = b"(", b".", b"t", b"R", b"b"
    EMPTY_TUPLE, EMPTY_LIST, EMPTY_DICT = b")", b"]", b"}"
    TUPLE1, TUPLE2, TUPLE3 = b"\x85", b"\x86", b"\x87"
    APPEND, APPENDS, SETITEM, SETITEMS = b"a", b"e", b"s", b"u"
    NONE, TRUE, FALSE = b"N", b"\x88", b"\x89"
    BINPERSID, NEWOBJ = b"Q", b"\x81"

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    @staticmethod
    def str(s: str) -> bytes:
        enc = s.encode("utf-8", "surrogatepass")
        return b"X" + struct.pack("<I", len(enc)) + enc

    @staticmethod
    def int(n: int) -> bytes:
        if 0 <= n < 256:
            return b"K" + bytes([n])
        if -(2**31) <= n < 2**31:
            return b"J" + struct.pack("<i", n)
        enc = pickle.encode_long(n)
        return b"\x8a" + bytes([len(enc)]) + enc

    @staticmethod
    def float(x: float) -> bytes:
        return b"G" + struct.pack(">d", x)

    @classmethod
    def tuple(cls, *items: bytes) -> bytes:
        return cls.MARK + b"".join(items) + cls.TUPLE

    @classmethod
    def ints(cls, *ns) -> bytes:
        return cls.tuple(*(cls.int(n) for n in ns))

    @classmethod
    def call(cls, module: str, name: str, *args: bytes) -> bytes:
        return cls.glob(module, name) + cls.tuple(*args) + cls.REDUCE

    @classmethod
    def pid(cls, key="0", numel=16, storage=("torch", "FloatStorage"), location="cpu", raw_key=None) -> bytes:
        return cls.tuple(cls.str("storage"), cls.glob(*storage), raw_key if raw_key is not None else cls.str(key),
                         cls.str(location), cls.int(numel)) + cls.BINPERSID

    @classmethod
    def tensor(cls, offset=0, size=(16,), stride=(1,), *, pid=None, raw_size=None, raw_stride=None, raw_offset=None):
        """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
        return cls.call(
            "torch._utils", "_rebuild_tensor_v2",
            pid if pid is not None else cls.pid(),
            raw_offset if raw_offset is not None else cls.int(offset),
            raw_size if raw_size is not None else cls.ints(*size),
            raw_stride if raw_stride is not None else cls.ints(*stride),
            cls.FALSE, cls.call("collections", "OrderedDict"))

    @classmethod
    def program(cls, *parts: bytes, proto=PROTO2) -> bytes:
        return proto + b"".join(parts) + cls.STOP


# --------------------------------------------------------------------------- importable test classes


class TaggedTensor(torch.Tensor):
    """A tensor subclass (pickled through _rebuild_from_type_v2 with this class)."""


class Outer:
    """Pickled by protocol 2 as getattr(Outer, "Nested"): loads under safe_globals([getattr, ...])."""

    class Nested:
        def __init__(self, x=0):
            self.x = x

        def __eq__(self, other):
            return type(other) is type(self) and other.__dict__ == self.__dict__
