"""A Python-level fuzzer for fastckpt.load(weights_only=True), with torch.load as the oracle.

Inputs are real torch.save outputs, mutated three ways:
  * pickle: opcode-aware edits of data.pkl (ints, memo indices, strings, globals, opcode swaps,
    spliced GLOBAL/REDUCE/NEWOBJ/BUILD/APPEND/SETITEM sequences, memo aliasing, truncation),
    re-zipped with a valid CRC so the edit reaches the unpickler instead of the CRC check;
  * records: storage bytes, sizes, names, byteorder/version records, compression, re-zipped;
  * raw: header fields and bytes of the archive itself (CRCs and offsets left as they fall).
For every input: fastckpt must not crash or hang, every refusal must be a CheckpointError, and
whatever loads must equal torch.load's result for the same bytes (or torch must refuse it).

Iteration i of seed s is a pure function of (s, i), so any finding replays alone:
    python tests/fuzz/pyfuzz.py --seed S --start I --iters 1 -v
Long local runs:  python tests/fuzz/pyfuzz.py --seed 1 --iters 20000 --keep-going --out /tmp/ff
The other surfaces (open, convert, CLI, sharded index; tests/fuzz/surfaces.py): add --surfaces.
The loop runs in a child process (a segfault or hang is then a report, not a dead test run);
the parent restarts it after the iteration that crashed, when asked to keep going.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import pickletools
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent

# --------------------------------------------------------------------------- seeds


def make_seeds() -> dict[str, bytes]:
    """Varied torch.save outputs; deterministic (fixed generator, BytesIO => prefix 'archive')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about sparse invariant checks being off
        return _make_seeds()


def _make_seeds() -> dict[str, bytes]:
    import collections

    import torch

    g = torch.Generator().manual_seed(1234)

    def save(obj, **kw):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(obj, buf, **kw)
        return buf.getvalue()

    dtypes = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 2, generator=g).bfloat16(),
        f64=torch.randn(3, generator=g).double(),
        i64=torch.arange(6),
        i32=torch.arange(4, dtype=torch.int32),
        i8=torch.tensor([-1, 2, -3], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8),
        b=torch.tensor([True, False, True]),
        c64=torch.randn(2, dtype=torch.complex64, generator=g),
        scalar=torch.tensor(7),
        empty=torch.empty(0),
    )
    base = torch.arange(24, dtype=torch.float32)
    views = {
        "base": base,
        "mat": base.view(4, 6),
        "t": base.view(4, 6).t(),
        "slice": base[3:11],
        "step": base[1::3],
        "other": torch.ones(2, 2, dtype=torch.int16),
        "same_again": [base, base.view(2, 12)],
    }
    nested = {
        "cfg": {"lr": 0.25, "betas": (0.9, 0.999), "name": "model-\u00e9", "n": 10**20, "neg": -3,
                "flags": [True, False, None], "blob": b"\x00\xffbytes", "f": float("inf")},
        "layers": [{"w": torch.randn(2, 3, generator=g), "idx": i} for i in range(3)],
        "tup": (1, (2, (3, "x")), []),
    }
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    module_sd = lin.state_dict()  # OrderedDict with _metadata (BUILD on an OrderedDict)
    params = {"p": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
              "frozen": torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
              "leaf_grad": torch.zeros(2, requires_grad=True)}
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    i = torch.tensor([[0, 1, 1], [2, 0, 2]])
    v = torch.tensor([3.0, 4.0, 5.0])
    sparse = {"coo": torch.sparse_coo_tensor(i, v, (2, 3)), "dense": torch.ones(2)}
    misc = {"size": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"),
            "t": torch.zeros(2, 3).as_strided((2, 2), (1, 2), 1)}
    return {
        "dtypes_p2": save(dtypes),
        "dtypes_p4": save(dtypes, pickle_protocol=4),
        "views_p2": save(views),
        "views_p4": save(views, pickle_protocol=4),
        "nested_p2": save(nested),
        "module_sd_p2": save(module_sd),
        "params_p2": save(params),
        "optim_p2": save(opt.state_dict()),
        "optim_p4": save({"model": model.state_dict(), "opt": opt.state_dict()}, pickle_protocol=4),
        "sparse_p2": save(sparse),
        "misc_p2": save(misc),
    }


# --------------------------------------------------------------------------- zip helpers


def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def write_zip(entries, align=64, deflate=()) -> bytes:
    """A zip like torch writes (stored, data 64-byte aligned through an 'FB' extra); CRCs right."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a mutation, not a mistake
        with zipfile.ZipFile(buf, "w") as z:
            for name, payload in entries:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
                header_end = buf.tell() + 30 + len(name.encode())
                pad = (-(header_end + 4)) % align if align > 1 else 0
                info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad if align > 1 else b""
                z.writestr(info, payload)
    return buf.getvalue()


# --------------------------------------------------------------------------- pickle surgery

_OPS = {op.name: op for op in pickletools.opcodes}
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_MEMO_OPS = {"BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "GET", "PUT"}
_STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}
# opcodes interchangeable by stack shape (a swap keeps the stream parseable, changes the meaning)
_SWAPS = [
    [b"\x85", b"\x86", b"\x87", b")"],   # TUPLE1/2/3, EMPTY_TUPLE
    [b"R", b"\x81", b"b", b"s"],         # REDUCE, NEWOBJ, BUILD, SETITEM (two args -> one)
    [b"a", b"b", b"R"],                  # APPEND, BUILD, REDUCE
    [b"e", b"u", b"t", b"l", b"\x90"],   # APPENDS, SETITEMS, TUPLE, LIST, FROZENSET (mark-based)
    [b"]", b"}", b")", b"N", b"\x8f"],   # EMPTY_LIST/DICT/TUPLE, NONE, EMPTY_SET
    [b"\x88", b"\x89", b"N"],            # TRUE, FALSE, NONE
    [b"0", b"2"],                        # POP, DUP
    [b"\x94", b"0", b"2"],               # MEMOIZE, POP, DUP
]
INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -(2**31), 2**32, 2**32 - 1,
                    2**40, 2**53, 2**62, 2**63 - 1, 2**63, -(2**63), 2**64, 2**64 - 1, 10**30, 1 << 20, 1 << 26]
STRINGS = ["storage", "0", "1", "2", "3", "7", "cpu", "meta", "cuda", "cuda:0", "mps", "xla", "", "..", "../data.pkl",
           "data.pkl", "FloatStorage", "HalfStorage", "LongStorage", "ByteStorage", "BoolStorage", "DoubleStorage",
           "BFloat16Storage", "ComplexFloatStorage", "QInt8Storage", "QUInt4x2Storage", "UntypedStorage",
           "_metadata", "version", "__setstate__", "x" * 300, "\u00e9\U0001f600", "0" * 50]
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_qtensor"), ("torch._utils", "_rebuild_nested_tensor"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._utils", "_rebuild_wrapper_subclass"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch._utils", "_rebuild_tensor"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"), ("torch", "device"), ("torch", "float16"), ("torch", "int64"), ("torch", "bfloat16"),
    ("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "LongStorage"), ("torch", "ByteStorage"),
    ("torch", "BoolStorage"), ("torch", "UntypedStorage"), ("torch", "_utils"), ("torch", "sparse_coo"),
    ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "per_tensor_affine"),
    ("collections", "OrderedDict"), ("collections", "Counter"), ("collections", "defaultdict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("builtins", "slice"), ("builtins", "range"), ("builtins", "getattr"), ("builtins", "eval"),
    ("__builtin__", "set"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("os", "system"), ("sys", "modules"), ("posix", "system"), ("torch.serialization", "_get_layout"),
    ("torch.nested._internal.nested_tensor", "NestedTensor"), ("torch", "load"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("_codecs", "encode"),
]


class Op:
    """One pickle opcode as raw bytes, with what pickletools said about it (None for spliced bytes)."""

    __slots__ = ("raw", "name", "arg", "pushes", "pure")

    def __init__(self, raw: bytes, name=None, arg=None, pushes=False, pure=False):
        self.raw, self.name, self.arg, self.pushes = raw, name, arg, pushes
        self.pure = pure  # pushes one value and pops nothing: replaceable by any value


def parse_ops(pkl: bytes) -> list[Op]:
    ops, items = [], list(pickletools.genops(pkl))
    for k, (op, arg, pos) in enumerate(items):
        end = items[k + 1][2] if k + 1 < len(items) else pos + 1
        after = op.stack_after
        pushes = bool(after) and after[-1] is not pickletools.markobject
        ops.append(Op(pkl[pos:end], op.name, arg, pushes, pushes and not op.stack_before))
    end = items[-1][2] + 1
    if end < len(pkl):
        ops.append(Op(pkl[end:]))  # bytes after STOP
    return ops


def enc_int(n: int, rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # text forms (protocol 0 parsers)
        return b"I%d\n" % n if rng.random() < 0.5 else b"L%dL\n" % n
    if 0 <= n < 256 and rng.random() < 0.8:
        return b"K" + bytes([n])
    if 0 <= n < 65536 and rng.random() < 0.8:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31 and rng.random() < 0.9:
        return b"J" + struct.pack("<i", n)
    enc = pickle.encode_long(n)
    return b"\x8a" + bytes([len(enc)]) + enc if len(enc) < 256 else b"\x8b" + struct.pack("<i", len(enc)) + enc


def enc_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def enc_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def memo_get(k: int) -> bytes:
    return b"h" + bytes([k]) if k < 256 else b"j" + struct.pack("<I", k)


def memo_put(k: int) -> bytes:
    return b"q" + bytes([k]) if k < 256 else b"r" + struct.pack("<I", k)


class PickleMutator:
    def __init__(self, pkl: bytes, rng: random.Random):
        self.rng = rng
        self.ops = parse_ops(pkl)
        self.proto = pkl[1] if pkl[:1] == b"\x80" else 0
        self.memo = sorted({op.arg for op in self.ops if op.name in _MEMO_OPS and isinstance(op.arg, int)}
                           | set(range(sum(op.name == "MEMOIZE" for op in self.ops))))
        self.log: list[str] = []

    # values: self-contained byte sequences that push exactly one object
    def value(self, depth=0) -> bytes:
        r = self.rng
        choice = r.randrange(14 if depth < 2 else 6)
        if choice == 0:
            return enc_int(r.choice(INTERESTING_INTS) * r.choice((1, 1, -1)), r)
        if choice == 1:
            return enc_str(r.choice(STRINGS))
        if choice == 2:
            return r.choice([b"N", b"\x88", b"\x89", b")", b"]", b"}", b"G" + struct.pack(">d", r.choice(
                [0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308]))])
        if choice in (3, 4) and self.memo:
            return memo_get(r.choice(self.memo))  # aliasing: an object the stream already made
        if choice == 5:
            return b"C" + bytes([3]) + b"abc" if self.proto >= 3 else enc_int(r.randrange(-5, 300), r)
        if choice in (6, 7):  # a tuple (sizes, strides, args)
            n = r.choice((0, 1, 2, 3, 4, 5))
            return b"(" + b"".join(self.value(depth + 1) if r.random() < 0.3 else enc_int(
                r.choice((0, 1, 2, 3, 4, 16, -1, 2**62)), r) for _ in range(n)) + b"t"
        if choice == 8:  # a call of a (mostly allowlisted) global
            return enc_global(*r.choice(GLOBALS)) + self.value(depth + 1 if r.random() < 0.5 else 3) + b"R" \
                if r.random() < 0.3 else enc_global(*r.choice(GLOBALS)) + b"(" + b"".join(
                    self.value(depth + 1) for _ in range(r.randrange(4))) + b"tR"
        if choice == 9:  # NEWOBJ
            return enc_global(*r.choice(GLOBALS)) + b"(" + b"".join(
                self.value(depth + 1) for _ in range(r.randrange(3))) + b"t\x81"
        if choice == 10:  # a list / dict with contents
            if r.random() < 0.5:
                return b"](" + b"".join(self.value(depth + 1) for _ in range(r.randrange(4))) + b"e"
            return b"}(" + b"".join(self.value(depth + 1) + self.value(depth + 1) for _ in range(r.randrange(3))) + b"u"
        if choice == 11:  # the legacy set_ state: (storage, offset, size, stride)
            return b"(" + (memo_get(r.choice(self.memo)) if self.memo else b"N") + enc_int(
                r.choice((0, 1, 4, 2**20, 2**40)), r) + b"(" + enc_int(r.choice((1, 4, 1 << 20, 1 << 28)), r) + b"t(" \
                + enc_int(r.choice((1, 0, -1)), r) + b"tt"
        if choice == 12:  # a persistent id, maybe a valid-looking one
            return b"(" + enc_str(r.choice(("storage", "storage", "module"))) + enc_global(
                "torch", r.choice(("FloatStorage", "HalfStorage", "ByteStorage", "LongStorage", "UntypedStorage"))) \
                + enc_str(r.choice(("0", "1", "2", "9"))) + enc_str(r.choice(("cpu", "cpu", "meta"))) + enc_int(
                    r.choice((0, 1, 4, 6, 12, 24, 2**40)), r) + b"tQ"
        return enc_global(*r.choice(GLOBALS))

    def closers(self) -> list[tuple[int, int]]:
        """(MARK index, index of the APPENDS/SETITEMS that closes it), for the ops as they are now."""
        marks, pairs = [], []
        for i, op in enumerate(self.ops):
            if op.name == "MARK":
                marks.append(i)
            elif op.name in ("APPENDS", "SETITEMS", "TUPLE", "LIST", "DICT", "POP_MARK", "FROZENSET", "ADDITEMS"):
                if marks:
                    m = marks.pop()
                    if op.name in ("APPENDS", "SETITEMS"):
                        pairs.append((m, i))
        return pairs

    def mutate_once(self):
        r, ops = self.rng, self.ops
        k = r.randrange(len(ops))
        op = ops[k]
        kind = r.randrange(13)
        if kind == 0 and any(o.name in _INT_OPS for o in ops):  # change an int
            k = r.choice([i for i, o in enumerate(ops) if o.name in _INT_OPS])
            old = ops[k].arg if isinstance(ops[k].arg, int) else 0
            new = r.choice(INTERESTING_INTS + [old + 1, old - 1, old * 2, -old, old + r.randrange(-8, 9)])
            ops[k] = Op(enc_int(new, r), "INT*", new, True)
            self.log.append(f"int@{k} {old}->{new}")
        elif kind == 1 and any(o.name in _MEMO_OPS or o.name == "MEMOIZE" for o in ops):  # memo index
            k = r.choice([i for i, o in enumerate(ops) if o.name in _MEMO_OPS or o.name == "MEMOIZE"])
            new = r.choice(self.memo + [0, 1, 255, 256, 2**31 - 1, 2**32 - 1]) if self.memo else 0
            get = ops[k].name in ("BINGET", "LONG_BINGET", "GET") if r.random() < 0.8 else r.random() < 0.5
            ops[k] = Op(memo_get(new) if get else memo_put(new), "MEMO*", new, get)
            self.log.append(f"memo@{k} {'get' if get else 'put'} {new}")
        elif kind == 2 and any(o.name in _STR_OPS for o in ops):  # replace a string
            k = r.choice([i for i, o in enumerate(ops) if o.name in _STR_OPS])
            s = r.choice(STRINGS)
            ops[k] = Op(enc_str(s), "STR*", s, True)
            self.log.append(f"str@{k} {ops[k].arg!r:.40}")
        elif kind == 3 and any(o.name in ("GLOBAL", "STACK_GLOBAL") for o in ops):  # replace a global
            k = r.choice([i for i, o in enumerate(ops) if o.name in ("GLOBAL", "STACK_GLOBAL")])
            g = r.choice(GLOBALS)
            if ops[k].name == "STACK_GLOBAL":  # its two strings precede it; push the global instead
                ops[k] = Op(b"00" + enc_global(*g), "GLOBAL*", g, True)
            else:
                ops[k] = Op(enc_global(*g), "GLOBAL*", g, True)
            self.log.append(f"global@{k} {g}")
        elif kind == 4:  # swap an opcode for one of the same stack shape
            cands = [(i, grp) for i, o in enumerate(ops) for grp in _SWAPS if len(o.raw) == 1 and o.raw in grp]
            if cands:
                k, grp = r.choice(cands)
                new = r.choice(grp)
                self.log.append(f"swap@{k} {ops[k].raw!r}->{new!r}")
                ops[k] = Op(new, "SWAP*", None, False)
        elif kind in (5, 6) and any(o.pushes for o in ops):  # after a value: replace / wrap / build / append
            k = r.choice([i for i, o in enumerate(ops) if o.pushes])
            how = r.randrange(7)
            if how == 0 and op.pure:  # replace the value (in opcodes torch reads too)
                ops[k] = Op(self.value(), "VALUE*", None, True, True)
                self.log.append(f"replace@{k}({op.name}) {ops[k].raw[:60]!r}")
                return
            if how == 0:
                ins = b"0" + self.value()  # replace the value
            elif how == 1:  # wrap it: f(value)
                slot = r.choice((250, 251, 252))
                ins = memo_put(slot) + b"0" + enc_global(*r.choice(GLOBALS)) + b"(" + memo_get(slot) + b"".join(
                    self.value(1) for _ in range(r.randrange(3))) + b"tR"
            elif how == 2:
                ins = self.value() + b"b"  # BUILD the value with a state
            elif how == 3:
                ins = self.value() + b"a"  # APPEND
            elif how == 4:
                ins = self.value() + self.value() + b"s"  # SETITEM
            elif how == 5:
                ins = b"(" + self.value() + self.value() + b"u"  # SETITEMS
            else:
                ins = b"2" + memo_put(r.choice(self.memo or [0])) + b"0"  # DUP, re-memoise it elsewhere
            ops.insert(k + 1, Op(ins, "SPLICE*", None, True))
            self.log.append(f"after@{k}({op.name}) {ins[:60]!r}")
        elif kind == 7 and r.random() < 0.6 and self.closers():
            # a new item in a list or dict the stream builds: it ends up in the result, compared
            mark, closer = r.choice(self.closers())
            item = (enc_str(r.choice(("fz", "w", "0", "state"))) if ops[closer].name == "SETITEMS" else b"") + self.value()
            ops.insert(mark + 1, Op(item, "SPLICE*"))
            self.log.append(f"item@{mark}({ops[closer].name}) {item[:60]!r}")
        elif kind == 7:  # a self-contained value, popped (runs a callable, memoises nothing)
            v = self.value()
            ops.insert(k, Op(v + (memo_put(r.choice((200, 201))) if r.random() < 0.3 else b"") + b"0", "SPLICE*"))
            self.log.append(f"popped@{k} {v[:60]!r}")
        elif kind == 8:  # delete / duplicate / move an op
            if r.random() < 0.4:
                self.log.append(f"del@{k} {op.name}")
                del ops[k]
            elif r.random() < 0.5:
                ops.insert(k, Op(op.raw, op.name, op.arg, op.pushes))
                self.log.append(f"dup@{k} {op.name}")
            else:
                j = r.randrange(len(ops))
                ops.insert(j, ops.pop(k))
                self.log.append(f"move {k}->{j}")
        elif kind == 9:  # truncate
            cut = r.randrange(len(ops))
            del ops[cut:]
            if r.random() < 0.5:
                ops.append(Op(b".", "STOP"))
            self.log.append(f"truncate@{cut}")
        elif kind == 10:  # a length field or argument byte of one op
            if len(op.raw) > 1:
                raw = bytearray(op.raw)
                i = r.randrange(1, min(len(raw), 9))
                raw[i] = r.choice((0, 1, 0x7F, 0x80, 0xFF, raw[i] ^ (1 << r.randrange(8))))
                ops[k] = Op(bytes(raw), "RAW*")
                self.log.append(f"argbyte@{k} {op.name}[{i}]")
        elif kind == 11:  # the protocol header
            new = r.choice((0, 1, 2, 3, 4, 5, 6, 255))
            if ops[0].name == "PROTO":
                ops[0] = Op(bytes([0x80, new]), "PROTO")
                self.log.append(f"proto {new}")
        else:  # trailing bytes / a raw opcode byte anywhere
            b = bytes([r.randrange(256)])
            ops.insert(k, Op(b, "RAW*"))
            self.log.append(f"byte@{k} {b!r}")

    def emit(self) -> bytes:
        chunks = [op.raw for op in self.ops]
        if self.rng.random() < 0.9:  # keep protocol-4 frames consistent with the edits
            frames = [i for i, op in enumerate(self.ops) if op.name == "FRAME"]
            for n, i in enumerate(frames):
                end = frames[n + 1] if n + 1 < len(frames) else len(chunks)
                chunks[i] = b"\x95" + struct.pack("<Q", sum(len(c) for c in chunks[i + 1:end]))
        return b"".join(chunks)


# --------------------------------------------------------------------------- whole-input mutations


def mutate_pickle(data: bytes, rng: random.Random, log: list) -> bytes:
    entries = zip_entries(data)
    k = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    m = PickleMutator(entries[k][1], rng)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))):
        m.mutate_once()
    log.extend(m.log)
    entries[k] = (entries[k][0], m.emit())
    return write_zip(entries)


def mutate_records(data: bytes, rng: random.Random, log: list) -> bytes:
    entries = zip_entries(data)
    prefix = entries[0][0].split("/", 1)[0]
    storage = [i for i, (n, _) in enumerate(entries) if "/data/" in n]
    align, deflate = 64, set()
    kind = rng.randrange(10)
    if kind in (0, 1) and storage:  # storage bytes
        i = rng.choice(storage)
        b = bytearray(entries[i][1])
        if b:
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        entries[i] = (entries[i][0], bytes(b))
        log.append(f"record bytes {entries[i][0]}")
    elif kind == 2 and storage:  # storage size
        i = rng.choice(storage)
        b = entries[i][1]
        d = rng.choice((-1, 1, -2, 2, -4, 4, -8, 8, 64, -len(b)))
        entries[i] = (entries[i][0], b[:len(b) + d] if d < 0 else b + bytes(d))
        log.append(f"record size {entries[i][0]} {d:+d}")
    elif kind == 3:  # drop a record
        i = rng.randrange(len(entries))
        log.append(f"drop {entries[i][0]}")
        del entries[i]
    elif kind == 4:  # rename / duplicate
        i = rng.randrange(len(entries))
        new = f"{prefix}/" + rng.choice(("data/0", "data/1", "data/9", "data.pkl", "byteorder", "version",
                                         ".data/version", "data/", "data/0/../1", "constants.pkl", "x"))
        if rng.random() < 0.5:
            entries.append((new, entries[i][1]))
            log.append(f"dup {entries[i][0]} as {new}")
        else:
            log.append(f"rename {entries[i][0]} -> {new}")
            entries[i] = (new, entries[i][1])
    elif kind == 5:  # byteorder / version records
        name = rng.choice(("byteorder", "version", ".data/version"))
        val = rng.choice((b"big", b"little", b"", b"middle", b"0", b"1", b"3", b"10", b"11", b"99\n", b"abc"))
        entries = [(n, p) for n, p in entries if n != f"{prefix}/{name}"] + [(f"{prefix}/{name}", val)]
        log.append(f"set {name}={val!r}")
    elif kind == 6:  # compression
        deflate = {rng.choice(entries)[0] for _ in range(rng.randrange(1, 3))}
        log.append(f"deflate {sorted(deflate)}")
    elif kind == 7:  # order
        rng.shuffle(entries)
        log.append("shuffle")
    elif kind == 8:  # prefixes
        i = rng.randrange(len(entries))
        new = rng.choice(("other", "", "archive/archive", "a b")) + "/" + entries[i][0].split("/", 1)[1]
        log.append(f"prefix {entries[i][0]} -> {new}")
        entries[i] = (new, entries[i][1])
    else:
        align = rng.choice((1, 2, 8, 4096))
        log.append(f"align {align}")
    return write_zip(entries, align=align, deflate=deflate)


def _header_fields(data: bytes):
    """(offset, width) of each numeric field of every zip header found by signature."""
    fields = []
    layouts = {
        b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
        b"PK\x01\x02": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 2), (14, 2), (16, 4), (20, 4), (24, 4), (28, 2),
                        (30, 2), (32, 2), (34, 2), (36, 2), (38, 4), (42, 4)],
        b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
        b"PK\x06\x06": [(4, 8), (12, 2), (14, 2), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8)],
        b"PK\x06\x07": [(4, 4), (8, 8), (16, 4)],
        b"PK\x07\x08": [(4, 4), (8, 4), (12, 4)],
    }
    for sig, layout in layouts.items():
        start = 0
        while (pos := data.find(sig, start)) >= 0:
            fields += [(pos + off, w) for off, w in layout if pos + off + w <= len(data)]
            start = pos + 1
    return fields


def mutate_raw(data: bytes, rng: random.Random, log: list) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind in (0, 1, 2):  # a header field (after the first 4 bytes: those decide zip vs legacy)
        fields = [(o, w) for o, w in _header_fields(data) if o >= 4]
        o, w = rng.choice(fields)
        old = int.from_bytes(b[o:o + w], "little")
        mx = (1 << (8 * w)) - 1
        new = rng.choice((0, 1, mx, mx - 1, old + 1, old - 1, old + 64, old - 64, old * 2, old ^ 0x8,
                          len(data), len(data) - 22)) & mx
        b[o:o + w] = new.to_bytes(w, "little")
        log.append(f"field@{o}/{w} {old}->{new}")
    elif kind == 3:
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(4, len(b))
            b[i] = rng.randrange(256)
        log.append("byteflips")
    else:
        if rng.random() < 0.5:
            n = rng.randrange(4, len(b))
            del b[n:]
            log.append(f"truncate {n}")
        else:
            b += bytes(rng.randrange(1, 40))
            log.append("trailing")
    return bytes(b)


def make_input(seeds: dict[str, bytes], seed: int, i: int) -> tuple[bytes, dict]:
    """Input number i of run `seed`: a pure function of (seed, i)."""
    rng = random.Random(f"{seed}:{i}")
    name = rng.choice(sorted(seeds))
    data = seeds[name]
    log: list[str] = []
    rounds = rng.choice((1, 1, 1, 2, 3))
    for _ in range(rounds):
        x = rng.random()
        try:
            if x < 0.65:
                data = mutate_pickle(data, rng, log)
            elif x < 0.85:
                data = mutate_records(data, rng, log)
            else:
                data = mutate_raw(data, rng, log)
        except Exception as e:  # noqa: BLE001 - zipfile/pickletools choke on what earlier rounds made
            # a previous raw/record round left nothing to parse; keep what we have
            log.append(f"(stacked mutation skipped: {type(e).__name__})")
            break
    mode = {"mmap": rng.random() < 0.3, "path": rng.random() < 0.5}
    return data, {"seed_name": name, "log": log, **mode}


# --------------------------------------------------------------------------- the oracle (child side)


def _call(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*a, **kw), None
        except Exception as e:  # noqa: BLE001 - the outcome is what is judged
            return None, e


def normalise(msg: str) -> str:
    msg = re.sub(r"\(tagged with .*?\)$", "(tagged with _)", msg)
    msg = re.sub(r"0x[0-9a-fA-F]+", "0x_", msg)
    return re.sub(r"\d+", "N", msg)[:160]


def lower_for_torch(pkl: bytes) -> bytes | None:
    """The same pickle in the opcode subset torch's weights-only unpickler reads, or None.

    torch refuses FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, POP, LONG4 and the protocol-0
    text opcodes ("Unsupported operand"), so without this every protocol-4 input would go
    uncompared. Each rewrite keeps the meaning: MEMOIZE becomes BINPUT of the key it would use;
    STACK_GLOBAL of two strings becomes GLOBAL (the strings are dropped from the output, and a
    later memo get of one emits the string itself: strings have no identity to preserve).
    """
    try:
        items = list(pickletools.genops(pkl))
    except Exception:  # noqa: BLE001 - malformed: torch's own refusal is the reference
        return None
    out: list[bytes] = []
    memo: dict = {}  # memo key -> the string stored there (None: not a string)
    pushes: list = []  # recent pushes: (string or None, index in out where its bytes start)

    def push_str(sv):
        b = sv.encode("utf-8", "surrogatepass")
        pushes.append((sv, len(out)))
        out.append(b"X" + struct.pack("<I", len(b)) + b)

    for k, (op, arg, pos) in enumerate(items):
        raw = pkl[pos:items[k + 1][2] if k + 1 < len(items) else pos + 1]
        n = op.name
        if n == "FRAME":
            continue
        if n in ("SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINUNICODE"):
            push_str(arg)
            continue
        if n in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            key = len(memo) if n == "MEMOIZE" else arg
            if not isinstance(key, int) or not 0 <= key < 2**32:
                return None
            memo[key] = pushes[-1][0] if pushes else None
            raw = memo_put(key)
        elif n in ("BINGET", "LONG_BINGET", "GET"):
            if not isinstance(arg, int) or not 0 <= arg < 2**32:
                return None
            if isinstance(memo.get(arg), str):
                push_str(memo[arg])
                continue
            pushes.append((None, len(out)))
            raw = memo_get(arg)
        elif n == "STACK_GLOBAL":
            if len(pushes) < 2 or not all(isinstance(v, str) and "\n" not in v for v, _ in pushes[-2:]):
                return None
            (mod, start), (name, _) = pushes[-2:]
            del out[start:], pushes[-2:]
            pushes.append((None, len(out)))
            raw = enc_global(mod, name)
        elif n in ("INT", "LONG", "LONG4"):
            if isinstance(arg, bool):
                raw = b"\x88" if arg else b"\x89"
            else:
                enc = pickle.encode_long(arg)
                if len(enc) > 255:
                    return None
                raw = b"J" + struct.pack("<i", arg) if -(2**31) <= arg < 2**31 else b"\x8a" + bytes([len(enc)]) + enc
            pushes.append((None, len(out)))
        elif n == "FLOAT":
            raw = b"G" + struct.pack(">d", arg)
            pushes.append((None, len(out)))
        elif op.stack_after and op.stack_after[-1] is not pickletools.markobject:
            pushes.append((None, len(out)))
        else:
            pushes.clear()  # a pop or a mark: what is recent is no longer safe to cut out
        out.append(raw)
    end = items[-1][2] + 1
    return b"".join(out) + pkl[end:]


def reference_input(data: bytes) -> bytes | None:
    """The same records, data.pkl lowered for torch, re-zipped (only asked for inputs whose zip torch
    read well enough to reach the pickle; zipfile checks every CRC, so corrupt records give None)."""
    try:
        entries = zip_entries(data)
        k = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
        low = lower_for_torch(entries[k][1])
        if low is None or low == entries[k][1]:
            return None
        entries[k] = (entries[k][0], low)
        return write_zip(entries)
    except Exception:  # noqa: BLE001
        return None


# torch refusing, where fastckpt loaded, for one of these reasons means fastckpt skipped a safety check
TORCH_SAFETY_REFUSALS = ("not resizable", "out of bounds")


def record_payloads(data: bytes) -> set[bytes]:
    """Every record's bytes as Python's zipfile reads them (a third opinion on storage bytes)."""
    out = set()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                try:
                    out.add(z.read(info))
                except Exception:  # noqa: BLE001 - a record zipfile cannot read is no evidence either way
                    pass
    except Exception:  # noqa: BLE001
        pass
    return out


def make_comparer(parity, data: bytes):
    class Comparer(parity._Comparer):
        """parity's comparison, made robust to what a fuzzed stream can build."""

        torch_misread = False

        def same(self, a, b, path):
            if isinstance(a, dict) and type(a) is type(b) and not all(
                    isinstance(k, parity._SCALARS + (float, tuple)) for k in list(a) + list(b)):
                # keys that are tensors or storages (a fuzzed SETITEM makes them): parity compares
                # keys with ==, which is elementwise or by identity for those; compare them as values
                if not self._first_visit(a, b, path):
                    return
                assert len(a) == len(b), f"{path}: len {len(a)} != {len(b)}"
                for n, ((ka, va), (kb, vb)) in enumerate(zip(a.items(), b.items())):
                    self.same(ka, kb, f"{path}.<key {n}>")
                    self.same(va, vb, f"{path}[<key {n}>]")
                return self.attrs(a, b, path)
            return super().same(a, b, path)

        def tensor(self, a, b, path):
            ha, hb = a._backward_hooks, b._backward_hooks
            if ha is not None and not isinstance(ha, dict):
                # _rebuild_parameter(data, rg, hooks) stores any object as hooks; parity lists them
                self.same(ha, hb, f"{path}._backward_hooks")
                a._backward_hooks = b._backward_hooks = None
                try:
                    return super().tensor(a, b, path)
                finally:
                    a._backward_hooks, b._backward_hooks = ha, hb
            return super().tensor(a, b, path)

        def storage(self, a, b, path):
            try:
                return super().storage(a, b, path)
            except AssertionError as e:
                if "storage bytes differ" not in str(e):
                    raise
                # torch (miniz) returns uninitialised memory for a record whose central-directory
                # attributes say "directory"; if fastckpt's bytes are the record's and torch's are
                # no record's, the reference misread: skip the input, do not blame fastckpt.
                records = record_payloads(data)
                to_bytes = lambda s: parity._storage_bytes(s).numpy().tobytes()  # noqa: E731
                if to_bytes(a) in records and to_bytes(b) not in records:
                    self.torch_misread = True
                    return
                raise

    return Comparer()


def judge(fc_load, torch_load, data: bytes, mode: dict, path: str, *, strict=False, phase=lambda name: None,
          outcomes=None, note=lambda text: None) -> dict | None:
    """None when fastckpt handled the input correctly, else a finding (a dict)."""
    import fastckpt
    import parity

    outcomes = {} if outcomes is None else outcomes

    def count(key):
        outcomes[key] = outcomes.get(key, 0) + 1

    def load(fn, data=data, path=path):
        if mode["mmap"] or mode["path"]:
            return _call(fn, path, weights_only=True, mmap=mode["mmap"])
        return _call(fn, io.BytesIO(data), weights_only=True, mmap=False)

    phase("fc")
    got, err = load(fc_load)
    count("loaded" if err is None else type(err).__name__)
    if err is not None and isinstance(err, fastckpt.CheckpointError):
        return None
    phase("torch")
    ref, ref_err = load(torch_load)
    if ref_err is not None and "Unsupported operand" in str(ref_err):
        lowered = reference_input(data)
        if lowered is not None:  # the same meaning in opcodes torch reads: that is the reference
            ref_path = path + ".ref"
            pathlib.Path(ref_path).write_bytes(lowered)
            ref, ref_err = load(torch_load, lowered, ref_path)
            count("reference lowered")
    phase("cmp")
    if err is not None:
        same = ref_err is not None and type(err) is type(ref_err) and str(err) == str(ref_err)
        if same and not strict:
            return None  # what torch raises for these bytes, passed through (README: "pass through unchanged")
        return {"kind": "non-CheckpointError" if not same else "non-CheckpointError (same as torch)",
                "exc": type(err).__name__, "msg": str(err)[:500], "torch": repr(ref_err)[-300:],
                "where": "".join(traceback.format_tb(err.__traceback__)[-2:])[-600:]}
    if ref_err is not None:
        why = str(ref_err).split("error: ")[-1]
        count(f"loaded, torch refused: {type(ref_err).__name__}: {normalise(why)[:100]}")
        if "Unsupported operand" not in why:
            note(f"loaded, torch refused: {type(ref_err).__name__}: {why[:200]!r}")
        if any(m in str(ref_err) for m in TORCH_SAFETY_REFUSALS):
            return {"kind": "loaded what torch refused as unsafe", "exc": "-", "msg": "",
                    "torch": repr(ref_err)[-300:]}
        return None  # fastckpt more permissive than torch: allowed (e.g. protocol 4+ opcodes)
    cmp = make_comparer(parity, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp.same(got, ref, "obj")
            cmp.check_sharing()
    except AssertionError as e:
        return {"kind": "differs from torch", "exc": "AssertionError", "msg": str(e)[:500], "torch": ""}
    except Exception as e:  # noqa: BLE001 - comparing broke on a malformed result: also a finding
        return {"kind": "comparison raised", "exc": type(e).__name__, "msg": str(e)[:500], "torch": "",
                "where": "".join(traceback.format_tb(e.__traceback__)[-2:])[-600:]}
    if cmp.torch_misread:
        count("skipped: torch misread a record")
    return None


# phases inside fastckpt: a crash or hang there is a finding (elsewhere it is torch's or the harness's)
FASTCKPT_PHASES = ("fc", "open", "convert", "cli", "index")


class Child:
    def __init__(self, workdir: pathlib.Path, strict: bool, target: str | None, surfaces: bool = False):
        import torch

        import fastckpt
        sys.path.insert(0, str(TESTS))
        import parity

        self.torch, self.fastckpt, self.parity = torch, fastckpt, parity
        self.torch_load = parity._patch.original_load()
        self.fc_load = fastckpt.load
        if target:  # the harness's own tests swap in a broken loader
            mod, fn = target.split(":")
            sys.path.insert(0, str(HERE))
            self.fc_load = getattr(__import__(mod), fn)
        self.work = workdir
        self.cur = workdir / "cur.pt"
        self.strict = strict
        self.surfaces = surfaces  # fuzz open/convert/CLI/sharded index instead of load against torch
        self.outcomes: dict[str, int] = {}  # what fastckpt did, to see the mutations reach the unpickler

    def phase(self, i, name):
        sys.stdout.write(f"P {i} {name}\n")
        sys.stdout.flush()

    def check(self, i, data, meta) -> dict | None:
        self.cur.write_bytes(data)  # before loading: what the parent saves if we die
        if self.surfaces:
            import surfaces

            finding = surfaces.judge_surfaces(data, str(self.cur), str(self.work), random.Random(f"surfaces:{i}"),
                                              lambda name: self.phase(i, name))
            self.outcomes["surfaces ok" if finding is None else "finding"] = self.outcomes.get(
                "surfaces ok" if finding is None else "finding", 0) + 1
            return finding
        return judge(self.fc_load, self.torch_load, data, meta, str(self.cur), strict=self.strict,
                     phase=lambda name: self.phase(i, name), outcomes=self.outcomes,
                     note=lambda text: sys.stderr.write(f"NOTE i={i} {text}\n"))

    def run(self, seed, start, iters, verbose):
        seeds = make_seeds()
        if self.surfaces:
            import surfaces

            seeds.update(surfaces.seeds())
        stats = {"iters": 0, "findings": 0, "t0": time.time()}
        for i in range(start, start + iters):
            self.phase(i, "gen")
            data, meta = make_input(seeds, seed, i)
            if verbose:
                sys.stderr.write(f"[{i}] {meta}\n")
            finding = self.check(i, data, meta)
            stats["iters"] += 1
            if finding is not None:
                stats["findings"] += 1
                out = self.work / f"finding-{seed}-{i}.pt"
                out.write_bytes(data)
                finding.update(i=i, seed=seed, file=str(out), sig=f"{finding['kind']}|{finding['exc']}|"
                               f"{normalise(finding['msg'])}", **meta)
                sys.stdout.write("F " + json.dumps(finding) + "\n")
                sys.stdout.flush()
        stats["secs"] = round(time.time() - stats.pop("t0"), 2)
        stats["outcomes"] = self.outcomes
        sys.stdout.write("S " + json.dumps(stats) + "\n")
        sys.stdout.flush()


def child_main(args):
    import faulthandler
    import resource

    faulthandler.enable()  # a native crash prints the Python stack to stderr
    limit = args.mem_gb << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # allocations sized by the file fail, not swap
    warnings.simplefilter("ignore")
    Child(pathlib.Path(args.work), args.strict, args.target, args.surfaces).run(args.seed, args.start, args.iters, args.verbose)


# --------------------------------------------------------------------------- the driver (parent side)


def read_lines(proc, deadline):
    """The child's stdout lines (text, no newline) as they arrive; ends at EOF, or kills the child
    when no byte came before `deadline()`. Reads the descriptor itself (os.read), so no line can
    wait in a Python buffer where select() does not see it."""
    fd, pending = proc.stdout.fileno(), b""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode("utf-8", "replace")
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline() - time.time()))
        if not ready:  # silent too long: a hang
            proc.kill()
            proc.wait()
            return
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            proc.wait()
            return
        pending += chunk


def run_fuzz(seed: int, iters: int, *, start=0, work: pathlib.Path | None = None, keep_going=False, strict=False,
             timeout_s=20.0, target=None, verbose=False, mem_gb=4, log=None, surfaces=False) -> dict:
    """Run iterations [start, start+iters) in child processes. Returns findings and counts.

    A child that dies or goes silent is a finding when it was inside fastckpt.load; inside
    torch.load it only skips that input (the oracle broke, not the subject).
    """
    work = pathlib.Path(work or tempfile.mkdtemp(prefix="fastckpt-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    findings, skipped, done, outcomes = [], [], 0, {}
    i = start
    end = start + iters
    t0 = time.time()
    while i < end:
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", "--seed", str(seed), "--start", str(i),
               "--iters", str(end - i), "--work", str(work), "--mem-gb", str(mem_gb)]
        cmd += ["--strict"] * strict + (["--target", target] if target else []) + ["-v"] * verbose
        cmd += ["--surfaces"] * surfaces
        errf = open(work / f"child-stderr-{i}.txt", "w+")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, env=env)
        last_i, last_phase, finished = i, "start", False
        deadline = time.time() + timeout_s + 60  # the first input waits for imports and seeds
        for line in read_lines(proc, lambda: deadline):
            tag, _, rest = line.partition(" ")
            if tag == "P":
                n, _, ph = rest.partition(" ")
                last_i, last_phase = int(n), ph
                deadline = time.time() + timeout_s
            elif tag == "F":
                f = json.loads(rest)
                findings.append(f)
                if log:
                    log(f)
            elif tag == "S":
                st = json.loads(rest)
                done += st["iters"]
                for k, v in st["outcomes"].items():
                    outcomes[k] = outcomes.get(k, 0) + v
                finished = True
        proc.stdout.close()
        errf.seek(0)
        err_tail = errf.read()[-3000:]
        errf.close()
        if finished and proc.returncode == 0:
            break
        # died or hung at input last_i
        done += last_i - i  # the ones before it completed in this child
        rc = proc.returncode
        if last_phase in FASTCKPT_PHASES:
            saved = work / f"crash-{seed}-{last_i}.pt"
            shutil.copyfile(work / "cur.pt", saved)
            f = {"kind": "hang" if rc == -9 else "crash", "exc": f"rc={rc}", "msg": err_tail[-1500:], "i": last_i,
                 "seed": seed, "file": str(saved), "sig": f"{'hang' if rc == -9 else 'crash'}|rc={rc}"}
            findings.append(f)
            if log:
                log(f)
            if not keep_going:
                break
        elif last_phase in ("start", "gen"):  # the harness itself broke: say so, do not call it a finding
            raise RuntimeError(f"fuzz child failed outside the loads at input {last_i} (rc={rc}):\n{err_tail}")
        else:
            skipped.append({"i": last_i, "phase": last_phase, "rc": rc})  # torch itself died or hung
        done += 1
        i = last_i + 1
    return {"findings": findings, "skipped": skipped, "iters": done, "secs": round(time.time() - t0, 1),
            "work": str(work), "outcomes": outcomes}  # outcomes: of the children that finished


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--iters", type=int, default=int(os.environ.get("FASTCKPT_FUZZ_ITERS", "1000")))
    ap.add_argument("--work", "--out", dest="work", default=None)
    ap.add_argument("--keep-going", action="store_true", help="restart after a crash and keep fuzzing")
    ap.add_argument("--strict", action="store_true", help="a non-CheckpointError is a finding even when torch raised the same")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds one input may take")
    ap.add_argument("--mem-gb", type=int, default=4)
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--surfaces", action="store_true",
                    help="fuzz fastckpt.open, convert, the CLI and sharded indexes (tests/fuzz/surfaces.py)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--write", metavar="DIR", help="only write input(s) --start.. to DIR (to replay by hand)")
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.write:
        seeds = make_seeds()
        for i in range(args.start, args.start + args.iters):
            data, meta = make_input(seeds, args.seed, i)
            pathlib.Path(args.write, f"input-{args.seed}-{i}.pt").write_bytes(data)
            print(i, json.dumps(meta))
        return 0
    sigs: dict[str, int] = {}

    def show(f):
        new = f["sig"] not in sigs
        sigs[f["sig"]] = sigs.get(f["sig"], 0) + 1
        if new:
            print(f"NEW FINDING seed={f['seed']} i={f['i']}: {f['kind']} {f['exc']}: {f['msg'][:300]}\n   file={f['file']}"
                  f"\n   log={f.get('log')}", flush=True)

    res = run_fuzz(args.seed, args.iters, start=args.start, work=args.work, keep_going=args.keep_going,
                   strict=args.strict, timeout_s=args.timeout, verbose=args.verbose, mem_gb=args.mem_gb, log=show,
                   surfaces=args.surfaces)
    print(json.dumps({k: v for k, v in res.items() if k != "findings"}))
    for sig, n in sorted(sigs.items(), key=lambda kv: -kv[1]):
        print(f"{n:6d}  {sig}")
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
