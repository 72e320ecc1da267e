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
    gc.collect()
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
    gc.collect()
    assert fake.live_host_buffers == 0, "a ring buffer outlived its load"
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


def test_large_storages_get_their_own_allocation(tmp_path):
    path = _save(tmp_path, {"big": torch.randn(1 << 19), "small": torch.randn(4), "small2": torch.randn(4)})
    got = _fake_load(path, FakeBackend(), map_location="cuda:0", staging_bytes=SMALL_RING)
    big = got["big"].untyped_storage()
    assert big.nbytes() == 4 << 19  # not a view of a larger slab: freeing the tensor frees it
    small, small2 = got["small"].untyped_storage(), got["small2"].untyped_storage()
    assert small.nbytes() == 16 and abs(small2.data_ptr() - small.data_ptr()) == 256  # one slab


@pytest.mark.parametrize("where", ["packed", "large, last piece"])
def test_crc_mismatch_mid_stream(tmp_path, where):
    state = {f"t{i}": torch.randn(8) for i in range(50)}
    state["big"] = torch.randn(100_000)
    state.update({f"u{i}": torch.randn(8) for i in range(50)})
    data = save_bytes(state)
    key = "30" if where == "packed" else "50"
    index = 0 if where == "packed" else 400_000 - 1
    path = tmp_path / "bad.pt"
    path.write_bytes(flip_byte(data, f"data/{key}", index))
    fake = FakeBackend(delay=(0, 0.002))
    with pytest.raises(fastckpt.IntegrityError, match=f"data/{key}"):
        _fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    gc.collect()
    assert fake.live_host_buffers == 0
    # verify=False loads it anyway, through the same ring
    got = _fake_load(path, FakeBackend(), map_location="cuda:0", verify=False, staging_bytes=SMALL_RING)
    assert len(got) == 101


def test_failing_copy_propagates(tmp_path):
    path = _save(tmp_path, _llm_state())
    fake = FakeBackend(delay=(0, 0.001), fail_copy=5)
    with pytest.raises(RuntimeError, match="fake device: copy 5 failed"):
        _fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    gc.collect()
    assert fake.live_host_buffers == 0


def test_keyboard_interrupt_leaves_nothing_running(tmp_path):
    path = _save(tmp_path, _llm_state())

    def interrupt(n):
        if n == 3:
            _thread.interrupt_main()  # what Ctrl-C does to the loading (main) thread

    fake = FakeBackend(delay=(0.01, 0.01), on_copy=interrupt)
    with pytest.raises(KeyboardInterrupt):
        _fake_load(path, fake, map_location="cuda:0", staging_bytes=SMALL_RING)
    gc.collect()
    assert fake.live_host_buffers == 0
    assert fake.copies < 20  # stopped early, not after the whole file


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


def test_reads_and_copies_overlap(tmp_path, monkeypatch):
    """The fake-device benchmark: with reads slowed to ~20 ms per ring buffer (the copy engine's test
    delay) and copies taking as long, the load takes about half their sum. Run with -s for the figure."""
    path = _save(tmp_path, {f"w{i}": torch.randn(1 << 16) for i in range(32)})  # 32 x 256 KiB
    ring = 4 * (256 << 10)  # one tensor per ring buffer: 32 reads, 32 copies
    monkeypatch.setenv("FASTCKPT_TEST_READ_DELAY_US", "20000")

    def timed(fake):
        start = time.perf_counter()
        _fake_load(path, fake, map_location="cuda:0", staging_bytes=ring, threads=1)
        return time.perf_counter() - start

    read = min(timed(FakeBackend()) for _ in range(2))  # reads, and copies that cost ~nothing
    best = None
    for _ in range(3):
        fake = FakeBackend(delay=(0.02, 0.02))
        wall = timed(fake)
        ratio = wall / (read + fake.copy_seconds)
        best = min(best or ratio, ratio)
    print(f"\nfake-device overlap: read {read:.3f} s + copy {fake.copy_seconds:.3f} s, wall {wall:.3f} s, "
          f"best ratio {best:.2f} (<= 0.6 wanted)")
    assert best <= 0.6


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

    def test_crc_mismatch_leaves_no_device_memory(self, tmp_path):
        data = save_bytes({"a": torch.randn(1 << 20), "b": torch.randn(1 << 20)})
        path = tmp_path / "bad.pt"
        path.write_bytes(flip_byte(data, "data/1", 100))
        gc.collect()
        before = torch.cuda.memory_allocated()
        with pytest.raises(fastckpt.IntegrityError):
            fastckpt.load(path, map_location="cuda:0", staging_bytes=4 << 20)
        gc.collect()
        assert torch.cuda.memory_allocated() == before
