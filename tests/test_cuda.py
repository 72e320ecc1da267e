"""CUDA targets: fastckpt.load to a GPU equals torch.load to it. Skipped without CUDA."""

import pytest
import torch

from parity import assert_same, fastckpt_load, torch_load

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
