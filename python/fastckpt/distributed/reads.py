"""A rank's reads: its pieces of a file, with ``pread`` through one descriptor, into the file image.

The descriptor must be the file rank 0 indexed: on rank 0's host its (device, inode, size,
modification time) must be the plan's; on another host (a shared file system, where device numbers
differ, or a copy of the checkpoint on every node) its size and modification time. Every record read
is judged by the core's CRC rule (:meth:`Archive.check_crcs`), through the archive indexed from that
same descriptor.
"""

from __future__ import annotations

import concurrent.futures
import socket

from fastckpt import _native, errors
from fastckpt._source import Source
from fastckpt.distributed import schedule


def check_identity(source: Source, file: dict, host: str) -> None:
    """Refuses a file other than the one rank 0 indexed (replaced since, or another file on this node)."""
    planned, here = file["identity"], source.identity
    same = here == planned if socket.gethostname() == host else here[2:] == planned[2:]
    if not same:
        raise errors.FormatError(
            f"{file['path']} is not the file rank 0 indexed (device, inode, size, mtime: {here} here, {planned} "
            "there): it was replaced or changed since, or it is another file on this node")


def read_pieces(file: dict, host: str, image, pieces, check_crc: bool, threads: int) -> None:
    """Reads `pieces` ((start, end, record index or None)) of `file` into `image` (its whole size);
    storage records' CRC-32s are checked with `check_crc`, the others' always."""
    view = memoryview(image)
    segments = schedule.merged([s, e] for s, e, _ in pieces)
    chunks = [(a, min(a + schedule.READ_CHUNK, e)) for s, e in segments for a in range(s, e, schedule.READ_CHUNK)]
    with Source(file["path"]) as source:
        check_identity(source, file, host)

        def read(chunk):
            source.read_into(view[chunk[0]:chunk[1]], chunk[0])

        def check(batch):
            records = [file["records"][i] for i in batch]
            source.archive.check_crcs([r[0] for r in records],
                                      [_native.crc32(view[r[1]:r[1] + r[2]]) for r in records])

        records = [i for _, _, i in pieces if i is not None and (check_crc or not file["records"][i][4])]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, chunks))
            list(pool.map(check, schedule.batches(records, file["records"])))
