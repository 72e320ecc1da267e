"""CUDA targets: fastckpt.load to a GPU equals torch.load to it. Skipped without CUDA."""

import pytest
import torch

from parity import assert_same, fastckpt_load, torch_load

import fastckpt

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _checkpoint(tmp_path, device):
    base = torch.arange(4096, dtype=torch.float32, device=device)
    state = {
        "w": torch.randn(64, 32, device=device),
        "view": base[128:256],
        "base": base,
        "bf16": torch.randn(8, 8, device=device).to(torch.bfloat16),
        "param": torch.nn.Parameter(torch.randn(3, device=device)),
        "step": 7,
    }
    path = tmp_path / f"on_{device.replace(':', '_')}.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("saved_on", ["cpu", "cuda:0"])
@pytest.mark.parametrize("map_location", [None, "cuda:0", "cuda", torch.device("cuda", 0), {"cpu": "cuda:0"}])
@pytest.mark.parametrize("mmap", [False, True])
def test_load_to_cuda_matches_torch(tmp_path, saved_on, map_location, mmap):
    path = _checkpoint(tmp_path, saved_on)
    ref = torch_load(path, map_location=map_location, mmap=mmap).get()
    got = fastckpt_load(path, map_location=map_location, mmap=mmap).get()
    assert_same(got, ref)
    for key in ("w", "view", "base"):
        assert got[key].device == ref[key].device


@pytest.mark.parametrize("mmap", [False, True])
def test_cuda_file_to_cpu(tmp_path, mmap):
    path = _checkpoint(tmp_path, "cuda:0")
    ref = torch_load(path, map_location="cpu", mmap=mmap).get()
    got = fastckpt_load(path, map_location="cpu", mmap=mmap).get()
    assert_same(got, ref)
    assert got["w"].device.type == "cpu"


# --------------------------------------------------------------------------- staged storages behave like torch.load's


def _small_file(tmp_path, n=64):
    g = torch.Generator().manual_seed(4)
    state = {f"t{i}": torch.randn(64, generator=g) for i in range(n)}  # packed: one copy, then scattered
    state["big"] = torch.randn(1 << 20, generator=g)
    state["empty"] = torch.empty(0)
    state["i64"] = torch.arange(5, dtype=torch.int64)
    path = tmp_path / "small.pt"
    torch.save(state, path)
    return path, state


def test_caller_stream_work_finishes_before_copies_land(tmp_path):
    """Memory the caller freed while its queued kernels still write it is not reused by the load's
    copies before those kernels finish."""
    path, state = _small_file(tmp_path)
    pending = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the current stream
    pending.fill_(7)  # queued behind the sleep
    del pending  # its block is free for the caller's stream now, the fill still to run
    got = fastckpt.load(path, map_location="cuda")
    torch.cuda.synchronize()
    for key, value in state.items():
        assert torch.equal(got[key].cpu(), value), key


def test_record_stream_on_a_side_stream(tmp_path):
    path, state = _small_file(tmp_path)
    got = fastckpt.load(path, map_location="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        doubled = {k: got[k] * 2 for k in ("t0", "t1", "big")}
    for k in ("t0", "t1", "big"):
        got[k].record_stream(side)  # honoured only for blocks of the caching allocator
    del got
    clobber = [torch.full((1 << 22,), 1e9, device="cuda") for _ in range(4)]  # would take the freed blocks
    torch.cuda.synchronize()
    for k, v in doubled.items():
        assert torch.equal(v.cpu(), state[k] * 2), k
    del clobber


def test_storages_are_torchs_kind(tmp_path):
    from torch.multiprocessing.reductions import reduce_tensor

    path, _ = _small_file(tmp_path)
    got = fastckpt.load(path, map_location="cuda")
    reduce_tensor(got["t3"])  # _share_cuda_: needs the start of a caching-allocator block
    storage = got["t5"].untyped_storage()
    storage.resize_(storage.nbytes() * 2)
    assert got["empty"].untyped_storage().data_ptr() == 0
    torch.save(got, tmp_path / "again.pt")  # empty next to int64: no "view the same data" error
    assert torch.equal(torch.load(tmp_path / "again.pt")["i64"].cpu(), torch.arange(5))


def test_ring_is_allocated_once_per_process(tmp_path):
    from fastckpt import devices

    path, _ = _small_file(tmp_path)
    fastckpt.load(path, map_location="cuda")
    ring = devices.backend_for("cuda").ring
    after_first = ring.allocations
    fastckpt.load(path, map_location="cuda")
    assert ring.allocations == after_first


def _fails_and_frees(load) -> str:
    """Runs a load that must fail; returns the error's type name. Collection stays off: the device
    memory must be back when the error is gone, without a collection, and no stager thread left."""
    import gc
    import threading

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gc.disable()
    try:
        try:
            load()
        except BaseException as e:  # noqa: BLE001
            kind = type(e).__name__
        else:
            raise AssertionError("the load did not fail")
        assert torch.cuda.memory_allocated() == before
    finally:
        gc.enable()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fastckpt-")]
    return kind


def test_failures_free_device_memory_without_a_collection(tmp_path):
    import _thread

    from parity import flip_byte

    g = torch.Generator().manual_seed(5)
    state = {f"w{i}": torch.randn(1 << 22, generator=g) for i in range(16)}  # 16 x 16 MiB
    good = tmp_path / "good.pt"
    torch.save(state, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(flip_byte(good.read_bytes(), "data/12", 5))

    assert _fails_and_frees(lambda: fastckpt.load(bad, map_location="cuda")) == "IntegrityError"

    free, total = torch.cuda.mem_get_info()
    used = torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction((used + (100 << 20)) / total)  # room for ~6 of 16 tensors
    try:
        assert _fails_and_frees(lambda: fastckpt.load(good, map_location="cuda")) == "OutOfMemoryError"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)

    timer = threading_timer(0.05, _thread.interrupt_main)
    try:
        kind = _fails_and_frees(lambda: [fastckpt.load(good, map_location="cuda") for _ in range(1000)])
    finally:
        timer.cancel()
    assert kind == "KeyboardInterrupt"

    got = fastckpt.load(good, map_location="cuda")  # and the next load works
    assert all(torch.equal(got[k].cpu(), v) for k, v in state.items())


def threading_timer(seconds, fn):
    import threading

    timer = threading.Timer(seconds, fn)
    timer.start()
    return timer
