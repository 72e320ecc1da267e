"""``fastckpt.save``: what ``torch.save`` writes, written natively, in parallel and atomically.

``data.pkl`` is pickled here with torch's persistent-id rules (torch 2.13's ``torch/serialization.py``
``_save``); the storages go to the native writer, which lays the archive out up front and writes the
records from several threads with their CRC-32 computed on the way. The result is the file
``torch.save`` writes, byte for byte (see the README's "Save" section for where that holds).
"""

from __future__ import annotations

import collections
import copyreg
import functools
import gc
import io
import os
import pickle
import sys
from dataclasses import dataclass

import torch
import torch.serialization as _ts

from fastckpt import _native, devices
from fastckpt._atomic import write_file

__all__ = ["save"]

# torch's writer (caffe2 PyTorchStreamWriter) writes this version for torch.save.
_FORMAT_VERSION_RECORD = b"3\n"


def save(
    obj,
    f,
    pickle_module=pickle,
    pickle_protocol=_ts.DEFAULT_PROTOCOL,
    _use_new_zipfile_serialization=True,
    _disable_byteorder_record=False,
    *,
    threads=None,
    atomic=True,
    fsync=False,
    staging_bytes=None,
):
    """Save `obj` like ``torch.save`` does, with storages written in parallel, CRC-32 included.

    Takes ``torch.save``'s arguments and writes the same archive. Extra keywords:

    * ``threads``: writer threads (default: the CPUs this process may use).
    * ``atomic`` (default True): for a path, write a temporary file next to the target and rename it
      over the target only once complete, so a failure or a kill never leaves a torn file (the
      previous one stays). File objects are written in order, as torch does; ``atomic`` does not
      apply to them.
    * ``fsync``: flush the file (and, for an atomic save, its directory) to stable storage.
    * ``staging_bytes``: host memory for CUDA/MPS storages saved to a path (default
      ``devices.DEFAULT_STAGING_BYTES``): they stream device → a ring of reused (pinned) buffers →
      file, the copies overlapped with the writing, instead of a host copy of every storage at once.

    ``_use_new_zipfile_serialization=False`` (the legacy format, still atomic) and
    ``torch.serialization.skip_data`` (in place, as torch does it) are handed to torch's own writer.
    """
    torch._C._log_api_usage_once("torch.save")
    _ts._check_dill_version(pickle_module)
    _ts._check_save_filelike(f)
    if isinstance(f, (str, os.PathLike)):
        f = os.fspath(f)
    if not _use_new_zipfile_serialization:
        if _ts._serialization_tls.skip_data:
            raise RuntimeError("Cannot use skip_data=True with _use_new_zipfile_serialization=False")
        write_file(f, atomic, fsync, lambda target: _legacy_save(obj, target, pickle_module, pickle_protocol))
        return
    if _ts._serialization_tls.skip_data:  # records without their bytes: a layout for someone else to fill
        with _ts._open_zipfile_writer(f) as opened:
            _ts._save(obj, opened, pickle_module, pickle_protocol, _disable_byteorder_record)
        return

    staging_bytes = devices.check_staging_bytes(staging_bytes)
    with collection_paused():
        _save_zip(obj, f, pickle_module, pickle_protocol, _disable_byteorder_record, threads, atomic, fsync,
                  staging_bytes)


class collection_paused:
    """Garbage collection off for a save, restored as it was when the block is left.

    A save makes several objects per tensor, nearly all freed when it ends: collections meanwhile cost
    ~30% of the pickling, and re-enabled any earlier the first one would walk the save's bookkeeping
    (dicts over every storage). Leave the block after the frame holding the save's objects is gone."""

    def __enter__(self):
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self._was_enabled:
            gc.enable()


def check_zip_save(f, pickle_module, use_new_zipfile_serialization: bool) -> None:
    """torch.save's checks of its arguments, for a save in the zip format fastckpt writes."""
    torch._C._log_api_usage_once("torch.save")
    _ts._check_dill_version(pickle_module)
    _ts._check_save_filelike(f)
    if not use_new_zipfile_serialization or _ts._serialization_tls.skip_data:
        raise ValueError("a background save writes the zip format with data: _use_new_zipfile_serialization=False "
                         "and torch.serialization.skip_data need fastckpt.save(..., background=False)")


def _save_zip(obj, f, pickle_module, pickle_protocol, disable_byteorder: bool, threads, atomic: bool, fsync: bool,
              staging_bytes: int):
    if not isinstance(f, str):
        _check_writable(f)
    pickled = pickle_for_save(obj, f, pickle_module, pickle_protocol, disable_byteorder)
    cpu, staged = pickled.placement()

    def write(target):
        # Each storage's address and size are read now, after the pickling: an object's __reduce__ or a
        # persistent hook may have resized or freed one (as FSDP does), and torch.save writes what a
        # storage holds when it writes it.
        sources = {key: ((storage.data_ptr(), storage.nbytes()),) for key, storage in cpu.items()}
        copies = []  # host copies of device storages, alive until written
        if isinstance(target, int):
            sources.update(_stream_to_file(target, f, pickled, staged, staging_bytes, threads))
        else:  # in order, through write(): each device storage copied to the host first, as torch does
            for key, (storage, _) in staged.items():
                copies.append(_to_cpu(storage))
                sources[key] = ((copies[-1].data_ptr(), copies[-1].nbytes()),)
        write_records(target, pickled, pickled.records(sources), threads, f if isinstance(target, int) else "")

    write_file(f, atomic, fsync, write)


@dataclass(eq=False)
class Pickled:
    """A save's data.pkl and the storages it names, keyed "0", "1"... in first-pickled order; `cpu`:
    the keys of those the pickler knew to be CPU storages."""

    prefix: str
    alignment: int
    compute_crc32: bool
    disable_byteorder: bool
    data_pkl: bytes
    storages: dict
    cpu: set

    def placement(self) -> tuple[dict, dict]:
        """({key: CPU storage}, {key: (device storage, its devices backend)}); storages on other devices
        are copied to the CPU here, as torch.save does. A devices.use_backend override for "cpu"
        (tests) sends CPU storages through its backend as if they were on a device."""
        cpu_backend = devices.backend_for("cpu")
        if cpu_backend is None and len(self.cpu) == len(self.storages):
            return dict(self.storages), {}
        cpu, staged = {}, {}
        for key, storage in self.storages.items():
            kind = "cpu" if key in self.cpu else storage.device.type
            backend = cpu_backend if kind == "cpu" else devices.backend_for(kind)
            if backend is not None:
                staged[key] = (storage, backend)
            elif kind == "cpu":
                cpu[key] = storage
            else:
                cpu[key] = self.storages[key] = _to_cpu(storage)
        return cpu, staged

    def records(self, sources: dict) -> list:
        """Every record in torch's order: (name, data, ...) with each storage's (data, ...) tuple from
        `sources` (see _native.write_zip)."""
        return self._framed([(f"data/{key}", *sources[key]) for key in self.storages])

    def data_offsets(self) -> dict:
        """{key: where its storage's data goes in the file}, for storages of their current sizes (the
        layout depends on names and sizes only)."""
        framed = self._framed([(f"data/{key}", s.nbytes()) for key, s in self.storages.items()])
        sizes = [(name, data if isinstance(data, int) else len(data)) for name, data in framed]
        offsets = dict(zip((name for name, _ in sizes), _native.zip_data_offsets(sizes, self.prefix, self.alignment)))
        return {key: offsets[f"data/{key}"] for key in self.storages}

    def _framed(self, stored: list) -> list:
        """`stored` (the storages' records) with the other records around them, in torch's order."""
        if sys.byteorder not in ("little", "big"):
            raise ValueError("Unknown endianness type: " + sys.byteorder)
        byteorder = [("byteorder", sys.byteorder.encode())]
        records = [("data.pkl", self.data_pkl), (".format_version", b"1"),
                   (".storage_alignment", str(self.alignment).encode())]
        if not self.disable_byteorder:
            records += byteorder
        records += stored
        records.append(("version", _FORMAT_VERSION_RECORD))
        if self.disable_byteorder:
            records += byteorder  # torch's writer adds it when the caller did not
        return records


def pickle_for_save(obj, f, pickle_module, pickle_protocol, disable_byteorder: bool) -> Pickled:
    """Pickles `obj` as torch.save does for a save to `f` (a path or a file object), under the current
    ``torch.utils.serialization.config``."""
    from torch.utils.serialization import config

    prefix = "archive" if not isinstance(f, str) else _archive_name(f)
    data_pkl, storages, cpu = _pickle(obj, pickle_module, pickle_protocol)
    return Pickled(prefix, config.save.storage_alignment, config.save.compute_crc32, disable_byteorder, data_pkl,
                   storages, cpu)


def write_records(target, pickled: Pickled, records: list, threads, path: str = "") -> None:
    """Writes the archive of `records` to a descriptor (from offset 0) or a file object (in order)."""
    _native.write_zip(target, records, pickled.prefix, pickled.alignment, pickled.compute_crc32, threads or 0, path)
    if not isinstance(target, int):
        target.flush()


def write_to_path(path: str, pickled: Pickled, records: list, threads, *, atomic: bool, fsync: bool) -> None:
    """write_records to `path`, atomically unless told otherwise (see save)."""
    write_file(path, atomic, fsync, lambda target: write_records(target, pickled, records, threads, path))


def uint8_view(storage) -> torch.Tensor:
    """The bytes of `storage` as a 1-D uint8 tensor on its device."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _stream_to_file(fd: int, path: str, pickled: Pickled, staged: dict, staging_bytes: int, threads) -> dict:
    """Writes the data of the `staged` storages ({key: (storage, backend)}) to their places in the file
    through a ring of devices.SLOTS host buffers of the backend, each refilled by the next copy once
    its bytes are written, so copies overlap the writing and host memory stays within
    `staging_bytes`. Returns each storage's record source for write_zip (data in the file)."""
    if not staged:
        return {}
    where = pickled.data_offsets()
    slot_bytes = devices.slot_bytes(staging_bytes)
    sources = {}
    by_backend: dict = {}
    for key, (storage, backend) in staged.items():
        by_backend.setdefault(backend, []).append((key, storage))
    for backend, items in by_backend.items():
        sources.update(_stream_ring(fd, path, backend, items, where, slot_bytes, pickled.compute_crc32, threads))
    return sources


def _stream_ring(fd, path, backend, items, where, slot_bytes, compute_crc32, threads) -> dict:
    """_stream_to_file for the storages of one backend: [(key, storage)]."""
    # A chunk fills one ring buffer: its parts are (key, source view, offset in the record, length,
    # offset in the buffer); small storages share a chunk, large ones are cut into several.
    chunks, parts, used = [], [], 0
    sources = {}
    for key, storage in items:
        nbytes = storage.nbytes()
        if nbytes == 0:
            sources[key] = (b"", 0, 0)
            continue
        view = uint8_view(storage)
        for start in range(0, nbytes, slot_bytes):
            n = min(slot_bytes, nbytes - start)
            if used + n > slot_bytes:
                chunks.append(parts)
                parts, used = [], 0
            parts.append((key, view[start : start + n], start, n, used))
            used += -(-n // 64) * 64
    if parts:
        chunks.append(parts)
    session = backend.session(sorted({s.device for _, s in items}, key=str))
    buffers, events = [], []  # the backend's ring buffers (shared with loads), an event list per buffer
    crcs: dict = {}  # key -> (CRC so far, bytes so far, first bytes)
    try:
        def issue(i):
            slot = i % devices.SLOTS
            if slot == len(buffers):
                buffers.append(backend.ring.take(slot_bytes, slot_bytes))
                events.append(None)
            by_device: dict = {}
            for _, view, _, n, at in chunks[i]:
                by_device.setdefault(view.device, []).append((view, at, n))
            for device, pieces in by_device.items():
                session.to_host(device, buffers[slot][0], pieces)
            events[slot] = [session.record(d) for d in by_device]

        for i in range(min(devices.SLOTS, len(chunks))):
            issue(i)
        for i, chunk in enumerate(chunks):
            slot = i % devices.SLOTS
            for event in events[slot]:
                event.synchronize()
            buffer, view = buffers[slot]
            base = buffer.data_ptr()
            pieces = [(where[key] + start, base + at, n) for key, _, start, n, at in chunk]
            written = _native.write_pieces(fd, pieces, compute_crc32, threads or 0, path)
            for (key, _, start, n, at), crc in zip(chunk, written):
                if start == 0:
                    crcs[key] = (crc, n, view[at : at + min(n, 8)].tobytes())
                else:
                    before, done, lead = crcs[key]
                    crcs[key] = (_native.crc32_combine(before, crc, n), done + n, lead)
            if i + devices.SLOTS < len(chunks):
                issue(i + devices.SLOTS)
    finally:
        session.close()  # no copy into the buffers runs past here
        backend.ring.give(buffers)
    for key, (crc, done, lead) in crcs.items():
        sources[key] = (lead, crc, done)
    return sources


def _legacy_save(obj, target, pickle_module, pickle_protocol):
    """torch's writer of the legacy (pre-zip) format, into a file object or a descriptor."""
    if isinstance(target, int):
        with os.fdopen(os.dup(target), "wb") as file:
            return _legacy_save(obj, file, pickle_module, pickle_protocol)
    _ts._legacy_save(obj, target, pickle_module, pickle_protocol)
    target.flush()


def _archive_name(path: str) -> str:
    """The folder torch's writer puts the records in: the file name without its last extension. Raises
    torch's errors for a name it refuses and for a missing parent directory."""
    try:
        path.encode("ascii")
    except UnicodeEncodeError:
        return "archive"  # torch writes non-ASCII paths through a Python file object
    base = path[max(path.rfind("/"), path.rfind("\\")) + 1 :]
    dot = base.rfind(".")
    name = base[:dot] if dot >= 0 else base
    if not name:
        raise RuntimeError(f"invalid file name: {path}")
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        raise RuntimeError(f"Parent directory {parent} does not exist.")
    return name


def _check_writable(buffer) -> None:
    if not callable(getattr(buffer, "write", None)):
        msg = f"Buffer of {str(type(buffer)).strip('<>')} has no callable attribute 'write'"
        raise (AttributeError if not hasattr(buffer, "write") else TypeError)(msg)


def _pickle(obj, pickle_module, pickle_protocol):
    """data.pkl, the storages it references keyed "0", "1"... in first-pickled order, and the keys of
    those known to be on the CPU."""
    storages: dict[str, torch.UntypedStorage] = {}
    cpu: set[str] = set()
    keys: dict[int, str] = {}  # storage._cdata -> key
    dtypes: dict[int, torch.dtype] = {}  # data_ptr -> dtype: one memory may not be saved as two dtypes

    def key_of(storage, dtype, ptr):
        """torch's persistent_id bookkeeping: the dtype check, then the storage's key."""
        if ptr != 0 and dtypes.setdefault(ptr, dtype) != dtype:
            raise RuntimeError("Cannot save multiple tensors or storages that view the same data as different types")
        key = keys.setdefault(storage._cdata, str(len(keys)))
        storages[key] = storage
        return key

    def storage_id(o):
        """torch's persistent_id: the id of a storage the pickler meets as such, None for anything else."""
        if isinstance(o, torch.storage.TypedStorage):
            storage, dtype, storage_type, numel = o._untyped_storage, o.dtype, _storage_type(o.dtype), o._size()
        elif torch.is_storage(o):
            storage, dtype, storage_type, numel = o, torch.uint8, _ts.normalize_storage_type(type(o)), o.nbytes()
        else:
            return None
        key = key_of(storage, dtype, storage.data_ptr() if str(storage.device) != "meta" else 0)
        fake_device = getattr(o, "_fake_device", None)
        location = str(fake_device) if fake_device is not None else _ts.location_tag(storage)
        return ("storage", storage_type, key, location, numel)

    def reduce_tensor(t):
        """``Tensor.__reduce_ex__`` of a plain (exactly torch.Tensor) dense CPU tensor without hooks or
        Python state (torch's fast path, ``_reduce_ex_internal``'s last branch), with the persistent id
        of its storage made here (see _PersistentId); NotImplemented sends every other tensor to its own
        ``__reduce_ex__``. Runs once per tensor: every global it uses is bound to a local name."""
        if not t.is_cpu or t.layout is not strided or t.is_quantized or t.is_nested or t._backward_hooks or t.__dict__:
            return NotImplemented
        dtype = t.dtype
        rebuild, storage_type, id_dtype, itemsize = kinds.get(dtype) or _storage_kind(dtype)
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        key = key_of(storage, id_dtype, storage.data_ptr())
        cpu.add(key)
        pid = persistent_id(("storage", storage_type, key, "cpu", nbytes // itemsize))
        args = (pid, t.storage_offset(), tuple(t.size()), t.stride(), t.requires_grad, empty_hooks(ordered_dict))
        if rebuild is rebuild_v3:
            args += (dtype,)
        metadata = tensor_metadata(t)
        if metadata:
            args += (metadata,)
        return rebuild, args

    kinds, strided, persistent_id, empty_hooks, ordered_dict, rebuild_v3, tensor_metadata = (
        _KINDS, torch.strided, _PersistentId, _EmptyHooks, _ORDERED_DICT_REDUCE, torch._utils._rebuild_tensor_v3,
        torch._C._get_tensor_metadata)

    buffer = io.BytesIO()
    if pickle_module is pickle:
        # The same stream, with two Python calls per tensor (reduce_tensor, key_of): the pickler's hooks
        # are answered in C by type (None or NotImplemented for every other object), and the carriers
        # made by reduce_tensor are turned into what torch's pickler would write by tuple().
        persistent_ids = dict.fromkeys(_storage_types(), storage_id)
        persistent_ids[_PersistentId] = tuple
        # reduce_tensor takes torch's _get_obj_state(t) to be t.__dict__, true while torch.Tensor has no slots.
        fast_tensors = not copyreg._slotnames(torch.Tensor)
        reductions = {torch.Tensor: reduce_tensor, _EmptyHooks: tuple} if fast_tensors else {}

        pickler = _HookedPickler(buffer, protocol=pickle_protocol)
        pickler.persistent_id = _native.type_dispatch(persistent_ids, None)
        pickler.reducer_override = _native.type_dispatch(reductions, NotImplemented)
    else:
        pickler = _subclass_of(pickle_module.Pickler)(buffer, protocol=pickle_protocol)
        pickler.storage_id = storage_id
    pickler.dump(obj)
    return buffer.getvalue(), storages, cpu


# The picklers take their hooks per instance: a class made per save (as torch.save makes one) is a
# reference cycle, which kept the save's bookkeeping (every storage, and the CPU copies of device ones)
# alive after it returned, until a garbage collection found it.
class _HookedPickler(pickle.Pickler):
    """The stdlib pickler, with persistent_id and reducer_override set on the instance."""


@functools.cache
def _subclass_of(pickler: type) -> type:
    """Another pickle module's Pickler, answering persistent_id with the instance's `storage_id`."""

    class Pickler(pickler):
        def persistent_id(self, o):
            return self.storage_id(o)

    return Pickler


def _storage_types() -> tuple:
    """Every class torch's persistent_id takes for a storage: torch._storage_classes and TypedStorage's subclasses."""
    found, todo = set(torch._storage_classes), [torch.storage.TypedStorage]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return tuple(found)


_KINDS: dict[torch.dtype, tuple] = {}


def _storage_kind(dtype) -> tuple:
    """(rebuild function, storage type in the persistent id, dtype for the same-memory check, element size)
    of a tensor of `dtype` on torch's fast path, kept in _KINDS."""
    kind = _KINDS.get(dtype)
    if kind is None:
        if dtype in torch.storage._new_dtypes():  # saved as an UntypedStorage
            kind = (torch._utils._rebuild_tensor_v3, torch.UntypedStorage, torch.uint8, 1)
        else:
            kind = (torch._utils._rebuild_tensor_v2, _storage_type(dtype), dtype, torch._utils._element_size(dtype))
        _KINDS[dtype] = kind
    return kind


def _storage_type(dtype):
    """The legacy storage class of `dtype` (TypedStorage._pickle_storage_type()), with its error."""
    try:
        return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])
    except KeyError as e:
        raise KeyError(f"dtype {dtype} is not recognized") from e


class _PersistentId(tuple):
    """A storage's persistent id, made by reduce_tensor where torch's reduce value has a TypedStorage (or
    an UntypedStorage): its own type, so that persistent_id finds it and answers tuple(it), the id."""

    __slots__ = ()


class _EmptyHooks(tuple):
    """Stands for the empty OrderedDict of backward hooks in a tensor's reduce value: reducer_override
    answers tuple(it), (OrderedDict, ()), which pickles as torch's OrderedDict() does (and the pickler
    memoizes this object as it would that one), without a Python call or copyreg's slot-name lookup."""

    __slots__ = ()


_ORDERED_DICT_REDUCE = (collections.OrderedDict, ())


def _to_cpu(storage):
    """A CPU copy of a device storage, through pinned memory when torch.save would use it."""
    from torch.utils.serialization import config

    acc = torch.accelerator.current_accelerator(check_available=True) if config.save.use_pinned_memory_for_d2h else None
    if acc is None or acc.type != storage.device.type:
        return storage.cpu()
    pinned = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=True).untyped_storage()
    pinned.copy_(storage)
    torch.accelerator.current_stream(storage.device.index).synchronize()
    return pinned
