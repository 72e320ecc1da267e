"""fastckpt.load returns what torch.load returns, for files written by torch.save.

Every case is saved once; each test loads it with torch.load and fastckpt.load under the same
options and compares the object graphs field by field (tests/parity.py: assert_same).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import pickle
import warnings
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from parity import (
    TaggedTensor,
    assert_same,
    assert_same_outcome,
    fastckpt_load,
    record,
    retag,
    rezip,
    save_bytes,
    torch_load,
    zip_entries,
)

import fastckpt


# --------------------------------------------------------------------------- the objects


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _trained():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _training_checkpoint():
    model, opt, sched = _trained()
    return {"epoch": 3, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(), "best_loss": float("inf"), "config": {"lr": 1e-3, "name": "run-1"}}


def _dtypes():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (48,), dtype=torch.uint8, generator=gen)  # arbitrary bits: NaN payloads, -0.0...
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
              torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
              *sorted(torch.storage._new_dtypes(), key=str)]
    out = {str(dt): raw.clone().view(dt) for dt in dtypes}
    out["bool"] = torch.tensor([True, False, True])
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 3)
    out["nan"] = torch.tensor([0x7FC00001, -0x3FFFFF, 0x7F800000, -(2**31)], dtype=torch.int32).view(torch.float32)
    return out


def _views():
    base = torch.arange(24.0)
    return {"base": base, "slice": base[4:10], "strided": base.view(4, 6)[:, 1::2], "t": base.view(4, 6).t(),
            "expand": torch.arange(3.0).expand(4, 3), "twice": [base, base], "tail": torch.arange(100.0)[50:52],
            "int_view": torch.arange(12).view(3, 4)[1:, ::2]}


def _conj_neg():
    c = torch.randn(4, dtype=torch.complex64)
    return {"c": c, "conj": c.conj(), "neg": torch.randn(3, dtype=torch.complex64).conj().imag,
            "resolved": c.conj().resolve_conj(),
            "c128": torch.randn(3, dtype=torch.complex128).conj()}


def _requires_grad():
    x = torch.randn(3, requires_grad=True)
    return {"leaf": x, "nonleaf": x * 2, "plain": torch.randn(2), "int": torch.arange(3)}


def _parameters():
    stateful = nn.Parameter(torch.randn(2))
    stateful.tag, stateful.scale = "x", 2.0
    return {"p": nn.Parameter(torch.randn(3)), "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
            "stateful": stateful, "view_param": nn.Parameter(torch.arange(6.0).view(2, 3)[1])}


def _tensor_attrs():
    t = torch.randn(2)
    t.foo, t.meta = "bar", {"k": [1, 2]}
    return {"t": t}


def _subclass():
    t = torch.arange(4.0).as_subclass(TaggedTensor)
    t.label = "weights"
    return {"t": t, "plain": torch.ones(2)}


def _quantized():
    x = torch.randn(3, 4)
    out = {str(dt): torch.quantize_per_tensor(x, 0.1, 2, dt)
           for dt in (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4)}
    out["per_channel"] = torch.quantize_per_channel(x, torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 2, 3]), 0,
                                                    torch.qint8)
    out["float_qparams"] = torch.quantize_per_channel(x, torch.tensor([0.1, 0.2, 0.3, 0.4]),
                                                      torch.tensor([0.0, 1.0, 2.0, 3.0]), 1, torch.quint8)
    return out


def _sparse():
    dense = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0], [0.0, 6.0, 0.0, 0.0]])
    return {"coo": dense.to_sparse(),
            "uncoalesced": torch.sparse_coo_tensor(torch.tensor([[0, 0, 1], [1, 1, 0]]), torch.tensor([1.0, 2, 3]),
                                                   (2, 2)),
            "hybrid": torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.randn(2, 3), (2, 3)),
            "csr": dense.to_sparse_csr(), "csc": dense.to_sparse_csc(),
            "bsr": dense.to_sparse_bsr((2, 2)), "bsc": dense.to_sparse_bsc((2, 2))}


def _nested():
    return {"nt": torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)])}


def _jagged():
    return {"njt": torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)], layout=torch.jagged)}


def _meta():
    m = torch.empty(3, 4, device="meta")
    return {"m": m, "row": m[1], "rg": torch.empty(2, device="meta", requires_grad=True), "cpu": torch.ones(2)}


def _storages():
    t = torch.arange(6.0)
    return {"untyped": torch.arange(5, dtype=torch.int16).untyped_storage(), "t": t, "shares_t": t.storage(),
            "typed": torch.arange(3, dtype=torch.int16).storage(), "empty": torch.UntypedStorage(0)}


def _values():
    return {"size": torch.Size([2, 3]), "dtype": torch.bfloat16,
            "dtypes": [torch.float8_e4m3fn, torch.uint16, torch.int4],
            "device": torch.device("cuda", 1), "cpu": torch.device("cpu"), "layout": torch.sparse_csr,
            "qscheme": torch.per_channel_affine, "set": {1, "a", (2, 3)}, "empty_set": set(), "complex": 1 + 2j,
            "bytes": b"ab\xff\x00", "bytearray": bytearray(b"xy"), "big": 2**100, "neg": -(2**70), "i64": -(2**63),
            "floats": [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-310], "unicode": "ünï\u2603",
            "none": None, "bools": (True, False), "nested": {"a": [1, (2, [3])], "e": ([], (), {})},
            "counter": Counter("abca"), "od": OrderedDict(b=1, a=2), "keys": {3: "x", -1: "y", (1, 2): "z", None: 0}}


def _shared_objects():
    d, lst, t = {"x": 1}, [1], torch.randn(2)
    return {"tensors": [t, t], "dicts": (d, d), "lists": [lst, lst], "again": t, "views": [t[1:], t[1:]]}


def _mixed():
    base = torch.arange(10.0)
    return {"views": [base, base[2:5]], "sd": _model().state_dict(), "bytes": b"\x00\xff", "set": {1, 2},
            "size": torch.Size([1]), "c": 2j, "text": "ok"}


def _numpy_rng():
    return {"numpy_rng": np.random.get_state(), "rng": torch.get_rng_state()}


def _namespace():
    return {"args": argparse.Namespace(lr=0.1, layers=[2, 3]), "w": torch.ones(2)}


@dataclasses.dataclass
class Case:
    make: object
    weights_only: str = "ok"  # "ok" | "torch_fails" (fastckpt loads, torch refuses) | "refused" (both refuse)
    protocol: int = 2
    safe_globals: tuple = ()


CASES = {
    "state_dict": Case(lambda: _model().state_dict()),
    "optimizer": Case(lambda: (lambda m, o, s: {"model": m.state_dict(), "optimizer": o.state_dict()})(*_trained())),
    "training": Case(_training_checkpoint),
    "dtypes": Case(_dtypes),
    "views": Case(_views),
    "conj_neg": Case(_conj_neg),
    "requires_grad": Case(_requires_grad),
    "parameters": Case(_parameters),
    "tensor_attrs": Case(_tensor_attrs),
    "subclass": Case(_subclass, safe_globals=(TaggedTensor,)),
    "subclass_unlisted": Case(_subclass, weights_only="refused"),
    "quantized": Case(_quantized),
    "sparse": Case(_sparse),
    "nested": Case(_nested),
    "jagged": Case(_jagged),
    "meta": Case(_meta),
    "storages": Case(_storages),
    "values": Case(_values),
    "shared_objects": Case(_shared_objects),
    "module_object": Case(_model, weights_only="refused"),
    "numpy_rng": Case(_numpy_rng, weights_only="refused"),
    "namespace": Case(_namespace, weights_only="refused"),
    "protocol2": Case(_mixed, protocol=2),
    "protocol3": Case(_mixed, weights_only="torch_fails", protocol=3),
    "protocol4": Case(_mixed, weights_only="torch_fails", protocol=4),
    "protocol5": Case(_mixed, weights_only="torch_fails", protocol=5),
}

_saved: dict[str, bytes] = {}


def saved(name: str) -> bytes:
    if name not in _saved:
        torch.manual_seed(0)
        case = CASES[name]
        with warnings.catch_warnings():  # beta/prototype/deprecation notices while building the objects
            warnings.simplefilter("ignore")
            obj = case.make()
        _saved[name] = save_bytes(obj, pickle_protocol=case.protocol)
    return _saved[name]


# --------------------------------------------------------------------------- running both loaders


def as_source(data: bytes, source: str, tmp_path, stack):
    if source == "bytesio":
        return io.BytesIO(data)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(data)
    return path if source == "path" else stack.enter_context(open(path, "rb"))


def compare(data: bytes, case: Case, weights_only: bool, mmap: bool, source: str, tmp_path, **kwargs):
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.serialization.safe_globals(list(case.safe_globals)))
        f = as_source(data, source, tmp_path, stack)
        torch_wo = weights_only and case.weights_only == "ok"
        ref = torch_load(f, weights_only=weights_only if case.weights_only == "refused" else torch_wo, mmap=mmap,
                         **kwargs)
        got = fastckpt_load(f, weights_only=weights_only, mmap=mmap, **kwargs)
        if weights_only and case.weights_only == "refused":
            assert isinstance(ref.exc, pickle.UnpicklingError), "the case is meant to be refused by torch too"
            assert isinstance(got.exc, fastckpt.UnsafeGlobalError), f"not refused: {got.exc or got.value!r}"
        else:
            assert ref.exc is None, f"torch.load failed on the reference load: {ref.exc!r}"
        assert_same_outcome(got, ref)


SOURCES = [("path", False), ("path", True), ("bytesio", False), ("file", False)]


@pytest.mark.parametrize("source,mmap", SOURCES, ids=[f"{s}-mmap" if m else s for s, m in SOURCES])
@pytest.mark.parametrize("weights_only", [True, False], ids=["wo", "pickle"])
@pytest.mark.parametrize("name", list(CASES))
def test_parity(name, weights_only, source, mmap, tmp_path):
    compare(saved(name), CASES[name], weights_only, mmap, source, tmp_path)


# --------------------------------------------------------------------------- rewritten files


POINTER_KEYS = {"0": "94238473829376", "1": "94238473829472", "2": "140117216387072"}


def _pointer_keys(data):
    return retag(data, POINTER_KEYS, {f"data/{k}": f"data/{v}" for k, v in POINTER_KEYS.items()})


TRANSFORMS = {
    "big_endian": lambda d: rezip(d, replace={"byteorder": b"big"}),
    "no_format_version": lambda d: rezip(d, drop={".format_version", ".storage_alignment"}),
    "no_byteorder": lambda d: rezip(d, drop={"byteorder"}),
    "pointer_keys": _pointer_keys,
    "rezipped": lambda d: rezip(d),
    "unaligned": lambda d: rezip(d, align=1),
}
# objects with no digit-only strings besides storage keys (pointer_keys retags every such string)
TRANSFORM_CASES = ["dtypes", "views", "conj_neg", "quantized"]


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["wo", "pickle"])
@pytest.mark.parametrize("name", TRANSFORM_CASES)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_rewritten_file(transform, name, weights_only, mmap, tmp_path):
    data = TRANSFORMS[transform](saved(name))
    if transform == "big_endian":
        assert record(data, "byteorder") == b"big"
    compare(data, CASES[name], weights_only, mmap, "path", tmp_path)


def test_pointer_keys_rewrite_is_complete():
    """The helper renamed every storage record and torch reads the result (guards the test above)."""
    data = TRANSFORMS["pointer_keys"](saved("views"))
    names = [n.split("/", 1)[1] for n, _ in zip_entries(data)]
    assert not any(n.startswith("data/") and n[5:] in POINTER_KEYS for n in names)
    assert any(n == f"data/{POINTER_KEYS['0']}" for n in names)
    assert_same(torch.load(io.BytesIO(data)), torch.load(io.BytesIO(saved("views"))))


# --------------------------------------------------------------------------- the comparer itself


def _pairs():
    """(a, b) pairs that differ in exactly one way assert_same must notice."""
    t = torch.arange(6.0).view(2, 3)
    md, plain = OrderedDict(a=1), OrderedDict(a=1)
    md._metadata = {"": {"version": 1}}
    d = {"k": 1}
    hooked = torch.ones(2)
    hooked._backward_hooks = OrderedDict()
    return {
        "stride": (t.t().contiguous().t(), t),
        "storage_offset": (torch.arange(4.0)[1:], torch.arange(1.0, 4.0)),
        "storage_size": (torch.arange(4.0)[:2], torch.arange(4.0)[:2].clone()),
        "sharing": ([t, t[1]], [t, t[1].clone()]),
        "identity": ([d, d], [d, dict(d)]),
        "metadata": (md, plain),
        "parameter": (nn.Parameter(torch.ones(2)), torch.ones(2)),
        "nan_payload": (torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32),
                        torch.tensor([0x7FC00002], dtype=torch.int32).view(torch.float32)),
        "requires_grad": (torch.ones(2, requires_grad=True), torch.ones(2)),
        "key_order": ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        "neg_bit": (torch.ones(2, dtype=torch.complex64).conj().imag, torch.zeros(2)),
        "hooks": (hooked, torch.ones(2)),
        "float_sign": (-0.0, 0.0),
        "tuple_vs_size": ((2, 3), torch.Size([2, 3])),
        "attribute": (_tensor_attrs()["t"], torch.randn(2)),
    }


@pytest.mark.parametrize("difference", list(_pairs()))
def test_assert_same_notices(difference):
    a, b = _pairs()[difference]
    with pytest.raises(AssertionError):
        assert_same(a, b)


def test_assert_same_accepts_equal_graphs():
    for name in ("training", "views", "quantized", "sparse", "storages", "values", "shared_objects"):
        assert_same(torch_load(io.BytesIO(saved(name))).get(), torch_load(io.BytesIO(saved(name))).get())
