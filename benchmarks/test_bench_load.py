"""Regression benchmarks for the hot paths, with pytest-benchmark:

    pytest benchmarks/test_bench_load.py --benchmark-only --benchmark-autosave     # record a baseline
    pytest benchmarks/test_bench_load.py --benchmark-only --benchmark-compare      # compare with it

Each group pairs fastckpt with the torch call it replaces, so the table shows both side by side.
These run in-process (repeated loads reuse heap memory already faulted in), so they are for catching
regressions; `fastckpt bench` (fresh process per load) gives the numbers to quote. The checkpoints
are the harness's own, generated once into $FASTCKPT_BENCH_DIR (default ~/.cache/fastckpt-bench).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
fastckpt = pytest.importorskip("fastckpt")

from fastckpt.bench import generate  # noqa: E402

SLOW = {"rounds": 5, "iterations": 1, "warmup_rounds": 1}


def _checkpoint(spec: str) -> str:
    return generate.ensure(generate.parse_spec(spec), generate.default_cache_dir())["files"]["pt"]["path"]


@pytest.fixture(scope="session")
def many_small() -> str:
    """100,000 records of 16 fp32 each: per-record and per-tensor costs only."""
    return _checkpoint("small-100k")


@pytest.fixture(scope="session")
def llm() -> str:
    """0.25 GB of bf16 in 264 tensors: bandwidth."""
    return _checkpoint("llm-250m")


def _require(obj, name: str):
    if not hasattr(obj, name):
        pytest.skip(f"{getattr(obj, '__name__', obj)}.{name} does not exist yet")
    return getattr(obj, name)


@pytest.mark.benchmark(group="open 100k records")
def test_open_archive_fastckpt(benchmark, many_small):
    from fastckpt import _native

    archive = benchmark(_require(_native.Archive, "open"), many_small)
    assert len(archive.names()) > 100_000


@pytest.mark.benchmark(group="open 100k records")
def test_open_archive_torch(benchmark, many_small):
    def open_reader():
        with open(many_small, "rb") as f:
            return torch._C.PyTorchFileReader(f).get_all_records()

    assert len(benchmark(open_reader)) > 100_000


@pytest.mark.benchmark(group="unpickle 100k tensors (mmap)")
def test_unpickle_fastckpt(benchmark, many_small):
    load = _require(fastckpt, "load")
    sd = benchmark.pedantic(load, args=(many_small,), kwargs={"mmap": True, "weights_only": True}, **SLOW)
    assert len(sd) == 100_000


@pytest.mark.benchmark(group="unpickle 100k tensors (mmap)")
def test_unpickle_torch(benchmark, many_small):
    sd = benchmark.pedantic(torch.load, args=(many_small,), kwargs={"mmap": True, "weights_only": True},
                            rounds=2, iterations=1)
    assert len(sd) == 100_000


@pytest.mark.benchmark(group="eager read 0.25 GB")
def test_eager_read_fastckpt(benchmark, llm):
    load = _require(fastckpt, "load")
    sd = benchmark.pedantic(load, args=(llm,), kwargs={"mmap": False, "weights_only": True}, **SLOW)
    assert sd["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.benchmark(group="eager read 0.25 GB")
def test_eager_read_torch(benchmark, llm):
    sd = benchmark.pedantic(torch.load, args=(llm,), kwargs={"mmap": False, "weights_only": True}, **SLOW)
    assert sd["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.benchmark(group="verify 0.25 GB")
def test_verify_fastckpt(benchmark, llm):
    report = benchmark(_require(fastckpt, "verify"), llm)
    assert report.ok
