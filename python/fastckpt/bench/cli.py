"""`fastckpt bench`: fastckpt against torch.load and safetensors on synthetic checkpoints."""

from __future__ import annotations

import argparse
import os
import sys
import time

from fastckpt.bench import contenders as contenders_mod
from fastckpt.bench import generate
from fastckpt.bench.generate import BenchError

FULL = ["llm-500m", "llm-2g", "small-1k", "small-10k", "small-100k", "moe-20k", "train-1g"]
QUICK = ["llm-250m", "small-10k"]
ALL_CONTENDERS = "all"
# The headline comparisons (eager and lazy torch.load, safetensors, eager and lazy fastckpt): what --quick
# and a run on the user's own files compare; the variants (pickle, file object, 2nd load) are for full runs.
CORE_CONTENDERS = "torch,torch-mmap,st-load,fastckpt,fastckpt-mmap"
# User files smaller than this run warm only (a cold load of a few MB times the disk's latency, not the
# loader) and 2 rounds, as --quick: the run is the workers' imports, not the loads.
SMALL_FILE_BYTES = 64 << 20
DEFAULT_OUT = "fastckpt-bench"
QUICK_TIME = "about 45 s"  # measured from a fresh clone on an idle 2-core machine: benchmarks/README.md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastckpt bench",
        description="Benchmark fastckpt.load against torch.load and safetensors: every load in a fresh process, "
                    "warm and cold page cache, checked for correctness; ratios measured side by side.",
        epilog="Checkpoints are generated once and cached (--cache-dir, default $FASTCKPT_BENCH_DIR or "
               "~/.cache/fastckpt-bench). Progress goes to stderr, the table to stdout; results.json and bench.png "
               f"to ./{DEFAULT_OUT}/ (--out).")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="your own .pt/.bin checkpoints to benchmark (instead of generated ones; .pt contenders only)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small representative run ({QUICK_TIME} on an idle 2-core machine): {', '.join(QUICK)}, "
                        f"warm, 2 rounds, contenders {CORE_CONTENDERS.replace(',', ', ')}")
    p.add_argument("-c", "--checkpoints", metavar="SPEC,...",
                   help="checkpoints to run, SCENARIO-SIZE[-DTYPE] (e.g. llm-2g,llm-100m-fp16,small-100k,moe-20k,"
                        f"train-1g); default: {','.join(FULL)}")
    p.add_argument("-s", "--scenario", metavar="NAME,...",
                   help=f"keep only these scenarios ({', '.join(generate.SCENARIOS)}) from the checkpoint list")
    p.add_argument("--contenders", metavar="ID,...",
                   help=f"ids ({', '.join(contenders_mod.CONTENDERS)}), all, safetensors (both), patterns such as "
                        f"'fastckpt*', or module:function (default: all; --quick, and FILE runs without st-load: "
                        f"{CORE_CONTENDERS.replace(',', ', ')})")
    p.add_argument("--mode", metavar="warm,cold",
                   help=f"page-cache states (default: warm,cold; --quick, and FILEs all under "
                        f"{SMALL_FILE_BYTES >> 20} MiB: warm)")
    p.add_argument("--device", metavar="cpu,cuda", help="targets (default: cpu, plus cuda:0 when available)")
    p.add_argument("-r", "--rounds", type=int, help="rounds per case: each contender once per round (default 3; "
                                                     f"--quick, and FILEs all under {SMALL_FILE_BYTES >> 20} MiB: 2)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help=f"where results.json and bench.png are written (default ./{DEFAULT_OUT}/)")
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="where generated checkpoints are kept")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the memcpy/page-cache/disk/H2D ceilings")
    p.add_argument("--list", action="store_true", help="list scenarios and contenders, then exit")
    return p


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def config_from_args(args: argparse.Namespace, log) -> "runner.Config":  # noqa: F821
    from fastckpt.bench import runner

    small_files = False
    if args.files:
        specs = [generate.UserFile(path) for path in args.files]
        small_files = all(_size(path) < SMALL_FILE_BYTES for path in args.files)
    else:
        specs = [generate.parse_spec(s) for s in (_split(args.checkpoints) if args.checkpoints
                                                  else QUICK if args.quick else FULL)]
    if args.scenario:
        wanted = _split(args.scenario)
        unknown = set(wanted) - set(generate.SCENARIOS)
        if unknown:
            raise BenchError(f"unknown scenario {', '.join(sorted(unknown))}: choose from {', '.join(generate.SCENARIOS)}")
        specs = [s for s in specs if s.scenario in wanted]
        if not specs:
            raise BenchError("no checkpoint left after --scenario; name some with --checkpoints")
    modes = _split(args.mode) if args.mode else ["warm"] if args.quick or small_files else ["warm", "cold"]
    if not modes or set(modes) - {"warm", "cold"}:
        raise BenchError(f"--mode takes warm, cold or both, not '{args.mode}'")
    rounds = args.rounds or (2 if args.quick or small_files else 3)
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    chosen, skipped = [], {}
    picked = contenders_mod.resolve(_split(args.contenders or (CORE_CONTENDERS if args.quick or args.files
                                                               else ALL_CONTENDERS)))
    if args.files and not args.contenders:  # a user's file has no .safetensors twin
        picked = [c for c in picked if c.fmt == "pt"]
    for c in picked:
        reason = contenders_mod.unavailable(c)
        if reason:
            skipped[c.id] = reason
            log(f"skipping contender {c.id}: {reason}")
        else:
            chosen.append(c)
    if not chosen:
        raise BenchError("no contender can run here (see the messages above)")
    return runner.Config(checkpoints=specs, contenders=chosen, skipped=skipped, modes=modes,
                         devices=_devices(args.device), rounds=rounds,
                         cache_dir=args.cache_dir or generate.default_cache_dir(), ceilings=not args.no_ceilings)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # missing: generate.ensure says so
        return 0


def _devices(text: str | None) -> list[str]:
    import torch

    if text is None:
        return ["cpu", "cuda:0"] if torch.cuda.is_available() else ["cpu"]
    devices = []
    for name in _split(text):
        if name == "cpu":
            devices.append(name)
        elif name.startswith("cuda"):
            index = int(name.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise BenchError(f"--device {name}: no such CUDA device here")
            devices.append(f"cuda:{index}")
        else:
            raise BenchError(f"--device takes cpu and cuda[:N], not '{name}'")
    return devices


def _check_writable(out: str) -> None:
    """Made before the run, so that a bad --out is said in a second, not after the whole run."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--out {out}: cannot make the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise BenchError(f"--out {out}: the folder is not writable")


def _list() -> str:
    lines = ["scenarios (checkpoint spec SCENARIO-SIZE[-DTYPE]):"]
    for s in generate.SCENARIOS.values():
        lines.append(f"  {s.name:<6} sized in {s.sized_in}, dtypes {'/'.join(s.dtypes)}: {s.models}")
    lines.append("contenders:")
    for c in contenders_mod.CONTENDERS.values():
        lines.append(f"  {c.id:<18} {c.label}{' (lazy on CPU)' if c.lazy else ''}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(_list())
        return 0

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    from fastckpt.bench import report, runner

    try:
        config = config_from_args(args, log)
        _check_writable(args.out)
        results = runner.run(config, log)
    except BenchError as e:
        print(f"fastckpt bench: {e}", file=sys.stderr)
        return 2
    print(report.format_table(results), flush=True)
    written = ["results.json"]
    report.write_json(results, os.path.join(args.out, "results.json"))
    try:
        report.plot(results, os.path.join(args.out, "bench.png"))
        written.append("bench.png")
    except ImportError:
        log("no plot: matplotlib is not installed (pip install matplotlib)")
        if os.path.exists(os.path.join(args.out, "bench.png")):  # an earlier run's: it would not match
            os.remove(os.path.join(args.out, "bench.png"))
    shown = args.out if os.path.isabs(args.out) or args.out.startswith(".") else os.path.join(".", args.out)
    folder = os.path.join(shown, "")
    log(f"done in {time.perf_counter() - started:.1f} s: the table above; {' and '.join(written)} in {folder}")
    wrong = [cid for case in results["cases"] for cid, s in case["summary"].items() if s["correct"] is False]
    return 1 if wrong else 0
