"""Background saves: how long a checkpoint stalls a training loop, against torch.save and fastckpt.save.

For each case (the states of bench_save.py: ``llm``, a Llama-like bf16 state dict; ``train``, an MLP with
its AdamW state, RNG and scheduler), fresh processes measure, side by side in one run:

* ``torch.save`` and ``fastckpt.save`` (synchronous): the first save of the process and later ones
  (each to a path with no file), and the process's peak RSS;
* ``AsyncSaver.save`` (``max_in_flight=1``), --checkpoints in a row to one path: the time each call
  blocks the caller (the snapshot), the background write, first checkpoint and later ones apart, and
  the peak RSS after each checkpoint (it must not grow), against state + one checkpoint's staging;
* the snapshot's floor: a parallel memcpy of the state's bytes into already-touched memory (the
  native copy the snapshot uses, without and with CRC-32);
* a loop of --loop checkpoints with --work seconds of simulated work (sleep) before each, against the
  same loop without checkpoints.

    python benchmarks/bench_async_save.py [--tiny] [--cases llm,train] [--llm-mb 2048] [--train-mb 256]
                                          [--checkpoints 10] [--loop 5] [--work 2] [--dir DIR] [--out FILE]

``--tiny`` runs a small training state and short waits, to check that the script works (no figures to
report).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_save import build  # noqa: E402  (the same seeded states as the save benchmark)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _state_bytes(obj) -> int:
    import torch

    seen, total, todo = set(), 0, [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return total


def _sync(spec: dict, obj) -> dict:
    import torch

    import fastckpt

    save = torch.save if spec["mode"] == "torch" else fastckpt.save
    times = []
    for i in range(1 + spec["later"]):
        path = f"{spec['path']}.{i}"
        t0 = time.perf_counter()
        save(obj, path)
        times.append(time.perf_counter() - t0)
        os.unlink(path)
    return {"first": times[0], "later": statistics.median(times[1:]), "peak_rss_mb": _peak_rss_mb()}


def _background(spec: dict, obj) -> dict:
    import torch

    import fastckpt
    from fastckpt import _native

    out = {"stall": [], "snapshot": [], "write": [], "rss_mb": []}
    with fastckpt.AsyncSaver(max_in_flight=1) as saver:
        for _ in range(spec["checkpoints"]):
            t0 = time.perf_counter()
            handle = saver.save(obj, spec["path"])
            out["stall"].append(time.perf_counter() - t0)
            handle.result()
            out["snapshot"].append(handle.snapshot_seconds)
            out["write"].append(handle.write_seconds)
            out["rss_mb"].append(_peak_rss_mb())
        out["staging_allocations"] = saver.staging_allocations

        # The floor: the same copies into memory touched beforehand, without and with CRC-32.
        tensors = [t for t in _flat(obj) if t.untyped_storage().nbytes()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        dst = torch.ones(sum(-(-n // 64) * 64 for n in storages.values()), dtype=torch.uint8)
        copies, at = [], 0
        for ptr, n in storages.items():
            copies.append((dst.data_ptr() + at, ptr, n))
            at += -(-n // 64) * 64
        for crc in (False, True):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                _native.copy_memory(copies, crc, 0)
                best = min(best, time.perf_counter() - t0)
            out["memcpy_crc" if crc else "memcpy"] = best
        del dst

        # Training loop: work then checkpoint, against work alone.
        for with_checkpoints in (False, True):
            t0 = time.perf_counter()
            for _ in range(spec["loop"]):
                time.sleep(spec["work"])
                if with_checkpoints:
                    saver.save(obj, spec["path"])
            saver.wait()
            out["loop_with" if with_checkpoints else "loop_without"] = time.perf_counter() - t0
    os.unlink(spec["path"])
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _flat(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flat(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flat(v)


def worker(spec: dict) -> dict:
    obj = build(spec["case"], spec)
    base = {"state_bytes": _state_bytes(obj), "rss_before_mb": _peak_rss_mb()}
    return {**base, **(_background(spec, obj) if spec["mode"] == "background" else _sync(spec, obj))}


def run_worker(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(case: str, r: dict) -> list[str]:
    torch_r, fast, bg = r["torch"], r["fastckpt"], r["background"]
    state_mb = bg["state_bytes"] / 2**20
    later_stall = statistics.median(bg["stall"][1:]) if len(bg["stall"]) > 1 else bg["stall"][0]
    later_write = statistics.median(bg["write"][1:]) if len(bg["write"]) > 1 else bg["write"][0]
    rss = bg["rss_mb"]
    return [
        f"{case}: state {state_mb:.0f} MiB",
        f"  torch.save          first {torch_r['first']:.3f} s   later {torch_r['later']:.3f} s   "
        f"peak RSS {torch_r['peak_rss_mb']:.0f} MiB",
        f"  fastckpt.save       first {fast['first']:.3f} s   later {fast['later']:.3f} s   "
        f"peak RSS {fast['peak_rss_mb']:.0f} MiB",
        f"  background stall    first {bg['stall'][0]:.3f} s   later {later_stall:.3f} s   "
        f"(write first {bg['write'][0]:.3f} s, later {later_write:.3f} s)",
        f"  memcpy floor        {bg['memcpy']:.3f} s (with CRC {bg['memcpy_crc']:.3f} s)   "
        f"stall / floor {later_stall / bg['memcpy']:.2f}   stall / torch.save {later_stall / torch_r['later']:.2f}",
        f"  peak RSS            {rss[0]:.0f} MiB after the first checkpoint, {rss[-1]:.0f} MiB after "
        f"{len(rss)}; / (RSS with the state + its staging) {rss[-1] / (bg['rss_before_mb'] + state_mb):.2f}   "
        f"staging allocations {bg['staging_allocations']}",
        f"  loop                {bg['loop_with']:.2f} s with checkpoints, {bg['loop_without']:.2f} s without: "
        f"{bg['loop_with'] / bg['loop_without']:.3f}x",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help="default llm,train (--tiny: train)")
    parser.add_argument("--llm-mb", type=int, default=2048)
    parser.add_argument("--train-mb", type=int, default=256)
    parser.add_argument("--later", type=int, default=3, help="synchronous saves after the first")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--loop", type=int, default=5)
    parser.add_argument("--work", type=float, default=2.0)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None, help="write the raw figures as JSON here")
    parser.add_argument("--tiny", action="store_true", help="small states, short waits: a check that it runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.tiny:
        args.llm_mb, args.train_mb, args.later, args.checkpoints, args.loop, args.work = 16, 8, 1, 3, 2, 0.05
    args.cases = args.cases or ("train" if args.tiny else "llm,train")

    directory = tempfile.mkdtemp(prefix="fastckpt-async-save-", dir=args.dir)
    results = {}
    for case in args.cases.split(","):
        results[case] = {}
        for mode in ("torch", "fastckpt", "background"):
            spec = {"case": case, "mode": mode, "path": os.path.join(directory, f"{case}.pt"),
                    "llm_mb": args.llm_mb, "train_mb": args.train_mb, "small": 0, "later": args.later,
                    "checkpoints": args.checkpoints, "loop": args.loop, "work": args.work}
            results[case][mode] = run_worker(spec)
        print("\n".join(report(case, results[case])), flush=True)
    os.rmdir(directory)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
