"""Many tiny tensors, phase by phase: where a load's time goes between "as returned" and "ready".

    python benchmarks/bench_tiny.py [FILE] [--runs 3]

FILE defaults to the harness's small-100k checkpoint (``fastckpt bench -c small-100k`` makes it).
Each run is a fresh process (so every loader starts from the same interpreter heap) that times:
load (as returned), touch (one byte per page of every tensor's bytes, as the harness's `ready` does), and the
next ``gc.collect()``; every garbage collection Python runs in each phase is timed through
``gc.callbacks`` and reported beside it, in µs per tensor. Medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from fastckpt.bench.generate import default_cache_dir

LOADERS = {
    "torch.load": "torch.load(path, weights_only=True)",
    "fastckpt.load mmap=F": "fastckpt.load(path, weights_only=True, mmap=False)",
    "fastckpt.load mmap=T": "fastckpt.load(path, weights_only=True, mmap=True)",
}

CHILD = """
import gc, json, sys, time
import torch, fastckpt
fastckpt.load  # its first access imports the loader: done before the clock, as the harness does
from fastckpt.bench.worker import touch
from fastckpt.bench.digest import flatten
path = sys.argv[1]
collections = []  # (phase, generation, seconds)
phase = ["load"]
def timed(step, info):
    if step == "start":
        timed.t = time.perf_counter()
    else:
        collections.append((phase[0], info["generation"], time.perf_counter() - timed.t))
gc.callbacks.append(timed)
t0 = time.perf_counter()
obj = LOAD
t1 = time.perf_counter()
phase[0] = "touch"
touch(obj)
t2 = time.perf_counter()
phase[0] = "next gc.collect()"
gc.collect()
t3 = time.perf_counter()
n = sum(1 for _, leaf in flatten(obj) if isinstance(leaf, torch.Tensor))
out = {"tensors": n, "load": t1 - t0, "touch": t2 - t1, "next gc.collect()": t3 - t2}
for name in ("load", "touch", "next gc.collect()"):
    out[name + " gc"] = sum(s for p, _, s in collections if p == name)
    out[name + " full"] = sum(1 for p, g, _ in collections if p == name and g == 2)
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", default=os.path.join(default_cache_dir(), "small-100k.pt"))
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    samples = {name: [] for name in LOADERS}
    for _ in range(args.runs):
        for name, expr in LOADERS.items():  # alternating, so drift hits every loader alike
            run = subprocess.run([sys.executable, "-c", CHILD.replace("LOAD", expr), args.file],
                                 capture_output=True, text=True, check=True)
            samples[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"{args.file}: medians of {args.runs} fresh processes; µs per tensor (of which in GC, full collections)")
    phases = ("load", "touch", "next gc.collect()")
    print(f"{'loader':24}" + "".join(f"{p:>30}" for p in phases) + f"{'ready = load + touch':>24}")
    for name, runs in samples.items():
        n = runs[0]["tensors"]
        cells = []
        for ph in phases:
            us = statistics.median(r[ph] for r in runs) / n * 1e6
            gc_us = statistics.median(r[ph + " gc"] for r in runs) / n * 1e6
            full = statistics.median(r[ph + " full"] for r in runs)
            cells.append(f"{us:9.2f} ({gc_us:6.2f} GC, {full:g} full)")
        ready = statistics.median(r["load"] + r["touch"] for r in runs) / n * 1e6
        print(f"{name:24}" + "".join(f"{c:>30}" for c in cells) + f"{ready:24.2f}")


if __name__ == "__main__":
    main()
