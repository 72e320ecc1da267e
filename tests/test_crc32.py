"""fastckpt's CRC-32 against zlib: every length and alignment that reaches the
heads, lanes and tails of the folding code, chaining, crc32_combine (including
lengths past 4 GiB, against an independent GF(2) reference), and each
implementation the CPU supports (forced through FASTCKPT_CRC32 in a child)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import zlib

import pytest

from fastckpt import _native

IMPLEMENTATIONS = ("vpclmulqdq", "pclmulqdq", "armv8-crc", "portable")

# --- an independent reference for crc32_combine --------------------------------
# Polynomials over GF(2) as Python ints in the normal representation (bit i is
# the coefficient of x^i); CRC values are bit-reversed into it and back.
P = (1 << 32) | 0x04C11DB7


def _reflect32(v: int) -> int:
    return int(f"{v:032b}"[::-1], 2)


def _mulmod(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a >> 32:
            a ^= P
        b >>= 1
    return product


def _x_pow(n: int) -> int:
    result, base = 1, 2  # x^0, x^1
    while n:
        if n & 1:
            result = _mulmod(result, base)
        base = _mulmod(base, base)
        n >>= 1
    return result


def reference_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc(A||B) = crc(A)·x^(8·len_b) + crc(B) mod P."""
    return _reflect32(_mulmod(_reflect32(crc_a), _x_pow(8 * len_b))) ^ crc_b


# --- tests ---------------------------------------------------------------------


def test_known_values():
    assert _native.crc32(b"") == 0
    assert _native.crc32(b"123456789") == 0xCBF43926
    assert _native.crc32(b"", 0xDEADBEEF) == 0xDEADBEEF
    assert _native.crc32(b"a" * 1000) == zlib.crc32(b"a" * 1000)


def test_implementation_name():
    assert _native.crc32_implementation() in IMPLEMENTATIONS


def _sweep(max_len: int, alignments) -> None:
    data = bytearray(random.Random(1).randbytes(max_len + 64))
    view = memoryview(data)
    for align in alignments:
        for n in range(max_len + 1):
            chunk = view[align : align + n]
            seed = (n * 2654435761 + align) & 0xFFFFFFFF
            assert _native.crc32(chunk, seed) == zlib.crc32(chunk, seed), (align, n)


def test_every_length_at_every_alignment():
    _sweep(2048, range(64))


def test_large_odd_buffers():
    rng = random.Random(2)
    for size in (1 << 20, (3 << 20) + 1, (5 << 20) - 7):
        data = rng.randbytes(size)
        assert _native.crc32(data) == zlib.crc32(data)
        assert _native.crc32(memoryview(data)[13:]) == zlib.crc32(memoryview(data)[13:])


def test_chaining_with_value():
    rng = random.Random(3)
    data = rng.randbytes(1 << 20)
    whole = zlib.crc32(data)
    for _ in range(100):
        cut = rng.randrange(len(data) + 1)
        assert _native.crc32(data[cut:], _native.crc32(data[:cut])) == whole
    for value in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert _native.crc32(data[:777], value) == zlib.crc32(data[:777], value)


def test_combine_matches_concatenation():
    rng = random.Random(4)
    data = rng.randbytes(70000)
    cases = [(0, 0), (0, 5), (5, 0), (1, 1), (64, 64), (4096, 12345)]
    cases += [(rng.randrange(20000), rng.randrange(50000)) for _ in range(300)]
    for len_a, len_b in cases:
        a, b = zlib.crc32(data[:len_a]), zlib.crc32(data[len_a : len_a + len_b])
        expected = zlib.crc32(data[: len_a + len_b])
        assert _native.crc32_combine(a, b, len_b) == expected, (len_a, len_b)
        assert reference_combine(a, b, len_b) == expected, (len_a, len_b)


def test_combine_huge_lengths():
    # No buffer of 2^32+ bytes: the reference above, checked against zlib by the
    # previous test, and the homomorphism (A||B)||C == A||(B||C), which ties
    # every length to the sum of two others.
    rng = random.Random(5)
    lengths = [1 << 32, (1 << 32) + 1, 5 << 40, (1 << 64) - 1, (1 << 63) + 12345]
    lengths += [rng.getrandbits(rng.randrange(33, 65)) for _ in range(100)]
    for n in lengths:
        a, b = rng.getrandbits(32), rng.getrandbits(32)
        assert _native.crc32_combine(a, b, n) == reference_combine(a, b, n), n
    for _ in range(200):
        n1, n2 = rng.getrandbits(rng.randrange(1, 63)), rng.getrandbits(rng.randrange(1, 63))
        a, b, c = (rng.getrandbits(32) for _ in range(3))
        left = _native.crc32_combine(_native.crc32_combine(a, b, n1), c, n2)
        right = _native.crc32_combine(a, _native.crc32_combine(b, c, n2), n1 + n2)
        assert left == right, (n1, n2)


_CHILD = """
import random, sys, zlib
from fastckpt import _native
if _native.crc32_implementation() != sys.argv[1]:
    print("unsupported")
    sys.exit(0)
data = bytearray(random.Random(6).randbytes((3 << 20) + 64))
view = memoryview(data)
for align in range(0, 64, 3):
    for n in list(range(0, 1100)) + [4095, 65537, 1 << 20, (3 << 20) + 1]:
        assert _native.crc32(view[align:align + n], n) == zlib.crc32(view[align:align + n], n), (align, n)
print("ok")
"""


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_forced_implementation(name):
    if name == _native.crc32_implementation():
        pytest.skip("the default implementation, covered in this process")
    if (name == "armv8-crc") != (platform.machine().lower() in ("aarch64", "arm64")):
        pytest.skip(f"{name} does not exist on {platform.machine()}")
    env = dict(os.environ, FASTCKPT_CRC32=name)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, name], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "unsupported":
        pytest.skip(f"{name} is not supported on this CPU")
    assert out.stdout.strip() == "ok"
