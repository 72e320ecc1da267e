"""Drop-in fidelity (issue 8): the behaviours where fastckpt.load and torch.load parted ways,
each compared with torch.load on files written by torch.save or torch's own writers."""

from __future__ import annotations

import datetime
import io
import re
import threading
import zoneinfo

import pytest
import torch

from parity import P, Outer, assert_same, call, fc_load, flip_byte, retag, rezip, save_bytes, torch_load

import fastckpt

OD = P.call("collections", "OrderedDict")


def _write(tmp_path, data, name="f.pt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------- allowlist semantics

PARIS = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
ALLOWLISTED = {
    "nested-class-via-getattr": ({"n": Outer.Nested(3)}, [getattr, Outer, Outer.Nested]),
    "datetime-zoneinfo": ({"d": PARIS, "t": torch.ones(2)},
                          [getattr, datetime.datetime, zoneinfo.ZoneInfo, zoneinfo.ZoneInfo._unpickle]),
    "date-and-timedelta": ({"d": datetime.date(2020, 5, 17), "dt": datetime.timedelta(3, 7)},
                           [datetime.date, datetime.timedelta]),
}


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("case", list(ALLOWLISTED))
def test_user_allowlisted_callables_load_as_torch(case, mmap, tmp_path):
    obj, allowed = ALLOWLISTED[case]
    p = _write(tmp_path, save_bytes(obj))
    with torch.serialization.safe_globals(allowed):
        ref = torch_load(p, weights_only=True)
        got = call(fc_load, p, weights_only=True, mmap=mmap)
    assert ref.exc is None, ref.exc
    assert got.exc is None, got.exc
    assert_same(got.value, ref.value)


def _core(message: str) -> str:
    """A weights-only message with object addresses blanked."""
    return re.sub(r"0x[0-9a-f]+", "0x?", message)


GETATTR = P.glob("builtins", "getattr")
REFUSALS = {  # name: (data.pkl, globals the user allowlisted)
    "global-not-allowed": (P.program(P.call("argparse", "Namespace")), []),
    "builtin-not-allowed": (P.program(P.call("builtins", "print", P.str("x"))), []),
    "blocked-module": (P.program(P.call("os", "system", P.str("true"))), []),
    "missing-classmethod": (P.program(P.call("zoneinfo", "ZoneInfo._unpickle", P.str("UTC"), P.int(1))), []),
    "reduce-on-unrecognized-function": (P.program(
        GETATTR + P.tuple(P.glob("collections", "OrderedDict"), P.str("fromkeys")) + P.REDUCE
        + P.tuple(P.EMPTY_LIST) + P.REDUCE), [getattr]),
    "newobj-on-unlisted-class": (P.program(
        GETATTR + P.tuple(P.glob("collections", "OrderedDict"), P.str("__class__")) + P.REDUCE
        + P.EMPTY_TUPLE + P.NEWOBJ), [getattr]),
    "build-on-unlisted-type": (P.program(P.EMPTY_DICT + P.EMPTY_DICT + P.BUILD), []),
    "append-to-dict": (P.program(P.EMPTY_DICT + P.int(1) + P.APPEND), []),
    "extend-a-dict": (P.program(P.EMPTY_DICT + P.MARK + P.int(1) + P.int(2) + P.APPENDS), []),
    "setitem-on-list": (P.program(P.EMPTY_LIST + P.str("a") + P.str("b") + P.SETITEM), []),
    "setitems-on-list": (P.program(P.EMPTY_LIST + P.MARK + P.str("a") + P.str("b") + P.str("c") + P.str("d")
                                   + P.SETITEMS), []),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_messages_are_torchs(case, tmp_path):
    pkl, allowed = REFUSALS[case]
    p = _write(tmp_path, rezip(save_bytes(torch.arange(4.0)), replace={"data.pkl": pkl}))
    with torch.serialization.safe_globals(allowed):
        ref = torch_load(p, weights_only=True)
        got = call(fc_load, p, weights_only=True)
    assert ref.exc is not None and got.exc is not None, (ref, got)
    assert isinstance(got.exc, fastckpt.UnpicklingError)
    assert _core(str(got.exc)) == _core(str(ref.exc))


# --------------------------------------------------------------------------- one storage key, several dtypes


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["wo", "pickle"])
def test_an_empty_storage_key_read_with_several_dtypes(weights_only, mmap, tmp_path):
    t = torch.empty(0)
    other = torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=torch.int64, _internal=True)
    p = _write(tmp_path, save_bytes([t, other, torch.empty(0, dtype=torch.int16)]))
    ref = torch_load(p, weights_only=weights_only)
    got = call(fc_load, p, weights_only=weights_only, mmap=mmap)
    assert got.exc is None, got.exc
    assert_same(got.value, ref.value)
    assert got.value[1].dtype is torch.int64


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("second", [("IntStorage", 16), ("FloatStorage", 8)], ids=["dtype", "numel"])
def test_a_non_empty_record_read_two_ways_is_refused(second, mmap, tmp_path):
    first = P.tensor(pid=P.pid(numel=16))
    other = P.tensor(pid=P.pid(numel=second[1], storage=("torch", second[0])), size=(second[1],))
    p = _write(tmp_path, rezip(save_bytes(torch.arange(16.0)), replace={"data.pkl": P.program(P.tuple(first, other))}))
    with pytest.raises(fastckpt.MetadataError, match=r"storage '0' is read as .* but as 16 × torch.float32"):
        fastckpt.load(p, mmap=mmap)


# --------------------------------------------------------------------------- every refusal a CheckpointError

NOT_CHECKPOINTS = {
    "empty": b"",
    "random": bytes(range(256)) * 8,
    "truncated-zip": save_bytes(torch.ones(3))[:3],
    "junk-before-zip": b"#!/bin/sh\nexit 0\n" + save_bytes(torch.ones(3)),
    "text": b"this is not a checkpoint\n",
    "pickle-not-torch": b"\x80\x02}q\x00.",
}


@pytest.mark.parametrize("source", ["path", "bytesio"])
@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_bytes_that_are_no_checkpoint_raise_format_error(case, source, tmp_path):
    data = NOT_CHECKPOINTS[case]
    f = _write(tmp_path, data) if source == "path" else io.BytesIO(data)
    with pytest.raises(fastckpt.FormatError) as info:
        fastckpt.load(f)
    text = str(info.value)
    assert ("empty" in text) if not data else (f"{len(data)} bytes" in text and "expected" in text)
    if case == "junk-before-zip":
        assert "a zip signature is at offset 17, not at 0" in text


@pytest.mark.parametrize("proto", [1, 2, 4])
def test_legacy_files_still_go_to_torch(proto, tmp_path):
    p = _write(tmp_path, save_bytes({"w": torch.arange(3.0)}, _use_new_zipfile_serialization=False, pickle_protocol=proto))
    assert_same(fastckpt.load(p, weights_only=False), torch.load(p, weights_only=False))


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_unknown_location_tag_is_a_metadata_error_with_torchs_text(mmap, tmp_path):
    p = _write(tmp_path, retag(save_bytes({"w": torch.ones(2)}), {"cpu": "xla9"}))
    ref = torch_load(p)
    with pytest.raises(fastckpt.MetadataError) as info:
        fastckpt.load(p, mmap=mmap)
    assert str(ref.exc) in str(info.value)


@pytest.mark.parametrize("text", [b"garbage", b"0", b"-64", b"", b"6 4"])
def test_bad_storage_alignment_record_is_a_record_error(text, tmp_path):
    p = _write(tmp_path, rezip(save_bytes(torch.ones(2)), replace={".storage_alignment": text}))
    with pytest.raises(fastckpt.RecordError, match="storage_alignment"):
        fastckpt.load(p)


@pytest.mark.parametrize("alignment", [3, 100])
def test_any_positive_storage_alignment_loads(alignment, tmp_path):
    from torch.utils.serialization import config

    with config.patch({"save.storage_alignment": alignment}):
        p = _write(tmp_path, save_bytes({"a": torch.arange(5.0), "b": torch.ones(3, dtype=torch.int16)}))
    for mmap in (False, True):
        assert_same(fastckpt.load(p, mmap=mmap), torch.load(p))


# --------------------------------------------------------------------------- order of checks, file views


def test_torchscript_from_a_file_object_with_mmap_raises_what_torch_raises(tmp_path):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    ref = call(torch.load, io.BytesIO(buf.getvalue()), mmap=True, weights_only=False)
    got = call(fc_load, io.BytesIO(buf.getvalue()), mmap=True, weights_only=False)
    assert type(got.exc) is type(ref.exc) and str(got.exc) == str(ref.exc)
    assert got.warnings == ref.warnings


def test_dcp_round_trip_under_the_patch(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16), "step": 7}
    torch.save(state, tmp_path / "in.pt")
    with fastckpt.patched():
        torch_save_to_dcp(tmp_path / "in.pt", tmp_path / "dcp")
        dcp_to_torch_save(tmp_path / "dcp", tmp_path / "out.pt")
        got = torch.load(tmp_path / "out.pt")
    assert_same(got, torch.load(tmp_path / "out.pt"))
    assert torch.equal(got["w"], state["w"]) and got["step"] == 7


# --------------------------------------------------------------------------- integrity under the patch


def test_patch_verify_catches_corruption_that_mmap_loads_skip(tmp_path):
    p = _write(tmp_path, flip_byte(save_bytes({"layer.weight": torch.arange(64.0)}), "data/0", 3))
    try:
        fastckpt.patch(verify=True)
        with pytest.raises(fastckpt.IntegrityError, match=r"(?s)layer\.weight.*verify=False"):
            torch.load(p, mmap=True)
        fastckpt.patch(verify=False)
        torch.load(p, mmap=False)  # the escape hatch
    finally:
        fastckpt.unpatch()
    assert not fastckpt.patching.is_patched()


def test_patched_blocks_overlapping_in_threads_keep_torch_patched_until_the_last_leaves():
    inside, leave = threading.Barrier(3), [threading.Event(), threading.Event()]
    seen = []

    def block(i):
        with fastckpt.patched():
            inside.wait()
            leave[i].wait()
            seen.append(fastckpt.patching.is_patched())

    threads = [threading.Thread(target=block, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    leave[0].set()
    threads[0].join()
    assert fastckpt.patching.is_patched()  # the first to leave does not unpatch the other
    leave[1].set()
    threads[1].join()
    assert seen == [True, True]
    assert not fastckpt.patching.is_patched()
