"""Malicious and malformed data.pkl streams inside otherwise valid checkpoints.

Every payload must load nothing, raise a fastckpt.CheckpointError subclass (the expected one where
the class is specified) and execute nothing: no os.system / subprocess / exec / compile / import of
a new module during the load (recorded with an audit hook), and the marker file never appears.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from parity import P, assert_same_outcome, call, fc_load, record, rezip, save_bytes, torch_load

import fastckpt
from fastckpt import CheckpointError, LimitError, MetadataError, UnpicklingError, UnsafeGlobalError

MARKER = Path(tempfile.gettempdir()) / f"fastckpt-pwned-{os.getpid()}"
CMD = f"touch {MARKER}"

# ----------------------------------------------------------------------------- audit hook

_recording = False
_events: list[tuple[str, str]] = []
_WATCHED = ("os.system", "subprocess.Popen", "exec", "compile", "import", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "ctypes.dlopen", "pty.spawn")


def _audit(event, args):
    if _recording and event.startswith(_WATCHED):
        if event == "import" and args and args[0] in sys.modules:
            return
        _events.append((event, repr(args)[:200]))


sys.addaudithook(_audit)  # cannot be removed: gated by _recording


@contextlib.contextmanager
def recording():
    global _recording
    _events.clear()
    _recording = True
    try:
        yield _events
    finally:
        _recording = False


# ----------------------------------------------------------------------------- the catalogue

# the base file holds one float32 storage '0' of 16 elements (64 bytes)
BASE = save_bytes(torch.arange(16.0))
OD = P.call("collections", "OrderedDict")
PROTO4 = b"\x80\x04"


def tensor_v3(size, dtype="float64", numel=64):
    return P.call("torch._utils", "_rebuild_tensor_v3",
                  P.pid(numel=numel, storage=("torch.storage", "UntypedStorage")), P.int(0), P.ints(*size),
                  P.ints(*([1] * len(size))), P.FALSE, OD, P.glob("torch", dtype))


def nested_lists(n):
    return P.EMPTY_LIST * n + P.APPEND * (n - 1)


def nested_dicts(n):
    return P.EMPTY_DICT + (P.str("k") + P.EMPTY_DICT) * n + P.SETITEM * n


def relinked_lists(n):
    """Each list memoized and appended to its parent before it gets its own child: nesting n deep
    while no list ever holds a deeper one at the moment it is linked."""
    out = P.EMPTY_LIST + b"r" + struct.pack("<I", 0)
    for k in range(1, n):
        out += b"j" + struct.pack("<I", k - 1) + P.EMPTY_LIST + b"r" + struct.pack("<I", k) + P.APPEND + b"0"
    return out


def relinked_dicts(n):
    out = P.EMPTY_DICT + b"r" + struct.pack("<I", 0)
    for k in range(1, n):
        out += b"j" + struct.pack("<I", k - 1) + P.str("k") + P.EMPTY_DICT + b"r" + struct.pack("<I", k) + P.SETITEM + b"0"
    return out


def refused(module, name, *args):
    return P.program(P.call(module, name, *args)), UnsafeGlobalError


CATALOGUE = {
    # forbidden globals
    "os.system": refused("os", "system", P.str(CMD)),
    "posix.system": refused("posix", "system", P.str(CMD)),
    "nt.system": refused("nt", "system", P.str(CMD)),
    "subprocess.Popen": refused("subprocess", "Popen", P.tuple(P.str("touch"), P.str(str(MARKER)))),
    "subprocess.check_output": refused("subprocess", "check_output", P.str(CMD)),
    "builtins.eval": refused("builtins", "eval", P.str(f"__import__('os').system({CMD!r})")),
    "__builtin__.eval": refused("__builtin__", "eval", P.str(f"__import__('os').system({CMD!r})")),
    "builtins.exec": refused("builtins", "exec", P.str(f"import os; os.system({CMD!r})")),
    "builtins.compile": refused("builtins", "compile", P.str("1"), P.str("x"), P.str("eval")),
    "builtins.__import__": refused("builtins", "__import__", P.str("os")),
    "builtins.getattr": (P.program(P.call("builtins", "getattr", P.call("torch", "device", P.str("cpu")),
                                          P.str("__reduce_ex__"))), UnsafeGlobalError),
    "builtins.open": refused("builtins", "open", P.str(str(MARKER)), P.str("w")),
    "copyreg._reconstructor": refused("copyreg", "_reconstructor", P.glob("os", "system"), P.NONE, P.NONE),
    "torch.load": refused("torch", "load", P.str("/dev/null")),
    "torch.nn.functional.os": refused("torch.nn.functional", "os"),
    "dotted_name": refused("torch", "nn.functional.os.system", P.str(CMD)),
    "dotted_attr_of_allowed": refused("torch._utils", "_rebuild_tensor_v2.__globals__"),
    "dunder_of_allowed_class": refused("collections", "OrderedDict.__init_subclass__"),
    "newobj_unlisted": (P.program(P.glob("argparse", "Namespace") + P.EMPTY_TUPLE + P.NEWOBJ), UnsafeGlobalError),
    "stack_global": (P.program(P.str("os") + P.str("system") + b"\x93" + P.tuple(P.str(CMD)) + P.REDUCE,
                               proto=PROTO4), UnsafeGlobalError),
    "stack_global_from_memo": (P.program(
        P.EMPTY_LIST + P.str("os") + b"q\x01" + P.APPEND + P.str("system") + b"q\x02" + P.APPEND
        + b"h\x01h\x02\x93" + P.tuple(P.str(CMD)) + P.REDUCE, proto=PROTO4), UnsafeGlobalError),
    "stack_global_not_strings": (P.program(P.int(1) + P.int(2) + b"\x93", proto=PROTO4), UnpicklingError),
    # opcodes that are never allowed
    "INST": (P.program(P.MARK + P.str(CMD) + b"ios\nsystem\n"), UnpicklingError),
    "OBJ": (P.program(P.MARK + P.glob("os", "system") + P.str(CMD) + b"o"), UnpicklingError),
    "EXT1": (P.program(b"\x82\x01" + P.tuple(P.str(CMD)) + P.REDUCE), UnpicklingError),
    "EXT4": (P.program(b"\x84\xff\xff\xff\x7f"), UnpicklingError),
    "PERSID": (P.program(b"P0\n"), UnpicklingError),
    "READONLY_BUFFER": (P.program(b"\x97", proto=b"\x80\x05"), UnpicklingError),
    # operations on the wrong types
    "reduce_list_args": (P.program(P.glob("collections", "OrderedDict") + P.EMPTY_LIST + P.REDUCE), UnpicklingError),
    "build_on_list": (P.program(P.EMPTY_LIST + P.EMPTY_DICT + P.str("a") + P.int(1) + P.SETITEM + P.BUILD),
                      UnpicklingError),
    "build_on_tensor_out_of_bounds": (P.program(P.tensor() + P.tuple(P.pid(), P.int(0), P.ints(1000), P.ints(1))
                                                + P.BUILD), CheckpointError),
    "build_on_tensor_dict": (P.program(P.tensor() + P.EMPTY_DICT + P.str("__class__") + P.glob("torch", "Size")
                                       + P.SETITEM + P.BUILD), CheckpointError),
    "setitem_on_list": (P.program(P.EMPTY_LIST + P.str("a") + P.str("b") + P.SETITEM), UnpicklingError),
    "append_on_dict": (P.program(P.EMPTY_DICT + P.str("a") + P.APPEND), UnpicklingError),
    "appends_on_tuple": (P.program(P.EMPTY_TUPLE + P.MARK + P.int(1) + P.APPENDS), UnpicklingError),
    "setitems_odd": (P.program(P.EMPTY_DICT + P.MARK + P.str("a") + P.SETITEMS), UnpicklingError),
    "unhashable_key": (P.program(P.EMPTY_DICT + P.EMPTY_LIST + P.str("v") + P.SETITEM), CheckpointError),
    "get_layout_unknown": (P.program(P.call("torch.serialization", "_get_layout", P.str("os.system"))),
                           CheckpointError),
    "rebuild_from_type_non_tensor": (P.program(P.call(
        "torch._tensor", "_rebuild_from_type_v2", P.glob("torch._utils", "_rebuild_tensor_v2"),
        P.glob("collections", "OrderedDict"),
        P.tuple(P.pid(), P.int(0), P.ints(16), P.ints(1), P.FALSE, OD), P.NONE)), CheckpointError),
    # malformed persistent ids
    "pid_wrong_tag": (P.program(P.tensor(pid=P.tuple(P.str("module"), P.glob("torch", "FloatStorage"), P.str("0"),
                                                     P.str("cpu"), P.int(16)) + P.BINPERSID)), UnpicklingError),
    "pid_short": (P.program(P.tensor(pid=P.tuple(P.str("storage"), P.glob("torch", "FloatStorage"), P.str("0"),
                                                 P.str("cpu")) + P.BINPERSID)), CheckpointError),
    "pid_long": (P.program(P.tensor(pid=P.tuple(P.str("storage"), P.glob("torch", "FloatStorage"), P.str("0"),
                                                P.str("cpu"), P.int(16), P.NONE, P.NONE) + P.BINPERSID)),
                 CheckpointError),
    "pid_int": (P.program(P.tensor(pid=P.int(0) + P.BINPERSID)), CheckpointError),
    "pid_str": (P.program(P.tensor(pid=P.str("storage") + P.BINPERSID)), CheckpointError),
    "pid_int_key": (P.program(P.tensor(pid=P.pid(raw_key=P.int(0)))), CheckpointError),
    "pid_negative_numel": (P.program(P.tensor(pid=P.pid(numel=-1))), CheckpointError),
    "pid_huge_numel": (P.program(P.tensor(pid=P.pid(numel=2**62))), CheckpointError),
    "pid_numel_over_int64": (P.program(P.tensor(pid=P.pid(numel=2**64 + 16))), CheckpointError),
    "pid_key_dotdot": (P.program(P.tensor(pid=P.pid(key="../0"))), CheckpointError),
    "pid_key_path": (P.program(P.tensor(pid=P.pid(key="0/../../data.pkl"))), CheckpointError),
    "pid_key_missing": (P.program(P.tensor(pid=P.pid(key="7"))), CheckpointError),
    "pid_storage_type_not_storage": (P.program(P.tensor(pid=P.pid(storage=("torch", "Size")))), CheckpointError),
    "pid_storage_type_dtype": (P.program(P.tensor(pid=P.pid(storage=("torch", "float32")))), CheckpointError),
    "pid_storage_type_unknown": (P.program(P.tensor(pid=P.pid(storage=("torch", "EvilStorage")))), CheckpointError),
    # tensor metadata out of bounds
    "offset_past_end": (P.program(P.tensor(offset=16, size=(1,))), MetadataError),
    "size_past_end": (P.program(P.tensor(size=(17,))), MetadataError),
    "stride_past_end": (P.program(P.tensor(size=(9,), stride=(2,))), MetadataError),
    "view_2d_past_end": (P.program(P.tensor(offset=1, size=(4, 4), stride=(4, 1))), MetadataError),
    "negative_offset": (P.program(P.tensor(offset=-1, size=(4,))), MetadataError),
    "negative_size": (P.program(P.tensor(size=(-1,))), MetadataError),
    "negative_stride": (P.program(P.tensor(offset=15, size=(2,), stride=(-1,))), MetadataError),
    "size_overflows_int64": (P.program(P.tensor(size=(2**63,))), MetadataError),
    "extent_overflows_int64": (P.program(P.tensor(size=(2**62, 4), stride=(4, 1))), MetadataError),
    "offset_overflows_int64": (P.program(P.tensor(offset=2**63 - 1, size=(2,))), MetadataError),
    "stride_overflows_int64": (P.program(P.tensor(size=(2,), stride=(2**63 - 1,))), MetadataError),
    "size_stride_mismatch": (P.program(P.tensor(size=(4,), stride=(1, 1))), MetadataError),
    "v3_dtype_past_end": (P.program(tensor_v3((9,))), MetadataError),
    "size_not_int": (P.program(P.tensor(raw_size=P.tuple(P.str("a")))), CheckpointError),
    "offset_float": (P.program(P.tensor(raw_offset=P.float(1.0), size=(4,))), CheckpointError),
    "size_not_tuple": (P.program(P.tensor(raw_size=P.int(4))), CheckpointError),
    # stream structure and resource limits
    "empty": (b"", UnpicklingError),
    "no_stop": (P.PROTO2 + P.NONE, UnpicklingError),
    "stop_on_empty_stack": (P.program(b""), UnpicklingError),
    "reduce_underflow": (P.program(P.REDUCE), UnpicklingError),
    "tuple_without_mark": (P.program(P.TUPLE), UnpicklingError),
    "append_underflow": (P.program(P.APPEND), UnpicklingError),
    "mark_flood": (P.PROTO2 + P.MARK * 1_000_000 + P.STOP, CheckpointError),
    "nested_lists": (P.program(nested_lists(100_000)), CheckpointError),
    "nested_tuples": (P.program(P.EMPTY_TUPLE + P.TUPLE1 * 100_000), CheckpointError),
    "nested_marks": (P.program(P.MARK * 100_000 + P.TUPLE * 100_000), CheckpointError),
    "nested_dicts": (P.program(nested_dicts(100_000)), CheckpointError),
    "memo_get_undefined": (P.program(b"h\x05"), UnpicklingError),
    "memo_get_huge": (P.program(P.NONE + b"r\xff\xff\xff\xff" + b"j\xfe\xff\xff\xff"), UnpicklingError),
    "unicode_past_end": (P.PROTO2 + b"X\xff\xff\xff\x7fabc" + P.STOP, UnpicklingError),
    "long1_past_end": (P.PROTO2 + b"\x8a\xffabc", UnpicklingError),
    "invalid_utf8": (P.program(b"X\x01\x00\x00\x00\xff"), UnpicklingError),
    "unknown_opcode": (P.program(b"\xff"), UnpicklingError),
    # legacy set_ states (BUILD on a Tensor or a Parameter) outside their storage
    "build_parameter_set_past_end": (P.program(
        P.call("torch._utils", "_rebuild_parameter", P.tensor(), P.FALSE, OD)
        + P.tuple(P.pid(), P.int(0), P.ints(1 << 30), P.ints(1)) + P.BUILD), MetadataError),
    "build_parameter_set_offset_past_end": (P.program(
        P.call("torch._utils", "_rebuild_parameter", P.tensor(), P.FALSE, OD)
        + P.tuple(P.pid(), P.int(1 << 40), P.ints(1), P.ints(1)) + P.BUILD), MetadataError),
    "build_tensor_set_over_untyped_storage_call": (P.program(
        P.tensor() + P.tuple(P.call("torch.storage", "UntypedStorage"), P.int(0), P.ints(1 << 28), P.ints(1))
        + P.BUILD), CheckpointError),
    "rebuild_tensor_legacy_past_end": (P.program(P.call("torch._utils", "_rebuild_tensor", P.pid(), P.int(0),
                                                        P.ints(1 << 30), P.ints(1))), MetadataError),
    # allocations sized by an integer from the file
    "bytearray_huge": (P.program(P.call("builtins", "bytearray", P.int(1 << 34))), LimitError),
    "untyped_storage_sized": (P.program(P.call("torch.storage", "UntypedStorage", P.int(1 << 30))), UnsafeGlobalError),
    "typed_storage_sized": (P.program(P.call("torch.storage", "TypedStorage", P.int(1 << 28))), UnsafeGlobalError),
    "legacy_storage_called": (P.program(P.call("torch", "FloatStorage", P.int(1 << 28))), CheckpointError),
    "legacy_tensor_sized": (P.program(P.call("torch", "FloatTensor", P.int(1 << 14), P.int(1 << 14))),
                            UnsafeGlobalError),
    "tensor_newobj_sized": (P.program(P.glob("torch", "Tensor") + P.tuple(P.int(1 << 28)) + P.NEWOBJ),
                            UnsafeGlobalError),
    "cuda_tensor_sized": (P.program(P.call("torch.cuda", "FloatTensor", P.int(1 << 28))), CheckpointError),
    # nesting reached by filling memoized containers after they were linked
    "nested_lists_relinked": (P.program(relinked_lists(50_000)), LimitError),
    "nested_dicts_relinked": (P.program(relinked_dicts(50_000)), LimitError),
}


@pytest.fixture(scope="module")
def warmed_up(tmp_path_factory):
    """Load a valid, a refused and a malformed file once, so lazy imports don't count as events."""
    root = tmp_path_factory.mktemp("warm")
    payloads = [None, P.program(P.call("argparse", "Namespace")), P.PROTO2, P.program(P.tensor(size=(99,)))]
    for i, pkl in enumerate(payloads):
        p = root / f"{i}.pt"
        p.write_bytes(BASE if pkl is None else rezip(BASE, replace={"data.pkl": pkl}))
        for mmap in (False, True):
            call(fc_load, p, mmap=mmap)
    return True


def check_refused(path, expected, mmap, **kwargs):
    MARKER.unlink(missing_ok=True)
    with recording() as events:
        out = call(fc_load, path, mmap=mmap, **kwargs)
    assert out.exc is not None, f"loaded {out.value!r}"
    assert isinstance(out.exc, CheckpointError), f"{type(out.exc).__mro__}: {out.exc}"
    assert isinstance(out.exc, expected), f"expected {expected.__name__}, got {type(out.exc).__name__}: {out.exc}"
    if isinstance(out.exc, UnpicklingError):
        assert isinstance(out.exc, pickle.UnpicklingError)
    assert not events, f"executed something while loading: {events}"
    assert not MARKER.exists()
    return out.exc


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue(name, mmap, tmp_path, warmed_up):
    pkl, expected = CATALOGUE[name]
    p = tmp_path / "evil.pt"
    p.write_bytes(rezip(BASE, replace={"data.pkl": pkl}))
    exc = check_refused(p, expected, mmap)
    if expected is UnsafeGlobalError and "Unsupported operand" in str(exc):
        # torch's weights-only unpickler stops sooner, at an opcode it does not read (STACK_GLOBAL,
        # FRAME...): the refusal carries its text
        assert str(exc) == str(torch_load(p, mmap=mmap, weights_only=True).exc)
    elif expected is UnsafeGlobalError:
        fix = ("only calls given data",) if name.endswith("_sized") else ("add_safe_globals", "blocked")
        assert any(phrase in str(exc) for phrase in fix), str(exc)


@pytest.mark.parametrize("weights_only", [True, None], ids=["explicit", "default"])
def test_refused_global_message(weights_only, tmp_path, warmed_up):
    p = tmp_path / "evil.pt"
    p.write_bytes(rezip(BASE, replace={"data.pkl": CATALOGUE["subprocess.Popen"][0]}))
    exc = check_refused(p, UnsafeGlobalError, False, weights_only=weights_only)
    assert "subprocess.Popen" in str(exc)
    assert "torch.serialization.add_safe_globals([subprocess.Popen])" in str(exc)


def test_truncated_pickles(tmp_path, warmed_up):
    """Every proper prefix of a real data.pkl (the last one lacks only STOP) is refused."""
    base = save_bytes({"w": torch.arange(6.0).view(2, 3), "n": 1})
    full = record(base, "data.pkl")
    for cut in range(len(full)):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(rezip(base, replace={"data.pkl": full[:cut]}))
        check_refused(p, CheckpointError, mmap=cut % 2 == 1)


def test_huge_memo_index_is_safe(tmp_path, warmed_up):
    """LONG_BINPUT 0xffffffff is valid pickle: load it like torch, or refuse with LimitError; never allocate 2**32."""
    pkl = P.program(P.EMPTY_LIST + P.str("x") + b"r\xff\xff\xff\xff" + P.APPEND + b"j\xff\xff\xff\xff" + P.APPEND)
    p = tmp_path / "memo.pt"
    p.write_bytes(rezip(BASE, replace={"data.pkl": pkl}))
    ref = torch_load(p)
    assert ref.exc is None and ref.value == ["x", "x"]
    got = call(fc_load, p)
    if got.exc is None:
        assert_same_outcome(got, ref)
    else:
        assert isinstance(got.exc, fastckpt.LimitError), got.exc


def test_valid_payload_control(tmp_path, warmed_up):
    """The helpers build loadable files: a hand-written valid tensor pickle loads like torch loads it."""
    p = tmp_path / "ok.pt"
    p.write_bytes(rezip(BASE, replace={"data.pkl": P.program(P.tensor(offset=2, size=(2, 3), stride=(4, 1)))}))
    ref = torch_load(p)
    assert ref.exc is None
    with recording() as events:
        got = call(fc_load, p)
    assert_same_outcome(got, ref)
    assert not events
