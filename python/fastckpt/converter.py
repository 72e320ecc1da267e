"""fastckpt.convert: a torch checkpoint (or a sharded one) to safetensors, streaming, without torch.

The safetensors format is written here: an 8-byte little-endian header length,
a JSON header (``__metadata__`` = ``{"format": "pt"}``, then per tensor its
dtype, shape and ``data_offsets``), then the tensors' bytes, contiguous and
little-endian. Contiguous tensors are copied from the file with ``pread`` in
bounded chunks, each storage record's CRC-32 checked on the way; others are
made contiguous from their storage read into memory. Memory is bounded by the
largest strided storage and the chunk size, never by the checkpoint.
"""

from __future__ import annotations

import json
import os
import re

from fastckpt import _native
from fastckpt.errors import CheckpointError
from fastckpt._descriptors import Unsupported
from fastckpt.archive import check_storage_crc
from fastckpt.reader import CheckpointReader, numpy_dtype
from fastckpt.reader import open as open_checkpoint

CHUNK_BYTES = 64 << 20
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """Bytes from 5000000, "5GB", "500MiB" (as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB or 500MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])


class _Job:
    """One tensor to write: its source reader, descriptor, safetensors dtype and byte count."""

    def __init__(self, key, reader: CheckpointReader):
        self.key, self.reader = key, reader
        self.info = reader._descriptor(key)
        if type(self.info) is Unsupported:
            raise CheckpointError(f"tensor '{key}' is a {self.info.kind} tensor; safetensors cannot store it")
        if self.info.dtype not in _SAFETENSORS_DTYPES or (self.info.metadata or {}):
            what = f"dtype torch.{self.info.dtype}" if not self.info.metadata else "conj/neg metadata"
            raise CheckpointError(f"tensor '{key}' has {what}, which this converter cannot write to safetensors")
        self.dtype = numpy_dtype(self.info.dtype, key)
        self.nbytes = self.info.nbytes

    def contiguous(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.info.shape, self.info.strides))):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def convert(src, dst, *, max_shard_size=None, drop_non_tensors: bool = False, progress=None) -> list[str]:
    """Write the tensors of checkpoint `src` (a file, a sharded index or its folder) to safetensors `dst`.

    Keys are fastckpt.open's (state-dict keys, dotted paths for nested
    checkpoints). With `max_shard_size` (bytes or "5GB") and more data than
    that, `dst` ("model.safetensors") becomes shards "model-00001-of-0000N.safetensors"
    and "model.safetensors.index.json" next to it; `dst` may also be a folder.
    Non-tensor values are refused unless `drop_non_tensors`. `progress(nbytes)`
    is called as bytes are written. Returns the paths written.
    """
    dst = os.fspath(dst)
    if os.path.isdir(dst) or dst.endswith(os.sep):
        dst = os.path.join(dst, "model.safetensors")
    with open_checkpoint(src) as reader:
        if isinstance(reader, CheckpointReader):
            extra = reader.metadata()
            if extra and not drop_non_tensors:
                names = ", ".join(repr(k) for k in list(extra)[:5]) if isinstance(extra, dict) else type(extra).__name__
                raise CheckpointError(
                    f"{src} holds values that are not tensors ({names}); safetensors stores tensors only. "
                    "Pass drop_non_tensors=True (--drop-non-tensors) to leave them out."
                )
            jobs = [_Job(k, reader) for k in reader.keys()]
        else:
            jobs = [_Job(k, reader.shard_reader(k)) for k in reader.keys()]
        shards = _split_into_shards(jobs, None if max_shard_size is None else parse_size(max_shard_size))
        if len(shards) == 1:
            _write_file(dst, shards[0], progress)
            return [dst]
        stem = dst.removesuffix(".safetensors")
        names = [f"{os.path.basename(stem)}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        folder = os.path.dirname(dst)
        for name, shard in zip(names, shards):
            _write_file(os.path.join(folder, name), shard, progress)
        index = {
            "metadata": {"total_size": sum(j.nbytes for j in jobs)},
            "weight_map": {j.key: name for name, shard in zip(names, shards) for j in shard},
        }
        index_path = stem + ".safetensors.index.json"
        _atomic_write(index_path, json.dumps(index, indent=2).encode())
        return [os.path.join(folder, n) for n in names] + [index_path]


def _split_into_shards(jobs: list[_Job], max_bytes: int | None) -> list[list[_Job]]:
    shards: list[list[_Job]] = [[]]
    size = 0
    for job in jobs:
        if max_bytes is not None and shards[-1] and size + job.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


def _header(jobs: list[_Job]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.key] = {"dtype": _SAFETENSORS_DTYPES[job.info.dtype], "shape": list(job.info.shape),
                           "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_file(path: str, jobs: list[_Job], progress) -> None:
    header = _header(jobs)
    tmp = path + ".tmp"
    checked: set[tuple[str, str]] = set()  # (source file, record) whose CRC-32 was checked
    chunk = bytearray(min(CHUNK_BYTES, max((j.nbytes for j in jobs), default=0)) or 1)
    fds: dict[str, int] = {}
    try:
        with open(tmp, "wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for job in jobs:
                fd = fds.get(job.reader.path)
                if fd is None:
                    fd = fds[job.reader.path] = os.open(job.reader.path, os.O_RDONLY)
                _write_tensor(out, fd, job, chunk, checked, progress)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_tensor(out, fd: int, job: _Job, chunk: bytearray, checked: set, progress) -> None:
    storage = job.info.storage
    record = (job.reader.path, storage.record)
    start = storage.data_offset + job.info.offset * job.dtype.itemsize
    whole = job.info.offset == 0 and job.nbytes == storage.nbytes
    if job.contiguous() and not job.reader._big_endian:
        crc = _copy(out, fd, start, job.nbytes, chunk, progress)
        if whole:
            _check(job, crc)
            checked.add(record)
        elif record not in checked:
            _check(job, _copy(None, fd, storage.data_offset, storage.nbytes, chunk, None))
            checked.add(record)
        return
    # Strided or big-endian: the storage in memory, then its elements, contiguous and little-endian.
    import numpy as np

    data = bytearray(storage.nbytes)
    if os.preadv(fd, [data], storage.data_offset) != storage.nbytes:
        raise CheckpointError(f"{job.reader.path} ended inside record '{storage.record}'")
    if record not in checked:
        _check(job, _native.crc32(data))
        checked.add(record)
    item = job.dtype.itemsize
    array = np.ndarray(job.info.shape, job.dtype, buffer=data, offset=job.info.offset * item,
                       strides=[s * item for s in job.info.strides]) if job.nbytes else np.empty(0, job.dtype)
    array = job.reader._finish(array, job.info)
    out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    if progress:
        progress(job.nbytes)


def _copy(out, fd: int, offset: int, nbytes: int, chunk: bytearray, progress) -> int:
    """Copies [offset, +nbytes) of fd to `out` (or only reads it with out=None); returns its CRC-32."""
    view = memoryview(chunk)
    crc = 0
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[: min(len(view), nbytes - done)]], offset + done)
        if n <= 0:
            raise CheckpointError(f"the file ended at byte {offset + done} while reading a record")
        crc = _native.crc32(view[:n], crc)
        if out is not None:
            out.write(view[:n])
            if progress:
                progress(n)
        done += n
    return crc


def _check(job: _Job, computed: int) -> None:
    check_storage_crc(job.reader._archive, job.info.storage.record, computed, job.key)

