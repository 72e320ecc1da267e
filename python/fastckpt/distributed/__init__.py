"""fastckpt.distributed.load: every rank of a torch.distributed group gets torch.load's result while
the checkpoint is read about once in total.

How a load runs (every step ends with a collective, so a failure anywhere is raised everywhere):

1. Rank 0 indexes the checkpoint (strictly, as fastckpt.load does) and broadcasts a plan
   (:mod:`.plan`): each file's identity, size, stored records (offset, size, CRC-32) and which rank
   owns which contiguous byte range (balanced by bytes at record starts; a sharded checkpoint's shards
   go whole to ranks).
2. Each rank says which bytes it needs: all of every file, or with ``keys=``/``slices=`` only the
   records (or the byte spans of the slices) of what it asked for, found by unpickling ``data.pkl``
   over the file's metadata (headers, pickle, small records), which is exchanged first (:mod:`.selection`).
3. Every byte range needed by anyone is read once, with ``pread``, by one rank (:mod:`.schedule`, a
   pure function of the plan and the needs): a record needed by a single rank is read by that rank.
   A rank reads only the file rank 0 indexed, and checks every record it reads against its CRC-32
   (:mod:`.reads`).
4. The ranges are exchanged in large buckets (:mod:`.collectives`): ``broadcast`` when every other
   rank needs the same bytes, point-to-point sends otherwise. Each rank then holds the file image
   (untouched pages of what it did not need cost no memory) and runs the normal loader on it, with
   storages as zero-copy views.
"""

from __future__ import annotations

import os

from fastckpt import _native, loader
from fastckpt._options import resolve_verify
from fastckpt._policy import resolve_weights_only
from fastckpt.distributed import reads, schedule, selection
from fastckpt.distributed.plan import make_plan
from fastckpt.distributed.collectives import CollectiveError, Comm

__all__ = ["load", "CollectiveError"]

DEFAULT_THREADS = 4


def load(f, map_location=None, pickle_module=None, *, group=None, weights_only=None, keys=None, slices=None,
         verify=None, threads=None, **pickle_load_args):
    """Load a checkpoint on every rank of `group` (default: the world), reading it about once in total.

    Called by every rank with the same path (a torch.save file, a sharded checkpoint's
    ``*.index.json`` or a directory holding one). Returns on each rank what ``torch.load(f,
    map_location, ...)`` returns there; a sharded checkpoint returns its merged state dict.

    ``keys``: a list of top-level keys, or a predicate ``key -> bool``; the result then holds only
    those keys (checkpoint order), and the rank receives only their bytes. ``slices``: a callback
    ``(key, shape) -> slice | tuple | None``; a tensor value is replaced by ``tensor[slice].clone()``
    and the rank receives only the bytes that slice spans. ``verify=False`` skips the storage CRC-32
    checks (``data.pkl``'s is always checked; default: ``FASTCKPT_VERIFY``, else checked).
    ``threads``: reader threads per rank.

    Every rank reads the file rank 0 indexed: one replaced or changed in between (on rank 0's host:
    another device, inode, size or modification time; on other hosts: another size or modification
    time) makes every rank raise ``FormatError``.

    With NCCL, each rank's messages go through its own CUDA device: the group's bound device, or the
    one the rank chose with ``torch.cuda.set_device`` (required when several are visible).

    Failures are collective: every rank raises the same exception (a ``CheckpointError`` subclass,
    ``OSError``, ``KeyError`` for a missing requested key...). A rank that dies or hangs makes the
    others raise :class:`CollectiveError` once the process group's timeout passes: create the group
    with a ``timeout=`` you can wait for.
    """
    comm = Comm(group)
    wo, pickle_module = comm.agree(lambda: _check_args(f, weights_only, pickle_module, keys, slices))
    pickle_load_args.setdefault("encoding", "utf-8")
    plan = comm.from_root(lambda: make_plan(os.fspath(f), comm.size))
    if plan["kind"] == "fallback":  # legacy or TorchScript: fastckpt.load hands them to torch.load
        return comm.agree(lambda: selection.select(
            loader.load(f, map_location, pickle_module, weights_only=weights_only, **pickle_load_args), keys, slices))

    files = plan["files"]
    partial = keys is not None or slices is not None
    images = [None] * len(files)
    opts = dict(pickle_module=pickle_module, weights_only=wo, threads=threads or DEFAULT_THREADS,
                pickle_load_args=pickle_load_args)
    check_crc = resolve_verify(verify)
    # Ranks may differ: some ask for parts, others for everything; the metadata round is collective.
    if plan["kind"] == "file" and any(comm.all_gather_json(partial)):
        meta = [schedule.metadata_segments(files[0])]
        _fetch(comm, plan, images, [meta] * comm.size, check_crc, opts["threads"])
        wanted = comm.agree(lambda: [selection.wanted_spans(files[0], images[0], keys, slices, opts) if partial
                                     else [[0, files[0]["size"]]]])
    elif plan["kind"] == "sharded":
        wanted = comm.agree(lambda: selection.wanted_shards(plan, keys))
    else:
        wanted = [[[0, file["size"]]] for file in files]
    needs = comm.all_gather_json(wanted)
    _fetch(comm, plan, images, needs, check_crc, opts["threads"])
    return comm.agree(lambda: selection.assemble(plan, images, wanted, map_location, keys, slices, partial, opts))


def _check_args(f, weights_only, pickle_module, keys, slices):
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(f"fastckpt.distributed.load reads a path, not {type(f).__name__}")
    if keys is not None and not callable(keys) and isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a list of keys or a predicate, not a single string")
    if slices is not None and not callable(slices):
        raise TypeError("slices must be a callable (key, shape) -> slice")
    return resolve_weights_only(weights_only, pickle_module)


def _fetch(comm, plan, images, needs, check_crc: bool, threads: int) -> None:
    """Reads this rank's pieces (CRC-checked), agrees, then exchanges; fills `images` in place."""
    files = plan["files"]

    def read():
        schedules = [schedule.Schedule(file, [needs[r][i] for r in range(comm.size)]) for i, file in enumerate(files)]
        for i, (file, s) in enumerate(zip(files, schedules)):
            mine = s.reads.get(comm.rank)
            if images[i] is None and (needs[comm.rank][i] or mine):
                images[i] = _native.allocate(file["size"])
            if mine:
                reads.read_pieces(file, plan["host"], images[i], mine, check_crc, threads)
        return schedules

    schedules = comm.agree(read)
    comm.exchange(images, schedules)
