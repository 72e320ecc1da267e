"""One storage-reference rule (core/storage_rule.h) for every path that reads persistent ids: the
native builder (fastckpt.load), the torch-free reader (fastckpt.open) and the Python fallback
(torch's own unpickler with fastckpt's storages) refuse a malformed reference with the same error
class and text, and accept what torch accepts."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch

from parity import P, rezip, save_bytes

import fastckpt
from fastckpt import MetadataError, RecordError, UnsafeGlobalError, _native

BASE = save_bytes(torch.arange(16.0))  # storage '0': 16 float32s


def _bytes(b: bytes) -> bytes:  # SHORT_BINBYTES
    return b"C" + bytes([len(b)]) + b


def _pid(tag=None, key=None, location=None, numel=None) -> bytes:
    return P.tuple(tag or P.str("storage"), P.glob("torch", "FloatStorage"), key or P.str("0"),
                   location or P.str("cpu"), numel if numel is not None else P.int(16)) + P.BINPERSID


CASES = {  # name: (persistent id, error class, text)
    "not_a_tuple": (P.int(0) + P.BINPERSID, UnsafeGlobalError, "got an object of type int"),
    "four_items": (P.tuple(P.str("storage"), P.glob("torch", "FloatStorage"), P.str("0"), P.str("cpu"))
                   + P.BINPERSID, UnsafeGlobalError, "got a tuple of 4 items"),
    "other_tag": (_pid(tag=P.str("module")), UnsafeGlobalError, "tagged the string 'module'"),
    "int_key": (_pid(key=P.int(0)), MetadataError, "storage key is the integer 0, not a string"),
    "bytes_key": (_pid(key=_bytes(b"0")), MetadataError, "storage key is a bytes object"),
    "list_location": (_pid(location=P.EMPTY_LIST), MetadataError, "location an object of type list"),
    "negative_numel": (_pid(numel=P.int(-1)), MetadataError, "numel the integer -1"),
    "float_numel": (_pid(numel=b"G" + struct.pack(">d", 16.0)), MetadataError, "numel an object of type float"),
    "numel_over_int64": (_pid(numel=b"\x8a\x09" + (2**64 + 16).to_bytes(9, "little")), MetadataError,
                         "does not fit in 64 bits"),
    "nbytes_overflow": (_pid(numel=P.int(2**62)), MetadataError, "more than 2^64 bytes"),
    "record_too_small": (_pid(numel=P.int(17)), RecordError, "record 'data/0' holds 64 bytes but its storage needs 68"),
    "record_too_large": (_pid(numel=P.int(15)), RecordError, "holds 64 bytes but its storage needs 60"),
}


def _file(tmp_path, pid: bytes):
    p = tmp_path / "ref.pt"
    p.write_bytes(rezip(BASE, replace={"data.pkl": P.program(P.tensor(size=(1,), pid=pid))}))
    return p


def _open(p):
    with fastckpt.open(p) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


SURFACES = {
    "native": lambda p: fastckpt.load(p),
    "native_full": lambda p: fastckpt.load(p, weights_only=False),
    # any pickle option but `encoding` runs torch's own unpickler with fastckpt's persistent_load
    "python": lambda p: fastckpt.load(p, weights_only=False, pickle_module=pickle, fix_imports=True),
    "reader": _open,
}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("case", CASES)
def test_one_rule_for_every_path(case, surface, tmp_path):
    pid, cls, text = CASES[case]
    with pytest.raises(cls) as info:
        SURFACES[surface](_file(tmp_path, pid))
    assert text in str(info.value)


@pytest.mark.parametrize("surface", SURFACES)
def test_python_2_ascii_bytes_tag_and_location_accepted_as_torch_does(surface, tmp_path):
    """torch decodes the tag and the location with _maybe_decode_ascii (Python 2 pickles read with
    encoding='bytes'); so does the rule."""
    p = _file(tmp_path, _pid(tag=_bytes(b"storage"), location=_bytes(b"cpu")))
    assert torch.load(p, weights_only=False)[0] == 0.0
    got = SURFACES[surface](p)
    assert (got[0] if not isinstance(got, dict) else next(iter(got.values()))[0]) == 0.0


def test_binding_returns_the_judged_fields():
    assert _native.storage_reference(("storage", torch.FloatStorage, "3", b"cuda:0", 5)) == ("3", "cuda:0", 5)
    assert _native.storage_nbytes("3", 5, 4) == 20
    with pytest.raises(MetadataError, match="storage '3'"):
        _native.storage_nbytes("3", 2**62, 8)
    with pytest.raises(UnsafeGlobalError, match="5-tuple"):
        _native.storage_reference(["storage", None, "0", "cpu", 1])
