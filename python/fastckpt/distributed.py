"""fastckpt.distributed.load: every rank of a torch.distributed group gets torch.load's result while
the checkpoint is read about once in total.

How a load runs (every step ends with a collective, so a failure anywhere is raised everywhere):

1. Rank 0 indexes the checkpoint (strictly, as fastckpt.load does) and broadcasts a plan: each file's
   size, its stored records (offset, size, CRC-32) and which rank owns which contiguous byte range
   (balanced by bytes at record starts; a sharded checkpoint's shards go whole to ranks).
2. Each rank says which bytes it needs: all of every file, or with ``keys=``/``slices=`` only the
   records (or the byte spans of the slices) of what it asked for, found by unpickling ``data.pkl``
   over the file's metadata (headers, pickle, small records), which is exchanged first.
3. Every byte range needed by anyone is read once, with ``pread``, by its owner (a record needed by a
   single rank is read by that rank), and every record read is checked against its CRC-32.
4. The ranges are exchanged in large buckets: ``broadcast`` when every other rank needs the same bytes,
   point-to-point sends otherwise. Each rank then holds the file image (untouched pages of what it
   did not need cost no memory) and runs the normal loader on it, with storages as zero-copy views.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import json
import os
import pickle

import torch
import torch.distributed as dist

from fastckpt import _formats, _graph, _native, errors, loader
from fastckpt._options import resolve_verify
from fastckpt._policy import resolve_weights_only
from fastckpt.archive import open_archive

# Exchange granularity: large enough to run collectives near link speed, small enough that a
# packed bucket's staging copy stays modest.
BUCKET_BYTES = 64 << 20
# Segments below this travel packed into shared buckets; larger ones are sent in place.
PACK_BELOW = 1 << 20
READ_CHUNK = 16 << 20
MAX_INDEX_BYTES = 64 << 20  # a sharded checkpoint's *.index.json is read whole, under this cap
DEFAULT_THREADS = 4


class CollectiveError(RuntimeError):
    """A collective failed: a rank died, left, or did not take part within the group's timeout."""


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
    checks (``data.pkl``'s is always checked). ``threads``: reader threads per rank.

    Failures are collective: every rank raises the same exception (a ``CheckpointError`` subclass,
    ``OSError``, ``KeyError`` for a missing requested key...). A rank that dies or hangs makes the
    others raise :class:`CollectiveError` once the process group's timeout passes: create the group
    with a ``timeout=`` you can wait for.
    """
    comm = _Comm(group)
    wo, pickle_module = comm.agree(lambda: _check_args(f, weights_only, pickle_module, keys, slices))
    pickle_load_args.setdefault("encoding", "utf-8")
    plan = comm.from_root(lambda: _plan(os.fspath(f), comm.size))
    if plan["kind"] == "fallback":  # legacy or TorchScript: fastckpt.load hands them to torch.load
        return comm.agree(lambda: _select(
            loader.load(f, map_location, pickle_module, weights_only=weights_only, **pickle_load_args), keys, slices))

    files = plan["files"]
    partial = keys is not None or slices is not None
    images = [None] * len(files)
    opts = dict(pickle_module=pickle_module, weights_only=wo, threads=threads or DEFAULT_THREADS,
                pickle_load_args=pickle_load_args)
    check_crc = resolve_verify(verify)
    # Ranks may differ: some ask for parts, others for everything; the metadata round is collective.
    if plan["kind"] == "file" and any(comm.all_gather_json(partial)):
        meta = [_metadata_segments(files[0])]
        _fetch(comm, files, images, [meta] * comm.size, check_crc, opts["threads"])
        wanted = comm.agree(lambda: [_wanted_spans(files[0], images[0], keys, slices, opts) if partial
                                     else [[0, files[0]["size"]]]])
    elif plan["kind"] == "sharded":
        wanted = comm.agree(lambda: _wanted_shards(plan, keys))
    else:
        wanted = [[[0, file["size"]]] for file in files]
    needs = comm.all_gather_json(wanted)
    _fetch(comm, files, images, needs, check_crc, opts["threads"])
    return comm.agree(lambda: _assemble(plan, images, wanted, map_location, keys, slices, partial, opts))


def _check_args(f, weights_only, pickle_module, keys, slices):
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(f"fastckpt.distributed.load reads a path, not {type(f).__name__}")
    if keys is not None and not callable(keys) and isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a list of keys or a predicate, not a single string")
    if slices is not None and not callable(slices):
        raise TypeError("slices must be a callable (key, shape) -> slice")
    return resolve_weights_only(weights_only, pickle_module)


# --------------------------------------------------------------------------- the plan (rank 0)


def _plan(path: str, ranks: int) -> dict:
    if os.path.isdir(path) or path.endswith(".index.json"):
        return _sharded_plan(path, ranks)
    if loader.handed_to_torch(path, False):
        return {"kind": "fallback"}
    archive = open_archive(path)
    if _formats.is_torchscript(archive):
        return {"kind": "fallback"}
    file = _file_entry(path, archive)
    file["ranges"] = _balanced_ranges(file, ranks)
    return {"kind": "file", "files": [file]}


def _file_entry(path: str, archive) -> dict:
    """The file's stored records in file order: [name, data offset, size, crc32, is a storage]."""
    stored = sorted((r for r in archive.records() if r.method == _native.Method.stored), key=lambda r: r.data_offset)
    records = [[r.name, r.data_offset, r.size, r.crc32, r.name.startswith("data/")] for r in stored]
    return {"path": path, "size": archive.size, "records": records}


def _balanced_ranges(file: dict, ranks: int) -> list:
    """[start, owner] of `ranks` contiguous ranges of about equal bytes, cut where storages start."""
    starts = [start for _, start, _, _, storage in file["records"] if storage]
    cuts, size = [0], file["size"]
    for k in range(1, ranks):
        target = size * k // ranks
        i = bisect.bisect_left(starts, target)
        near = min(starts[max(i - 1, 0):i + 1], key=lambda s: abs(s - target), default=0)
        cuts.append(max(near, cuts[-1]))
    return [[cut, rank] for rank, cut in enumerate(cuts)]


def _sharded_plan(path: str, ranks: int) -> dict:
    index_path = _index_file(path) if os.path.isdir(path) else path
    with open(index_path, "rb") as fh:
        text = fh.read(MAX_INDEX_BYTES + 1)
    if len(text) > MAX_INDEX_BYTES:
        raise errors.LimitError(f"{index_path} is over the {MAX_INDEX_BYTES}-byte cap for an index")
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise errors.FormatError(f"{index_path} is not a JSON object with a 'weight_map': {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise errors.FormatError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    shard_names = sorted(set(weight_map.values()))
    for name in shard_names:  # shards live beside the index: no paths out of its directory
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise errors.FormatError(f"{index_path}: shard name {name!r} is not a file name")
    directory = os.path.dirname(index_path)
    files = []
    for name in shard_names:
        shard = os.path.join(directory, name)
        if _formats.sniff(shard, records=False) is not _formats.Kind.ZIP or shard.endswith(".safetensors"):
            raise errors.FormatError(f"shard {shard} is not a torch.save zip checkpoint")
        archive = open_archive(shard)
        if _formats.is_torchscript(archive):
            raise errors.FormatError(f"shard {shard} is a TorchScript archive, not a checkpoint")
        files.append(_file_entry(shard, archive))
    load_by_rank = [0] * ranks
    for i in sorted(range(len(files)), key=lambda i: -files[i]["size"]):  # largest first, to the least loaded
        owner = load_by_rank.index(min(load_by_rank))
        files[i]["ranges"] = [[0, owner]]
        load_by_rank[owner] += files[i]["size"]
    shard_of = {name: i for i, name in enumerate(shard_names)}
    return {"kind": "sharded", "files": files, "weight_map": {k: shard_of[v] for k, v in weight_map.items()}}


def _index_file(directory: str) -> str:
    found = sorted(n for n in os.listdir(directory) if n.endswith(".index.json"))
    if len(found) != 1:
        raise errors.FormatError(f"{directory} holds {len(found)} *.index.json files; expected one (or pass its path)")
    return os.path.join(directory, found[0])


# --------------------------------------------------------------------------- who reads and sends what


def _pieces(file: dict):
    """The file as consecutive spans (start, end, record index or None for the bytes between records)."""
    pos = 0
    for i, (_, start, size, _, _) in enumerate(file["records"]):
        if start > pos:
            yield pos, start, None
        if size:
            yield start, start + size, i
        pos = start + size
    if pos < file["size"]:
        yield pos, file["size"], None


def _metadata_segments(file: dict) -> list:
    """Everything but the storages' bytes: headers, data.pkl, small records, the central directory."""
    records = file["records"]
    return _merged([[s, e] for s, e, i in _pieces(file) if i is None or not records[i][4]])


def _merged(segments) -> list:
    out = []
    for a, b in sorted(segments):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif a < b:
            out.append([a, b])
    return out


class _Schedule:
    """For one file and everyone's needs: the pieces each rank reads, and the segments each rank
    sends to each other rank. Deterministic, so every rank computes the same one."""

    def __init__(self, file: dict, needs: list):
        size, n = file["size"], len(needs)
        for segments in needs:  # sizes from peers are checked before they size anything
            if any(not (0 <= a < b <= size) for a, b in segments) or segments != _merged(segments):
                raise errors.FormatError(f"a rank asked for byte ranges outside {file['path']} ({size} bytes)")
        range_starts = [start for start, _ in file["ranges"]]
        self.reads = collections.defaultdict(list)  # rank -> [(start, end, record index or None)]
        self.sends = collections.defaultdict(dict)  # src -> {dst: [[a, b]]}
        cursor = [0] * n
        for start, end, record in _pieces(file):
            parts = {}
            for r in range(n):
                segments, j = needs[r], cursor[r]
                while j < len(segments) and segments[j][1] <= start:
                    j += 1
                cursor[r] = j
                while j < len(segments) and segments[j][0] < end:
                    parts.setdefault(r, []).append([max(start, segments[j][0]), min(end, segments[j][1])])
                    if segments[j][1] > end:
                        break
                    j += 1
            if not parts:
                continue
            # Read whole (so its CRC can be checked) by its one user, else by the range's owner.
            owner = next(iter(parts)) if len(parts) == 1 else file["ranges"][bisect.bisect_right(range_starts, start) - 1][1]
            self.reads[owner].append((start, end, record))
            for r, got in parts.items():
                if r != owner:
                    self.sends[owner].setdefault(r, []).extend(got)
        for targets in self.sends.values():
            for r in targets:
                targets[r] = _merged(targets[r])


def _fetch(comm, files, images, needs, check_crc: bool, threads: int) -> None:
    """Reads this rank's pieces (CRC-checked), agrees, then exchanges; fills `images` in place."""
    def read():
        schedules = [_Schedule(file, [needs[r][i] for r in range(comm.size)]) for i, file in enumerate(files)]
        for i, (file, schedule) in enumerate(zip(files, schedules)):
            if images[i] is None and (needs[comm.rank][i] or schedule.reads.get(comm.rank)):
                images[i] = _native.allocate(file["size"])
            if schedule.reads.get(comm.rank):
                _read_pieces(file, images[i], schedule.reads[comm.rank], check_crc, threads)
        return schedules

    schedules = comm.agree(read)
    comm.exchange(images, schedules)


def _read_pieces(file: dict, image, pieces, check_crc: bool, threads: int) -> None:
    view = memoryview(image)
    segments = _merged([s, e] for s, e, _ in pieces)
    chunks = [(a, min(a + READ_CHUNK, e)) for s, e in segments for a in range(s, e, READ_CHUNK)]
    fd = os.open(file["path"], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        actual = os.fstat(fd).st_size
        if actual != file["size"]:
            raise errors.FormatError(
                f"{file['path']} is {actual} bytes here but was {file['size']} when rank 0 indexed it "
                "(changed since, or not the same file on every node)")

        def read(chunk):
            pos, end = chunk
            while pos < end:
                n = os.preadv(fd, [view[pos:end]], pos)
                if n <= 0:
                    raise errors.FormatError(f"{file['path']} ended at {pos} while reading (truncated?)")
                pos += n

        def check(batch):
            for i in batch:
                name, start, size, crc, _ = file["records"][i]
                computed = _native.crc32(view[start:start + size])
                if crc and computed != crc:  # 0: written with compute_crc32=False
                    raise errors.IntegrityError(
                        f"CRC-32 mismatch in record '{name}' of {file['path']} (data at offset {start}): stored "
                        f"0x{crc:08x}, computed 0x{computed:08x}; the file is corrupted (run `fastckpt verify`). "
                        "To load it anyway, skip the storage checks with verify=False.")

        records = [i for _, _, i in pieces if i is not None and (check_crc or not file["records"][i][4])]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, chunks))
            list(pool.map(check, _batches(records, file["records"])))
    finally:
        os.close(fd)


def _batches(indices, records, target=READ_CHUNK):
    """Record indices grouped into runs of about `target` bytes (one task each: many tiny records)."""
    batch, size = [], 0
    for i in indices:
        batch.append(i)
        size += records[i][2]
        if size >= target:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _buckets(segments):
    """Segments grouped for one transfer each: large ones alone (split at BUCKET_BYTES), small ones packed."""
    group, size = [], 0
    for a, b in segments:
        while b - a >= PACK_BELOW:
            step = min(b - a, BUCKET_BYTES)
            yield [(a, a + step)]
            a += step
        if a < b:
            if size + (b - a) > BUCKET_BYTES:
                yield group
                group, size = [], 0
            group.append((a, b))
            size += b - a
    if group:
        yield group


# --------------------------------------------------------------------------- keys and slices


def _chosen(all_keys, keys) -> list:
    """The keys selected by `keys` (None: all; a predicate; a list), in checkpoint order."""
    all_keys = list(all_keys)
    if keys is None:
        return all_keys
    if callable(keys):
        return [k for k in all_keys if keys(k)]
    wanted = set(keys)
    missing = wanted.difference(all_keys)
    if missing:
        raise KeyError(f"requested key(s) not in the checkpoint: {sorted(map(str, missing))[:8]}")
    return [k for k in all_keys if k in wanted]


def _state_dict(obj, what: str):
    if not isinstance(obj, dict):
        raise TypeError(f"keys=/slices= need a checkpoint whose top-level object is a dict; {what} holds a "
                        f"{type(obj).__name__}")
    return obj


def _slice_of(key, value, slices):
    if slices is None or not isinstance(value, torch.Tensor):
        return None
    return slices(key, tuple(value.shape))


def _select(obj, keys, slices):
    if keys is None and slices is None:
        return obj
    obj = _state_dict(obj, "it")
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k in _chosen(obj, keys):
        value, s = obj[k], _slice_of(k, obj[k], slices)
        if s is not None:
            with torch.no_grad():
                value = value[s].clone()
        out[k] = value
    return out


def _keep_on_cpu(storage, location):
    return storage


def _wanted_spans(file: dict, image, keys, slices, opts) -> list:
    """The byte ranges of the storages (or slices of them) this rank asked for, found by unpickling
    data.pkl over the metadata alone: storages are views of the image, where their bytes will land."""
    archive = _native.Archive.from_buffer(image)
    obj = _state_dict(_load_image_archive(archive, _keep_on_cpu, opts), file["path"])
    base = _base_address(archive)
    storage_end = {start: start + size for _, start, size, _, storage in file["records"] if storage}
    spans = []
    for key in _chosen(obj, keys):
        value = obj[key]
        s = _slice_of(key, value, slices)
        for tensor in _tensors(value):
            if tensor.layout is not torch.strided or tensor.is_nested:  # no single storage span: take them all
                return _merged([start, end] for start, end in storage_end.items())
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                continue
            start = storage.data_ptr() - base
            if s is None:
                spans.append([start, storage_end[start]])
                continue
            view = tensor[s]
            if view.numel():
                first = view.storage_offset() * view.element_size()
                last = first + sum((n - 1) * st for n, st in zip(view.shape, view.stride())) * view.element_size()
                spans.append([start + first, start + last + view.element_size()])
    return _merged(spans)


def _tensors(value):
    return _graph.distinct_leaves(value, lambda v: isinstance(v, torch.Tensor))


def _wanted_shards(plan: dict, keys) -> list:
    shards = {plan["weight_map"][k] for k in _chosen(plan["weight_map"], keys)}
    return [[[0, file["size"]]] if i in shards else [] for i, file in enumerate(plan["files"])]


# --------------------------------------------------------------------------- building the result


def _base_address(archive) -> int:
    whole = archive.whole()
    return torch.frombuffer(whole, dtype=torch.uint8).data_ptr() if len(whole) else 0


def _load_image_archive(archive, map_location, opts):
    return loader.load_archive(archive, map_location, opts["pickle_module"], weights_only=opts["weights_only"],
                                mmap=True, verify=False, threads=opts["threads"],
                                pickle_load_args=dict(opts["pickle_load_args"]))


def _restore_only(archive, wanted, map_location):
    """A map_location that applies the caller's to the storages this rank asked for and leaves the
    others (never received: zero pages) as CPU views, so they are not copied to a device."""
    base = _base_address(archive)
    restore = torch.serialization._get_restore_location(map_location)
    ends = [end for _, end in wanted]

    def restore_wanted(storage, location):
        start = storage.data_ptr() - base
        j = bisect.bisect_right(ends, start)  # the first wanted range ending after the storage starts
        if storage.nbytes() and not (j < len(wanted) and wanted[j][0] < start + storage.nbytes()):
            return storage
        return restore(storage, location)

    return restore_wanted


def _assemble(plan, images, wanted, map_location, keys, slices, partial: bool, opts):
    if plan["kind"] == "file":
        archive = _native.Archive.from_buffer(images[0])
        where = _restore_only(archive, wanted[0], map_location) if partial else map_location
        return _select(_load_image_archive(archive, where, opts), keys, slices)
    by_shard = collections.defaultdict(set)
    for key, shard in plan["weight_map"].items():
        by_shard[shard].add(key)
    merged = {}
    for i, file in enumerate(plan["files"]):
        if not wanted[i]:
            continue
        shard = _state_dict(_load_image_archive(_native.Archive.from_buffer(images[i]), map_location, opts),
                            file["path"])
        if set(shard) != by_shard[i]:
            raise errors.FormatError(f"shard {file['path']} holds other keys than the index maps to it")
        merged.update(shard)
    return _select(merged, keys, slices)


# --------------------------------------------------------------------------- collectives


def _describe(error: BaseException) -> dict:
    message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    report = {"type": f"{type(error).__module__}.{type(error).__qualname__}", "message": str(message)}
    if isinstance(error, OSError) and error.errno is not None:
        report.update(errno=error.errno, strerror=error.strerror, filename=error.filename)
    return report


_RAISABLE = {f"{c.__module__}.{c.__qualname__}": c for c in (
    *(getattr(errors, name) for name in errors.__all__), CollectiveError, KeyError, TypeError, ValueError,
    RuntimeError, OSError, pickle.UnpicklingError)}


def _rebuild(report: dict, rank: int) -> BaseException:
    """The same exception on every rank, from the report of the first rank that failed."""
    if "errno" in report:  # OSError picks FileNotFoundError etc. from the code
        args = (report["errno"], report["strerror"]) + ((report["filename"],) if report["filename"] is not None else ())
        error = OSError(*args)
    elif report["type"] in _RAISABLE:
        error = _RAISABLE[report["type"]](report["message"])
    else:
        error = RuntimeError(f"{report['type']}: {report['message']}")
    if hasattr(error, "add_note"):
        error.add_note(f"(fastckpt.distributed.load: raised on rank {rank})")
    return error


class _Comm:
    """The group's collectives over host buffers; with NCCL they are staged through device memory."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("fastckpt.distributed.load needs torch.distributed.init_process_group() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of `group`")
        # NCCL moves only device tensors (untested here: no GPU on the development machine).
        nccl = dist.get_backend(self.group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise CollectiveError(f"fastckpt.distributed.load: {what} failed on rank {self.rank}: {e} (a rank "
                                  "died, or did not take part within the process group's timeout)") from e

    def _wire(self, host):
        return host if self.device.type == "cpu" else host.to(self.device)

    @staticmethod
    def _land(host, wire):
        if wire is not host:
            host.copy_(wire)

    def _broadcast(self, host, src: int) -> None:
        wire = self._wire(host)
        self._run("a broadcast", dist.broadcast, wire, group=self.group, group_src=src)
        self._land(host, wire)

    def broadcast_json(self, obj, src: int):
        data = json.dumps(obj).encode() if self.rank == src else b""
        length = torch.tensor([len(data)], dtype=torch.int64)
        self._broadcast(length, src)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(length), dtype=torch.uint8)
        self._broadcast(payload, src)
        return json.loads(payload.numpy().tobytes())

    def all_gather_json(self, obj) -> list:
        data = json.dumps(obj).encode()
        lengths = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        self._run("an all_gather", dist.all_gather, lengths, torch.tensor([len(data)], device=self.device), group=self.group)
        longest = max(int(n) for n in lengths)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.empty(longest, dtype=torch.uint8, device=self.device) for _ in range(self.size)]
        self._run("an all_gather", dist.all_gather, gathered, self._wire(mine), group=self.group)
        return [json.loads(g[:int(n)].cpu().numpy().tobytes()) for g, n in zip(gathered, lengths)]

    def agree(self, fn):
        """Runs fn() here, then all ranks learn whether any failed; all raise the first rank's error."""
        try:
            value, error = fn(), None
        except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
            value, error = None, e
        first = torch.tensor([self.rank if error is not None else self.size], dtype=torch.int64)
        wire = self._wire(first)
        self._run("agreeing on a step's outcome", dist.all_reduce, wire, op=dist.ReduceOp.MIN, group=self.group)
        self._land(first, wire)
        failed = int(first)
        if failed == self.size:
            return value
        report = self.broadcast_json(_describe(error) if failed == self.rank else None, failed)
        raise _rebuild(report, failed) from error

    def from_root(self, fn):
        """fn() on rank 0 only; its JSON result (or its error) on every rank."""
        error = None
        if self.rank == 0:
            try:
                message = {"ok": fn()}
            except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
                error, message = e, {"error": _describe(e)}
        reply = self.broadcast_json(message if self.rank == 0 else None, 0)
        if "error" in reply:
            raise _rebuild(reply["error"], 0) from error
        return reply["ok"]

    def exchange(self, images, schedules) -> None:
        """Every send of every schedule: broadcasts (same bytes to all others) first, in a fixed order,
        then the point-to-point sends, posted together."""
        p2p, landings, tags = [], [], collections.Counter()
        for image, schedule in zip(images, schedules):
            whole = torch.frombuffer(image, dtype=torch.uint8) if image is not None else None
            for src in range(self.size):
                targets = schedule.sends.get(src, {})
                segment_lists = list(targets.values())
                if targets and len(targets) == self.size - 1 and all(s == segment_lists[0] for s in segment_lists):
                    for bucket in _buckets(segment_lists[0]):
                        self._broadcast_bucket(whole, bucket, src)
                    continue
                for dst, segments in sorted(targets.items()):
                    if self.rank not in (src, dst):
                        continue
                    peer = dst if self.rank == src else src
                    for bucket in _buckets(segments):
                        host = self._bucket_tensor(whole, bucket, sending=self.rank == src)
                        wire = self._wire(host) if self.rank == src else (
                            host if self.device.type == "cpu" else torch.empty_like(host, device=self.device))
                        op = dist.isend if self.rank == src else dist.irecv
                        p2p.append(dist.P2POp(op, wire, group=self.group, group_peer=peer, tag=tags[src, dst]))
                        tags[src, dst] += 1
                        if self.rank != src:
                            landings.append((whole, bucket, host, wire))
        if p2p:
            works = self._run("a point-to-point exchange", dist.batch_isend_irecv, p2p)
            for work in works:
                self._run("a point-to-point exchange", work.wait)
        for whole, bucket, host, wire in landings:
            self._land(host, wire)
            self._unpack(whole, bucket, host)

    @staticmethod
    def _bucket_tensor(whole, bucket, *, sending: bool):
        """The bytes of a bucket: in place for one segment, else a packed copy (or room for one)."""
        if len(bucket) == 1:
            a, b = bucket[0]
            return whole[a:b]
        if sending:
            return torch.cat([whole[a:b] for a, b in bucket])
        return torch.empty(sum(b - a for a, b in bucket), dtype=torch.uint8)

    @staticmethod
    def _unpack(whole, bucket, packed) -> None:
        if len(bucket) == 1:
            return
        pos = 0
        for a, b in bucket:
            whole[a:b] = packed[pos:pos + b - a]
            pos += b - a

    def _broadcast_bucket(self, whole, bucket, src: int) -> None:
        host = self._bucket_tensor(whole, bucket, sending=self.rank == src)
        self._broadcast(host, src)
        if self.rank != src:
            self._unpack(whole, bucket, host)
