"""Page-cache control for cold runs: evict a file, and count how much of it is still resident.

Eviction is a request the kernel may ignore (pages mapped elsewhere, some sandboxes), so a cold run
never trusts it: it counts resident pages with mincore(2) right before the clock starts.
"""

from __future__ import annotations

import ctypes
import mmap
import os

# A cold run may start with at most this fraction of the file resident (a page or two of metadata
# read since the eviction), else it is reported "not cold" instead of timed.
COLD_TOLERANCE = 0.01
# A warm run expects the file fully resident; below this it is flagged "not warm".
WARM_TOLERANCE = 0.99

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def evict(path: str) -> None:
    """Ask the kernel to drop the file's clean pages from the page cache (dirty ones are written first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str) -> float:
    """Fraction of the file's pages in the page cache, read without touching them (mmap + mincore)."""
    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
            if _libc.mincore(addr, size, pages.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return float(np.count_nonzero(pages & 1)) / len(pages)


def warm(path: str, chunk: int = 64 << 20) -> float:
    """Read the whole file once so that it is page-cached; returns the resident fraction afterwards."""
    buffer = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return resident_fraction(path)
