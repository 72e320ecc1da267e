"""fastckpt.convert against hostile folders, races and kills: atomic outputs, whole shard sets, bounded
expansion, the source never replaced or re-opened, and a CLI that exits 2 without a traceback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

import fastckpt  # noqa: E402
from fastckpt import converter  # noqa: E402
from test_reader import save_sharded  # noqa: E402


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fastckpt", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def state(version: int, n: int = 6, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(version)
    return {f"layer.{i}.weight": torch.randn(size, size, generator=g) for i in range(n)} | {
        "version": torch.tensor([version] * 4)}


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".fastckpt-" in n or n.endswith(".tmp"))


def read_set(folder, stem="model") -> dict:
    """The tensors of the sharded output in `folder`; asserts it is a whole set of one convert."""
    index = json.loads((folder / f"{stem}.safetensors.index.json").read_text())
    merged = {}
    for name in sorted(set(index["weight_map"].values())):
        part = st_torch.load_file(folder / name)
        assert sorted(part) == sorted(k for k, v in index["weight_map"].items() if v == name)
        merged |= part
    return merged


def same_version(got: dict, versions: list[dict]) -> int:
    v = int(got["version"][0])
    assert sorted(got) == sorted(versions[v]), "keys of two versions"
    for k, want in versions[v].items():
        assert torch.equal(got[k], want), f"{k} is not version {v}'s: a torn output"
    return v


def test_without_ml_dtypes_or_torch_bf16_and_fp8_convert(tmp_path):
    src = {"b": torch.randn(4, 3).bfloat16(), "f8": torch.randn(5).to(torch.float8_e4m3fn),
           "bt": torch.randn(3, 4).bfloat16().t(), "x": torch.ones(2).expand(3, 2)}
    torch.save(src, tmp_path / "m.pt")
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['ml_dtypes'] = None\n"
            "from fastckpt.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "convert", tmp_path / "m.pt", tmp_path / "m.safetensors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = st_torch.load_file(tmp_path / "m.safetensors")
    for k, v in src.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k


def test_destination_that_is_the_source_is_refused(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    os.link(tmp_path / "m.pt", tmp_path / "hard.safetensors")
    (tmp_path / "soft.safetensors").symlink_to(tmp_path / "m.pt")
    for dst in ("m.pt", "hard.safetensors", "soft.safetensors"):
        with pytest.raises(ValueError, match="is the source"):
            fastckpt.convert(tmp_path / "m.pt", tmp_path / dst)
        assert (tmp_path / "m.pt").read_bytes() == before
    folder = save_sharded(tmp_path, {f"k{i}": torch.full((4,), float(i)) for i in range(6)})
    shard = folder / "pytorch_model-00003-of-00003.bin"
    shard_bytes = shard.read_bytes()
    with pytest.raises(ValueError, match="is the source"):
        fastckpt.convert(folder, shard)
    proc = cli("convert", folder, shard)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is the source" in proc.stderr
    assert shard.read_bytes() == shard_bytes and leftovers(folder) == []


def test_missing_destination_folder_is_named(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError) as info:
        fastckpt.convert(tmp_path / "m.pt", missing / "m.safetensors")
    assert info.value.filename == str(missing)
    for extra in ((), ("--max-shard-size", "10B")):
        proc = cli("convert", tmp_path / "m.pt", missing / "m.safetensors", *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert str(missing) in proc.stderr and ".tmp" not in proc.stderr


def test_planted_link_at_the_old_temporary_name_is_not_written_through(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "m.safetensors.tmp").symlink_to(victim)
    fastckpt.convert(tmp_path / "m.pt", tmp_path / "m.safetensors")
    assert victim.read_bytes() == b"precious"
    assert torch.equal(st_torch.load_file(tmp_path / "m.safetensors")["w"], torch.ones(3))


def test_expanded_views_are_bounded_unless_allowed(tmp_path, monkeypatch):
    torch.save({"small": torch.ones(4), "huge": torch.ones(1).expand(2**20, 2**20)}, tmp_path / "x.pt")
    with pytest.raises(fastckpt.LimitError, match="'huge'.*allow_expansion"):
        fastckpt.convert(tmp_path / "x.pt", tmp_path / "x.safetensors")
    proc = cli("convert", tmp_path / "x.pt", tmp_path / "x.safetensors")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "'huge'" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists() and leftovers(tmp_path) == []
    # A modest expansion over the cap: refused by default, written whole (in bounded blocks) when allowed.
    monkeypatch.setattr(converter, "EXPANSION_SLACK", 0)
    monkeypatch.setattr(converter, "CHUNK_BYTES", 4096)
    t = torch.arange(8.0)[None, :, None].expand(300, 8, 5)
    torch.save({"e": t}, tmp_path / "e.pt")
    with pytest.raises(fastckpt.LimitError, match="'e'"):
        fastckpt.convert(tmp_path / "e.pt", tmp_path / "e.safetensors")
    fastckpt.convert(tmp_path / "e.pt", tmp_path / "e.safetensors", allow_expansion=True)
    assert torch.equal(st_torch.load_file(tmp_path / "e.safetensors")["e"], t.contiguous())


def test_source_replaced_after_indexing_is_read_from_the_indexed_file(tmp_path):
    old, new = state(0), state(1)
    src = tmp_path / "m.pt"
    torch.save(old, src)
    torch.save(new, tmp_path / "new.pt")
    replaced = []

    def progress(n):
        if not replaced:
            os.replace(tmp_path / "new.pt", src)  # atomically, as a trainer's save would
            replaced.append(n)

    fastckpt.convert(src, tmp_path / "m.safetensors", progress=progress)
    assert replaced
    got = st_torch.load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(got[k], v) for k, v in old.items())


def test_sharded_output_replaces_the_whole_set(tmp_path):
    versions = [state(0), state(1)]
    out = tmp_path / "out"
    out.mkdir()
    for v in (0, 1, 0):
        torch.save(versions[v], tmp_path / f"v{v}.pt")
        written = fastckpt.convert(tmp_path / f"v{v}.pt", out, max_shard_size="20KB")
        assert same_version(read_set(out), versions) == v
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(os.listdir(out)) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
        assert sorted(written) == sorted(str(out / n) for n in os.listdir(out))


def test_failure_in_the_last_shard_keeps_the_old_set(tmp_path):
    versions = [state(0), state(1)]
    out = tmp_path / "out"
    out.mkdir()
    torch.save(versions[0], tmp_path / "v0.pt")
    fastckpt.convert(tmp_path / "v0.pt", out, max_shard_size="20KB")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    torch.save(versions[1], tmp_path / "v1.pt")
    with fastckpt.open(tmp_path / "v1.pt") as f:
        offset = f.descriptor("version").storage.data_offset  # the last tensor: the last shard
    data = bytearray((tmp_path / "v1.pt").read_bytes())
    data[offset] ^= 1
    (tmp_path / "v1.pt").write_bytes(data)
    with pytest.raises(fastckpt.IntegrityError, match="'version'"):
        fastckpt.convert(tmp_path / "v1.pt", out, max_shard_size="20KB")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_hostile_old_index_cannot_remove_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / "outside.safetensors").write_text("mine")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "keep.txt", "b": "../outside.safetensors", "c": "model-00001-of-00002.safetensors"}}))
    (out / "model-00001-of-00002.safetensors").write_text("not a shard of ours: no token")
    torch.save(state(0), tmp_path / "v0.pt")
    fastckpt.convert(tmp_path / "v0.pt", out, max_shard_size="20KB")
    assert (out / "keep.txt").read_text() == "mine" and (tmp_path / "outside.safetensors").read_text() == "mine"
    assert (out / "model-00001-of-00002.safetensors").exists()


def test_concurrent_converts_leave_one_whole_set(tmp_path):
    versions = [state(0, n=12), state(1, n=12)]
    for v in (0, 1):
        torch.save(versions[v], tmp_path / f"v{v}.pt")
    out = tmp_path / "out"
    out.mkdir()
    pids = []
    for v in (0, 1):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for _ in range(3):
                    fastckpt.convert(tmp_path / f"v{v}.pt", out, max_shard_size="20KB")
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0, 0]
    same_version(read_set(out), versions)
    fastckpt.convert(tmp_path / "v1.pt", out, max_shard_size="20KB")  # cleans what the race left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(os.listdir(out)) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
    assert same_version(read_set(out), versions) == 1


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_kill_at_random_moments_never_tears_the_output(tmp_path, sharded):
    versions = [state(0, n=8, size=256), state(1, n=8, size=256)]  # 2 MiB each
    for v in (0, 1):
        torch.save(versions[v], tmp_path / f"v{v}.pt")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.safetensors"
    kwargs = {"max_shard_size": "600KB"} if sharded else {}

    def current() -> int:
        return same_version(read_set(out) if sharded else st_torch.load_file(dst), versions)

    t0 = time.perf_counter()
    fastckpt.convert(tmp_path / "v0.pt", dst, **kwargs)
    one = time.perf_counter() - t0
    rng = random.Random(7)
    kills, start = 0, time.monotonic()
    while kills < 12 and time.monotonic() - start < 20:
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(1, 1000):
                    fastckpt.convert(tmp_path / f"v{i % 2}.pt", dst, **kwargs)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 3 * one))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        current()  # the old whole output or the new one
    assert kills >= 6
    fastckpt.convert(tmp_path / "v1.pt", dst, **kwargs)
    assert current() == 1 and leftovers(out) == []
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(os.listdir(out)) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
    else:
        assert os.listdir(out) == ["model.safetensors"]


def test_cli_convert_failures_exit_2_without_a_traceback(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3), "c": torch.ones(2, dtype=torch.complex128)}, good)
    data = good.read_bytes()
    cases = {
        "missing": tmp_path / "missing.pt",
        "empty": b"",
        "text": b"hello, not a checkpoint" * 10,
        "truncated": data[: len(data) // 2],
        "tail_cut": data[:-5],
        "complex128": good,
        "bad_index.index.json": b"{not json",
        "deep.index.json": b"[" * 100000,
        "folder": None,
    }
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    cases["legacy"] = tmp_path / "legacy.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")
    cases["torchscript"] = tmp_path / "script.pt"
    st_torch.save_file({"w": torch.ones(2)}, tmp_path / "already.safetensors")
    cases["safetensors"] = tmp_path / "already.safetensors"
    for name, content in cases.items():
        if isinstance(content, bytes):
            src = tmp_path / name
            src.write_bytes(content)
        elif content is None:
            src = tmp_path / name
            src.mkdir()
        else:
            src = content
        proc = cli("convert", src, tmp_path / "out.safetensors")
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("fastckpt convert:"), (name, proc.stderr)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()
