"""fastckpt.verify against one zlib.crc32 pass over a mapping of the same (warm) file, and against
the page-cache read ceiling (pread into pre-faulted buffers on all cores, as `fastckpt bench` measures it):

    python benchmarks/bench_verify.py [FILE] [--runs 5]

FILE defaults to the harness's generated llm-2g checkpoint (``fastckpt bench -c llm-2g`` makes it).
Prints the median seconds and GB/s of each, alternating, the zlib / fastckpt.verify(threads=1) ratio
and fastckpt.verify() (all cores) as a fraction of the ceiling.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
import zlib

import fastckpt
from fastckpt.bench import ceilings
from fastckpt.bench.generate import default_cache_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", default=os.path.join(default_cache_dir(), "llm-2g.pt"))
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    with open(args.file, "rb") as f:
        while f.read(1 << 24):  # warm the page cache
            pass

    def zlib_pass():
        with open(args.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            zlib.crc32(m)

    size = os.path.getsize(args.file)
    contenders = {"page-cache read ceiling": lambda: ceilings.read_file(args.file, size, ceilings.cores(),
                                                                       ceilings.WARM_BLOCK),
                  "zlib.crc32 over a mapping": zlib_pass,
                  "fastckpt.verify(threads=1)": lambda: fastckpt.verify(args.file, threads=1),
                  "fastckpt.verify()": lambda: fastckpt.verify(args.file)}
    times = {name: [] for name in contenders}
    for _ in range(args.runs):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    gb = size / 1e9
    for name, t in times.items():
        print(f"{name:<28} median {statistics.median(t):.3f} s  {gb / statistics.median(t):5.1f} GB/s")
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"zlib / fastckpt.verify(threads=1): {median['zlib.crc32 over a mapping'] / median['fastckpt.verify(threads=1)']:.2f}x; "
          f"fastckpt.verify() at {median['page-cache read ceiling'] / median['fastckpt.verify()']:.2f}x the page-cache "
          f"read ceiling ({ceilings.cores()} cores; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
