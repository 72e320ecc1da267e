"""Staged device loads (fastckpt.devices).

The ring's logic is proven here with the fake backend (device memory = host memory, copies on a
thread of their own after random delays), which claims the "cuda" device type inside
``use_backend``; results are compared with torch.load(map_location="cpu"). The tests marked
``cuda`` run the real backend and are skipped without a GPU.
"""

import _thread
import gc
import io
import threading
import time

import pytest
import torch

from parity import assert_same, fastckpt_load, flip_byte, retag, save_bytes, torch_load

import fastckpt
from fastckpt import _native, devices
from fastckpt.testing import FakeBackend
from fastckpt.archive import open_archive, read_data_pickle

SMALL_RING = 4 * (16 << 10)


@pytest.fixture(autouse=True)
def nothing_left_running():
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("fastckpt-")]
    assert not left, f"threads still running after the test: {left}"


def _llm_state(dtype=torch.bfloat16, hidden=128, layers=4, vocab=1000):
    g = torch.Generator().manual_seed(1)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).to(dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{proj}.weight"] = torch.randn(hidden, hidden, generator=g).to(dtype)
        sd[p + "mlp.up_proj.weight"] = torch.randn(3 * hidden, hidden, generator=g).to(dtype)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).to(dtype)
    return sd


def _mixed_state():
    g = torch.Generator().manual_seed(0)
    base = torch.arange(5000, dtype=torch.float32)
    big = torch.randn(300, 300, generator=g)
    return {
        "w": torch.randn(64, 32, generator=g),
        "big": big,
        "big_t": big.t(),  # a strided view of a storage split over several ring buffers
        "base": base,
        "view": base[128:256],  # shares base's storage
        "bf16": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "int": torch.arange(7, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "half": torch.randn(100, generator=g).half(),
        "empty": torch.empty(0),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "nested": [base[:3], {"again": big}],
        "step": 7,
    }


def _save(tmp_path, obj, name="ckpt.pt", cuda_tags=False):
    data = save_bytes(obj)
    if cuda_tags:  # as if saved from a GPU: every storage tagged "cuda:0"
        data = retag(data, {"cpu": "cuda:0"})
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _fake_load(path, fake, **kwargs):
    with devices.use_backend(fake):
        return fastckpt_load(path, **kwargs).get()


def _assert_clean(fake, staging_bytes):
    assert fake.ring.idle == fake.host_allocations, "a ring buffer was not given back to the ring"
    assert fake.early_refills == 0, "a ring buffer was refilled before its copy finished"
    assert 0 < fake.max_host_bytes <= staging_bytes
    assert fake.max_in_flight <= staging_bytes


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("map_location", ["cuda:0", "cuda", torch.device("cuda", 0), {"cpu": "cuda:0"}])
def test_parity_under_random_delays(tmp_path, mmap, map_location):
    path = _save(tmp_path, _mixed_state())
    ref = torch_load(path, map_location="cpu", mmap=mmap).get()
    fake = FakeBackend(delay=(0, 0.003), seed=3)
    got = _fake_load(path, fake, map_location=map_location, mmap=mmap, staging_bytes=SMALL_RING)
    assert_same(got, ref)
    assert fake.copies > 4  # packed storages plus the large one in pieces
    _assert_clean(fake, SMALL_RING)


@pytest.mark.parametrize("weights_only", [True, False])
def test_cuda_tagged_file_with_no_map_location(tmp_path, weights_only):
    path = _save(tmp_path, _mixed_state(), cuda_tags=True)
    ref = torch_load(path, map_location="cpu", weights_only=weights_only).get()
    fake = FakeBackend(delay=(0, 0.002))
    got = _fake_load(path, fake, weights_only=weights_only, staging_bytes=SMALL_RING)
    assert_same(got, ref)
    _assert_clean(fake, SMALL_RING)


def test_dict_remaps_device_tags(tmp_path):
    path = _save(tmp_path, _mixed_state(), cuda_tags=True)
    ref = torch_load(path, map_location="cpu").get()
    fake = FakeBackend(device_type="mps")  # "cuda:0" -> "mps": staged by the mps backend's stand-in
    assert_same(_fake_load(path, fake, map_location={"cuda:0": "mps"}), ref)
    assert fake.copies > 0
    fake = FakeBackend()
    assert_same(_fake_load(path, fake, map_location={"cuda:0": "cpu"}), ref)
    assert fake.copies == 0  # nothing bound for a device


def test_mixed_cpu_and_device_targets(tmp_path):
    state = _mixed_state()
    on_device = {state["big"].untyped_storage().data_ptr(), state["w"].untyped_storage().data_ptr()}
    registry = torch.serialization._package_registry
    before = list(registry)
    torch.serialization.register_package(
        0, lambda s: "cuda:0" if s.data_ptr() in on_device else None, lambda s, loc: None
    )
    try:
        path = _save(tmp_path, state)
    finally:
        registry[:] = before
    ref = torch_load(path, map_location="cpu").get()
    fake = FakeBackend(delay=(0, 0.002))
    got = _fake_load(path, fake, staging_bytes=SMALL_RING)
    assert_same(got, ref)
    assert fake.copies >= 2
    _assert_clean(fake, SMALL_RING)


def test_callable_map_location_keeps_torchs_path(tmp_path):
    path = _save(tmp_path, _mixed_state())
    seen = []

    def to_cpu(storage, location):
        seen.append(location)
        return storage

    fake = FakeBackend()
    got = _fake_load(path, fake, map_location=to_cpu)
    assert_same(got, torch_load(path, map_location=to_cpu).get())
    assert seen and fake.copies == 0


@pytest.mark.parametrize("staging_bytes", [SMALL_RING, 4 << 20])
def test_ten_thousand_tiny_tensors(tmp_path, staging_bytes):
    g = torch.Generator().manual_seed(2)
    path = _save(tmp_path, {f"t{i}": torch.randn(16, generator=g) for i in range(10_000)})
    ref = torch_load(path, map_location="cpu").get()
    fake = FakeBackend(delay=(0, 0.001))
    got = _fake_load(path, fake, map_location="cuda:0", staging_bytes=staging_bytes)
    assert_same(got, ref)
    # Packed: one copy (and one device slab) per ring buffer's worth, not one per tensor.
    assert fake.copies <= 10_000 * 256 // (staging_bytes // devices.SLOTS) + 1
    _assert_clean(fake, staging_bytes)


@pytest.mark.parametrize("mmap", [False, True])
def test_bf16_llm_shaped(tmp_path, mmap):
    path = _save(tmp_path, _llm_state())
    ref = torch_load(path, map_location="cpu", mmap=mmap).get()
    fake = FakeBackend(delay=(0, 0.002), seed=5)
    ring = 4 * (64 << 10)
    got = _fake_load(path, fake, map_location="cuda:0", mmap=mmap, staging_bytes=ring)
    assert_same(got, ref)
    _assert_clean(fake, ring)


def test_every_storage_is_its_own_allocation(tmp_path):
    state = {"big": torch.randn(1 << 19), "small": torch.randn(4), "small2": torch.randn(4), "view": None}
    state["view"] = state["big"][10:20]
    path = _save(tmp_path, state)
    fake = FakeBackend()
    got = _fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert_same(got, torch_load(path, map_location="cpu").get())
    assert fake.device_allocations == fake.live_device_blocks == 3  # big (with its view), small, small2
    for key, nbytes in (("big", 4 << 19), ("small", 16), ("small2", 16)):
        assert got[key].untyped_storage().nbytes() == nbytes  # no slab behind it: freeing it frees the block
    del got["small"]
    assert fake.live_device_blocks == 2


def test_consecutive_storages_share_a_copy(tmp_path):
    path = _save(tmp_path, {f"t{i}": torch.randn(100) for i in range(100)})  # 400 B each, 16 KiB ring buffers
    fake = FakeBackend()
    _fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert fake.device_allocations == 100
    assert fake.copies <= 100 * 512 // (SMALL_RING // devices.SLOTS) + 1  # 512: 400 B aligned to 256


def test_large_storage_fills_what_a_buffer_has_left():
    class Record:
        def __init__(self, name, offset, size):
            self.name, self.data_offset, self.size = name, offset, size

    dev = torch.device("cuda", 0)
    staged = [("0", Record("data/0", 0, 1000), dev), ("1", Record("data/1", 1024, 40000), dev),
              ("2", Record("data/2", 41024, 100), dev), ("3", Record("data/3", 41152, 0), dev)]
    chunks = devices._chunks(staged, 16384)
    assert [[(p.key, p.start, p.nbytes, p.at) for p in c.pieces] for c in chunks] == [
        [("0", 0, 1000, 0), ("1", 0, 15360, 1024)],
        [("1", 15360, 16384, 0)],
        [("1", 31744, 8256, 0), ("2", 0, 100, 8448)],  # the tail shares its buffer with what follows
    ]


def test_zero_byte_storages_have_no_data(tmp_path):
    state = {"e": torch.empty(0), "i": torch.arange(3, dtype=torch.int64), "e16": torch.empty(0, dtype=torch.half),
             "e2": torch.empty(0, 4)}
    path = _save(tmp_path, state)
    fake = FakeBackend()
    got = _fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert_same(got, torch_load(path, map_location="cpu").get())
    for key in ("e", "e16", "e2"):
        assert got[key].untyped_storage().data_ptr() == 0, key  # as a device's empty storage, never a neighbour's
    assert fake.device_allocations == 1
    torch.save(got, io.BytesIO())  # no two storages "view the same data as different types"


def test_ring_is_allocated_once_and_reused(tmp_path):
    path = _save(tmp_path, _llm_state())
    fake = FakeBackend(delay=(0, 0.001))
    ref = torch_load(path, map_location="cpu").get()
    for _ in range(3):
        assert_same(_fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING), ref)
        assert fake.host_allocations == devices.SLOTS
        _assert_clean(fake, SMALL_RING)
    # The first buffer is taken by the stager, which reads into it while the others are allocated.
    assert fake.host_threads == ["fastckpt-stager"] + ["fastckpt-ring"] * (devices.SLOTS - 1)


def _failed_load(path, fake, **kwargs) -> tuple[type, str]:
    """Loads and returns the error's type and message: no reference to the error (its traceback holds
    the load's frames) outlives this function, so what stays alive after it is what a cycle holds."""
    try:
        with devices.use_backend(fake):
            fastckpt.load(path, **kwargs)  # not parity's Outcome, which keeps the error it re-raises
    except BaseException as e:  # noqa: BLE001
        return type(e), str(e)
    raise AssertionError("the load did not fail")


@pytest.fixture
def no_collection():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _assert_released(fake):
    assert fake.live_device_blocks == 0, "a failed load's device blocks outlived it (held by a reference cycle?)"
    assert fake.ring.idle == fake.host_allocations, "a ring buffer was not given back"
    assert fake.early_refills == 0 and fake.copies_after_close == 0


@pytest.mark.parametrize("where", ["packed", "large, last piece"])
def test_crc_mismatch_mid_stream(tmp_path, where, no_collection):
    state = {f"t{i}": torch.randn(8) for i in range(50)}
    state["big"] = torch.randn(100_000)
    state.update({f"u{i}": torch.randn(8) for i in range(50)})
    data = save_bytes(state)
    key = "30" if where == "packed" else "50"
    index = 0 if where == "packed" else 400_000 - 1
    path = tmp_path / "bad.pt"
    path.write_bytes(flip_byte(data, f"data/{key}", index))
    fake = FakeBackend(delay=(0, 0.002))
    kind, message = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is fastckpt.IntegrityError and f"data/{key}" in message
    _assert_released(fake)
    # verify=False loads it anyway, through the same ring
    got = _fake_load(path, fake, map_location="cuda:0", verify=False, staging_bytes=SMALL_RING)
    assert len(got) == 101


def test_failing_copy_propagates(tmp_path, no_collection):
    path = _save(tmp_path, _llm_state())
    fake = FakeBackend(delay=(0, 0.001), fail_copy=5)
    kind, message = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is RuntimeError and message == "fake device: copy 5 failed"
    _assert_released(fake)


def test_unpickling_stops_when_the_stager_fails(tmp_path, no_collection):
    path = tmp_path / "bad.pt"
    path.write_bytes(flip_byte(save_bytes({f"t{i}": torch.randn(8) for i in range(2000)}), "data/0"))

    def first_allocation_waits_for_the_failure(n):
        # The first allocation is the unpickler's (the stager fails before it copies anything): hold
        # it until the stager has failed; the unpickler's next storage must raise, not allocate.
        deadline = time.monotonic() + 10
        while n == 1 and any(t.name == "fastckpt-stager" for t in threading.enumerate()):
            assert time.monotonic() < deadline
            time.sleep(0.001)

    fake = FakeBackend(on_alloc=first_allocation_waits_for_the_failure)
    kind, message = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is fastckpt.IntegrityError and "data/0" in message
    assert fake.device_allocations == 1
    _assert_released(fake)


def test_keyboard_interrupt_leaves_nothing_running(tmp_path, no_collection):
    path = _save(tmp_path, _llm_state())

    def interrupt(n):
        if n == 3:
            _thread.interrupt_main()  # what Ctrl-C does to the loading (main) thread

    fake = FakeBackend(delay=(0.01, 0.01), on_copy=interrupt)
    kind, _ = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is KeyboardInterrupt
    _assert_released(fake)
    assert fake.copies < 20  # stopped early, not after the whole file


def test_second_interrupt_while_cleaning_up(tmp_path, no_collection):
    path = _save(tmp_path, _llm_state())

    def interrupt_twice(n):
        if n == 3:  # the stager waits for this copy: the loading thread is joining it meanwhile
            _thread.interrupt_main()
            time.sleep(0.2)
            _thread.interrupt_main()
            time.sleep(0.2)

    fake = FakeBackend(on_copy=interrupt_twice)
    kind, _ = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is KeyboardInterrupt
    _assert_released(fake)  # nothing freed while a copy could still run, nothing issued after


class _HostAllocationFails(FakeBackend):
    def _host_buffer(self, nbytes):
        if self.host_allocations == 2:
            raise RuntimeError("fake device: pinned allocation failed")
        return super()._host_buffer(nbytes)


def test_failing_ring_allocation_raises_its_error(tmp_path, no_collection):
    path = _save(tmp_path, _llm_state())
    fake = _HostAllocationFails()
    kind, message = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is RuntimeError and message == "fake device: pinned allocation failed"
    assert fake.live_device_blocks == 0 and fake.ring.idle == fake.live_host_buffers == 1


class _FailingClose(FakeBackend):
    def session(self, devices):
        session = super().session(devices)
        close = session.close

        def close_then_fail():
            close()
            raise RuntimeError("fake device: sticky error")

        session.close = close_then_fail
        return session


def test_failing_close_still_releases(tmp_path, no_collection):
    path = _save(tmp_path, _llm_state())
    fake = _FailingClose(fail_copy=2)
    kind, message = _failed_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    assert kind is RuntimeError and "sticky" in message
    assert fake.live_device_blocks == 0
    assert fake.ring.idle == 0  # after a device error a copy may still read them: dropped, not reused


def test_staging_bytes_is_checked(tmp_path):
    path = _save(tmp_path, {"a": torch.ones(2)})
    for bad in (0, 100, 1.5, True):
        with pytest.raises(ValueError, match="staging_bytes"):
            fastckpt.load(path, staging_bytes=bad)


def test_storage_scan_names_each_storage_once():
    state = _mixed_state()
    buf = io.BytesIO(save_bytes(state))
    refs = _native.scan_storages(read_data_pickle(open_archive(buf)))
    assert len(refs) == len({k for k, _ in refs}) == 9  # big and base are shared
    assert {loc for _, loc in refs} == {"cpu"}


def test_reads_and_copies_overlap(tmp_path):
    """Copy n is held until the stager has read and issued chunk n+1: a stager that waited for a copy
    before reading the next buffer would stall here (and fail the order check below)."""
    path = _save(tmp_path, {f"w{i}": torch.randn(1 << 16) for i in range(16)})  # 16 x 256 KiB
    ring = 4 * (256 << 10)  # one tensor per ring buffer: 16 reads, 16 copies

    def hold_until_next_issued(n):
        deadline = time.monotonic() + 10
        while n < 16 and ("issue", n + 1) not in list(fake.log) and time.monotonic() < deadline:
            time.sleep(0.001)

    fake = FakeBackend(on_copy=hold_until_next_issued)
    _fake_load(path, fake, map_location="cuda:0", staging_bytes=ring, threads=1)
    order = {event: i for i, event in enumerate(fake.log)}
    for n in range(1, 16):
        assert order[("issue", n + 1)] < order[("done", n)], f"chunk {n + 1} was read only after copy {n} finished"
    _assert_clean(fake, ring)


# ---- the real CUDA backend ---------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("saved_on", ["cpu", "cuda:0"])
@pytest.mark.parametrize(
    "map_location", [None, "cuda", "cuda:0", torch.device("cuda", 0), {"cpu": "cuda:0"}, {"cuda:0": "cuda:0"}]
)
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("staging_bytes", [SMALL_RING, None])
def test_cuda_parity(tmp_path, saved_on, map_location, mmap, staging_bytes):
    state = _mixed_state()
    path = _save(tmp_path, state, cuda_tags=saved_on == "cuda:0")
    ref = torch_load(path, map_location=map_location, mmap=mmap).get()
    got = fastckpt_load(path, map_location=map_location, mmap=mmap, staging_bytes=staging_bytes).get()
    assert_same(got, ref)
    for key in ("w", "big", "view", "bf16", "empty"):
        assert got[key].device == ref[key].device


@pytest.mark.cuda
@needs_cuda
class TestCuda:
    def test_mixed_targets_and_views(self, tmp_path):
        path = _save(tmp_path, _mixed_state())
        mapping = {"cpu": "cuda:0"}
        ref = torch_load(path, map_location=mapping).get()
        assert_same(fastckpt_load(path, map_location=mapping).get(), ref)

    @pytest.mark.parametrize("mmap", [False, True])
    def test_hundred_thousand_tiny_tensors(self, tmp_path, mmap):
        path = _save(tmp_path, {f"t{i}": torch.randn(16) for i in range(100_000)})
        ref = torch_load(path, map_location="cuda:0", mmap=mmap).get()
        assert_same(fastckpt_load(path, map_location="cuda:0", mmap=mmap).get(), ref)

    @pytest.mark.parametrize("mmap", [False, True])
    def test_bf16_llm_shaped(self, tmp_path, mmap):
        path = _save(tmp_path, _llm_state(hidden=1024, layers=8, vocab=32000))
        ref = torch_load(path, map_location="cuda:0", mmap=mmap).get()
        assert_same(fastckpt_load(path, map_location="cuda:0", mmap=mmap).get(), ref)

    def test_safe_on_a_non_default_current_stream(self, tmp_path):
        path = _save(tmp_path, _llm_state(hidden=1024, layers=4, vocab=32000))
        ref = torch.load(path, map_location="cpu")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            got = fastckpt.load(path, map_location="cuda:0", staging_bytes=4 << 20)
            sums = {k: v.float().sum() for k, v in got.items()}  # queued on `stream`, right away
        stream.synchronize()
        for k, v in ref.items():
            assert torch.equal(sums[k].cpu(), v.float().sum()), k

    def test_peak_device_memory_not_above_torchs(self, tmp_path):
        path = _save(tmp_path, {**_llm_state(hidden=1024, layers=4, vocab=32000),
                                **{f"tiny{i}": torch.randn(16) for i in range(5000)}})

        def peak(load):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = load(path, map_location="cuda:0")
            torch.cuda.synchronize()
            del result
            return torch.cuda.max_memory_allocated() - before

        assert peak(fastckpt.load) <= peak(torch.load)

    def test_freeing_a_large_tensor_frees_its_memory(self, tmp_path):
        path = _save(tmp_path, {"big": torch.randn(1 << 22), "tiny": torch.randn(4)})
        got = fastckpt.load(path, map_location="cuda:0")
        before = torch.cuda.memory_allocated()
        del got["big"]
        assert torch.cuda.memory_allocated() <= before - (16 << 20)

    def test_crc_mismatch_leaves_no_device_memory(self, tmp_path, no_collection):
        data = save_bytes({"a": torch.randn(1 << 20), "b": torch.randn(1 << 20)})
        path = tmp_path / "bad.pt"
        path.write_bytes(flip_byte(data, "data/1", 100))
        before = torch.cuda.memory_allocated()
        try:
            fastckpt.load(path, map_location="cuda:0", staging_bytes=4 << 20)
        except fastckpt.IntegrityError:
            pass
        else:
            raise AssertionError("the load did not fail")
        assert torch.cuda.memory_allocated() == before  # without a collection: no reference cycle


# ---- benchmarks/gpu_check.sh (runs on a GPU machine; here: what can be checked without one) ----------

_REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_gpu_check_without_cuda_exits_77_before_building(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(_REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)  # an import of torch, no build
    assert done.returncode == 77, done.stdout + done.stderr
    assert "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", _REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_verdict(tmp_path, capsys):
    gc_ = _gpu_check_module()
    check = gc_.Check(str(tmp_path), 100)
    check.results["facts"] = {"torch": "2.11.0+cu130", "gpu": "H100"}
    check.results["steps"] = {
        "tests": {"rc": 0, "summary": "90 passed"},
        "ceilings": {"h2d_pinned": 50.0, "pread_pinned": 40.0, "ceiling": 40.0},
        "rows": {"fastckpt warm": {"gbps": 36.0, "seconds": [0.22, 0.2]}, "torch warm": {"gbps": 3, "seconds": [2.7]}},
        "identical_to_torch": {"fastckpt warm": True, "torch warm": True},
    }
    assert gc_.finish(check) == 0
    line = capsys.readouterr().out
    assert "90% of min(H2D pinned 50.0, pread->pinned 40.0 GB/s)" in line and "12.3x torch.load" in line
    assert line.rstrip().endswith("PASS")
    check.results["steps"]["rows"]["fastckpt warm"] = {"gbps": 30.0, "seconds": [1.0]}  # 75%, 2.7x
    check.results["steps"]["identical_to_torch"]["fastckpt warm"] = False
    check.results["failures"] = []
    assert gc_.finish(check) == 1
    failures = " ".join(check.results["failures"])
    assert "75% of the ceiling" in failures and "speed-up 2.7x" in failures
    assert "ROWS DIFFER" in capsys.readouterr().out
    import json

    assert json.loads((tmp_path / "results.json").read_text())["passed"] is False


def test_gpu_check_compares_saves_and_finds_tmpfs(tmp_path):
    gc_ = _gpu_check_module()
    a, b = tmp_path / "a" / "s.pt", tmp_path / "b" / "s.pt"
    for p in (a, b):
        p.parent.mkdir()
        torch.save({"w": torch.arange(10)}, p)
    assert gc_._same_archives(str(a), str(b)) == (True, "equal")  # serialization ids differ, and are skipped
    torch.save({"w": torch.arange(1, 11)}, b)
    assert gc_._same_archives(str(a), str(b)) == (False, "record s/data/0 differs")
    assert gc_._fs_type("/proc/self") == "proc"
