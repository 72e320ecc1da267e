"""fastckpt.save: the bytes torch.save writes, atomic replacement, torch's errors, patch(save=True)."""

from __future__ import annotations

import collections
import errno
import gc
import importlib
import inspect
import io
import os
import pickle
import random
import resource
import signal
import stat
import time
import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils.serialization import config

from parity import assert_same, call, fc_load, save_bytes

import fastckpt
from fastckpt import _native

fpatch = importlib.import_module("fastckpt.patching")
writer = importlib.import_module("fastckpt.writer")

ORIGINAL_SAVE = torch.serialization.save


@pytest.fixture(autouse=True)
def restore_torch_save():
    yield
    fpatch.unpatch()
    torch.save = torch.serialization.save = ORIGINAL_SAVE


def torch_bytes(obj, **kwargs) -> bytes:
    return save_bytes(obj, ORIGINAL_SAVE, **kwargs)


def fastckpt_bytes(obj, **kwargs) -> bytes:
    return save_bytes(obj, fastckpt.save, **kwargs)


def save_both(tmp_path, name, obj, **kwargs) -> tuple[bytes, bytes]:
    """torch.save and fastckpt.save of `obj` to files of the same name (the archive prefix comes from it)."""
    ref, got = tmp_path / "torch" / name, tmp_path / "fastckpt" / name
    ref.parent.mkdir(exist_ok=True)
    got.parent.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ORIGINAL_SAVE(obj, ref, **kwargs)
        fastckpt.save(obj, got, **kwargs)
    return ref.read_bytes(), got.read_bytes()


def assert_identical(ref: bytes, got: bytes):
    if ref != got:
        first = next((i for i in range(min(len(ref), len(got))) if ref[i] != got[i]), min(len(ref), len(got)))
        pytest.fail(f"archives differ: {len(ref)} vs {len(got)} bytes, first difference at byte {first}: "
                    f"torch {ref[first:first + 16]!r}, fastckpt {got[first:first + 16]!r}")


# --------------------------------------------------------------------------- synthetic objects


def random_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def every_dtype() -> dict:
    """One tensor of every dtype torch.save can write (legacy storage types and torch.storage._new_dtypes())."""
    out = {}
    dtypes = list(torch.storage._dtype_to_storage_type_map()) + sorted(torch.storage._new_dtypes(), key=str)
    for i, dtype in enumerate(dtypes):
        if dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex32 is experimental
            itemsize = torch.empty(0, dtype=dtype).element_size()
            out[str(dtype)] = random_bytes(6 * itemsize, i).view(dtype).reshape(2, 3)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some quantized kernels warn about their future
        out.update(quantized(x))
    return out


def quantized(x):
    out = {}
    out["qint8"] = torch.quantize_per_tensor(x, 0.1, 3, torch.qint8)
    out["quint8"] = torch.quantize_per_tensor(x, 0.2, 7, torch.quint8)
    out["qint32"] = torch.quantize_per_tensor(x, 0.3, 0, torch.qint32)
    out["quint4x2"] = torch.quantize_per_tensor(x, 0.5, 1, torch.quint4x2)
    out["quint2x4"] = torch.quantize_per_tensor(x, 0.5, 1, torch.quint2x4)
    out["per_channel"] = torch.quantize_per_channel(x, torch.rand(4) + 0.1, torch.arange(4), 1, torch.quint8)
    return out


def views_and_sharing() -> dict:
    base = torch.arange(24.0)
    t = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, and still saved
        typed = torch.arange(5, dtype=torch.int16).storage()
    return {
        "base": base,
        "slice": base[4:10],
        "strided": base.view(4, 6)[:, 1::2],
        "transposed": base.view(4, 6).t(),
        "expanded": torch.arange(3.0).expand(4, 3),
        "same_twice": [t, t],
        "storage": torch.arange(6, dtype=torch.uint8).untyped_storage(),
        "typed_storage": typed,
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "neg": torch.randn(3, dtype=torch.complex64).conj().imag,
        "offset_only": base[23:],
    }


def model_and_optimizer() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 6)).pow(2).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(), "epoch": 3, "params": list(model.parameters())}


class TaggedTensor(torch.Tensor):
    """A tensor subclass: pickled through torch's own __reduce_ex__ (_rebuild_from_type_v2)."""


def misc_objects() -> dict:
    attr = torch.arange(3.0)
    attr.note = "python state"
    hooked = torch.ones(2, requires_grad=True)
    hooked.register_hook(lambda g: g)
    od_attr = collections.OrderedDict(a=1)
    od_attr._metadata = {"": {"version": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # strided nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)])
    return {
        "attr": attr,
        "hooked": hooked,
        "subclass": torch.arange(4.0).as_subclass(TaggedTensor),
        "nonleaf": torch.ones(2, requires_grad=True) * 2,
        "meta": torch.empty(3, device="meta"),
        "nested": nested,
        "od_empty": collections.OrderedDict(),
        "od_attr": od_attr,
        "empty": torch.empty(0),
        "empty2d": torch.zeros(0, 5, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "grad": torch.ones(3, requires_grad=True),
        "param": nn.Parameter(torch.randn(2, 2)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "sparse": torch.randn(4, 4).to_sparse(),
        "pk_descriptor": torch.tensor([0x50, 0x4B, 0x07, 0x08, 1, 2, 3, 4, 5], dtype=torch.uint8),
        "python": {"s": "x", "b": b"\x00\xff", "set": {1, 2}, "f": 1.5, "n": None, "t": (1, [2])},
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
    }


def many_small(n=5000) -> dict:
    g = torch.Generator().manual_seed(3)
    return {f"t{i}": torch.randn(int(torch.randint(0, 40, (1,), generator=g)), generator=g) for i in range(n)}


def big() -> dict:
    # 20 MiB: several 8 MiB chunks of one record, and records large enough to bypass batching.
    return {"big": random_bytes(20 << 20, 5), "mid": torch.randn(50_000), "small": torch.ones(3)}


OBJECTS = {
    "dtypes": every_dtype,
    "views": views_and_sharing,
    "training": model_and_optimizer,
    "misc": misc_objects,
    "many_small": many_small,
    "big": big,
    "tensor": lambda: torch.arange(10),
    "none": lambda: None,
}


# --------------------------------------------------------------------------- byte identity


@pytest.mark.parametrize("kind", sorted(OBJECTS))
def test_same_bytes_as_torch_save(tmp_path, kind):
    obj = OBJECTS[kind]()
    ref, got = save_both(tmp_path, "ckpt.pt", obj)
    assert_identical(ref, got)
    assert fastckpt.verify(tmp_path / "fastckpt" / "ckpt.pt").ok
    assert_identical(torch_bytes(obj), fastckpt_bytes(obj))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols(tmp_path, protocol):
    obj = {**views_and_sharing(), "training": model_and_optimizer()}
    assert_identical(*save_both(tmp_path, "p.pt", obj, pickle_protocol=protocol))


@pytest.mark.parametrize("alignment", [1, 100, 4096])
def test_storage_alignment(tmp_path, alignment):
    with config.patch({"save.storage_alignment": alignment}):
        ref, got = save_both(tmp_path, "a.pt", {**big(), **misc_objects()})
    assert_identical(ref, got)
    assert str(alignment).encode() in got


def test_without_crc32(tmp_path):
    with config.patch({"save.compute_crc32": False}):
        assert_identical(*save_both(tmp_path, "nocrc.pt", {**big(), **many_small(100)}))
        assert_identical(torch_bytes(many_small(10)), fastckpt_bytes(many_small(10)))


def test_disable_byteorder_record(tmp_path):
    obj = views_and_sharing()
    assert_identical(*save_both(tmp_path, "b.pt", obj, _disable_byteorder_record=True))


@pytest.mark.parametrize("name", ["a.b.c.tar", "noext", "ünï.pt", "x.pt"])
def test_archive_names(tmp_path, name):
    assert_identical(*save_both(tmp_path, name, {"w": torch.ones(3)}))


def test_thread_counts_agree(tmp_path):
    obj = {**big(), **many_small(300)}
    ref = fastckpt_bytes(obj, threads=1)
    assert fastckpt_bytes(obj, threads=5) == ref
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fastckpt.save(obj, tmp_path / "a" / "t.pt", threads=3, atomic=False, fsync=True)
    fastckpt.save(obj, tmp_path / "b" / "t.pt", threads=2, fsync=True)
    assert (tmp_path / "a" / "t.pt").read_bytes() == (tmp_path / "b" / "t.pt").read_bytes()


# Another pickle module: the stdlib's pure-Python pickler under another name.
PURE_PICKLE = types.SimpleNamespace(__name__="purepickle", Pickler=pickle._Pickler, Unpickler=pickle._Unpickler,
                                    load=pickle._load)


def test_other_pickle_module_same_bytes(tmp_path):
    obj = {**many_small(20), "w": torch.arange(6.0).view(2, 3)}
    assert_identical(*save_both(tmp_path, "m.pt", obj, pickle_module=PURE_PICKLE))


@pytest.mark.parametrize("pickle_module", [pickle, PURE_PICKLE], ids=["pickle", "other"])
def test_save_leaves_no_garbage_and_collection_as_it_was(tmp_path, pickle_module):
    # What a save makes is freed when it returns, by reference counting: a reference cycle would keep
    # its bookkeeping (every storage, CPU copies of device ones) alive until a collection found it.
    obj = {**many_small(200), "opt": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1}]}}
    gc.collect()
    gc.disable()
    try:
        fastckpt.save(obj, tmp_path / "a.pt", pickle_module=pickle_module)
        assert not gc.isenabled()
        hooks = [o for o in gc.get_objects() if type(o) is types.FunctionType
                 and o.__module__ == "fastckpt.writer" and o.__qualname__.startswith("_pickle.<locals>")]
        assert hooks == []  # the pickling hooks of the save, which hold its dicts of storages
    finally:
        gc.enable()
    fastckpt.save(obj, tmp_path / "b.pt")
    assert gc.isenabled()


def test_legacy_format_is_torchs(tmp_path):
    base = torch.arange(10.0)
    obj = {"base": base, "view": base[2:5], "p": nn.Parameter(torch.ones(2)), "i": torch.arange(3)}
    assert fastckpt_bytes(obj, _use_new_zipfile_serialization=False) == torch_bytes(
        obj, _use_new_zipfile_serialization=False)
    p = tmp_path / "legacy.pt"
    fastckpt.save(obj, p, _use_new_zipfile_serialization=False)
    assert_same(torch.load(p, weights_only=False), torch.load(io.BytesIO(torch_bytes(obj, _use_new_zipfile_serialization=False)), weights_only=False))


def test_skip_data_is_torchs(tmp_path):
    obj = {"w": torch.randn(10)}
    with torch.serialization.skip_data():
        got, ref = fastckpt_bytes(obj), torch_bytes(obj)
        assert got == ref
        assert_identical(*save_both(tmp_path, "skip.pt", obj))
        with pytest.raises(RuntimeError, match="skip_data"):
            fastckpt.save(obj, io.BytesIO(), _use_new_zipfile_serialization=False)


def test_alignment_out_of_range_leaves_target(tmp_path):
    p = tmp_path / "a.pt"
    fastckpt.save({"w": torch.ones(2)}, p)
    before = p.read_bytes()
    for alignment in (0, 1 << 17):
        with config.patch({"save.storage_alignment": alignment}), pytest.raises(fastckpt.LimitError):
            fastckpt.save({"w": torch.ones(3)}, p)
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.pt"]


@pytest.mark.parametrize("kind", ["training", "views", "misc"])
def test_loads_like_torch(tmp_path, kind):
    obj = OBJECTS[kind]()
    p = tmp_path / "l.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastckpt.save(obj, p)
    ref = torch.load(io.BytesIO(torch_bytes(obj)), weights_only=False)
    assert_same(torch.load(p, weights_only=False), ref)
    assert_same(fc_load(p, weights_only=False), ref)
    assert_same(fc_load(p, mmap=True, weights_only=False), ref)


def test_file_object_written_in_order_from_its_position():
    class Sink(io.RawIOBase):
        """Accepts at most 1000 bytes a call, never seeks: short writes must be completed."""

        def __init__(self):
            self.data = bytearray(b"junk")

        def writable(self):
            return True

        def write(self, b):
            n = min(len(b), 1000)
            self.data += bytes(b[:n])
            return n

    obj = {**big(), **many_small(50)}
    sink = Sink()
    fastckpt.save(obj, sink)
    assert bytes(sink.data[4:]) == torch_bytes(obj)


def test_zip64_record_and_offsets_past_4gib():
    """A record of 4 GiB + 100 bytes (ZIP64 sizes, 24-byte descriptor) and records after it whose
    headers lie past 4 GiB (ZIP64 offsets), streamed to a sink that only hashes: the memory is never
    touched (fresh pages of an uninitialised tensor), so this costs CRC time, not RAM or disk."""

    class Sink:
        def __init__(self):
            self.crc, self.size = 0, 0

        def write(self, b):
            self.crc = _native.crc32(b, self.crc)
            self.size += len(b)
            return len(b)

        def flush(self):
            pass

    obj = {"small": torch.arange(5), "big": torch.empty(2**32 + 100, dtype=torch.uint8), "after": torch.ones(3),
           "empty": torch.empty(0)}
    ref, got = Sink(), Sink()
    ORIGINAL_SAVE(obj, ref)
    fastckpt.save(obj, got)
    assert (got.size, got.crc) == (ref.size, ref.crc) and got.size > 2**32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_storages_same_bytes(tmp_path, pinned):
    obj = {"gpu": torch.randn(1000, device="cuda"), "view": torch.arange(10.0, device="cuda")[2:],
           "cpu": torch.ones(3), "bf16": torch.randn(64, 64, device="cuda").bfloat16()}
    with config.patch({"save.use_pinned_memory_for_d2h": pinned}):
        assert_identical(*save_both(tmp_path, "cuda.pt", obj))


# --------------------------------------------------------------------------- errors, as torch raises them


def test_file_object_write_error_propagates():
    class Full(io.BytesIO):
        def write(self, b):
            if self.tell() > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    with pytest.raises(OSError) as info:
        fastckpt.save({**big(), **many_small(20)}, Full())
    assert info.value.errno == errno.ENOSPC


def same_error(fn_args, **kwargs):
    ref = call(ORIGINAL_SAVE, *fn_args, **kwargs)
    got = call(fastckpt.save, *fn_args, **kwargs)
    assert ref.exc is not None and got.exc is not None
    assert (type(got.exc), str(got.exc)) == (type(ref.exc), str(ref.exc))


def test_unpicklable_errors_are_torchs(tmp_path):
    same_error((lambda: 1, io.BytesIO()))
    t = torch.ones(4)
    same_error(([t, t.view(torch.int32)], io.BytesIO()))

    class Local:
        pass

    same_error(({"x": Local()}, io.BytesIO()))
    same_error((torch.ones(2), object()))
    same_error((torch.ones(2), type("W", (), {"write": 3})()))
    same_error((torch.ones(2), str(tmp_path / "missing" / "x.pt")))
    same_error((torch.ones(2), io.BytesIO()), pickle_module=type("M", (), {"__name__": "dill", "__version__": "0.2"}))


def test_warnings_are_torchs():
    hooked = torch.ones(2, requires_grad=True)
    hooked.register_hook(print)
    ref, got = call(ORIGINAL_SAVE, [hooked], io.BytesIO()), call(fastckpt.save, [hooked], io.BytesIO())
    assert got.exc is None and got.warnings == ref.warnings and len(ref.warnings) == 1


def test_failed_save_leaves_previous_file(tmp_path):
    p = tmp_path / "keep.pt"
    fastckpt.save({"v": torch.arange(5)}, p)
    before = p.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # AttributeError: a local lambda
        fastckpt.save({"v": torch.arange(9), "bad": lambda: 0}, p)

    class Interrupt:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fastckpt.save([torch.ones(3), Interrupt()], p)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.pt"]


class _Resizer:
    """Resizes a storage when pickled, as FSDP's hooks free unsharded parameters (resize_(0))."""

    def __init__(self, t: torch.Tensor, nbytes: int):
        self.t, self.nbytes = t, nbytes

    def __reduce__(self):
        self.t.untyped_storage().resize_(self.nbytes)
        return int, (0,)


@pytest.mark.parametrize("to", [0, 100])
@pytest.mark.parametrize("nbytes", [4096, 4 << 20])  # a heap block; a mapping of its own, unmapped when freed
@pytest.mark.parametrize("target", ["file", "path", "background"])
def test_storage_resized_while_pickling_is_written_as_torch_writes_it(tmp_path, nbytes, to, target):
    """torch.save writes each storage as it is when written (its current pointer and size): so does
    fastckpt, never the bytes at a pointer the pickling freed."""

    def make():
        t = random_bytes(nbytes, 8)
        return {"t": t, "other": torch.ones(5), "resize": _Resizer(t, to), "after": torch.arange(3)}

    if target == "file":
        assert_identical(torch_bytes(make()), fastckpt_bytes(make()))
        return
    ref, got = tmp_path / "torch" / "r.pt", tmp_path / "fastckpt" / "r.pt"
    ref.parent.mkdir()
    got.parent.mkdir()
    ORIGINAL_SAVE(make(), ref)
    if target == "path":
        fastckpt.save(make(), got)
    else:
        fastckpt.save(make(), got, background=True).result()
    assert_identical(ref.read_bytes(), got.read_bytes())


def _in_child(fn) -> int:
    """Runs fn() in a forked child; returns its exit status (fn's return value, or 99 on an exception)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_file_size_limit_raises_oserror_and_keeps_target(tmp_path):
    p = tmp_path / "full.pt"
    fastckpt.save({"old": torch.ones(10)}, p)
    before = p.read_bytes()
    limit = 1 << 20

    def child():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            fastckpt.save({"new": random_bytes(4 << 20, 1)}, p)
        except OSError as e:
            return 3 if e.errno in (errno.EFBIG, errno.ENOSPC) else 4
        return 0

    assert _in_child(child) == 3
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["full.pt"]


def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path):
    """A save killed at a random moment leaves the previous checkpoint or the new one, never a torn file."""
    p = tmp_path / "ckpt.pt"
    versions = [{"version": torch.tensor(v), "w": random_bytes(24 << 20, v), **many_small(200)} for v in (0, 1)]
    fastckpt.save(versions[0], p)

    def child():
        for i in range(1, 1000):
            fastckpt.save(versions[i % 2], p)
        return 0

    t0 = time.perf_counter()  # kill moments spread over a few saves, however fast this machine is now
    fastckpt.save(versions[1], tmp_path / "timing.pt")
    one_save = time.perf_counter() - t0
    rng = random.Random(12)
    for _ in range(20):  # a count, not a time budget: a busy machine makes each trial slower, not fewer
        pid = os.fork()
        if pid == 0:
            try:
                child()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 3 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report = fastckpt.verify(p)
        assert report.ok, report.failures
        got = fc_load(p)
        assert int(got["version"]) in (0, 1)
        assert torch.equal(got["w"], versions[int(got["version"])]["w"])
    for name in os.listdir(tmp_path):  # a killed save may leave its temporary file, never anything else
        assert name in ("ckpt.pt", "timing.pt") or (name.startswith(".ckpt.pt.") and name.endswith(".tmp")), name
    fastckpt.save(versions[0], p)  # the next save removes the killed saves' temporaries
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "timing.pt"]


def test_atomic_replace_keeps_mode_and_links(tmp_path):
    p = tmp_path / "m.pt"
    fastckpt.save({"a": torch.ones(2)}, p)
    os.chmod(p, 0o640)
    fastckpt.save({"a": torch.ones(3)}, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    link = tmp_path / "link.pt"
    link.symlink_to(p)
    fastckpt.save({"a": torch.ones(4)}, link)
    assert link.is_symlink() and fc_load(p)["a"].shape == (4,)
    fastckpt.save({"a": torch.ones(4)}, os.devnull)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# --------------------------------------------------------------------------- patch(save=True)


def test_exported():
    assert fastckpt.save is importlib.import_module("fastckpt.saver").save
    assert "save" in fastckpt.__all__


def test_patch_save_and_unpatch(tmp_path, monkeypatch):
    calls = []
    real = writer.save
    monkeypatch.setattr(writer, "save", lambda *a, **k: calls.append(k) or real(*a, **k))
    fpatch.patch()
    assert torch.save is ORIGINAL_SAVE, "save is patched only on request"
    fpatch.patch(save=True)
    fpatch.patch(save=True)
    wrapper = torch.save
    assert wrapper is not ORIGINAL_SAVE and torch.serialization.save is wrapper
    assert inspect.signature(wrapper) == inspect.signature(ORIGINAL_SAVE) and wrapper.__doc__ == ORIGINAL_SAVE.__doc__
    p = tmp_path / "p.pt"
    torch.save({"w": torch.ones(2)}, p, pickle_protocol=2)
    assert calls == [{"pickle_protocol": 2}]
    assert p.read_bytes() == save_both(tmp_path, "p.pt", {"w": torch.ones(2)})[0]
    fpatch.unpatch()
    assert torch.save is ORIGINAL_SAVE and torch.serialization.save is ORIGINAL_SAVE
    assert torch.load is torch.serialization.load and not fpatch.is_patched()


def test_unpatch_leaves_foreign_save_alone():
    fpatch.patch(save=True)

    def other(*args, **kwargs):
        return ORIGINAL_SAVE(*args, **kwargs)

    torch.save = other
    fpatch.unpatch()
    assert torch.save is other and torch.serialization.save is ORIGINAL_SAVE


def test_patched_save_in_a_library_path(tmp_path):
    """Code that calls torch.save (a trainer) gets fastckpt.save, and its checkpoints load back."""
    fpatch.patch(save=True)
    ckpt = model_and_optimizer()
    p = tmp_path / "trainer.pt"
    torch.save(ckpt, p)
    fpatch.unpatch()
    assert_identical(p.read_bytes(), save_both(tmp_path, "trainer.pt", ckpt)[0])
    assert torch.equal(torch.load(p)["model"]["0.weight"], ckpt["model"]["0.weight"])
