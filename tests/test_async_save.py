"""Background saves (fastckpt.save(..., background=True), AsyncSaver) and device saves through the
devices backend seam: the fake backend, with CPU storages sent through it as if they were on a device."""

from __future__ import annotations

import errno
import importlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from parity import fc_load

import fastckpt
from fastckpt import _native
from fastckpt.devices import use_backend
from fastckpt.errors import LimitError

from fastckpt.testing import FakeBackend

writer = importlib.import_module("fastckpt.writer")
saver_module = importlib.import_module("fastckpt.saver")


def random_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def state(seed: int = 0, big: int = 3 << 20) -> dict:
    """Tensors of every shape of sharing: large (several copy chunks), small, empty, views, a shared
    storage, a tied parameter, plus Python values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 64, generator=g)
    weight = torch.nn.Parameter(torch.randn(32, 16, generator=g))
    return {
        "big": random_bytes(big, seed),
        "bf16": torch.randn(300, 70, generator=g).bfloat16(),
        "base": base, "view": base[3:9, 5:], "t": base.t(),
        "weight": weight, "tied": weight,
        "small": [torch.arange(i, dtype=torch.int64) + seed for i in range(40)],
        "empty": torch.empty(0), "scalar": torch.tensor(seed),
        "step": seed, "name": "ckpt",
    }


def mutate(obj) -> None:
    """add_(1) on every tensor of `obj`, in place."""
    with torch.no_grad():
        for t in _tensors(obj):
            if t.numel():
                t.add_(1)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def sync_bytes(tmp_path, name: str, obj) -> bytes:
    """What a synchronous fastckpt.save of `obj` to a file called `name` writes."""
    ref = tmp_path / "sync" / name
    ref.parent.mkdir(exist_ok=True)
    fastckpt.save(obj, ref)
    return ref.read_bytes()


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


@pytest.fixture
def saver():
    with fastckpt.AsyncSaver() as s:
        yield s


# --------------------------------------------------------------------------- snapshot semantics


def test_exported_lazily():
    code = "import sys, fastckpt; assert 'torch' not in sys.modules and 'lightning' not in sys.modules; " \
           "fastckpt.AsyncSaver; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "AsyncSaver" in fastckpt.__all__ and fastckpt.AsyncSaver is saver_module.AsyncSaver


@pytest.mark.parametrize("via", ["function", "saver"])
def test_file_is_the_state_at_call_time_under_mutation(tmp_path, saver, via):
    obj = state(1)
    expected = sync_bytes(tmp_path, "m.pt", obj)
    p = tmp_path / "m.pt"
    handle = fastckpt.save(obj, p, background=True) if via == "function" else saver.save(obj, p)
    mutate(obj)  # right after the call: the file must not see it
    del obj
    assert handle.result() == str(p)
    assert p.read_bytes() == expected
    assert handle.done() and handle.wait(0) and handle.bytes > 3 << 20
    assert handle.snapshot_seconds > 0 and handle.write_seconds > 0


@pytest.mark.parametrize("setting", [{"save.compute_crc32": False}, {"save.storage_alignment": 4096}])
def test_serialization_config_as_a_synchronous_save(tmp_path, saver, setting):
    from torch.utils.serialization import config

    obj = state(7, big=1 << 18)
    with config.patch(setting):
        expected = sync_bytes(tmp_path, "c.pt", obj)
        handle = saver.save(obj, tmp_path / "c.pt")
    handle.result()
    assert (tmp_path / "c.pt").read_bytes() == expected


def test_device_storages_snapshot_through_the_backend(tmp_path, saver):
    obj = state(2, big=1 << 20)
    expected = sync_bytes(tmp_path, "d.pt", obj)
    backend = FakeBackend("cpu", delay=(0, 0.002), seed=3)
    with use_backend(backend):
        handle = saver.save(obj, tmp_path / "d.pt")
        mutate(obj)
    handle.result()
    assert (tmp_path / "d.pt").read_bytes() == expected
    assert backend.copies > 0 and backend.early_refills == 0 and backend.in_flight == 0


def test_device_copy_failure_surfaces(tmp_path, saver):
    with use_backend(FakeBackend("cpu", fail_copy=2)), pytest.raises(RuntimeError, match="copy 2 failed"):
        saver.save(state(3, big=1 << 16), tmp_path / "f.pt").result()  # from the snapshot or the write
    assert not (tmp_path / "f.pt").exists() and leftovers(tmp_path) == []


def test_staging_is_reused(tmp_path, saver):
    for i in range(3):
        saver.save(state(i), tmp_path / "r.pt").result()
    assert saver.staging_allocations == 1
    saver.save(state(0, big=6 << 20), tmp_path / "r.pt").result()
    assert saver.staging_allocations == 2
    saver.save(state(5), tmp_path / "r.pt").result()
    assert saver.staging_allocations == 2, "a larger buffer serves a smaller state"


def test_same_path_completes_in_call_order(tmp_path, monkeypatch):
    order = []
    real = writer.write_to_path

    def recording(path, pickled, records, threads, **kwargs):
        time.sleep(random.uniform(0, 0.01))
        real(path, pickled, records, threads, **kwargs)
        order.append(pickled.data_pkl)

    monkeypatch.setattr(writer, "write_to_path", recording)
    p = tmp_path / "o.pt"
    objs = [{"v": i, "w": torch.full((1000,), i)} for i in range(6)]
    with fastckpt.AsyncSaver(max_in_flight=3) as s:
        handles = [s.save(o, p) for o in objs]
        s.wait()
    assert all(h.done() for h in handles)
    assert order == [writer.pickle_for_save(o, str(p), __import__("pickle"), 2, False).data_pkl for o in objs]
    assert fc_load(p)["v"] == 5


def test_max_in_flight_bounds_snapshots(tmp_path, monkeypatch):
    gate = threading.Event()
    real = writer.write_to_path
    monkeypatch.setattr(writer, "write_to_path", lambda *a, **k: (gate.wait(), real(*a, **k)))
    s = fastckpt.AsyncSaver(max_in_flight=2)
    first = s.save(state(0), tmp_path / "a.pt")
    s.save(state(1), tmp_path / "b.pt")
    assert not first.done()
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    s.save(state(2), tmp_path / "c.pt")  # waits for the first write
    assert first.done()
    s.close()
    assert [fc_load(tmp_path / f"{n}.pt")["step"] for n in "abc"] == [0, 1, 2]


# --------------------------------------------------------------------------- failures


def _fail_writes(monkeypatch):
    def failing(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(_native, "write_zip", failing)


def test_failure_surfaces_in_result_next_save_and_close(tmp_path, monkeypatch):
    p = tmp_path / "x.pt"
    fastckpt.save({"old": torch.ones(3)}, p)
    before = p.read_bytes()
    s = fastckpt.AsyncSaver()
    with monkeypatch.context() as m:
        _fail_writes(m)
        h = s.save(state(0), p)
        with pytest.raises(OSError) as info:
            h.result()
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            h.wait()  # every time it is asked
        s.save(state(1), p)  # reported through the handle: not raised again
        with pytest.raises(OSError, match="injected"):  # ...but this one nobody looked at
            s.save(state(2), p)
        s.save(state(3), p)
        with pytest.raises(OSError, match="injected"):
            s.close()
    s.close()  # reported once
    assert p.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_in_background(tmp_path, saver):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        h = saver.save(state(0), folder / "x.pt")
        with pytest.raises(PermissionError):
            h.result()
    finally:
        folder.chmod(0o700)
    assert os.listdir(folder) == []


def test_folder_removed_before_the_write_fails_in_background(tmp_path, monkeypatch):
    """A real OS error (no injection; root ignores read-only folders): the folder goes away between the
    snapshot and the write, held back behind another save."""
    gate = threading.Event()
    real = writer.write_to_path
    monkeypatch.setattr(writer, "write_to_path", lambda *a, **k: (gate.wait(5), real(*a, **k)))
    folder = tmp_path / "gone"
    folder.mkdir()
    with fastckpt.AsyncSaver(max_in_flight=2) as s:
        first = s.save(state(0), tmp_path / "a.pt")
        second = s.save(state(1), folder / "x.pt")
        folder.rmdir()
        gate.set()
        first.result()
        with pytest.raises(FileNotFoundError):
            second.result()
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_paths_only_and_zip_format_only(tmp_path, saver):
    with pytest.raises(ValueError, match="path"):
        fastckpt.save({"a": torch.ones(2)}, io.BytesIO(), background=True)
    with pytest.raises(ValueError, match="_use_new_zipfile_serialization"):
        saver.save({"a": torch.ones(2)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    assert os.listdir(tmp_path) == []


def test_memory_limit_checked_before_copying(tmp_path, monkeypatch):
    s = fastckpt.AsyncSaver(max_staging_bytes=1 << 20)
    with pytest.raises(LimitError, match=r"needs 32\d{5} bytes of staging memory"):
        s.save(state(0), tmp_path / "big.pt")
    assert s.staging_allocations == 0 and os.listdir(tmp_path) == []
    monkeypatch.setattr(saver_module, "_available_memory", lambda: 1000)
    s.max_staging_bytes = None
    with pytest.raises(LimitError, match="1000 bytes available"):
        s.save(state(0), tmp_path / "big.pt")
    assert s.staging_allocations == 0 and os.listdir(tmp_path) == []
    monkeypatch.setattr(saver_module, "_available_memory", lambda: None)
    s.save(state(0), tmp_path / "big.pt").result()
    monkeypatch.setattr(saver_module, "_available_memory", lambda: 1000)
    s.save(state(1), tmp_path / "big.pt").result()  # needs no new memory: the staging it keeps
    assert s.staging_allocations == 1 and fc_load(tmp_path / "big.pt")["step"] == 1
    s.close()


def test_interrupt_during_snapshot_leaves_nothing(tmp_path, saver):
    class Interrupt:
        def __reduce__(self):
            raise KeyboardInterrupt

    p = tmp_path / "i.pt"
    with pytest.raises(KeyboardInterrupt):
        saver.save([state(0), Interrupt()], p)
    assert os.listdir(tmp_path) == []
    saver.save(state(1), p).result()  # the saver still works, with the staging it had
    assert fc_load(p)["step"] == 1


# --------------------------------------------------------------------------- processes


def _run_child(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_atexit_completes_pending_writes(tmp_path):
    p = tmp_path / "exit.pt"
    out = _run_child("""
        import sys, torch, fastckpt
        fastckpt.save({"w": torch.arange(4 << 20, dtype=torch.int32)}, sys.argv[1], background=True)
    """, p)
    assert out.returncode == 0, out.stderr
    assert fastckpt.verify(p).ok
    assert torch.equal(fc_load(p)["w"], torch.arange(4 << 20, dtype=torch.int32))


def test_atexit_prints_a_failure(tmp_path):
    out = _run_child("""
        import errno, sys, torch, fastckpt
        from fastckpt import _native
        def failing(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        _native.write_zip = failing
        fastckpt.save({"w": torch.ones(10)}, sys.argv[1], background=True)
    """, tmp_path / "f.pt")
    assert "background save to" in out.stderr and "injected" in out.stderr, out.stderr
    assert os.listdir(tmp_path) == []


def test_forked_child_does_not_wait_for_the_parents_writes(tmp_path, monkeypatch):
    gate = threading.Event()
    real = writer.write_to_path
    monkeypatch.setattr(writer, "write_to_path", lambda *a, **k: (gate.wait(60), real(*a, **k)))
    with fastckpt.AsyncSaver() as s:
        pending = s.save(state(0), tmp_path / "p.pt")
        pid = os.fork()
        if pid == 0:  # the parent's write is not this process's: exit (atexit included) without waiting
            code = 1
            try:
                gate.set()  # this process's copy: its own writes go through
                s.save({"child": 1}, tmp_path / "child.pt").result()
                s.wait()
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child waited for its parent's write")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert not pending.done()
        gate.set()
    assert fc_load(tmp_path / "p.pt")["step"] == 0 and fc_load(tmp_path / "child.pt") == {"child": 1}


def test_sigkill_during_background_writes_never_tears(tmp_path):
    p = tmp_path / "k.pt"
    versions = [{"version": v, "w": random_bytes(16 << 20, v)} for v in (0, 1)]
    fastckpt.save(versions[0], p)
    rng = random.Random(5)
    for trial in range(10):
        pid = os.fork()
        if pid == 0:
            try:
                with fastckpt.AsyncSaver() as s:
                    for i in range(1, 1000):
                        s.save(versions[i % 2], p)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.01, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report = fastckpt.verify(p)
        assert report.ok, (trial, report.failures)
        got = fc_load(p)
        assert torch.equal(got["w"], versions[got["version"]]["w"])
    for name in os.listdir(tmp_path):  # a killed write may leave its temporary, never anything else
        assert name == "k.pt" or (name.startswith(".k.pt.") and name.endswith(".tmp")), name
    fastckpt.save(versions[0], p, background=True).result()  # the next save removes the dead writers' temporaries
    assert os.listdir(tmp_path) == ["k.pt"]


# --------------------------------------------------------------------------- synchronous device saves


def test_device_save_streams_through_a_bounded_ring(tmp_path):
    """A synchronous save of device storages holds at most staging_bytes of host buffers, whatever
    the state's size, and writes what a save of the same CPU state writes."""
    obj = {**state(4, big=(5 << 20) + 13), "more": [random_bytes(300_000, i) for i in range(8)]}
    expected = sync_bytes(tmp_path, "s.pt", obj)
    staging = 4 * (256 << 10)
    backend = FakeBackend("cpu", delay=(0, 0.001), seed=1)
    with use_backend(backend):
        fastckpt.save(obj, tmp_path / "s.pt", staging_bytes=staging)
    assert (tmp_path / "s.pt").read_bytes() == expected
    total = sum(t.untyped_storage().nbytes() for t in _tensors(obj))
    assert backend.max_host_bytes <= staging < total / 4
    assert backend.copies > total // staging and backend.early_refills == 0
    assert backend.host_allocations == 4 and backend.ring.idle == 4, "the ring is kept for the next load or save"


def test_device_save_to_a_file_object_copies_each_storage():
    obj = state(6, big=1 << 16)
    plain, staged = io.BytesIO(), io.BytesIO()
    fastckpt.save(obj, plain)
    with use_backend(FakeBackend("cpu")):
        fastckpt.save(obj, staged)
    assert staged.getvalue() == plain.getvalue()
