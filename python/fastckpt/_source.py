"""A checkpoint file opened once: the descriptor every later read goes through and the archive indexed from it.

Readers that come back for a file's bytes after indexing it (``convert``, ``distributed.load``) read
them with ``pread`` on this descriptor, never by opening the path again: a file replaced at that path
meanwhile is not read, and one truncated in place ends a read with an error instead of a fault.
"""

from __future__ import annotations

import os

from fastckpt import _native
from fastckpt.errors import FormatError


def identity(st: os.stat_result) -> list[int]:
    """What tells one file version from another: device, inode, size, modification time (ns)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


class Source:
    """``path`` opened read-only: ``fd``, ``stat`` (of that descriptor) and ``archive`` (indexed from it).
    The archive is indexed on first use, so a caller can check the file's identity first."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = -1
        # O_NONBLOCK: a FIFO at the path is not waited on (the archive then refuses it).
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.stat = os.fstat(self.fd)
        except BaseException:
            self.close()
            raise
        self._archive = None

    @property
    def archive(self) -> _native.Archive:
        """The archive indexed (strictly) from this descriptor, on first use."""
        if self._archive is None:
            self._archive = _native.Archive.open_fd(self.fd, 0, self.path)
        return self._archive

    @property
    def identity(self) -> list[int]:
        return identity(self.stat)

    def read_into(self, view, offset: int) -> None:
        """Fills `view` (a writable buffer) from byte `offset` of the file."""
        view = memoryview(view).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise FormatError(f"{self.path} ended at byte {offset + done} while reading it (truncated since "
                                  "it was opened?)")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
