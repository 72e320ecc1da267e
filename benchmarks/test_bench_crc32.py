"""CRC-32 regression benchmarks, with pytest-benchmark:

    pytest benchmarks/test_bench_crc32.py --benchmark-only --benchmark-autosave   # record a baseline
    pytest benchmarks/test_bench_crc32.py --benchmark-only --benchmark-compare    # compare with it

One group, 64 MiB: fastckpt next to zlib and ISA-L so the table shows them side by side.
`python benchmarks/bench_crc32.py` gives the interleaved ratios to quote.
"""

from __future__ import annotations

import os
import zlib

import pytest

from fastckpt import _native

SIZE = 64 << 20


@pytest.fixture(scope="module")
def buffer() -> bytearray:
    block = os.urandom(1 << 20)
    return bytearray(block * (SIZE // len(block)))


@pytest.fixture(scope="module")
def expected(buffer) -> int:
    return zlib.crc32(buffer)


def _run(benchmark, fn, buffer, expected):
    result = benchmark(fn, buffer)
    assert result == expected
    benchmark.extra_info["GB/s"] = round(SIZE / benchmark.stats.stats.min / 1e9, 2)


@pytest.mark.benchmark(group="crc32 64 MiB")
def test_crc32_fastckpt(benchmark, buffer, expected):
    benchmark.extra_info["implementation"] = _native.crc32_implementation()
    _run(benchmark, _native.crc32, buffer, expected)


@pytest.mark.benchmark(group="crc32 64 MiB")
def test_crc32_zlib(benchmark, buffer, expected):
    _run(benchmark, zlib.crc32, buffer, expected)


@pytest.mark.benchmark(group="crc32 64 MiB")
def test_crc32_isal(benchmark, buffer, expected):
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    _run(benchmark, isal_zlib.crc32, buffer, expected)
