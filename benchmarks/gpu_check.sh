#!/usr/bin/env bash
# One command for a GPU machine (sized for 1x H100/H200, 16 cores, 128 GiB, within 8 minutes):
# build and install fastckpt, run the CUDA tests, run the CUDA benchmark rows on a generated 8 GB
# bf16 LLM-shaped checkpoint (warm and cold page cache, pinned and pageable H2D ceilings measured in
# the same run), and print a one-line summary. Run from anywhere: benchmarks/gpu_check.sh
#
# Environment: PYTHON (default python3), OUT (default ./gpu-check-out), FASTCKPT_BENCH_DIR (where
# the 16 GB of .pt + .safetensors files go; default $TMPDIR/fastckpt-bench), ROUNDS (default 1),
# BUDGET_S (default 470: every step's timeout is cut to what is left of it).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
ROUNDS=${ROUNDS:-1}  # 28 fresh-process loads of 8 GB at 1; ROUNDS=3 for medians when time allows
export FASTCKPT_BENCH_DIR=${FASTCKPT_BENCH_DIR:-${TMPDIR:-/tmp}/fastckpt-bench}
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))
mkdir -p "$OUT" "$FASTCKPT_BENCH_DIR"

step() {  # step NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logging to $OUT/NAME.log
  local name=$1 cap=$2 left=$((DEADLINE - SECONDS))
  shift 2
  ((left > 10)) || { echo "gpu_check: no time left for $name" >&2; exit 124; }
  ((cap < left)) || cap=$left
  echo "== $name (at most ${cap} s)" >&2
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
}

has_cuda_torch() {
  "$PY" - <<'EOF' 2>/dev/null
import torch, sys
sys.exit(0 if torch.__version__.startswith("2.13") and torch.cuda.is_available() else 1)
EOF
}

# torch: keep an installed torch 2.13 that sees the GPU; otherwise install it. On Linux x86_64 the
# PyPI wheel of torch 2.13.0 is the CUDA build, but its CUDA runtime comes as dependencies
# (nvidia-* wheels): install with dependencies (a `pip download --no-deps torch==2.13.0` gets a
# wheel that cannot run on its own).
if ! has_cuda_torch; then
  step install-torch 240 "$PY" -m pip install -q "torch==2.13.0"
  has_cuda_torch || { echo "gpu_check: torch 2.13 with CUDA is not usable here (no GPU, or a CPU build)" >&2; exit 2; }
fi
if ! "$PY" -c "import scikit_build_core, pybind11, cmake, ninja, numpy, ml_dtypes, pytest, safetensors" 2>/dev/null; then
  step build-deps 180 "$PY" -m pip install -q "torch==2.13.0" scikit-build-core pybind11 cmake ninja numpy ml_dtypes \
    pytest safetensors
fi
step install 180 "$PY" -m pip install -q --no-build-isolation --no-deps .
"$PY" -c "import torch, fastckpt; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'fastckpt', fastckpt.__version__)" | tee "$OUT/versions.txt"

# The CUDA tests: -p no:cacheprovider keeps the checkout clean; a failure is reported, not fatal,
# so the benchmark still runs and the summary says what failed.
set +e
step tests 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_devices.py tests/test_cuda.py
tests_rc=$?
set -e

step bench 330 "$PY" -m fastckpt bench -c llm-8g-bf16 --device cuda:0 --mode warm,cold -r "$ROUNDS" \
  --contenders torch,torch-mmap,torch-mmap-to,st-load,st-open,fastckpt,fastckpt-mmap --out "$OUT" || true

"$PY" - "$OUT" "$tests_rc" <<'EOF'
import json, os, re, sys

out, tests_rc = sys.argv[1], int(sys.argv[2])
log = open(os.path.join(out, "tests.log")).read()
counts = re.findall(r"(\d+) (passed|failed|skipped|error)", log)
tests = ", ".join(f"{n} {what}" for n, what in counts) or "no result"
line = [f"gpu_check: tests {'ok' if tests_rc == 0 else 'FAILED'} ({tests})"]
path = os.path.join(out, "results.json")
if not os.path.exists(path):
    line.append("bench: no results (see bench.log)")
else:
    results = json.load(open(path))
    for case in results["cases"]:
        s = case["summary"].get("fastckpt")
        if not s or not s["ok"]:
            line.append(f"{case['mode']}: fastckpt did not run")
            continue
        ratios = {(r["a"], r["b"]): r["median"] for r in case["ratios"] if r["metric"] == "ready_s"}
        ceiling = s["ceiling"]
        vs = " ".join(f"{1 / ratios[('fastckpt', b)]:.1f}x {b}" for b in ("torch", "st-load") if ("fastckpt", b) in ratios)
        line.append(f"{case['mode']}: fastckpt {s['gbps']:.1f} GB/s"
                    + (f" = {ceiling['percent']:.0f}% of {ceiling['name']} {ceiling['gbps']:.1f} GB/s" if ceiling else "")
                    + f", speed-up: {vs}, +RSS {s['rss_growth_bytes']['median'] / 1e6:.0f} MB"
                    + (f", dev peak {s['cuda_max_allocated']['median'] / 1e9:.2f} GB" if s["cuda_max_allocated"] else "")
                    + ("" if s["correct"] else ", WRONG RESULT"))
    c = results.get("ceilings") or {}
    if "h2d_pageable" in c:
        line.append(f"H2D pinned {c['h2d_pinned']:.1f} / pageable {c['h2d_pageable']:.1f} GB/s")
print(" | ".join(line))
EOF
exit "$tests_rc"
