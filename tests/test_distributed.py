"""fastckpt.distributed.load in real gloo groups of 2 and 4 processes on this machine (127.0.0.1 /
file:// rendezvous only); every rank compares its result with torch.load."""

from __future__ import annotations

import collections
import copy
import fractions
import json
import multiprocessing
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

from parity import flip_byte, zip_entries  # noqa: E402

import distributed_worker  # noqa: E402

TIMEOUT_S = 20


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict()
    for layer in range(4):  # ~6 MB, LLM-shaped
        state[f"layer{layer}.attn"] = torch.randn(256, 1024, generator=g).to(torch.bfloat16)
        state[f"layer{layer}.mlp"] = torch.randn(512, 512, generator=g)
        state[f"layer{layer}.norm"] = torch.ones(1024)
    base = torch.randn(64, 64, generator=g)
    state["tied.a"], state["tied.b"] = base, base[8:16]  # one storage, two keys
    state["strided"] = torch.randn(32, 48, generator=g).t()
    state["step"] = torch.tensor(7)
    state["empty"] = torch.empty(0)
    state["meta"] = {"epoch": 3, "lr": 0.1, "names": ["a", "b"]}
    single = root / "single.pt"
    torch.save(state, single)
    tiny = root / "tiny.pt"
    torch.save({f"t{i}": torch.full((i % 5,), float(i)) for i in range(300)}, tiny)
    data = single.read_bytes()
    corrupt = root / "corrupt.pt"
    last = [name.split("/", 1)[1] for name, body in zip_entries(data) if "/data/" in name and body][-1]  # last rank reads it
    corrupt.write_bytes(flip_byte(data, last, index=5))
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):  # CRCs not recorded: only the identity check can tell
        torch.save({k: v for k, v in state.items() if k != "meta"}, root / "nocrc_a.pt")
        other = copy.deepcopy({k: v for k, v in state.items() if k != "meta"})  # same layout, other values
        for v in other.values():
            if v.is_floating_point():
                v.add_(1)
        torch.save(other, root / "nocrc_b.pt")
    assert (root / "nocrc_a.pt").stat().st_size == (root / "nocrc_b.pt").stat().st_size
    notckpt = root / "notckpt.pt"
    notckpt.write_bytes(b"hello, not a checkpoint" * 10)
    unsafe = root / "unsafe.pt"
    torch.save({"w": torch.ones(3), "ratio": fractions.Fraction(1, 3)}, unsafe)  # not on torch's allowlist
    badindex = root / "bad.index.json"
    badindex.write_text(json.dumps({"weight_map": {"w": "../single.pt"}}))
    sharded = root / "sharded"
    sharded.mkdir()
    keys = list(state)
    weight_map = {}
    for i in range(3):
        shard = {k: state[k] for k in keys[i::3] if k != "meta"}
        torch.save(shard, sharded / f"model-{i + 1:05d}-of-00003.pt")
        weight_map.update({k: f"model-{i + 1:05d}-of-00003.pt" for k in shard})
    (sharded / "model.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {name: str(p) for name, p in dict(single=single, tiny=tiny, corrupt=corrupt, notckpt=notckpt,
                                              unsafe=unsafe, badindex=badindex, sharded=sharded,
                                              nocrc_a=root / "nocrc_a.pt", nocrc_b=root / "nocrc_b.pt").items()}


def run_group(n, scenarios, paths, tmp_path, timeout_s=TIMEOUT_S, backend="gloo"):
    """Spawns n ranks running `scenarios`; returns each surviving rank's report and exit code."""
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "out"
    out.mkdir()
    init_file = tmp_path / "rendezvous"
    procs = [ctx.Process(target=distributed_worker.main,
                         args=(r, n, str(init_file), scenarios, paths, str(out), timeout_s, backend)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = {r: json.loads((out / f"{r}.json").read_text()) for r in range(n) if (out / f"{r}.json").exists()}
    return reports, codes


def assert_ok(reports, n, scenarios):
    assert sorted(reports) == list(range(n)), reports
    for rank, report in reports.items():
        for name in scenarios:
            assert "error" not in report[name], f"rank {rank}, {name}: {report[name]['traceback']}"


def test_import_fastckpt_does_not_import_torch():
    code = "import sys, fastckpt; assert 'torch' not in sys.modules; fastckpt.distributed; assert 'torch.distributed' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_two_ranks(paths, tmp_path):
    scenarios = ["full", "reads_once", "keys", "errors", "replaced"]
    reports, codes = run_group(2, scenarios, paths, tmp_path)
    assert_ok(reports, 2, scenarios)
    assert reports[0]["replaced"]["ok"] == reports[1]["replaced"]["ok"]
    errors = [report["errors"]["ok"] for report in reports.values()]
    assert errors[0] == errors[1]  # every rank raised the same class with the same message
    assert "IntegrityError: CRC-32 mismatch" in errors[0][0]
    assert errors[0][1].startswith("FileNotFoundError")
    assert codes == [0, 0]


def test_four_ranks(paths, tmp_path):
    scenarios = ["full", "reads_once", "keys", "errors"]
    reports, codes = run_group(4, scenarios, paths, tmp_path)
    assert_ok(reports, 4, scenarios)
    assert len({json.dumps(report["errors"]["ok"]) for report in reports.values()}) == 1
    assert codes == [0, 0, 0, 0]


def test_dead_rank_ends_the_others(paths, tmp_path):
    reports, codes = run_group(2, ["dies"], paths, tmp_path, timeout_s=10)
    assert codes[1] == 3 and sorted(reports) == [0]
    assert "error" not in reports[0]["dies"], reports[0]["dies"]["traceback"]
    message, seconds = reports[0]["dies"]["ok"]
    assert message.startswith("CollectiveError") and seconds < 10 + 5, (message, seconds)


def test_stalled_rank_ends_the_others_within_the_timeout(paths, tmp_path):
    timeout = distributed_worker.TIMEOUT_STALL_S
    reports, codes = run_group(2, ["stalls"], paths, tmp_path, timeout_s=timeout)
    for rank in (0, 1):  # the stalled rank, once awake, finds the group gone: an error, not a hang
        message, seconds = reports[rank]["stalls"]["ok"]
        assert message.startswith("CollectiveError"), message
    assert reports[0]["stalls"]["ok"][1] < timeout + 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_to_cuda(paths, tmp_path):
    n = min(torch.cuda.device_count(), 2)
    reports, codes = run_group(n, ["cuda"], paths, tmp_path, backend="nccl")
    assert_ok(reports, n, ["cuda"])
