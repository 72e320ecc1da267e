"""CRC-32 throughput: fastckpt against zlib and ISA-L, side by side in one run.

    python benchmarks/bench_crc32.py [--size-mib 256] [--repeats 7] [--threads N] [--json out.json]

Each repetition times every library once on the same buffer, in a rotating
order, so the ratios compare runs taken seconds apart on a noisy machine. Two
modes: one thread over the whole buffer (timed by the wall clock and by the
thread's CPU time, which other processes on a shared machine disturb less),
and N Python threads (default: every CPU this process may use) each over its
own 1/N of the buffer, which only scales when the call releases the GIL; that
is checked separately and reported. Ratios are computed per repetition, then summarised as median and
min-max. Before timing, the three checksums must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import zlib

from fastckpt import _native


def _libraries() -> dict:
    libs = {"fastckpt": _native.crc32, "zlib": zlib.crc32}
    try:
        from isal import isal_zlib

        libs["isal"] = isal_zlib.crc32
    except ImportError:
        print("isal is not installed: ISA-L column left out (pip install isal)", file=sys.stderr)
    return libs


def _make_buffer(size: int) -> bytearray:
    # Incompressible-looking bytes, every page touched before timing.
    block = os.urandom(1 << 20)
    buf = bytearray(size)
    view = memoryview(buf)
    for start in range(0, size, len(block)):
        n = min(len(block), size - start)
        view[start : start + n] = block[:n]
    return buf


def _one_thread(fn, view) -> tuple[float, float]:
    """Wall time and this thread's CPU time for one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn(view)
    return time.perf_counter() - wall, time.thread_time() - cpu


def _all_threads(fn, chunks) -> float:
    barrier = threading.Barrier(len(chunks) + 1)

    def worker(chunk):
        barrier.wait()
        fn(chunk)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def _spin(seconds: float) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        count += 1
    return count, time.perf_counter() - start


def releases_gil(fn, view, seconds: float = 0.3) -> float:
    """Share of its usual speed that a pure-Python loop keeps while another
    thread runs `fn` over `view` back to back: near 0 when `fn` holds the GIL
    (the loop only runs between calls), near 1 when it releases it (given a
    free core). A short switch interval makes the two cases far apart."""
    base_count, base_time = _spin(0.1)
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            fn(view)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        t = threading.Thread(target=hammer)
        t.start()
        time.sleep(0.01)  # let the hammer thread get into its first call
        count, elapsed = _spin(seconds)
        stop.set()
        t.join()
    finally:
        sys.setswitchinterval(interval)
    return (count / elapsed) / (base_count / base_time)


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(size_mib: int, repeats: int, threads: int) -> dict:
    size = size_mib << 20
    libs = _libraries()
    buf = _make_buffer(size)
    view = memoryview(buf)
    chunk = -(-size // threads)
    chunks = [view[i : i + chunk] for i in range(0, size, chunk)]

    checksums = {name: fn(view) for name, fn in libs.items()}
    if len(set(checksums.values())) != 1:
        raise SystemExit(f"checksums disagree: { {k: hex(v) for k, v in checksums.items()} }")

    names = list(libs)
    all_threads = f"{threads} threads, wall"
    modes = ("1 thread, wall", "1 thread, CPU time", all_threads)
    gbps = {mode: {name: [] for name in names} for mode in modes}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            wall, cpu = _one_thread(libs[name], view)
            gbps[modes[0]][name].append(size / wall / 1e9)
            gbps[modes[1]][name].append(size / cpu / 1e9)
            gbps[all_threads][name].append(size / _all_threads(libs[name], chunks) / 1e9)

    ratios = {}
    for mode, per_lib in gbps.items():
        for other in names[1:]:
            per_rep = [f / o for f, o in zip(per_lib["fastckpt"], per_lib[other])]
            ratios[f"{mode}: fastckpt/{other}"] = _summary(per_rep)

    gil = {name: releases_gil(fn, view) for name, fn in libs.items()}

    return {
        "size_mib": size_mib,
        "repeats": repeats,
        "threads": threads,
        "fastckpt_implementation": _native.crc32_implementation(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "checksum": f"{checksums['fastckpt']:08x}",
        "checksums_agree": True,
        "gbps": {mode: {n: _summary(v) | {"all": v} for n, v in per_lib.items()} for mode, per_lib in gbps.items()},
        "ratios": ratios,
        "gil_free_share": gil,
    }


def print_report(r: dict) -> None:
    print(
        f"CRC-32 over {r['size_mib']} MiB, {r['repeats']} interleaved repetitions; "
        f"fastckpt uses {r['fastckpt_implementation']}; {r['cpu']}; checksums agree ({r['checksum']})"
    )
    modes = list(r["gbps"])
    print(f"{'GB/s, median [min-max]':<24}" + "".join(f"{m:>22}" for m in modes) + f"{'GIL released?':>22}")
    for name in r["gbps"][modes[0]]:
        share = r["gil_free_share"][name]
        verdict = "yes" if share > 0.3 else "no"
        row = "".join(f"{_fmt(r['gbps'][m][name]):>22}" for m in modes)
        print(f"{name:<24}{row}{verdict:>10} ({share:.2f} kept)")
    print("ratios per repetition, median [min-max]:")
    for key, s in r["ratios"].items():
        print(f"  {key:<42} {_fmt(s, 2)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=256, help="buffer size (default 256)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (default 7)")
    p.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        help="threads for the all-threads mode (default: usable CPUs)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.size_mib <= 0 or args.repeats <= 0 or args.threads <= 0:
        p.error("--size-mib, --repeats and --threads must be positive")
    result = run(args.size_mib, args.repeats, args.threads)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
