"""Physical ceilings, measured in the same run as the loads: `python -m fastckpt.bench.ceilings REQUEST_JSON`.

They are the denominators of "% of ceiling", each the fastest way this machine can do the job, so a
load can approach a ceiling but not beat it:
- warm eager: populate fresh memory (`MADV_POPULATE_WRITE`) a block at a time and fill each block
  from the page cache with pread right after, on all cores — an eager load cannot do less;
- warm lazy: map the page cache, fault it in on all cores (`MADV_POPULATE_READ`), touch a byte per page;
- cold: read the evicted file into pre-faulted buffers with the reader configuration (threads x
  block size x O_DIRECT or read-ahead hints) that a brief search finds fastest, reported with the figure;
- CUDA: a pinned host-to-device copy.
Every reader uses os.preadv from Python threads: the GIL is released for each (MiB-sized) call, so
Python costs nothing measurable here.

Request: {"files": [path, ...], "cuda": "cuda:0" | null, "bytes": buffer size, "cold": bool (search for the
cold-read ceiling: only runs with cold cases need it)}. Reply: GB/s figures.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import threading
import time

FILE_CAP = 1 << 30  # bandwidth is flat beyond this: no need to read all of a big file
SEARCH_CAP = 256 << 20  # each configuration of the cold search reads this much
SEARCH_THREADS = (1, 2, 4, 8)
SEARCH_BLOCKS = (1 << 20, 4 << 20, 16 << 20)
SEARCH_AHEAD = (0, 64 << 20)  # POSIX_FADV_WILLNEED this far ahead of each read (the copy engine's hint)
FINALISTS = 3  # the fastest configurations of the search, measured again over FILE_CAP
WARM_BLOCK = 4 << 20
# Linux 5.14; older kernels refuse them and the pages fault one by one instead.
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23

_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL: madvise runs in parallel
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    result = memory(request["bytes"])
    result["files"] = {path: file_ceilings(path, request.get("cold", True)) for path in request["files"]}
    if request.get("cuda"):
        result.update(host_to_device(request["cuda"], request["bytes"]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


def cores() -> int:
    return len(os.sched_getaffinity(0))


def best_gbps(nbytes: int, fn, repeat: int = 3) -> float:
    return nbytes / min(fn() for _ in range(repeat)) / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Mapping:
    """A mapping made by hand: fresh anonymous memory (never faulted), or with `fd` the file's page cache
    read-only; unmapped on exit. The address is needed for madvise, which Python's mmap cannot run in
    parallel."""

    def __init__(self, nbytes: int, fd: int = -1):
        self.nbytes = nbytes
        prot, flags = ((mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if fd < 0
                       else (mmap.PROT_READ, mmap.MAP_SHARED))
        self.addr = _libc.mmap(None, nbytes, prot, flags, fd, 0)
        if self.addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        length = self.nbytes - offset if length is None else length
        return memoryview((ctypes.c_ubyte * length).from_address(self.addr + offset)).cast("B")

    def populate(self, offset: int = 0, length: int | None = None, advice: int = MADV_POPULATE_WRITE) -> None:
        _libc.madvise(self.addr + offset, self.nbytes - offset if length is None else length, advice)

    def populate_on_all_cores(self, advice: int = MADV_POPULATE_WRITE) -> None:
        shares = _shares(self.nbytes, cores(), mmap.PAGESIZE)
        _parallel(len(shares), lambda i: self.populate(shares[i][0], shares[i][1] - shares[i][0], advice))

    def close(self) -> None:
        _libc.munmap(self.addr, self.nbytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parallel(threads: int, work) -> float:
    """Seconds for `work(i)` on threads i = 0..threads-1, all started together."""
    if threads == 1:
        return _timed(lambda: work(0))
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - t0


def _shares(size: int, threads: int, align: int) -> list[tuple[int, int]]:
    """[offset, end) of each thread's contiguous share of `size` bytes, offsets aligned."""
    step = -(-size // threads // align) * align
    return [(i * step, min(size, (i + 1) * step)) for i in range(threads) if i * step < size]


def read_file(path: str, size: int, threads: int, block: int, direct: bool = False, into: _Mapping | None = None,
              ahead: int = 0) -> float:
    """Seconds to read [0, size) of `path`: each thread reads its contiguous share in file order, `block`
    bytes per pread, into its part of `into` (each block populated just before it is read, on the clock:
    the zeroed pages are still in cache when the copy lands, 1.6x faster here than populating the whole
    share first), or else again and again into its own pre-faulted block-sized buffer. With `ahead`,
    each read first asks the kernel (POSIX_FADV_WILLNEED) for the share's bytes up to `ahead` past it."""
    shares = _shares(size, threads, block)
    buffers = [] if into else [_Mapping(block) for _ in shares]
    for b in buffers:
        b.view()[:] = bytes(block)  # pre-faulted: the reads measure the page cache or the disk
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))  # O_DIRECT: buffers are page-aligned

    def work(i: int) -> None:
        begin, end = shares[i]
        hinted = begin
        for off in range(begin, end, block):
            if ahead and hinted < end:
                upto = min(end, off + ahead)
                if upto > hinted:
                    os.posix_fadvise(fd, hinted, upto - hinted, os.POSIX_FADV_WILLNEED)
                    hinted = upto
            if into:
                into.populate(off, min(block, end - off))
                os.preadv(fd, [into.view(off, min(block, end - off))], off)
            else:  # whole pages, as O_DIRECT wants: the buffer holds a block
                os.preadv(fd, [buffers[i].view(0, min(block, -(-(end - off) // mmap.PAGESIZE) * mmap.PAGESIZE))], off)

    try:
        return _parallel(len(shares), work)
    finally:
        os.close(fd)
        for b in buffers:
            b.close()


def memory(nbytes: int) -> dict:
    """memcpy between pre-faulted buffers on one core, and populating fresh memory on all cores."""
    with _Mapping(nbytes) as src, _Mapping(nbytes) as dst:
        src.view()[:] = b"\1" * nbytes
        dst.view()[:] = bytes(nbytes)

        def copy() -> None:
            dst.view()[:] = src.view()

        memcpy = best_gbps(nbytes, lambda: _timed(copy))

    def populate() -> float:
        with _Mapping(nbytes) as fresh:
            return _timed(fresh.populate_on_all_cores)

    return {"memcpy_1core": memcpy, "populate": best_gbps(nbytes, populate)}


def file_ceilings(path: str, cold: bool = True) -> dict:
    from fastckpt.bench import coldcache

    size = min(os.path.getsize(path), FILE_CAP)
    coldcache.warm(path)

    def warm_eager() -> float:
        with _Mapping(size) as fresh:
            return read_file(path, size, cores(), WARM_BLOCK, into=fresh)

    out = {
        "pagecache_read": best_gbps(size, lambda: read_file(path, size, cores(), WARM_BLOCK), repeat=2),
        "warm_eager": best_gbps(size, warm_eager, repeat=5),
        "pagecache_map": best_gbps(os.path.getsize(path), lambda: map_and_touch(path), repeat=5),
    }
    out.update(cold_read(path, size) if cold else {"cold_read": None, "cold_read_note": "no cold runs"})
    return out


def cold_read(path: str, size: int) -> dict:
    """The fastest cold reader: every configuration once over SEARCH_CAP bytes, the fastest few again over
    `size`; each read starts from an evicted file."""
    from fastckpt.bench import coldcache

    def cold(config: tuple, nbytes: int) -> float | None:
        coldcache.evict(path)
        if coldcache.resident_fraction(path) > coldcache.COLD_TOLERANCE:
            return None
        threads, block, direct, ahead = config
        return nbytes / read_file(path, nbytes, threads, block, direct, ahead=ahead) / 1e9

    search = min(size, SEARCH_CAP)
    direct = _direct_works(path)
    configs = [(t, b, False, a) for a in SEARCH_AHEAD for t in SEARCH_THREADS for b in SEARCH_BLOCKS]
    configs += [(t, b, True, 0) for t in SEARCH_THREADS for b in SEARCH_BLOCKS if direct]
    found = {config: cold(config, search) for config in configs}
    if None in found.values():
        return {"cold_read": None, "cold_read_note": "eviction not honoured"}
    finalists = sorted(configs, key=found.get, reverse=True)[:FINALISTS]
    gbps, (threads, block, direct, ahead) = max((cold(c, size) or 0.0, c) for c in finalists)
    return {"cold_read": gbps, "cold_read_config": {"threads": threads, "block": block, "direct": direct, "ahead": ahead},
            "cold_read_search": [{"threads": t, "block": b, "direct": d, "ahead": a, "gbps": found[t, b, d, a]}
                                 for t, b, d, a in configs]}


def _direct_works(path: str) -> bool:
    """Whether the file system takes O_DIRECT (tmpfs, for one, refuses it)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def map_and_touch(path: str) -> float:
    """Seconds to map the file, fault its pages in on all cores (MADV_POPULATE_READ) and read a byte per
    page; unmapping is left off the clock, as a load leaves it to whoever frees the tensors."""
    import numpy as np

    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        with _Mapping(os.fstat(fd).st_size, fd) as m:
            m.populate_on_all_cores(MADV_POPULATE_READ)
            np.frombuffer(m.view(), dtype=np.uint8)[::mmap.PAGESIZE].sum()
            return time.perf_counter() - t0
    finally:
        os.close(fd)


def host_to_device(device: str, nbytes: int) -> dict:
    import torch

    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {"gpu": torch.cuda.get_device_name(device)}
    for name, pinned in (("h2d_pinned", True), ("h2d_pageable", False)):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)

        def copy():
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)

        copy()  # warm-up: first use of the copy engines and of the driver's staging buffers
        out[name] = best_gbps(nbytes, copy)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
