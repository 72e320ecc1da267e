"""Attack classes of a hostile checkpoint author (issue 7): each test covers a class, not one file."""

import io
import os
import pickle
import shutil
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402
from fastckpt import _native  # noqa: E402



# --------------------------------------------------------------------------- zip names vs the name table

_MUL = np.uint64((0xC6A4A793 << 32) + 0x5BD1E995)  # libstdc++'s _Hash_bytes (MurmurHash64A): the old name hash
_SEED = 0xC70F6907


def _mix(v):
    return v ^ (v >> np.uint64(47))


def std_hash(blocks, length):
    """libstdc++'s std::hash of names made of whole 8-byte blocks (uint64 arrays, little-endian)."""
    h = np.full(blocks[0].shape, _SEED ^ ((length * int(_MUL)) & ((1 << 64) - 1)), dtype=np.uint64)
    for b in blocks:
        h = (h ^ (_mix(b * _MUL) * _MUL)) * _MUL
    return _mix(_mix(h) * _MUL)


def _hex_block(values):
    """8 lowercase hex digits of each value (< 2**32) as a little-endian uint64 block."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.zeros(values.shape, dtype=np.uint64)
    for k in range(8):  # most significant digit first in the text, so at the lowest byte
        nibble = (values >> np.uint64(4 * (7 - k))) & np.uint64(15)
        out |= digits[nibble].astype(np.uint64) << np.uint64(8 * k)
    return out


def names_clustered_in_std_hash(count, window=1024, prefix=b"data/..."):
    """`count` record names (what ZipIndex hashes: the part after "archive/") whose old hash puts
    them all in `window` neighbouring slots of a table sized for `count` names: linear probing then
    walks the whole cluster on every insert."""
    slots = 16
    while slots < 2 * count:
        slots *= 2
    fixed = [np.full(1, int.from_bytes(prefix[i : i + 8], "little"), dtype=np.uint64) for i in range(0, len(prefix), 8)]
    found = []
    step = 1 << 20
    for start in range(0, 1 << 32, step):
        i = np.arange(start, start + step, dtype=np.uint64)
        high, low = _hex_block(i >> np.uint64(32)), _hex_block(i & np.uint64(0xFFFFFFFF))
        h = std_hash([np.broadcast_to(b, i.shape) for b in fixed] + [high, low], len(prefix) + 16)
        found.extend(i[(h & np.uint64(slots - 1)) < np.uint64(window)].tolist())
        if len(found) >= count:
            return [prefix + b"%016x" % v for v in found[:count]]
    raise AssertionError("unreachable")


def stored_zip(names):
    """A zip of empty stored entries "archive/<name>" (built directly: zipfile is slow at 10^5 entries)."""
    local, central, offset = [], [], 0
    for name in names:
        name = b"archive/" + name
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name),
                                   0, 0, 0, 0, 0, offset) + name)
        local.append(header)
        offset += len(header)
    cd = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(names), len(names), len(cd), offset, 0)
    return b"".join(local) + cd + end


def test_the_generator_clusters_names_under_the_old_hash(tmp_path):
    # Checked against the real std::hash where a C++ compiler is at hand.
    names = names_clustered_in_std_hash(4, window=1)  # 4 names: a 16-slot table, all in slot 0
    src, exe = tmp_path / "h.cc", tmp_path / "h"
    src.write_text(
        "#include <cstdio>\n#include <iostream>\n#include <string>\n#include <string_view>\n"
        "int main() { std::string s; while (std::getline(std::cin, s)) "
        "std::printf(\"%zu\\n\", std::hash<std::string_view>{}(s)); }\n"
    )
    if shutil.which("g++") is None or subprocess.run(["g++", "-O1", "-o", exe, src]).returncode != 0:
        pytest.skip("no C++ compiler")
    out = subprocess.run([exe], input=b"\n".join(names) + b"\n", capture_output=True, check=True).stdout.split()
    blocks = [np.array([int.from_bytes(n[i : i + 8], "little") for n in names], dtype=np.uint64) for i in range(0, 24, 8)]
    assert [int(x) for x in out] == std_hash(blocks, 24).tolist()
    assert all(int(x) % 16 == 0 for x in out)


@pytest.mark.parametrize("count", [50_000])
def test_indexing_crafted_names_stays_linear(count, tmp_path):
    crafted = stored_zip(names_clustered_in_std_hash(count))
    plain = stored_zip([b"data/...%016d" % i for i in range(count)])
    assert len(crafted) == len(plain)

    def index_time(blob):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            archive = _native.Archive.from_buffer(_filled(blob))
            best = min(best, time.perf_counter() - start)
        assert len(archive.records()) == count
        return best

    # With the old unkeyed hash every crafted insert walked one cluster: ~10^9 probes, against ~10^5.
    assert index_time(crafted) < 10 * index_time(plain) + 0.05


def _filled(blob):
    buffer = _native.allocate(len(blob))
    memoryview(buffer)[:] = blob
    return buffer
