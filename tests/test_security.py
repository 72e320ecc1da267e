"""Attack classes of a hostile checkpoint author (issue 7): each test covers a class, not one file."""

import io
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402



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


INDEX_SCRIPT = """
import sys
from fastckpt import _native
blob = open(sys.argv[1], "rb").read()
buffer = _native.allocate(len(blob))
memoryview(buffer)[:] = blob
assert len(_native.Archive.from_buffer(buffer).records()) == int(sys.argv[2])
"""


def instructions_inserting_names(path, count) -> int:
    """Instructions executed in ZipIndex::insert_name (siphash and probing) while indexing `path`: a
    count of the table's work, the same on a busy machine as on a quiet one (valgrind's callgrind)."""
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={path}.out", "--toggle-collect=*ZipIndex::insert_name*",
         sys.executable, "-c", INDEX_SCRIPT, str(path), str(count)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0, result.stderr[-3000:]
    collected = int(re.search(r"Collected : (\d+)", result.stderr).group(1))
    assert collected > 0, "callgrind saw no ZipIndex::insert_name (symbols stripped?)"
    return collected


@pytest.mark.timeout(900)
def test_indexing_crafted_names_stays_linear(tmp_path):
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind (callgrind) counts the index's instructions; not installed")
    count = 20_000
    crafted, plain = tmp_path / "crafted.zip", tmp_path / "plain.zip"
    crafted.write_bytes(stored_zip(names_clustered_in_std_hash(count)))
    plain.write_bytes(stored_zip([b"data/...%016d" % i for i in range(count)]))
    assert crafted.stat().st_size == plain.stat().st_size
    # With the old unkeyed hash every crafted insert walked one cluster: ~2*10^8 probes against ~3*10^4.
    assert instructions_inserting_names(crafted, count) < 2 * instructions_inserting_names(plain, count)


# --------------------------------------------------------------------------- storages and legacy set_ states

from parity import P, assert_same, rezip, save_bytes, torch_load  # noqa: E402

OD = P.call("collections", "OrderedDict")


def _write(tmp_path, data, name="f.pt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("obj", ["empty", "full"])
def test_every_loaded_storage_is_not_resizable(obj, mmap, tmp_path):
    t = torch.empty(0) if obj == "empty" else torch.arange(8.0)
    s = t.to(torch.uint8).untyped_storage()
    p = _write(tmp_path, save_bytes({"t": t, "p": torch.nn.Parameter(t.clone()), "s": s}))
    got = fastckpt.load(p, mmap=mmap)
    s = got["s"]._untyped_storage if isinstance(got["s"], torch.storage.TypedStorage) else got["s"]
    for storage in (got["t"].untyped_storage(), got["p"].untyped_storage(), s):
        with pytest.raises(RuntimeError, match="not resizable"):
            storage.resize_(1 << 20)


# The base file: storage '0' is 8 float32s, storage '1' holds no bytes.
TWO = save_bytes([torch.arange(8.0), torch.empty(0)])


def _parameter_over(key, numel):
    pid = P.pid(key=key, numel=numel)
    return P.call("torch._utils", "_rebuild_parameter", P.tensor(pid=pid, size=(numel,)), P.FALSE, OD)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("key,numel", [("1", 0), ("0", 8)], ids=["empty-storage", "full-storage"])
def test_parameter_set_state_cannot_leave_its_storage(key, numel, mmap, tmp_path):
    # BUILD on a Parameter runs Tensor.__setstate__; a 4-item state is set_(storage, offset, size, stride).
    state = P.tuple(P.pid(key=key, numel=numel), P.int(0), P.ints(1 << 24), P.ints(1))
    p = _write(tmp_path, rezip(TWO, replace={"data.pkl": P.program(_parameter_over(key, numel) + state + P.BUILD)}))
    assert torch_load(p).exc is not None  # torch refuses too ("storage that is not resizable")
    with pytest.raises(fastckpt.MetadataError, match="tensor"):
        fastckpt.load(p, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("target", ["tensor", "parameter"])
def test_in_bounds_legacy_set_state_loads_as_torch(target, mmap, tmp_path):
    base = P.tensor(pid=P.pid(numel=8), size=(8,)) if target == "tensor" else _parameter_over("0", 8)
    state = P.tuple(P.pid(numel=8), P.int(2), P.ints(2, 3), P.ints(3, 1))
    p = _write(tmp_path, rezip(TWO, replace={"data.pkl": P.program(base + state + P.BUILD)}))
    ref = torch_load(p)
    assert ref.exc is None, ref.exc
    assert_same(fastckpt.load(p, mmap=mmap), ref.value)


def test_small_constructor_calls_load_as_torch(tmp_path):
    data = P.EMPTY_LIST + P.MARK + P.float(1.0) + P.float(2.0) + P.APPENDS
    pkl = P.program(P.tuple(P.call("builtins", "bytearray", P.int(16)), P.call("torch", "FloatTensor", data)))
    p = _write(tmp_path, rezip(TWO, replace={"data.pkl": pkl}))
    ref = torch_load(p)
    assert ref.exc is None, ref.exc
    assert_same(fastckpt.load(p), ref.value)


# --------------------------------------------------------------------------- bytes before they are read


def _python_rebuilt():
    """Tensors whose rebuild hands storages to torch code that reads their bytes while loading."""
    dense = torch.zeros(6, 6)
    dense[1, 2], dense[4, 0], dense[5, 5] = 1.5, -2.0, 3.0
    return {
        "nested": torch.nested.nested_tensor([torch.arange(6.0).reshape(2, 3), torch.arange(8.0).reshape(2, 4)]),
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "qchannel": torch.quantize_per_channel(torch.randn(4, 3), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double),
                                               torch.tensor([0, 1, 2, 3]), 0, torch.qint8),
        "param": torch.nn.Parameter(torch.arange(5.0)),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_storages_reaching_python_wait_for_their_bytes(tmp_path, monkeypatch):
    # A read job slowed down on purpose: any storage handed to Python code before its
    # record arrived would be read as zeros (a nested tensor's sizes, sparse indices).
    p = _write(tmp_path, save_bytes(_python_rebuilt()))
    monkeypatch.setenv("FASTCKPT_TEST_READ_DELAY_US", "50000")
    got = fastckpt.load(p, mmap=False)
    monkeypatch.delenv("FASTCKPT_TEST_READ_DELAY_US")
    assert_same(got, torch.load(p))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_validates_the_real_bytes_not_zeros(tmp_path, monkeypatch):
    # A nested tensor whose sizes (record data/1) do not fit its buffer: torch's constructor
    # refuses it; one handed its sizes before they were read would see zeros and accept them.
    nested = torch.nested.nested_tensor([torch.arange(6.0).reshape(2, 3), torch.arange(8.0).reshape(2, 4)])
    sizes = torch.tensor([[2, 3], [2, 4000]]).numpy().tobytes()
    p = _write(tmp_path, rezip(save_bytes({"nested": nested}), replace={"data/1": sizes}))
    assert torch_load(p).exc is not None
    monkeypatch.setenv("FASTCKPT_TEST_READ_DELAY_US", "50000")
    with pytest.raises(fastckpt.CheckpointError, match="out of bounds"):
        fastckpt.load(p, mmap=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_crc_mismatch_reaches_the_waiting_storage(tmp_path, monkeypatch):
    from parity import flip_byte

    data = save_bytes(_python_rebuilt())
    names = [n for n, _ in __import__("parity").zip_entries(data) if "/data/" in n]
    p = _write(tmp_path, flip_byte(data, names[0].split("/", 1)[1]))
    monkeypatch.setenv("FASTCKPT_TEST_READ_DELAY_US", "20000")
    with pytest.raises(fastckpt.IntegrityError):
        fastckpt.load(p, mmap=False)


@pytest.mark.parametrize("invariants", [False, True])
def test_invalid_sparse_tensors_are_refused_whatever_the_invariants_setting(invariants, tmp_path):
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 9]]), torch.tensor([1.0, 2.0]), (3,))  # index 9 of 3
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        bad = coo
    p = _write(tmp_path, save_bytes({"coo": bad}))
    with torch.sparse.check_sparse_tensor_invariants(enable=invariants):
        with pytest.raises(fastckpt.MetadataError, match="sparse"):
            fastckpt.load(p)


# --------------------------------------------------------------------------- file objects that misbehave


class _Misbehaving(io.RawIOBase):
    """A readable, seekable file whose reads return `bad` once `after` bytes were read."""

    def __init__(self, data, bad, method, after=0):
        self._f, self._bad, self._method, self._after = io.BytesIO(data), bad, method, after

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def _misbehaves(self):
        return self._f.tell() >= self._after

    # Reads return at most 64 bytes, so a file takes many calls (torch's magic check reads 4).
    def readinto(self, b):
        if self._method == "readinto" and self._misbehaves():
            return self._bad(len(b)) if callable(self._bad) else self._bad
        return self._f.readinto(memoryview(b)[:64])

    def read(self, n=-1):
        if self._method == "read" and self._misbehaves():
            return self._bad(n) if callable(self._bad) else self._bad
        return self._f.read(min(n, 64) if n >= 0 else 64)


class _ReadOnly:
    """No readinto: fastckpt falls back to read()."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "readinto":
            raise AttributeError(name)
        return getattr(self._inner, name)


BAD_READS = {
    "minus_one": -1,
    "none": None,
    "more_than_asked": lambda n: n + 1,
    "zero_forever": 0,
    "a_string": "x",
}


@pytest.mark.timeout(60)  # a reader that loops on a file returning 0 bytes forever would hang here
@pytest.mark.parametrize("method", ["readinto", "read"])
@pytest.mark.parametrize("kind", list(BAD_READS))
def test_file_objects_whose_reads_misbehave_are_refused(kind, method):
    data = save_bytes({"w": torch.arange(64.0)})
    bad = BAD_READS[kind]
    if method == "read" and kind == "more_than_asked":
        bad = lambda n: b"\0" * (n + 1)  # noqa: E731
    f = _Misbehaving(data, bad, method, after=100)
    if method == "read":
        f = _ReadOnly(f)
    with pytest.raises(fastckpt.FormatError, match="_Misbehaving|_ReadOnly|truncated"):
        fastckpt.load(f)


def test_a_file_view_whose_seek_returns_another_position(tmp_path):
    """torch.distributed.checkpoint hands torch.load a view of a larger file whose seek() returns
    the position in the underlying file; only tell() is meaningful."""
    data = save_bytes({"w": torch.arange(64.0)})

    class View(io.BytesIO):
        def seek(self, *args):
            return super().seek(*args) + 1000

    assert_same(fastckpt.load(View(data)), torch.load(View(data)))


@pytest.mark.parametrize("start", [0, 100])
def test_open_files_are_mapped_from_their_position(start, tmp_path):
    """A file from open() is mapped through its descriptor from the current position (no whole-file
    read); results equal torch.load's from the same position, and the caller's descriptor stays usable."""
    data = save_bytes({"w": torch.arange(1000.0), "b": torch.ones(3, dtype=torch.int8)})
    p = _write(tmp_path, b"\0" * start + data)
    with open(p, "rb") as f_got, open(p, "rb") as f_ref:
        f_got.seek(start)
        f_ref.seek(start)
        assert_same(fastckpt.load(f_got), torch.load(f_ref))
        f_got.seek(0)
        assert f_got.read(start) == b"\0" * start
