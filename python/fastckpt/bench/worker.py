"""One load in a fresh process: `python -m fastckpt.bench.worker REQUEST_JSON`.

A fresh process per load, because a second load in the same process reuses heap memory that the
first one already faulted in (glibc grows its mmap threshold), which hides most of an eager load's
cost. The worker imports everything (torch, the contender's library, a CUDA context), prints
`ready`, and waits for a line on stdin before it evicts/checks the page cache and starts the clock:
so the runner can let a batch of workers import side by side and then time them one at a time,
with the others idle. It prints the result as one JSON line; the digest is computed after the clock
stops. (With stdin at EOF it does not wait: `... < /dev/null` runs it by hand.)

Request: {"contender": id, "path": file, "device": "cpu" | "cuda:N", "cold": bool}.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

PAGE = 4096


def main(argv: list[str]) -> int:
    try:
        request = json.loads(argv[0])
        load = prepare(request)
        print("ready", flush=True)
        sys.stdin.readline()
        result = measure(request, load)
    except Exception as e:  # reported to the runner as a failed sample; the run goes on
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


def prepare(request: dict):
    """Everything that must not be timed: imports, the contender's setup, the CUDA context."""
    import numpy.ctypeslib  # noqa: F401  (used by touch(); importing it there would be timed)
    import torch

    from fastckpt.bench import contenders

    load = contenders.get(request["contender"]).make(request["path"], request["device"])
    if request["device"].startswith("cuda"):
        torch.zeros(1, device=request["device"])
        torch.cuda.synchronize(request["device"])
        torch.cuda.reset_peak_memory_stats(request["device"])
    return load


def measure(request: dict, load) -> dict:
    import torch

    from fastckpt.bench import coldcache
    from fastckpt.bench.digest import digest

    path, device = request["path"], request["device"]
    cuda = device.startswith("cuda")
    result = check_residency(path, request["cold"])
    if result["status"] != "ok":
        return result

    peak_reset = _reset_peak_rss()
    rss_base = _status_bytes("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    obj = load()
    if cuda:
        torch.cuda.synchronize(device)
    t1, c1 = time.perf_counter(), time.process_time()
    rss_load = _status_bytes("VmHWM")
    touched = 0 if cuda else touch(obj)
    t2, c2 = time.perf_counter(), time.process_time()

    result.update(
        load_s=t1 - t0,
        ready_s=t2 - t0,
        cpu_load_s=c1 - c0,
        cpu_ready_s=c2 - c0,
        rss_base=rss_base,
        rss_load=rss_load,
        rss_ready=_status_bytes("VmHWM"),
        rss_peak_reset=peak_reset,
        rss_anon=_status_bytes("RssAnon"),
        rss_file=_status_bytes("RssFile"),
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        touched_bytes=touched,
        resident_after=coldcache.resident_fraction(path),
    )
    if cuda:
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    result["digest"] = digest(obj)
    if not cuda and not request["cold"]:
        result["map_gbps"] = map_ceiling(path)
    return result


def map_ceiling(path: str) -> float:
    """The page-cache map ceiling (GB/s) in the page cache's state of the load just measured.

    Mapping a cached file costs a page-table entry per folio the cache holds it in, and the folios'
    sizes come from how the file last entered the cache (4 KiB to 2 MiB here: 14 to 145 GB/s for the
    same 2 GB file), so a ceiling measured at another moment compares different states.
    """
    from fastckpt.bench.ceilings import best_gbps, map_and_touch

    return best_gbps(os.path.getsize(path), lambda: map_and_touch(path), repeat=2)


def check_residency(path: str, cold: bool) -> dict:
    """Evict for a cold run, then count resident pages: a cold run that finds the file cached is not timed."""
    from fastckpt.bench import coldcache

    if cold:
        coldcache.evict(path)
    resident = coldcache.resident_fraction(path)
    if cold and resident > coldcache.COLD_TOLERANCE:
        return {"status": "not-cold", "resident_before": resident}
    return {"status": "ok", "resident_before": resident}


def touch(obj) -> int:
    """Read one byte per 4 KiB page (and the last byte) of every CPU tensor's bytes; returns how many
    distinct bytes that covers (views of one storage count once).

    This is what makes a lazy (mmap) load comparable with an eager one: afterwards every page a tensor
    uses is resident and mapped. The reads are one numpy gather rather than a torch op per tensor, and
    the extents come from attributes that make no object (`untyped_storage()` makes a tensor's first
    Python storage object, tracked by the garbage collector: 100k of them set off collections that
    cost ~1.6 µs per tensor after a 100k-tensor load), so the harness adds ~1 µs per tensor, not 2.
    """
    import ctypes

    import numpy as np
    import torch

    extents = {}  # start address -> bytes
    stack = [obj]
    while stack:
        leaf = stack.pop()
        if isinstance(leaf, dict):
            stack.extend(leaf.values())
        elif isinstance(leaf, (list, tuple)):
            stack.extend(leaf)
        elif isinstance(leaf, torch.Tensor) and leaf.is_cpu and leaf.layout == torch.strided:
            if leaf.is_contiguous():
                start, nbytes = leaf.data_ptr(), leaf.nbytes
            else:  # a view with gaps: its whole storage
                storage = leaf.untyped_storage()
                start, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes > extents.get(start, 0):
                extents[start] = nbytes
    if not extents:
        return 0
    starts = np.fromiter(extents.keys(), dtype=np.int64, count=len(extents))
    sizes = np.fromiter(extents.values(), dtype=np.int64, count=len(extents))
    pages = -(-sizes // PAGE)
    page_in_storage = np.arange(pages.sum()) - np.repeat(np.cumsum(pages) - pages, pages)
    addresses = np.concatenate([np.repeat(starts, pages) + page_in_storage * PAGE, starts + sizes - 1])
    base = int(addresses.min())
    # A byte array spanning all the storages; the gather reads only the chosen addresses, never the gaps.
    memory = np.ctypeslib.as_array((ctypes.c_ubyte * (int(addresses.max()) - base + 1)).from_address(base))
    memory[addresses - base].sum()
    order = np.argsort(starts)
    starts, ends = starts[order], starts[order] + sizes[order]
    covered_before = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]])
    return int(np.clip(ends - np.maximum(starts, covered_before), 0, None).sum())


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (VmHWM) to the current RSS, so that it measures the load alone.

    ru_maxrss cannot be used for that: it starts at the parent's RSS at fork time and also keeps
    the peak of the imports.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown (torch's takes a few tenths of a second): the runner waits for this exit
    # before it starts the next timed load.
    os._exit(status)
