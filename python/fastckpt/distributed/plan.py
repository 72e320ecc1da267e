"""Rank 0's plan: the checkpoint indexed once (strictly, as fastckpt.load indexes it), as JSON every
rank receives — each file's path, identity, size and stored records (name, data offset, size, CRC-32,
whether it is a storage), which rank owns which byte range, and for a sharded checkpoint which shard
holds each key."""

from __future__ import annotations

import os
import socket

from fastckpt import _formats, _native, errors, loader
from fastckpt._source import Source
from fastckpt.distributed import schedule


def make_plan(path: str, ranks: int) -> dict:
    """{"kind": "file" | "sharded" | "fallback", "host", "files": [...], "weight_map" (sharded)}."""
    index = _formats.find_index(path)
    if index is not None:
        return _sharded_plan(index, ranks)
    if os.path.isdir(path):
        raise errors.FormatError(f"{path} is a folder without a sharded checkpoint's *.index.json")
    if loader.handed_to_torch(path, False):
        return {"kind": "fallback"}
    with Source(path) as source:
        if _formats.is_torchscript(source.archive):
            return {"kind": "fallback"}
        file = file_entry(source)
    file["ranges"] = schedule.balanced_ranges(file, ranks)
    return {"kind": "file", "host": socket.gethostname(), "files": [file]}


def file_entry(source: Source) -> dict:
    """The file's identity and its stored records in file order: [name, data offset, size, crc32, is a storage]."""
    archive = source.archive
    stored = sorted((r for r in archive.records() if r.method == _native.Method.stored), key=lambda r: r.data_offset)
    records = [[r.name, r.data_offset, r.size, r.crc32, r.name.startswith("data/")] for r in stored]
    return {"path": source.path, "size": archive.size, "identity": source.identity, "records": records}


def _sharded_plan(index_path, ranks: int) -> dict:
    index = _formats.read_index(index_path)
    shard_names = list(index.shards())
    files = []
    for name in shard_names:
        shard = str(index.shard_path(name))
        if shard.endswith(".safetensors") or _formats.sniff(shard, records=False) is not _formats.Kind.ZIP:
            raise errors.FormatError(f"shard {shard} is not a torch.save zip checkpoint")
        with Source(shard) as source:
            if _formats.is_torchscript(source.archive):
                raise errors.FormatError(f"shard {shard} is a TorchScript archive, not a checkpoint")
            files.append(file_entry(source))
    for file, owner in zip(files, schedule.assign_whole([f["size"] for f in files], ranks)):
        file["ranges"] = [[0, owner]]
    return {"kind": "sharded", "host": socket.gethostname(), "files": files, "index": str(index.path),
            "weight_map": index.weight_map, "shards": shard_names}
