"""The benchmark harness itself: deterministic checkpoints, real correctness checks, cold-cache
detection, the results document. Small sizes only; one end-to-end run shared by several tests."""

from __future__ import annotations

import json
import os
import struct
import zipfile

import pytest

torch = pytest.importorskip("torch")

from fastckpt.bench import ceilings, cli, coldcache, generate, summary, worker  # noqa: E402
from fastckpt.bench.generate import BenchError  # noqa: E402

# --------------------------------------------------------------------------- generator


@pytest.mark.parametrize("text, name", [("llm-2g", "llm-2g"), ("LLM-0.25G", "llm-250m"), ("llm-100m-fp16", "llm-100m-fp16"),
                                        ("llm-1g-bf16", "llm-1g"), ("small-100000", "small-100k"), ("moe-20k", "moe-20k"),
                                        ("train-1g", "train-1g")])
def test_spec_names_are_canonical(text, name):
    assert generate.parse_spec(text).name == name


@pytest.mark.parametrize("text", ["gpt-1g", "llm", "llm-0", "llm-xg", "llm-1g-int8", "small-10k-bf16", "llm-1g-bf16-x"])
def test_bad_specs_are_refused_with_a_message(text):
    with pytest.raises(BenchError, match="bad checkpoint spec|SCENARIO"):
        generate.parse_spec(text)


def _pt_records(path):
    """Every record of a torch.save file except the random serialization_id."""
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


@pytest.mark.parametrize("spec", ["small-300", "moe-400", "llm-12m", "train-2m"])
def test_generator_is_deterministic(tmp_path, spec):
    a = generate.ensure(generate.parse_spec(spec), str(tmp_path / "a"))
    b = generate.ensure(generate.parse_spec(spec), str(tmp_path / "b"))
    assert a["digest"] == b["digest"]
    assert _pt_records(a["files"]["pt"]["path"]) == _pt_records(b["files"]["pt"]["path"])
    with open(a["files"]["safetensors"]["path"], "rb") as fa, open(b["files"]["safetensors"]["path"], "rb") as fb:
        assert fa.read() == fb.read()


def test_cached_checkpoint_is_reused(tmp_path):
    spec = generate.parse_spec("small-100")
    first = generate.ensure(spec, str(tmp_path))
    mtime = os.path.getmtime(first["files"]["pt"]["path"])
    assert generate.ensure(spec, str(tmp_path)) == first
    assert os.path.getmtime(first["files"]["pt"]["path"]) == mtime


def test_safetensors_twin_has_the_same_tensors_in_the_same_order(tmp_path):
    from safetensors.torch import load_file

    from fastckpt.bench.digest import flatten

    m = generate.ensure(generate.parse_spec("train-2m"), str(tmp_path))
    loaded = torch.load(m["files"]["pt"]["path"], weights_only=True)
    tensors = [(k, t) for k, t in flatten(loaded) if isinstance(t, torch.Tensor)]
    twin = load_file(m["files"]["safetensors"]["path"])
    assert sorted(twin) == sorted(k for k, _ in tensors)
    for key, t in tensors:
        assert twin[key].dtype == t.dtype and torch.equal(twin[key], t), key
    with open(m["files"]["safetensors"]["path"], "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__")
    assert list(header) == [k for k, _ in tensors]  # file order = pickle (storage record) order
    starts = [v["data_offsets"][0] for v in header.values()]
    assert starts == sorted(starts)
    assert "optimizer.state.0.exp_avg_sq" in twin and isinstance(loaded["optimizer"]["param_groups"], list)


def test_generation_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 9 << 30, 1 << 30))
    with pytest.raises(BenchError, match=r"not generating llm-2g: it needs about 4\.00 GB .* only 1\.07 GB is free"):
        generate.ensure(generate.parse_spec("llm-2g"), str(tmp_path))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- cold cache


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4 << 20))
    return str(path)


def test_a_file_read_just_before_is_resident_and_not_cold(data_file, monkeypatch):
    coldcache.warm(data_file)
    assert coldcache.resident_fraction(data_file) == 1.0
    assert worker.check_residency(data_file, cold=False) == {"status": "ok", "resident_before": 1.0}
    # An eviction the kernel ignores must not yield a timed "cold" run.
    monkeypatch.setattr(coldcache, "evict", lambda path: None)
    assert worker.check_residency(data_file, cold=True) == {"status": "not-cold", "resident_before": 1.0}


def test_a_file_found_evicted_is_timed_cold(data_file, monkeypatch):
    coldcache.evict(data_file)  # the real request; whether the kernel honours it is not under test
    after = coldcache.resident_fraction(data_file)
    assert 0.0 <= after <= 1.0
    monkeypatch.setattr(coldcache, "resident_fraction", lambda path: 0.0)
    assert worker.check_residency(data_file, cold=True) == {"status": "ok", "resident_before": 0.0}
    monkeypatch.setattr(coldcache, "resident_fraction", lambda path: 2 * coldcache.COLD_TOLERANCE)
    assert worker.check_residency(data_file, cold=True)["status"] == "not-cold"


def test_touch_counts_the_bytes_of_every_tensor_once():
    base = torch.arange(10_000, dtype=torch.float32)
    tail = torch.arange(64.0)[8:]
    obj = {"a": base, "view": base[10:20], "strided": base[::3], "b": [torch.ones(3, dtype=torch.bfloat16)],
           "empty": torch.empty(0), "n": 3, "t": (tail, tail[4:])}
    assert worker.touch(obj) == base.untyped_storage().nbytes() + 6 + tail.nbytes


# --------------------------------------------------------------------------- ceilings


@pytest.mark.parametrize("threads,block", [(1, 1 << 20), (3, 1 << 20), (8, 64 << 10)])
def test_ceiling_reader_fills_every_byte_of_fresh_memory(tmp_path, threads, block):
    data = os.urandom((3 << 20) + 12345)  # shares and blocks that do not divide the size
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with ceilings._Mapping(len(data)) as fresh:
        assert ceilings.read_file(str(path), len(data), threads, block, into=fresh) > 0
        assert bytes(fresh.view()) == data
    assert ceilings.read_file(str(path), len(data), threads, block, direct=ceilings._direct_works(str(path))) > 0
    with ceilings._Mapping(len(data)) as fresh:
        assert ceilings.read_file(str(path), len(data), threads, block, into=fresh, ahead=2 * block) > 0
        assert bytes(fresh.view()) == data


def test_cold_read_ceiling_reports_the_fastest_configuration(data_file, monkeypatch):
    monkeypatch.setattr(coldcache, "resident_fraction", lambda path: 0.0)  # eviction is not under test
    c = ceilings.cold_read(data_file, os.path.getsize(data_file))
    assert c["cold_read"] > 0 and len(c["cold_read_search"]) >= len(ceilings.SEARCH_THREADS) * len(ceilings.SEARCH_BLOCKS)
    assert {"threads", "block", "direct", "ahead"} == set(c["cold_read_config"])
    assert {(r["direct"], r["ahead"]) for r in c["cold_read_search"]} >= {(False, 0), (False, ceilings.SEARCH_AHEAD[-1])}
    monkeypatch.setattr(coldcache, "resident_fraction", lambda path: 1.0)
    assert ceilings.cold_read(data_file, 1 << 20)["cold_read"] is None


# --------------------------------------------------------------------------- correctness


def test_pt_loaders_must_match_structure_and_safetensors_the_tensors():
    from collections import OrderedDict

    from fastckpt.bench.contenders import CONTENDERS
    from fastckpt.bench.digest import digest
    from fastckpt.bench.runner import is_correct

    t = torch.arange(6.0)
    reference = digest({"model": OrderedDict(w=t, b=t[2:]), "step": 3})
    u = t.clone()
    same = {"digest": digest({"model": OrderedDict(w=u, b=u[2:]), "step": 3})}
    assert same["digest"] == reference
    assert is_correct(same, reference, CONTENDERS["torch"], "cpu") is True
    wrong = {
        "values": {"model": OrderedDict(w=t + 1, b=t[2:]), "step": 3},
        "dtype": {"model": OrderedDict(w=t.double(), b=t[2:]), "step": 3},
        "container": {"model": dict(w=t, b=t[2:]), "step": 3},
        "key order": {"model": OrderedDict(b=t[2:], w=t), "step": 3},
        "non-tensor": {"model": OrderedDict(w=t, b=t[2:]), "step": 4},
        "sharing": {"model": OrderedDict(w=t, b=t[2:].clone()), "step": 3},
        "parameter": {"model": OrderedDict(w=torch.nn.Parameter(t), b=t[2:]), "step": 3},
    }
    for what, obj in wrong.items():
        assert is_correct({"digest": digest(obj)}, reference, CONTENDERS["torch"], "cpu") is False, what
    assert is_correct({"digest": digest(wrong["container"])}, reference, CONTENDERS["st-load"], "cpu") is True
    flat = {"model.w": t, "model.b": t[2:].clone()}  # a safetensors load: flat, own storages
    assert is_correct({"digest": digest(flat)}, reference, CONTENDERS["st-load"], "cpu") is True
    assert is_correct({"digest": digest(flat)}, reference, CONTENDERS["st-load"], "cuda:0") is False
    assert is_correct({"status": "not-cold"}, reference, CONTENDERS["torch"], "cpu") is None


# --------------------------------------------------------------------------- ratios


def test_ratios_pair_rounds_and_compare_lazy_load_times_only_with_lazy():
    def sample(cid, r, load, ready, correct=True):
        return {"contender": cid, "round": r, "status": "ok", "correct": correct, "load_s": load, "ready_s": ready,
                "cpu_ready_s": ready, "rss_base": 0, "rss_ready": 0}

    contenders = [{"id": "torch", "family": "torch", "lazy": False}, {"id": "torch-mmap", "family": "torch", "lazy": True},
                  {"id": "fastckpt-mmap", "family": "fastckpt", "lazy": True}]
    samples = [sample("torch", 0, 1.0, 1.0), sample("torch-mmap", 0, 0.1, 0.5), sample("fastckpt-mmap", 0, 0.05, 0.25),
               sample("torch", 1, 2.0, 2.0), sample("torch-mmap", 1, 0.2, 1.0), sample("fastckpt-mmap", 1, 0.1, 2.0, False)]
    results = {"config": {"contenders": contenders}, "ceilings": None,
               "checkpoints": {"x": {"digest": {"storage_bytes": 10**9, "n_tensors": 10}, "files": {"pt": {"path": "x"}}}},
               "cases": [{"checkpoint": "x", "mode": "warm", "device": "cpu", "samples": samples}]}
    summary.annotate(results)
    ratios = {(r["a"], r["b"], r["metric"]): r for r in results["cases"][0]["ratios"]}
    assert ratios["torch-mmap", "torch", "ready_s"]["median"] == 0.5 and ratios["torch-mmap", "torch", "ready_s"]["n"] == 2
    assert ("torch-mmap", "torch", "load_s") not in ratios  # eager vs lazy: as-returned times are not comparable
    fast = ratios["fastckpt-mmap", "torch-mmap", "load_s"]
    assert (fast["median"], fast["n"]) == (0.5, 1)  # round 1's wrong result is left out
    assert results["cases"][0]["summary"]["fastckpt-mmap"]["correct"] is False


# --------------------------------------------------------------------------- end to end

LOADERS = '''
import torch

def off_by_one(path, map_location):
    sd = torch.load(path, map_location=map_location)
    key = next(iter(sd))
    sd[key] = sd[key] + 1
    return sd
'''


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `fastckpt bench` run: torch.load and safetensors, a wrong custom loader, one that cannot be
    imported; warm and cold; JSON and plot written."""
    root = tmp_path_factory.mktemp("bench")
    (root / "bench_loaders.py").write_text(LOADERS)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        mp.syspath_prepend(str(root))
        rc = cli.main(["-c", "small-200", "--contenders", "torch,st-load,bench_loaders:off_by_one,no_such_module:load", "--mode", "warm,cold", "--device", "cpu",
                       "--rounds", "1", "--cache-dir", str(root / "cache"), "--out", str(out)])
    with open(out / "results.json") as f:
        return rc, json.load(f), out


def test_a_wrong_loader_is_flagged(bench_run):
    rc, results, _ = bench_run
    assert rc == 1  # a wrong result fails the command
    for case in results["cases"]:
        s = case["summary"]
        if s["bench_loaders:off_by_one"]["ok"]:
            assert s["bench_loaders:off_by_one"]["correct"] is False
        if s["torch"]["ok"]:
            assert s["torch"]["correct"] is True
            assert s["st-load"]["correct"] is True


def test_missing_contender_is_skipped_with_a_reason(bench_run):
    _, results, _ = bench_run
    assert "no_such_module" in results["skipped"]["no_such_module:load"]
    assert all(s["contender"] != "no_such_module:load" for case in results["cases"] for s in case["samples"])


def test_cold_runs_are_either_evicted_or_reported_not_cold(bench_run):
    _, results, _ = bench_run
    cold = [s for case in results["cases"] if case["mode"] == "cold" for s in case["samples"]]
    assert cold
    for s in cold:
        assert s["status"] in ("ok", "not-cold")
        if s["status"] == "ok":
            assert s["resident_before"] <= coldcache.COLD_TOLERANCE
        else:
            assert "load_s" not in s


def test_results_document_schema(bench_run):
    _, results, out = bench_run
    assert results["schema"] == "fastckpt-bench/1"
    assert {"cpu", "cores", "memory_bytes", "torch", "safetensors", "fastckpt", "gpu"} <= set(results["machine"])
    assert results["config"]["rounds"] == 1 and results["config"]["modes"] == ["warm", "cold"]
    assert set(results["ceilings"]) >= {"memcpy_1core", "populate", "files"}
    manifest = results["checkpoints"]["small-200"]
    assert manifest["digest"]["n_tensors"] == 200 and os.path.isfile(manifest["files"]["safetensors"]["path"])
    assert [(c["mode"], c["device"]) for c in results["cases"]] == [("warm", "cpu"), ("cold", "cpu")]
    for case in results["cases"]:
        ids = [c["id"] for c in results["config"]["contenders"] if case["device"] != "cpu" or not c["device_only"]]
        assert [s["contender"] for s in case["samples"]] == ids
        for s in case["samples"]:
            assert s["status"] in ("ok", "not-cold")
            if s["status"] == "ok":
                assert s["ready_s"] >= s["load_s"] > 0 and s["cpu_ready_s"] >= 0
                assert s["rss_ready"] >= s["rss_base"] > 0
                assert set(s["digest"]) >= {"tensors", "structure", "n_tensors", "devices"}
        assert set(case["summary"]) == set(ids)
        for r in case["ratios"]:
            assert r["min"] <= r["median"] <= r["max"] and r["metric"] in ("ready_s", "load_s")
    warm = results["cases"][0]["summary"]
    assert warm["torch"]["ceiling"]["name"] == "warm eager"
    assert warm["st-load"]["lazy"] and warm["st-load"]["ceiling"]["name"] == "page-cache map"
    assert (out / "bench.png").stat().st_size > 1000


def test_contenders_are_named_by_id_pattern_or_family():
    from fastckpt.bench.contenders import CONTENDERS, resolve

    assert [c.id for c in resolve(["torch", "fastckpt"])] == ["torch", "fastckpt"]  # an id is that contender alone
    assert [c.id for c in resolve(["safetensors"])] == ["st-load", "st-open"]
    assert [c.id for c in resolve(["fastckpt*"])] == [c for c in CONTENDERS if c.startswith("fastckpt")]
    assert [c.id for c in resolve(["all", "torch"])] == list(CONTENDERS)
    with pytest.raises(BenchError, match="unknown contender 'tensorflow'"):
        resolve(["tensorflow"])


def test_cli_refuses_clearly(capsys):
    assert cli.main(["--contenders", "nope", "--device", "cpu"]) == 2
    assert "unknown contender 'nope'" in capsys.readouterr().err
    assert cli.main(["-c", "llm-1x", "--device", "cpu"]) == 2
    assert "bad checkpoint spec" in capsys.readouterr().err
    assert cli.main(["--list"]) == 0
    assert "fastckpt-mmap" in capsys.readouterr().out


# --------------------------------------------------------------------------- defaults, progress


def _config(argv, tmp_path):
    args = cli.build_parser().parse_args(argv + ["--device", "cpu", "--cache-dir", str(tmp_path)])
    return args, cli.config_from_args(args, lambda message: None)


def test_quick_and_file_runs_take_the_headline_contenders(tmp_path):
    args, quick = _config(["--quick"], tmp_path)
    assert args.out == cli.DEFAULT_OUT == "fastckpt-bench"
    assert [c.id for c in quick.contenders] == cli.CORE_CONTENDERS.split(",")
    assert (quick.modes, quick.rounds) == (["warm"], 2)
    _, full = _config([], tmp_path)
    assert len(full.contenders) == len(cli.contenders_mod.CONTENDERS) and full.modes == ["warm", "cold"]
    small = tmp_path / "small.pt"
    torch.save({"w": torch.ones(4)}, small)
    _, mine = _config([str(small)], tmp_path)
    assert [c.id for c in mine.contenders] == ["torch", "torch-mmap", "fastckpt", "fastckpt-mmap"]
    assert (mine.modes, mine.rounds) == (["warm"], 2)  # a file under SMALL_FILE_BYTES: as --quick
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(cli.SMALL_FILE_BYTES)
    both = _config([str(small), str(big)], tmp_path)[1]
    assert (both.modes, both.rounds) == (["warm", "cold"], 3)


def test_progress_counts_only_the_loads_that_run(tmp_path, monkeypatch):
    from fastckpt.bench import contenders, runner

    path = tmp_path / "mine.pt"
    torch.save({"w": torch.ones(4)}, path)
    ran = []

    def fake_batch(requests):  # no worker processes: the schedule is under test
        ran.extend(requests)
        return iter([{"status": "error", "error": "not run"} for _ in requests])

    monkeypatch.setattr(runner, "run_batch", fake_batch)
    logged = []
    # st-load has no file to read (a user's .pt has no twin) and torch-mmap-to runs on devices only
    config = runner.Config(checkpoints=[generate.UserFile(str(path))], contenders=contenders.resolve(
        ["torch", "st-load", "torch-mmap-to", "fastckpt-mmap"]), modes=["warm", "cold"], devices=["cpu"], rounds=3,
        cache_dir=str(tmp_path), ceilings=False)
    runner.run(config, logged.append)
    counts = [line.split("]")[0] for line in logged if line.startswith("[")]
    assert len(ran) == 2 * 2 * 3 and counts[-1] == "[12/12" and len(counts) == 12


def test_the_default_run_writes_json_and_plot_to_the_folder_it_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["-c", "small-20", "--contenders", "torch-pickle", "--mode", "warm", "--device", "cpu", "-r", "1",
                   "--no-ceilings", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    out = tmp_path / "fastckpt-bench"
    with open(out / "results.json") as f:
        assert json.load(f)["cases"][0]["summary"]["torch-pickle"]["correct"] is True
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("results.json and bench.png in ./fastckpt-bench/")


def test_an_unwritable_out_folder_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["--quick", "--device", "cpu", "--out", str(blocker / "sub")]) == 2
    assert "cannot make the folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- table and plot

def _synthetic_results(extra_ids=("bench_loaders:a_long_custom_loader_name",), devices=("cpu", "cuda:0")):
    """A results document as a run makes it, from made-up samples: every built-in contender and a custom one,
    two checkpoints, a CPU and a device case, a wrong result, an error and a not-cold run."""
    from fastckpt.bench import contenders as contenders_mod

    chosen = list(contenders_mod.CONTENDERS.values()) + [contenders_mod.get(cid) for cid in extra_ids]
    config = [{"id": c.id, "label": c.label, "family": c.family, "fmt": c.fmt, "lazy": c.lazy,
               "device_only": c.device_only} for c in chosen]
    manifests = {name: {"name": name, "elements": n * 16, "files": {"pt": {"path": f"/x/{name}.pt"}},
                        "digest": {"n_tensors": n, "storage_bytes": n * 64}} for name, n in (("small-10k", 10_000),
                                                                                               ("llm-250m", 264))}
    cases = []
    for name in manifests:
        for device in devices:
            samples = []
            for r in range(2):
                for k, c in enumerate(chosen):
                    if not c.runs_on(device) or (name == "llm-250m" and c.id == "st-open"):
                        continue  # st-open sits out one case: its group must close up
                    s = {"contender": c.id, "round": r, "status": "ok", "correct": c.id != "torch-again",
                         "load_s": 0.0123 * (k + 1), "ready_s": 0.0456 * (k + 1) + r * 1e-3, "cpu_ready_s": 0.05,
                         "rss_base": 10**8, "rss_ready": 3 * 10**8, "cuda_max_allocated": 2 * 10**8}
                    if c.id == "fastckpt-fileobj" and r == 1:
                        s = {"contender": c.id, "round": r, "status": "error",
                             "error": "exit status 1: RuntimeError: " + "a long explanation " * 8}
                    if c.id == "torch-pickle" and r == 0:
                        s = {"contender": c.id, "round": r, "status": "not-cold", "resident_before": 1.0}
                    samples.append(s)
            cases.append({"checkpoint": name, "mode": "warm", "device": device, "samples": samples})
    files = {m["files"]["pt"]["path"]: {"warm_eager": 2.3, "pagecache_read": 9.5, "pagecache_map": 24.1,
                                        "cold_read": 1.83, "cold_read_config": {"threads": 4, "block": 1 << 20,
                                                                                "direct": True, "ahead": 64 << 20}}
             for m in manifests.values()}
    results = {"config": {"contenders": config, "rounds": 2}, "skipped": {"no_such:thing": "no_such is not "
                                                                          "available in this environment"},
               "machine": {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores_usable": 2,
                           "gpu": "NVIDIA H100 80GB HBM3"},
               "load_average": {"before": [1.0], "after": [2.0]},
               "ceilings": {"memcpy_1core": 10.7, "populate": 3.2, "h2d_pinned": 50.1, "h2d_pageable": 20.2,
                            "gpu": "NVIDIA H100 80GB HBM3", "files": files},
               "checkpoints": manifests, "cases": cases}
    summary.annotate(results)
    return results


def test_table_fits_100_columns_and_names_every_contender_that_ran():
    from fastckpt.bench import report

    results = _synthetic_results()
    table = report.format_table(results)
    lines = table.splitlines()
    assert max(map(len, lines)) <= report.WIDTH == 100
    legend = " ".join(line.strip() for line in lines if not line.startswith(("small", "llm")))
    for c in results["config"]["contenders"]:
        assert (f"{c['id']} = {c['label']}" if c["id"] != c["label"] else c["id"]) in legend
    # a row per contender and case, under its (possibly cut) id
    for case in results["cases"]:
        for cid in case["summary"]:
            assert any(line.startswith("  " + report._short_id(cid) + " ") for line in lines), cid
    assert "WRONG" in table and "a long explanation" in table
    cpu_only = report.format_table(_synthetic_results(extra_ids=(), devices=("cpu",)))
    assert max(map(len, cpu_only.splitlines())) <= 100
    assert "torch-mmap-to" not in cpu_only  # configured, but it runs on devices only: not in the legend


def test_colours_are_fixed_per_contender_and_distinct():
    from fastckpt.bench import contenders as contenders_mod
    from fastckpt.bench import report

    builtin = list(contenders_mod.CONTENDERS)
    assert set(builtin) <= set(report.COLOURS)
    every = report.colours(builtin + ["mod:a", "mod:b", "other:c"])
    assert len(set(every.values())) == len(every)  # distinct within a plot
    assert report.colours(["fastckpt", "torch"]) == {"fastckpt": report.COLOURS["fastckpt"],
                                                      "torch": report.COLOURS["torch"]}
    assert report.colours(["mod:a"]) == report.colours(["mod:a"])  # stable from run to run
    assert report.colours(["torch", "mod:a"])["mod:a"] == report.colours(["st-load", "mod:a"])["mod:a"]


def test_plot_groups_have_no_empty_slots_and_the_legend_clears_the_labels(tmp_path):
    from fastckpt.bench import report

    results = _synthetic_results()
    positions, width = report.bar_positions(results)
    for x, case in enumerate(results["cases"]):
        ran = [cid for cid, s in case["summary"].items() if s["ok"]]
        xs = sorted(positions[x, cid] for cid in ran)
        assert {cid for (i, cid) in positions if i == x} == set(ran)
        assert all(abs(b - a - width) < 1e-9 for a, b in zip(xs, xs[1:]))  # side by side, no gap
        assert abs((xs[0] + xs[-1]) / 2 - x) < 1e-9  # centred on the case's tick
    assert ("st-open" in results["cases"][0]["summary"]) and (2, "st-open") not in positions

    fig = report.figure(results)
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
        for label in ax.get_xticklabels():
            if label.get_text():
                assert legend.y1 < label.get_window_extent(renderer).y0
    fig.savefig(tmp_path / "bench.png")


def test_an_earlier_run_is_shown_again_from_its_json(tmp_path, capsys):
    from fastckpt.bench import report

    results = _synthetic_results(devices=("cpu",))
    report.write_json(results, tmp_path / "results.json")
    assert report.main([str(tmp_path / "results.json"), str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().out.strip() == report.format_table(results)
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    assert report.main([]) == 2
