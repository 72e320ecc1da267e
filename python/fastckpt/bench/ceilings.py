"""Physical ceilings, measured in the same run as the loads: `python -m fastckpt.bench.ceilings REQUEST_JSON`.

They are the denominators of "% of ceiling": a warm eager load cannot beat reading the page cache
into memory, a warm lazy one cannot beat mapping it, a cold one cannot beat reading the disk, a CUDA
one cannot beat a pinned host-to-device copy. First touch is shown because it, not memcpy, bounds
any load that copies into fresh memory on these machines (4 KiB page faults).

Request: {"files": [path, ...], "cuda": "cuda:0" | null, "bytes": buffer size}. Reply: GB/s figures.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time

CHUNK = 64 << 20  # read size for the file ceilings, as a loader reading big records would use
FILE_CAP = 1 << 30  # bandwidth is flat beyond this: no need to read all of a big file


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    result = memory(request["bytes"])
    result["files"] = {path: file_ceilings(path) for path in request["files"]}
    if request.get("cuda"):
        result.update(host_to_device(request["cuda"], request["bytes"]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


def _best_gbps(nbytes: int, fn, repeat: int = 3) -> float:
    best = min(_timed(fn) for _ in range(repeat))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _anonymous(nbytes: int):
    """Plain anonymous memory, as torch's CPU allocator gets it (numpy would madvise huge pages)."""
    import numpy as np

    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def memory(nbytes: int) -> dict:
    import numpy as np

    src, dst = _anonymous(nbytes), _anonymous(nbytes)
    src.fill(1)
    dst.fill(0)

    def first_touch():
        _anonymous(nbytes).fill(1)

    return {
        "memcpy_1core": _best_gbps(nbytes, lambda: np.copyto(dst, src)),
        "first_touch": _best_gbps(nbytes, first_touch),
    }


def file_ceilings(path: str) -> dict:
    from fastckpt.bench import coldcache

    size = min(os.path.getsize(path), FILE_CAP)
    buffer = _anonymous(CHUNK)
    buffer.fill(0)  # pre-faulted: the reads measure the page cache or the disk, not first touch
    coldcache.warm(path)
    out = {
        "pagecache_read": _best_gbps(size, lambda: _read(path, buffer), repeat=2),
        "pagecache_map": _best_gbps(os.path.getsize(path), lambda: _map_and_touch(path)),
    }
    coldcache.evict(path)
    resident = coldcache.resident_fraction(path)
    if resident <= coldcache.COLD_TOLERANCE:
        out["cold_read"] = size / _timed(lambda: _read(path, buffer)) / 1e9
    else:
        out["cold_read"] = None
        out["cold_read_note"] = f"eviction not honoured ({resident:.0%} still resident)"
    return out


def _read(path: str, buffer) -> None:
    """Read the file sequentially in CHUNK-sized reads, up to FILE_CAP bytes."""
    view = memoryview(buffer)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < FILE_CAP:
            n = f.readinto(view)
            if not n:
                break
            done += n


def _map_and_touch(path: str) -> None:
    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pages = np.frombuffer(m, dtype=np.uint8)
        pages[::mmap.PAGESIZE].sum()
        del pages


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
        out[name] = _best_gbps(nbytes, copy)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
