#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA device (sized for an H100/H200 with 16 cores, 128 GiB,
# and the device image as it is: whatever torch is installed, nothing fetched). Within BUDGET_S:
# builds and installs this checkout with the image's CMake/ninja/pybind11/scikit-build-core, runs
# the CUDA tests, then benchmarks/gpu_check.py (an 8 GB bf16 checkpoint: correctness of every row
# against torch.load(map_location="cuda"), the warm staged load against min(pinned H2D,
# pread-into-pinned) measured in the same run, the speed-up over torch.load, a cold row, a
# fastckpt.save of CUDA tensors), writing $OUT/results.json after every case and printing one line.
#
# Exit status: 0 when every check passes; 1 when one fails or a target is missed; 2 when the build
# fails; 77 on a machine without a CUDA device (checked first, before anything is built).
#
# Environment: PYTHON (default python3), OUT (default ./gpu-check-out), FASTCKPT_BENCH_DIR (where the
# checkpoints go, on disk, not tmpfs; default ./.gpu-check-data), BUDGET_S (default 470).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
export FASTCKPT_BENCH_DIR=${FASTCKPT_BENCH_DIR:-$PWD/.gpu-check-data}
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))

"$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    print("gpu_check: no CUDA device: torch cannot be imported here", file=sys.stderr)
    sys.exit(77)
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); nothing checked",
          file=sys.stderr)
    sys.exit(77)
EOF
rc=$?
((rc == 0)) || exit "$rc"

mkdir -p "$OUT"
left() { echo $((DEADLINE - SECONDS)); }

echo "== build and install (at most 180 s)" >&2
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if ! timeout 180 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q . >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log" >&2
  echo "gpu_check: the build failed (see $OUT/build.log)" >&2
  exit 2
fi

# From outside the checkout, so `import fastckpt` is the installed build, not python/fastckpt.
exec "$PY" "$PWD/benchmarks/gpu_check.py" --out "$OUT" --repo "$PWD" --deadline-s "$(left)"
