"""fastckpt.load: torch.load's signature, defaults and results, on the native core."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import re
import sys
import warnings

import torch

from fastckpt import _native, devices
from fastckpt._native import StoragePlan
from fastckpt._policy import FullContext, WeightsOnlyContext, make_full_unpickler, resolve_weights_only
from fastckpt._storages import Storages, native_byteorder_differs, torch_deserializers_first
from fastckpt.archive import (
    byteorder_record,
    check_storage_alignment,
    check_version,
    open_archive,
    read_data_pickle,
    read_record,
)
from fastckpt.errors import CheckpointError, FormatError, IntegrityError, MetadataError, UnpicklingError

_ZIP_MAGIC = b"PK\x03\x04"
def _is_path(f) -> bool:
    return isinstance(f, (str, os.PathLike))


# torch's legacy format opens with a pickle of torch.serialization.MAGIC_NUMBER.
_LEGACY_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_MAGIC_TEXT = b"L%dL\n" % torch.serialization.MAGIC_NUMBER  # pickle protocols 0 and 1
_SNIFF_BYTES = 64 << 10


def _head(f) -> tuple[bytes, int]:
    """Up to 64 KiB from the start (paths) or the current position (file objects), and the size from there."""
    if _is_path(f):
        with open(f, "rb") as fh:
            return fh.read(_SNIFF_BYTES), os.fstat(fh.fileno()).st_size
    torch.serialization._check_seekable(f)
    start = f.tell()
    head = f.read(_SNIFF_BYTES)
    f.seek(0, os.SEEK_END)
    size = f.tell() - start
    f.seek(start)
    return head, size


def _is_legacy(head: bytes) -> bool:
    """A legacy torch.save stream (its magic number pickled first) or a legacy tar archive."""
    if head[257:262] == b"ustar":
        return True
    if head.startswith(_LEGACY_MAGIC_TEXT):
        return True
    if len(head) < 2 or head[0] != 0x80:  # PROTO
        return False
    body = head[2:]
    if body[:1] == b"\x95":  # FRAME (protocol 4+) and its 8-byte length
        body = body[9:]
    return body.startswith(_LEGACY_MAGIC)


def _format_of(f) -> str:
    """'zip' or 'legacy' (torch's own readers); anything else is not a checkpoint: FormatError."""
    head, size = _head(f)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if _is_legacy(head):
        return "legacy"
    if size == 0:
        raise FormatError("the file is empty (0 bytes): not a checkpoint")
    what = f"{size} bytes starting {head[:16].hex(' ')}"
    found = head.find(_ZIP_MAGIC)
    hint = f"; a zip signature is at offset {found}, not at 0 (bytes in front of the archive?)" if found > 0 else ""
    raise FormatError(
        f"not a checkpoint: {what}; expected a zip archive (PK\\x03\\x04 at offset 0), "
        f"a legacy torch.save pickle or a legacy tar archive{hint}"
    )


def _handed_to_torch(f, mmap) -> bool:
    """Inputs torch.load handles in ways fastckpt does not reproduce natively."""
    if _is_path(f) and os.fspath(f).endswith(".safetensors"):
        return True
    if _format_of(f) == "legacy":
        return True
    if torch._guards.detect_fake_mode(None) is not None or torch.serialization._serialization_tls.skip_data:
        return True  # fake tensors and skip_data: storages that do not hold file bytes
    if mmap and torch.serialization.get_default_mmap_options() != torch.serialization.MAP_PRIVATE:
        return True  # MAP_SHARED writes through to the file; fastckpt maps privately only
    return False


def _byteorder(archive) -> bytes | None:
    mark = byteorder_record(archive)
    if mark is not None:
        return mark
    from torch.serialization import LoadEndianness, get_default_load_endianness

    default = get_default_load_endianness()
    if default is None or default == LoadEndianness.LITTLE:
        return b"little"
    if default == LoadEndianness.BIG:
        return b"big"
    return None  # NATIVE: no swap


def _unpickle_natively(data_pickle: bytes, ctx, plan):
    """The native machine, with storages made natively where the plan says."""
    gc_was_enabled = gc.isenabled()
    # A pickle this long can make enough objects to make a full collection due (see _collect_if_due).
    heap = sys.getallocatedblocks() if gc_was_enabled and len(data_pickle) >= _MANY_OBJECTS_PICKLE else 0
    gc.disable()  # a load makes many objects; collections while it runs would cost ~15% of it
    count_before = gc.get_count()[0]
    try:
        return _native.unpickle(data_pickle, ctx, plan)
    except UnpicklingError as e:
        raise type(e)(ctx.message(str(e))) from None
    finally:
        if gc_was_enabled:
            gc.enable()
            _collect_if_due(gc.get_count()[0] - count_before, heap)


# Pickles shorter than this make too few objects to matter (a tensor takes ~60 bytes of pickle).
_MANY_OBJECTS_PICKLE = 64 << 10


def _collect_if_due(made: int, heap: int) -> None:
    """Run the full garbage collection that a load of many objects made due, before returning.

    Python collects its oldest generation once the objects that reached it since the last full
    collection pass a quarter of those that were there (gcmodule: long_lived_pending >
    long_lived_total / 4). A load of ~100k tensors (a tensor and its hooks OrderedDict each) passes
    that on its own; with collection off while the machine ran, the collection was left to the
    caller's next allocations (1.8 µs per tensor for 100k, landing on whatever touched the tensors
    first), where torch.load pays its collections inside the load. `heap` (pymalloc's blocks before
    the load, which outnumber the collected objects ~3.5 to 1 after `import torch`) stands in for the
    oldest generation, whose exact size costs ~15 ms to count: so this collects only where Python's
    own rule surely would, soon.
    """
    if heap and 4 * made > heap:
        gc.collect()


def _native_full_pickle(pickle_module, pickle_load_args, data_pickle: bytes) -> bool:
    """Whether a weights_only=False load can run on the native machine with pickle's semantics.

    Only for the stdlib pickle module with no option but `encoding`, and pickles of protocol 2 or
    more (torch.save's): Python 3's pickler writes none of the opcodes the machine refuses (INST,
    OBJ, PERSID) at those protocols; EXT1/2/4 would need copyreg extensions registered.
    """
    return (
        pickle_module is pickle
        and set(pickle_load_args) <= {"encoding"}
        and len(data_pickle) >= 2
        and data_pickle[0] == pickle.PROTO[0]
        and data_pickle[1] >= 2
    )


def _plan(archive, data_pickle: bytes, map_location, *, mmap, verify, threads, staging_bytes, keep_on_cpu=frozenset()):
    """Where every storage's bytes come from and where they go, decided once before the pickle runs:
    (the started plan, whether bytes are swapped, the device stager or None). Storages whose keys
    are in `keep_on_cpu` stay CPU storages over the archive's bytes whatever map_location says
    (a distributed load's storages that this rank did not ask for)."""
    byteswap = native_byteorder_differs(_byteorder(archive))
    if torch.serialization._is_meta_location(map_location):
        mode = StoragePlan.Mode.meta
    else:
        mode = StoragePlan.Mode.mapped if mmap else StoragePlan.Mode.arena
    targets = str(map_location) if isinstance(map_location, torch.device) else map_location
    # Storages are made natively (on the CPU or staged to a device) only from bytes as saved, and only
    # where torch's own deserializers would restore them.
    native = not byteswap and torch_deserializers_first()
    plan = StoragePlan(archive, mode, targets, native_cpu=native)
    stager = None
    if mode != StoragePlan.Mode.meta:
        staged = [s for s in _device_storages(archive, data_pickle, plan) if s[0] not in keep_on_cpu] if native else []
        if staged:
            backend = staged[0][3]
            for key, _, _, _ in staged:
                plan.stage(key)
            stager = devices.Stager(archive, [(k, r, d) for k, r, d, _ in staged], backend,
                                    staging_bytes=staging_bytes, check_crc=verify is not False, threads=threads)
        check_crc = verify if mmap else verify is not False
        for key in plan.deflated_keys():  # a re-zipped checkpoint: inflated under a cap, CRC-checked
            plan.adopt(key, read_record(archive, f"data/{key}", check_crc))
        plan.start(bool(check_crc), threads)
    return plan, byteswap, stager


def _device_storages(archive, data_pickle: bytes, plan) -> list:
    """(key, record, device, backend) for each stored storage the plan sends to a device it can stage
    to here; [] when none (or several device types: one backend per load), so torch's path runs."""
    named = plan.named_targets()
    types = devices.staging_types()
    if named is None or not types:
        return []  # a callable map_location decides per storage; or no device to stage to
    # Before the scan that says which storage goes where (0.5 s for 100k storages): could any? A
    # target map_location names, or a device tag it keeps, which data.pkl then holds as text.
    if not any(t.split(":", 1)[0] in types for t in named) and not any(
        plan.target(t) == t and t.encode() in data_pickle for t in types
    ):
        return []
    try:
        refs = _native.scan_storages(data_pickle)
    except (RuntimeError, ValueError):  # CheckpointError subclasses: the real unpickling says why
        return []
    staged, resolved = [], {}
    for key, location in refs:
        target = plan.target(location)
        if target not in resolved:  # a few distinct targets among up to ~100k storages
            resolved[target] = devices.staging_device(target)
        where = resolved[target]
        name = f"data/{key}"
        if where is None or name not in archive:
            continue
        record = archive.record(name)
        if record.method == _native.Method.stored:  # deflated records are inflated on the host first
            staged.append((key, record, where[1], where[0]))
    return staged if len({b for _, _, _, b in staged}) == 1 else []


def _load_archive(archive, map_location, pickle_module, *, weights_only, mmap, verify, threads, pickle_load_args,
                  staging_bytes=devices.DEFAULT_STAGING_BYTES, keep_on_cpu=frozenset()):
    check_version(archive)
    check_storage_alignment(archive)
    data_pickle = read_data_pickle(archive)  # CRC-checked
    plan, byteswap, stager = _plan(archive, data_pickle, map_location, mmap=mmap, verify=verify, threads=threads,
                                   staging_bytes=staging_bytes, keep_on_cpu=keep_on_cpu)
    storages = Storages(plan, map_location, byteswap=byteswap, stager=stager, keep_on_cpu=keep_on_cpu)

    tls = torch.serialization._serialization_tls
    tls.map_location = map_location
    try:
        with stager or contextlib.nullcontext():
            result = _unpickle(data_pickle, plan, storages, weights_only, pickle_module, pickle_load_args)
            if stager is not None:
                stager.finish()
    finally:
        tls.map_location = None
    _validate_sparse_tensors()
    return result


def _unpickle(data_pickle: bytes, plan, storages, weights_only, pickle_module, pickle_load_args):
    """The object graph, on the native machine where it can run; waits for every eager read."""
    if weights_only:
        ctx = WeightsOnlyContext(storages, pickle_load_args.get("encoding", "utf-8"))
    elif _native_full_pickle(pickle_module, pickle_load_args, data_pickle):
        # The stdlib pickle's semantics (any global, any callable) on the native machine, so
        # storages and tensors are made as fast as with weights_only.
        ctx = FullContext(storages, pickle_load_args["encoding"], protocol=data_pickle[1])
    else:
        ctx = None
    if ctx is None:
        unpickler = make_full_unpickler(pickle_module, io.BytesIO(data_pickle), storages, **pickle_load_args)
        result = unpickler.load()
    else:
        result = _unpickle_natively(data_pickle, ctx, plan)
    plan.finish()
    return result


def _validate_sparse_tensors() -> None:
    """Torch's end-of-load sparse checks, always on: an invalid sparse tensor corrupts memory on first use."""
    try:
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            torch._utils._validate_loaded_sparse_tensors()
    except (RuntimeError, ValueError, IndexError) as e:
        raise MetadataError(f"invalid sparse tensor: {e}") from e


def _resolve_verify(verify):
    """None: FASTCKPT_VERIFY (0 or 1) if set, else None (eager loads check every storage, lazy ones none)."""
    if verify is None:
        env = os.getenv("FASTCKPT_VERIFY", "").strip().lower()
        if env in ("1", "true", "yes"):
            return True
        if env in ("0", "false", "no"):
            return False
    return verify


def _integrity_message(error: IntegrityError, archive) -> str:
    """Adds the tensors the bad record belongs to (read by the torch-free reader: nothing is run)
    and how to load anyway."""
    from fastckpt.inspection import tensors_by_record, tree_of

    text = str(error)
    m = re.search(r"record '(data/[^']+)'", text)
    if m:
        try:
            paths = tensors_by_record(tree_of(archive)).get(m.group(1), [])
        except CheckpointError:
            paths = []
        if paths:
            text += f"\nIt holds the tensor(s): {', '.join(paths[:4])}."
    return text + "\nTo load it anyway, skip the storage checks with verify=False (under fastckpt.patch(): " \
                  "fastckpt.patch(verify=False) or FASTCKPT_VERIFY=0)."


def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, verify=None, threads=None,
         staging_bytes=None, **pickle_load_args):
    """Load an object saved with torch.save; a drop-in replacement for torch.load.

    Accepts everything ``torch.load`` accepts and returns an equal object graph.
    Zip checkpoints are read by the native core: the zip structure is checked
    strictly, ``data.pkl``'s CRC-32 is always verified, with ``mmap=False``
    every storage's CRC-32 is verified while it is read in parallel, and with
    ``mmap=True`` storages are zero-copy views of a private mapping of the file
    (``verify=True`` checks their CRC-32s up front). Legacy (non-zip) files,
    TorchScript archives and ``.safetensors`` paths are handed to ``torch.load``.

    Extra keyword-only arguments: ``verify`` — None (default; the environment variable
    ``FASTCKPT_VERIFY=0|1`` overrides it): eager loads check every storage's CRC-32,
    lazy ones none; True: check every storage, also with ``mmap=True``; False: check no
    storage (``data.pkl`` is always checked) — and ``threads`` (reader threads; default:
    all CPUs) — and ``staging_bytes``: the host memory through which storages bound for a
    CUDA or MPS device are staged (a ring of reused, pinned buffers; default 256 MiB), whatever
    ``mmap`` says; see :mod:`fastckpt.devices`.
    """
    weights_only, pickle_module = resolve_weights_only(weights_only, pickle_module)  # first, as torch does
    staging_bytes = devices.check_staging_bytes(staging_bytes)
    if mmap is None:
        from torch.utils.serialization import config

        mmap = config.load.mmap
    if _handed_to_torch(f, mmap):
        return torch.load(f, map_location, pickle_module, weights_only=weights_only, mmap=mmap, **pickle_load_args)
    start = None if _is_path(f) else f.tell()
    archive = open_archive(f)
    if "constants.pkl" in archive:  # a TorchScript archive: torch.load dispatches to torch.jit.load
        if start is not None:
            f.seek(start)
        return torch.load(f, map_location, pickle_module, weights_only=weights_only, mmap=mmap, **pickle_load_args)
    if mmap and not _is_path(f):  # after the TorchScript check, as in torch.load
        raise ValueError("f must be a file path in order to use the mmap argument")
    if pickle_load_args and weights_only:
        warnings.warn("pickle_load_args only works if `weights_only=False`.", stacklevel=2)
    pickle_load_args.setdefault("encoding", "utf-8")
    try:
        return _load_archive(
            archive, map_location, pickle_module, weights_only=weights_only, mmap=mmap,
            verify=_resolve_verify(verify), threads=threads or 0, pickle_load_args=pickle_load_args,
            staging_bytes=staging_bytes,
        )
    except IntegrityError as e:
        raise IntegrityError(_integrity_message(e, archive)) from None
