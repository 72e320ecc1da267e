"""Concurrent loads share nothing: each thread gets what torch.load gets, and the GC is left as found."""

import gc
import threading

import pytest
import torch

from parity import assert_same, fc_load, torch_load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, generator=g)
    state = {f"t{i}": torch.randn(17 + i, generator=g) for i in range(300)}
    state.update(view=base[100:900], base=base, big=torch.randn(1 << 20, generator=g))
    path = tmp_path_factory.mktemp("concurrent") / "ckpt.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("mmap", [False, True])
def test_threads_loading_one_file(checkpoint, mmap):
    expected = torch_load(checkpoint, mmap=mmap).get()
    results, errors = [None] * 6, []

    def worker(i):
        try:
            for _ in range(3):
                results[i] = fc_load(checkpoint, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results:
        assert_same(got, expected)
    assert gc.isenabled()
