"""One rank of a gloo group spawned by test_distributed.py: runs the named scenarios and writes
what happened to <out>/<rank>.json (spawned processes import this module by name)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import traceback

import torch
import torch.distributed as dist

import fastckpt
from fastckpt import distributed as fd
from fastckpt.distributed import reads
from parity import assert_same


def ref_sharded(directory):
    index = json.load(open(os.path.join(directory, "model.index.json")))
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(torch.load(os.path.join(directory, shard)))
    return merged


def subset(ref, keys):
    """What keys= returns: the selected entries in checkpoint order, in the checkpoint's dict type."""
    return type(ref)((k, v) for k, v in ref.items() if k in keys)


def tp_slice(rank, n):
    """Tensor parallel: each rank its share of dim 0 (none for scalars)."""
    def slices(key, shape):
        return slice(rank * shape[0] // n, (rank + 1) * shape[0] // n) if shape else None
    return slices


def expect_error(cls, fn):
    try:
        fn()
    except cls as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"expected {cls.__name__}")


def scenario_full(paths, rank, n):
    for kwargs in ({}, {"map_location": "cpu"}, {"map_location": {"cpu": "cpu"}},
                   {"map_location": lambda s, loc: s}, {"weights_only": False}):
        assert_same(fd.load(paths["single"], **kwargs), torch.load(paths["single"], **kwargs))
    assert_same(fd.load(paths["tiny"]), torch.load(paths["tiny"]))
    assert_same(fd.load(paths["sharded"]), ref_sharded(paths["sharded"]))
    assert_same(fd.load(os.path.join(paths["sharded"], "model.index.json")), ref_sharded(paths["sharded"]))
    return "ok"


def scenario_reads_once(paths, rank, n):
    fd.load(paths["single"])  # warm: lazy imports read files too
    with open("/proc/self/io") as fh:
        before = int(next(line for line in fh if line.startswith("rchar")).split()[1])
    fd.load(paths["single"])
    with open("/proc/self/io") as fh:
        after = int(next(line for line in fh if line.startswith("rchar")).split()[1])
    got = torch.tensor([after - before])
    dist.all_reduce(got)
    size = os.path.getsize(paths["single"])
    assert int(got) <= 1.1 * size, (int(got), size)
    return int(got) / size


def scenario_keys(paths, rank, n):
    ref = torch.load(paths["single"])
    mine = [k for i, k in enumerate(ref) if i % n == rank]  # pipeline-style: disjoint keys
    got = fd.load(paths["single"], keys=mine)
    assert_same(got, subset(ref, mine))
    got = fd.load(paths["single"], keys=lambda k: k.startswith("layer0."))
    assert_same(got, subset(ref, [k for k in ref if k.startswith("layer0.")]))
    slices = tp_slice(rank, n)
    got = fd.load(paths["single"], slices=slices)
    assert list(got) == list(ref)
    for k, v in ref.items():
        want = v[slices(k, tuple(v.shape))] if isinstance(v, torch.Tensor) and v.shape else v
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], want), k
        else:
            assert_same(got[k], want)
    sref = ref_sharded(paths["sharded"])
    mine = [k for i, k in enumerate(sref) if i % n == rank]
    assert_same(fd.load(paths["sharded"], keys=mine), subset(sref, mine))
    return "ok"


def scenario_errors(paths, rank, n):
    seen = [expect_error(fastckpt.IntegrityError, lambda: fd.load(paths["corrupt"]))]
    assert_same(fd.load(paths["corrupt"], verify=False), torch.load(paths["corrupt"]))
    seen.append(expect_error(FileNotFoundError, lambda: fd.load(paths["single"] + ".missing")))
    seen.append(expect_error(KeyError, lambda: fd.load(paths["single"], keys=["nope"] if rank == n - 1 else None)))
    seen.append(expect_error(fastckpt.FormatError, lambda: fd.load(paths["notckpt"])))
    seen.append(expect_error(fastckpt.FormatError, lambda: fd.load(paths["badindex"])))
    seen.append(expect_error(fastckpt.UnsafeGlobalError, lambda: fd.load(paths["unsafe"])))
    assert_same(fd.load(paths["unsafe"], weights_only=False), torch.load(paths["unsafe"], weights_only=False))
    assert_same(fd.load(paths["single"]), torch.load(paths["single"]))  # the group still works
    return seen


def scenario_replaced(paths, rank, n):
    """The checkpoint is atomically replaced (same layout, other values, no CRCs recorded) after rank 0
    indexed it: every rank refuses, none returns a mix of the two versions."""
    target = os.path.join(os.path.dirname(paths["single"]), f"replaced-{n}.pt")
    if rank == 0:
        shutil.copyfile(paths["nocrc_a"], target)
        real = fd.make_plan

        def plan_then_replace(path, ranks):
            plan = real(path, ranks)
            shutil.copyfile(paths["nocrc_b"], target + ".new")
            os.replace(target + ".new", target)
            return plan

        fd.make_plan = plan_then_replace
    dist.barrier()
    try:
        error = expect_error(fastckpt.FormatError, lambda: fd.load(target))
    finally:
        if rank == 0:
            fd.make_plan = real
    assert "not the file rank 0 indexed" in error, error
    assert_same(fd.load(target), torch.load(paths["nocrc_b"]))  # the new file, whole, once it stays
    return error


def scenario_dies(paths, rank, n):
    if rank == 1:
        reads.read_pieces = lambda *args: os._exit(3)
    start = time.monotonic()
    error = expect_error(fd.CollectiveError, lambda: fd.load(paths["single"]))
    return [error, time.monotonic() - start]


def scenario_cuda(paths, rank, n):
    device = f"cuda:{rank}"
    assert_same(fd.load(paths["single"], map_location=device), torch.load(paths["single"], map_location=device))
    slices = tp_slice(rank, n)
    got = fd.load(paths["single"], map_location=device, keys=lambda k: k.startswith("layer"), slices=slices)
    ref = torch.load(paths["single"], map_location=device)
    for k, v in got.items():
        assert v.device == torch.device(device) and torch.equal(v, ref[k][slices(k, tuple(ref[k].shape))]), k
    return "ok"


def scenario_stalls(paths, rank, n):
    if rank == 1:
        real = reads.read_pieces
        reads.read_pieces = lambda *args: (time.sleep(2 * TIMEOUT_STALL_S), real(*args))
    start = time.monotonic()
    error = expect_error(fd.CollectiveError, lambda: fd.load(paths["single"]))
    return [error, time.monotonic() - start]


TIMEOUT_STALL_S = 3


def main(rank, n, init_file, scenarios, paths, out, timeout_s, backend):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=timeout_s))
    report = {}
    try:
        for name in scenarios:
            start = time.monotonic()
            try:
                report[name] = {"ok": globals()[f"scenario_{name}"](paths, rank, n)}
            except BaseException as e:  # noqa: BLE001 - written for the test to report
                report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            report[name]["seconds"] = time.monotonic() - start
    finally:
        with open(os.path.join(out, f"{rank}.json"), "w") as fh:
            json.dump(report, fh)
    dist.destroy_process_group()
