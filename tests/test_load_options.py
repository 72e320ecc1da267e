"""fastckpt.load's options behave like torch.load's: map_location, mmap, weights_only policy and env vars,
file objects, delegated formats; plus what fastckpt adds: CRC-32 and record-size checks, zero-copy mmap."""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import os
import pickle

import pytest
import torch
from torch import nn

from parity import (
    P,
    assert_same,
    assert_same_outcome,
    assert_tensors_equal,
    call,
    fastckpt_load,
    fc_api,
    fc_load,
    flip_byte,
    record,
    retag,
    rezip,
    save_bytes,
    torch_load,
)

import fastckpt


def _weights():
    w = torch.arange(48.0).view(6, 8)
    return {"weight": w, "row": w[2], "bias": torch.ones(3, dtype=torch.float16), "step": torch.tensor(7)}


@pytest.fixture(scope="module")
def data():
    return save_bytes(_weights())


@pytest.fixture
def path(tmp_path, data):
    p = tmp_path / "weights.pt"
    p.write_bytes(data)
    return p


def write(tmp_path, data: bytes, name="ckpt.pt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def both(f, **kwargs):
    """(fastckpt outcome, torch outcome) for the same call; torch runs first."""
    ref = torch_load(f, **kwargs)
    return fastckpt_load(f, **kwargs), ref


# --------------------------------------------------------------------------- map_location

class Recorder:
    """A map_location callable that logs what it receives and returns `result(storage)`."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, storage, location):
        self.calls.append((type(storage), storage.device, storage.nbytes(), location))
        return self.result(storage)


MAP_LOCATIONS = {
    "none": lambda: None,
    "str": lambda: "cpu",
    "device": lambda: torch.device("cpu"),
    "dict": lambda: {"cpu": "cpu"},
    "callable_none": lambda: Recorder(lambda s: None),
    "callable_storage": lambda: Recorder(lambda s: s),
    "meta": lambda: "meta",
    "meta_device": lambda: torch.device("meta"),
    "dict_to_meta": lambda: {"cpu": "meta"},
}


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("form", list(MAP_LOCATIONS))
def test_map_location(form, mmap, path):
    ref_loc, got_loc = MAP_LOCATIONS[form](), MAP_LOCATIONS[form]()
    ref = torch_load(path, map_location=ref_loc, mmap=mmap)
    got = fastckpt_load(path, map_location=got_loc, mmap=mmap)
    assert_same_outcome(got, ref)
    if isinstance(ref_loc, Recorder):
        assert got_loc.calls == ref_loc.calls
    if form.startswith("meta"):  # no data read: each meta storage records where its bytes are in the file
        for key, t in ref.value.items():
            assert got.value[key].untyped_storage()._checkpoint_offset == t.untyped_storage()._checkpoint_offset


def test_meta_reads_no_data(tmp_path, data):
    """With map_location='meta' a corrupt storage goes unnoticed (no byte of it is read)."""
    bad = write(tmp_path, flip_byte(data, "data/0", 3))
    assert_same_outcome(fastckpt_load(bad, map_location="meta", mmap=False), torch_load(bad, map_location="meta"))


@pytest.fixture(scope="module")
def cuda_data(data):
    return retag(data, {"cpu": "cuda:0"})


CUDA_OK = {
    "str": lambda: "cpu",
    "device": lambda: torch.device("cpu"),
    "dict": lambda: {"cuda:0": "cpu"},
    "callable": lambda: Recorder(lambda s: s),
    "meta": lambda: "meta",
}


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("form", list(CUDA_OK))
def test_cuda_tagged_file_remapped(form, mmap, tmp_path, cuda_data):
    p = write(tmp_path, cuda_data)
    ref_loc, got_loc = CUDA_OK[form](), CUDA_OK[form]()
    ref = torch_load(p, map_location=ref_loc, mmap=mmap)
    assert ref.exc is None
    assert_same_outcome(fastckpt_load(p, map_location=got_loc, mmap=mmap), ref)
    if isinstance(ref_loc, Recorder):
        assert got_loc.calls == ref_loc.calls and {c[3] for c in ref_loc.calls} == {"cuda:0"}


CUDA_FAILS = {
    "none": lambda: None,
    "other_tag": lambda: {"cuda:1": "cpu"},
    "callable_none": lambda: (lambda storage, location: None),
}


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("form", list(CUDA_FAILS))
def test_cuda_tagged_file_on_cpu_raises_torch_error(form, mmap, tmp_path, cuda_data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, also on a GPU one
    p = write(tmp_path, cuda_data)
    got, ref = both(p, map_location=CUDA_FAILS[form](), mmap=mmap)
    assert isinstance(ref.exc, RuntimeError) and "torch.cuda.is_available() is False" in str(ref.exc)
    assert_same_outcome(got, ref)


# --------------------------------------------------------------------------- weights_only policy


@pytest.fixture(scope="module")
def namespace_data():
    return save_bytes({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)})


ENVS = {
    "unset": {},
    "force_wo": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
    "force_wo_yes": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "YES"},
    "force_wo_off": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "0"},
    "force_no_wo": {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "true"},
    "force_no_wo_y": {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "y"},
    "both": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
}
KWARGS = {
    "default": {},
    "wo_true": {"weights_only": True},
    "wo_false": {"weights_only": False},
    "pickle_module": {"pickle_module": pickle},
    "pickle_module_wo": {"pickle_module": pickle, "weights_only": True},
    "load_args": {"encoding": "latin1"},
    "load_args_no_wo": {"encoding": "latin1", "weights_only": False},
}


@pytest.mark.parametrize("kwargs", list(KWARGS))
@pytest.mark.parametrize("env", list(ENVS))
def test_weights_only_policy(env, kwargs, namespace_data, monkeypatch):
    for var in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(var, raising=False)
    for var, value in ENVS[env].items():
        monkeypatch.setenv(var, value)
    buf = io.BytesIO(namespace_data)
    got, ref = both(buf, **KWARGS[kwargs])
    assert_same_outcome(got, ref, warnings_equal=True)
    if isinstance(ref.exc, pickle.UnpicklingError):
        assert isinstance(got.exc, fastckpt.UnsafeGlobalError)
        assert "argparse.Namespace" in str(got.exc) and "torch.serialization.add_safe_globals" in str(got.exc)


def test_refusal_names_global_and_fix(namespace_data):
    with pytest.raises(fastckpt.UnsafeGlobalError) as info:
        fc_load(io.BytesIO(namespace_data))
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, fastckpt.CheckpointError)
    assert "argparse.Namespace" in str(info.value)
    assert "torch.serialization.add_safe_globals([argparse.Namespace])" in str(info.value)


@pytest.mark.parametrize("how", ["add_safe_globals", "safe_globals"])
def test_user_allowlist(how, namespace_data):
    if how == "safe_globals":
        with torch.serialization.safe_globals([argparse.Namespace]):
            got, ref = both(io.BytesIO(namespace_data))
    else:
        before = torch.serialization.get_safe_globals()
        torch.serialization.add_safe_globals([argparse.Namespace])
        try:
            got, ref = both(io.BytesIO(namespace_data))
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(before)
    assert ref.exc is None
    assert_same_outcome(got, ref)


def test_blocklisted_module_stays_blocked_when_allowlisted():
    data = rezip(save_bytes(torch.ones(1)), replace={"data.pkl": P.program(P.call("os", "system", P.str("true")))})
    with torch.serialization.safe_globals([os.system]):
        got, ref = both(io.BytesIO(data))
    assert isinstance(ref.exc, pickle.UnpicklingError) and "blocked" in str(ref.exc)
    assert isinstance(got.exc, fastckpt.UnsafeGlobalError) and "os.system" in str(got.exc)


# --------------------------------------------------------------------------- files and objects


def test_mmap_needs_a_path(data, path):
    for f in (io.BytesIO(data), open(path, "rb")):
        with f:
            got, ref = both(f, mmap=True)
            assert isinstance(ref.exc, ValueError)
            assert_same_outcome(got, ref)


class NonSeekable:
    def __init__(self, data):
        self.data = io.BytesIO(data)

    def read(self, n=-1):
        return self.data.read(n)

    def seek(self, *args):
        raise io.UnsupportedOperation("seek")

    def tell(self):
        raise io.UnsupportedOperation("tell")


@pytest.mark.parametrize("make", [NonSeekable, bytes], ids=["unseekable", "bytes"])
def test_non_seekable_raises_torch_error(make, data):
    got, ref = call(fc_load, make(data)), call(torch.serialization.load, make(data))
    assert "You can only torch.load from a file that is seekable" in str(ref.exc)
    assert_same_outcome(got, ref)


@pytest.mark.parametrize("kind", ["bytesio", "file"])
def test_reads_from_current_position(kind, data, tmp_path):
    """Like torch, a file object is read from its current position (here: after 100 junk bytes)."""
    blob = b"\x00junk" * 20 + data
    if kind == "bytesio":
        make = lambda: io.BytesIO(blob)  # noqa: E731
    else:
        p = write(tmp_path, blob)
        make = lambda: open(p, "rb")  # noqa: E731
    with make() as f_ref, make() as f_got:
        f_ref.seek(100)
        f_got.seek(100)
        ref = call(torch.serialization.load, f_ref)
        assert ref.exc is None
        assert_same_outcome(call(fc_load, f_got), ref)


def test_mmap_default_from_torch_config(path):
    # Through torch's own config mechanism: pytest's monkeypatch undoes a setattr on
    # torch's config proxy with delattr (pytest >= 9.2), deleting the option for the process.
    import torch.utils.serialization.config as config

    with config.patch({"load.mmap": True}):
        sd = fc_load(path)
    assert all(_in_file_mapping(t, path) for t in sd.values())
    assert config.load.mmap is False  # the option is intact and restored


# --------------------------------------------------------------------------- delegated formats


@pytest.mark.parametrize("source", ["path", "bytesio"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["wo", "pickle"])
def test_legacy_format_delegated(weights_only, source, tmp_path):
    legacy = save_bytes(_weights(), _use_new_zipfile_serialization=False)
    f = write(tmp_path, legacy) if source == "path" else io.BytesIO(legacy)
    got, ref = both(f, weights_only=weights_only)
    assert ref.exc is None
    assert_same_outcome(got, ref)


def test_legacy_format_mmap_raises_torch_error(tmp_path):
    p = write(tmp_path, save_bytes(_weights(), _use_new_zipfile_serialization=False))
    got, ref = both(p, mmap=True)
    assert isinstance(ref.exc, RuntimeError) and "mmap can only be used" in str(ref.exc)
    assert_same_outcome(got, ref)


@pytest.mark.parametrize("weights_only", [True, False], ids=["wo", "pickle"])
def test_torchscript_delegated(weights_only, tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), p)
    got, ref = both(p, weights_only=weights_only)
    if weights_only:
        assert isinstance(ref.exc, RuntimeError)
        assert_same_outcome(got, ref)
        return
    assert ref.exc is None and got.exc is None, got.exc
    assert type(got.value) is type(ref.value)
    assert_same(got.value.state_dict(), ref.value.state_dict())
    x = torch.randn(4, 3)
    assert torch.equal(got.value(x), ref.value(x))
    assert got.warnings == ref.warnings  # "'torch.load' received a zip file that looks like a TorchScript archive..."


# --------------------------------------------------------------------------- integrity (fastckpt's additions)


def test_verify_catches_corrupt_storage_under_mmap(tmp_path, data):
    p = write(tmp_path, flip_byte(data, "data/0", 5))
    torch_view = torch.load(p, mmap=True)["weight"]
    assert not torch.equal(torch_view, _weights()["weight"]), "torch loads the corrupted bytes silently"
    with pytest.raises(fastckpt.IntegrityError):
        fc_load(p, mmap=True, verify=True)


@pytest.mark.parametrize("verify", [None, True])
def test_eager_read_checks_storage_crc(verify, tmp_path, data):
    p = write(tmp_path, flip_byte(data, "data/0", 5))
    with pytest.raises(fastckpt.IntegrityError, match=r"(?s)weight.*verify=False"):
        fc_load(p, mmap=False, verify=verify)


@pytest.mark.parametrize("mmap", [False, True])
def test_verify_false_checks_no_storage_but_data_pkl(mmap, tmp_path, data):
    p = write(tmp_path, flip_byte(data, "data/0", 5))
    assert_same(fc_load(p, mmap=mmap, verify=False), torch.load(p))  # the corrupted bytes, as torch
    with pytest.raises(fastckpt.IntegrityError, match="data.pkl"):
        fc_load(write(tmp_path, flip_byte(data, "data.pkl", 40), "pkl.pt"), mmap=mmap, verify=False)


@pytest.mark.parametrize("value,raises", [("1", True), ("0", False)])
def test_verify_from_the_environment(value, raises, tmp_path, data, monkeypatch):
    p = write(tmp_path, flip_byte(data, "data/0", 5))
    monkeypatch.setenv("FASTCKPT_VERIFY", value)
    if raises:
        with pytest.raises(fastckpt.IntegrityError):
            fc_load(p, mmap=True)
    else:
        fc_load(p, mmap=False)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_corrupt_data_pkl_raises_integrity_error(mmap, tmp_path, data):
    pkl = record(data, "data.pkl")
    index = pkl.index(b"weight") + 1  # 'weight' -> 'wEight': still a valid pickle
    p = write(tmp_path, flip_byte(data, "data.pkl", index, mask=0x20))
    assert "wEight" in torch.load(p), "torch loads the altered pickle silently"
    with pytest.raises(fastckpt.IntegrityError):
        fc_load(p, mmap=mmap)


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_unrecorded_crc_loads(mmap, verify, tmp_path):
    """compute_crc32=False writes CRC 0 ("not recorded"): such files must load everywhere."""
    torch.serialization.set_crc32_options(False)
    try:
        p = write(tmp_path, save_bytes(_weights()))
    finally:
        torch.serialization.set_crc32_options(True)
    ref = torch_load(p, mmap=mmap)
    assert_same_outcome(fastckpt_load(p, mmap=mmap, verify=verify), ref)


@pytest.mark.parametrize("delta", [-4, 4], ids=["short", "long"])
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_record_size_mismatch(mmap, delta, tmp_path, data):
    payload = record(data, "data/0")
    payload = payload[:delta] if delta < 0 else payload + b"\x00" * delta
    p = write(tmp_path, rezip(data, replace={"data/0": payload}))
    with pytest.raises(fastckpt.RecordError):
        fc_load(p, mmap=mmap)


# --------------------------------------------------------------------------- mmap: zero copy, COW, lifetime


def _mappings(path):
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                yield start, end, fields[1]


def _in_file_mapping(t: torch.Tensor, path) -> bool:
    return any(start <= t.data_ptr() < end for start, end, _ in _mappings(path))


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_zero_copy_and_copy_on_write(mmap, path):
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = fc_load(path, mmap=mmap)
    assert all(_in_file_mapping(t, path) == mmap for t in sd.values())
    if mmap:
        perms = {p for s, e, p in _mappings(path) if s <= sd["weight"].data_ptr() < e}
        assert perms == {"rw-p"}, f"tensors must be writable and private (copy-on-write), got {perms}"
    sd["weight"].add_(1)
    assert torch.equal(sd["row"], _weights()["row"] + 1), "views share the storage"
    del sd
    gc.collect()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "writing to a tensor reached the file"
    assert_tensors_equal(fc_load(path, mmap=mmap)["weight"], _weights()["weight"])


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_tensors_outlive_loader_and_file(mmap, path):
    row = fc_load(path, mmap=mmap)["row"]
    gc.collect()
    path.unlink()
    junk = [torch.full((1024,), 7.0) for _ in range(64)]  # reuse freed memory, if any was freed too early
    del junk
    gc.collect()
    assert_tensors_equal(row, _weights()["row"])
    assert row.untyped_storage().nbytes() == 48 * 4


@pytest.mark.parametrize("heap, collects", [(1_000, True), (10**9, False)], ids=["due", "not-due"])
def test_full_collection_due_runs_before_returning(heap, collects, tmp_path, monkeypatch):
    # 2,000 tensors make ~4,000 collected objects: more than a quarter of a 1,000-block heap (Python's
    # rule would collect soon after the load), far less than a quarter of a huge one (it would not).
    from fastckpt import loader

    path = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.full((2,), float(i)) for i in range(2000)}, path)
    collections = []
    monkeypatch.setattr(loader.sys, "getallocatedblocks", lambda: heap)
    monkeypatch.setattr(loader.gc, "collect", lambda *a: collections.append(a))
    sd = fc_load(path)
    assert len(sd) == 2000 and gc.isenabled()
    assert collections == ([()] if collects else [])


# --------------------------------------------------------------------------- tools


UNSAFE = {
    "clean": lambda: _weights(),
    "namespace": lambda: {"args": argparse.Namespace(lr=0.1)},
    "module": lambda: nn.Linear(2, 2),
    "mixed": lambda: {"c": nn.ReLU(), "r": range(3), "s": slice(1, 2), "f": frozenset({1})},
}


@pytest.mark.parametrize("name", list(UNSAFE))
def test_get_unsafe_globals_in_checkpoint(name, tmp_path):
    p = write(tmp_path, save_bytes(UNSAFE[name]()))
    expected = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    assert set(fc_api("get_unsafe_globals_in_checkpoint")(p)) == set(expected)


def test_cli_inspect(path, tmp_path, capsys):
    from fastckpt.cli import main

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("weight", "row", "bias", "float32", "float16", "_rebuild_tensor_v2", "total"):
        assert word in out, f"{word!r} missing from `fastckpt inspect` output:\n{out}"
    p = write(tmp_path, save_bytes({"args": argparse.Namespace(lr=0.1)}), "ns.pt")
    assert main(["inspect", str(p)]) == 0
    assert "Namespace" in capsys.readouterr().out
