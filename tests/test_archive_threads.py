"""Lifetimes of zero-copy views, copy-on-write, GIL release and concurrent reads."""

import collections
import gc
import sys
import threading
import time
import zipfile

import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402
from fastckpt import _native  # noqa: E402


def test_view_outlives_archive(small_ckpt, small_state):
    archive = _native.Archive.open(str(small_ckpt))
    view = memoryview(archive.view("data/0"))
    tensor = torch.frombuffer(archive.view("data/0"), dtype=torch.float32)
    half = torch.frombuffer(archive.view("data/2"), dtype=torch.float16)
    del archive
    gc.collect()
    assert bytes(view) == bytes(small_state["w"].untyped_storage())
    assert torch.equal(tensor, small_state["w"].flatten())
    assert torch.equal(half, small_state["h"])


def test_view_of_file_object_outlives_archive(small_ckpt, small_state):
    with open(small_ckpt, "rb") as f:
        archive = fastckpt.open_archive(f)
    tensor = torch.frombuffer(archive.view("data/1"), dtype=torch.int64)
    del archive
    gc.collect()
    assert torch.equal(tensor, small_state["b"])


def test_writes_to_a_view_never_reach_the_file(small_ckpt, small_state):
    before = small_ckpt.read_bytes()
    archive = _native.Archive.open(str(small_ckpt))
    tensor = torch.frombuffer(archive.view("data/0"), dtype=torch.float32)
    tensor.add_(1.0)  # copy-on-write: this process's pages only
    memoryview(archive.view("data/1"))[:8] = b"\xff" * 8
    assert torch.equal(torch.frombuffer(archive.view("data/0"), dtype=torch.float32),
                       small_state["w"].flatten() + 1.0)  # the same mapping sees the write
    del archive, tensor
    gc.collect()
    assert small_ckpt.read_bytes() == before
    fresh = _native.Archive.open(str(small_ckpt))
    assert bytes(fresh.view("data/1")) == bytes(small_state["b"].untyped_storage())
    assert fastckpt.verify(small_ckpt).ok


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """~200 MB in one stored record."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    torch.save({"x": torch.arange(50_000_000, dtype=torch.int32)}, path)
    return path


def test_verify_releases_the_gil(big_ckpt):
    """While the main thread is inside one verify call, another Python thread
    keeps running: the GIL is released during the CRC work. Progress is
    counted rather than wall times compared, so a busy machine does not decide
    the outcome; a tiny switch interval bounds what the other thread could do
    in the instants around the call if the GIL were held throughout."""
    archive = _native.Archive.open(str(big_ckpt))
    archive.verify(None, 1)  # warm the page cache
    # The same ~200 MB record ten times: one call long enough to measure.
    names = [n for n in archive.names() if n.startswith("data/")] * 10
    ticks = [0]
    done = threading.Event()

    def spin():
        while not done.is_set():
            ticks[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.05)
        t0, n0 = time.perf_counter(), ticks[0]
        time.sleep(0.1)
        rate = (ticks[0] - n0) / (time.perf_counter() - t0)  # iterations/s with the main thread idle
        for _ in range(5):
            t0, n0 = time.perf_counter(), ticks[0]
            report = archive.verify(names, 1)
            during, elapsed = ticks[0] - n0, time.perf_counter() - t0
            assert all(status == "ok" for _, status, _ in report)
            # Held throughout, the GIL would leave the spinner a few switch
            # intervals at most: ~1e-4 s of its rate.
            if elapsed > 0.05 and during > 0.05 * rate * elapsed:
                return
    finally:
        done.set()
        spinner.join()
        sys.setswitchinterval(old_interval)
    pytest.fail(f"another Python thread ran {during} iterations during a {elapsed:.3f} s verify (alone: {rate:.0f}/s)")


def test_concurrent_reads_agree(tmp_path):
    g = torch.Generator().manual_seed(2)
    state = collections.OrderedDict((f"t{i}", torch.randn(1 + i * 97, generator=g)) for i in range(64))
    path = tmp_path / "many.pt"
    torch.save(state, path)
    with zipfile.ZipFile(path) as zf:
        expected = {i.filename.split("/", 1)[1]: zf.read(i) for i in zf.infolist()}
    archive = fastckpt.open_archive(path)
    names = archive.names()
    results = {}
    errors = []

    def reader(k):
        try:
            seen = {}
            for _ in range(10):
                for name in names[k % len(names):] + names[:k % len(names)]:
                    data = archive.read(name)
                    buffer = bytearray(len(data))
                    archive.read_into(name, buffer, True, 1)
                    assert data == buffer == bytes(archive.view(name))
                    assert seen.setdefault(name, data) == data
                plan = _native.StoragePlan(archive, _native.StoragePlan.Mode.eager, None, True)
                plan.start(True, 2)
                for name in archive.names("data/"):
                    assert bytes(plan.bytes(name[5:], len(expected[name]))) == expected[name]
                plan.finish()
                assert all(status == "ok" for _, status, _ in archive.verify(None, 1))
            results[k] = seen
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 6 and all(seen == expected for seen in results.values())
