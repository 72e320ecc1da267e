"""The torch-free reader and the converter against the torch route, each run in a fresh process:

    python benchmarks/bench_reader.py [--cases convert,open,import] [--llm-mb 2048] [--small 100000]
                                      [--rounds 3] [--dir DIR]

``convert``: a Llama-like bf16 ``.bin`` of about --llm-mb MB to ``.safetensors`` — ``fastckpt.convert``
against ``torch.load`` + ``safetensors.torch.save_file``: wall time and peak RSS (ru_maxrss).
``open``: --small tensors of 16 fp32, every tensor as a numpy array — ``fastckpt.open(framework="numpy")``
against ``torch.load(mmap=True)`` + ``.numpy()`` (weights_only, as torch.load's default).
``import``: ``import fastckpt`` in a process where torch cannot be imported.
Contenders alternate within each round; medians and per-round ratios are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
case, contender, src, dst = sys.argv[1:5]
if contender == "import":
    sys.modules["torch"] = None  # torch cannot be imported
    t0 = time.perf_counter()
    import fastckpt  # noqa: F401
    print(json.dumps({"s": time.perf_counter() - t0, "rss": 0}))
    raise SystemExit
def peak_rss():  # VmHWM: unlike ru_maxrss it starts afresh at exec
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
if contender.startswith("fastckpt"):
    import fastckpt
    import fastckpt.converter, fastckpt.reader  # noqa: E401,F401  (imports are not timed, as torch's)
else:
    import torch
    if case == "convert":
        from safetensors.torch import save_file
t0 = time.perf_counter()
if case == "convert":
    if contender == "fastckpt":
        fastckpt.convert(src, dst)
    else:
        save_file(torch.load(src, weights_only=True), dst, metadata={"format": "pt"})
else:
    if contender == "fastckpt":
        with fastckpt.open(src, framework="numpy") as f:
            arrays = [f.get_tensor(k) for k in f.keys()]
    else:
        arrays = [t.numpy() for t in torch.load(src, mmap=True, weights_only=True).values()]
    total = sum(float(a[0]) for a in arrays)  # touch every array
elapsed = time.perf_counter() - t0
print(json.dumps({"s": elapsed, "rss": peak_rss()}))
"""


def make_files(case: str, args, folder: str) -> str:
    import torch

    torch.manual_seed(0)
    path = os.path.join(folder, f"{case}.bin")
    if case == "convert":
        hidden, sd, total, i = 2048, {}, 0, 0
        while total < args.llm_mb << 20:
            for name, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                                ("o", (hidden, hidden)), ("up", (4 * hidden, hidden)), ("down", (hidden, 4 * hidden))):
                sd[f"layers.{i}.{name}.weight"] = torch.randn(shape, dtype=torch.bfloat16)
                total += sd[f"layers.{i}.{name}.weight"].nbytes
            i += 1
        torch.save(sd, path)
    else:
        torch.save({f"t{i}": torch.randn(16) for i in range(args.small)}, path)
    return path


def run(case: str, contender: str, src: str, dst: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, case, contender, src, dst], capture_output=True, text=True,
                         check=True)
    if os.path.exists(dst):
        os.remove(dst)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="convert,open,import")
    p.add_argument("--llm-mb", type=int, default=2048)
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for case in args.cases.split(","):
            contenders = ["import"] if case == "import" else ["fastckpt", "torch"]
            src = make_files(case, args, folder) if case != "import" else ""
            samples = {c: [] for c in contenders}
            for r in range(args.rounds):
                for c in contenders if r % 2 == 0 else contenders[::-1]:
                    samples[c].append(run(case, c, src, os.path.join(folder, "out.safetensors")))
            row = {"case": case, "load_avg": os.getloadavg()[0]}
            for c, s in samples.items():
                row[c] = {"median_s": statistics.median(x["s"] for x in s),
                          "peak_rss_mb": max(x["rss"] for x in s) / 2**20}
            if "torch" in samples:
                row["time_ratio_per_round"] = [f["s"] / t["s"] for f, t in zip(samples["fastckpt"], samples["torch"])]
                if case == "convert":
                    row["fastckpt_peak_rss_over_file"] = row["fastckpt"]["peak_rss_mb"] / (os.path.getsize(src) / 2**20)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
