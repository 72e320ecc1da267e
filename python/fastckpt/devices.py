"""Device loads: file → reused (pinned) host buffers → device, behind a small backend seam.

A storage whose target is a CUDA or MPS device is not made on the CPU and copied by torch one
storage at a time from pageable or mapped pages. Before unpickling, ``plan_staging`` finds the
storages the pickle names (a native scan) and where ``map_location`` sends them; a stager thread
then reads their bytes with the copy engine (pread on worker threads, CRC-32 on the way, GIL
released) into a ring of host buffers allocated once per load, and issues asynchronous copies from
there to the device; an event per buffer gates its reuse, so reads, CRC and copies overlap while
host memory stays within ``staging_bytes``. Storages of at most ``PACK_BYTES`` share one buffer,
one copy and one device slab (each a view that keeps the slab alive); larger ones get their own
device allocation, so freeing the tensor frees its memory.

Backends: ``CudaBackend`` (pinned buffers from torch's caching host allocator, which keeps them
for the next load; a copy stream per device), ``MpsBackend`` (no pinning on MPS; same ring) and
``FakeBackend`` (tests: device memory is host memory, copies run on a thread of their own). A load
picks the backend for each target device type; ``use_backend(backend)`` overrides the one for
``backend.device_type`` in the calling context only, e.g.
``with use_backend(FakeBackend()): fastckpt.load(path, map_location="cuda:0")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import threading
import time
import traceback
import weakref
import zlib
from dataclasses import dataclass, field

import torch

from fastckpt import _native

DEFAULT_STAGING_BYTES = 4 * (64 << 20)
SLOTS = 4  # ring buffers: one being read, one being copied, two of slack for uneven steps
PACK_BYTES = 1 << 20  # torch's allocator also serves storages this small from shared blocks
_PACK_ALIGN = 256  # each packed storage starts aligned as a cudaMalloc'd one would
_MIN_SLOT_BYTES = 4096


# ---- backends -----------------------------------------------------------------------------------


class CudaBackend:
    device_type = "cuda"

    def device(self, target: torch.device) -> torch.device | None:
        """The device torch.load would use ("cuda" = the current one), or None to leave it to torch."""
        if not torch.cuda.is_available():
            return None  # torch's own path raises its message
        index = torch.cuda.current_device() if target.index is None else target.index
        return torch.device("cuda", index) if index < torch.cuda.device_count() else None

    def session(self, devices) -> _CudaSession:
        return _CudaSession(devices)


class _CudaSession:
    def __init__(self, devices):
        self._caller = {d: torch.cuda.current_stream(d) for d in devices}
        self._copy = {d: torch.cuda.Stream(d) for d in devices}
        for d in devices:
            # Memory the caller freed may still be read by its queued work: copies start after it.
            self._copy[d].wait_stream(self._caller[d])

    @staticmethod
    def host_buffer(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, device, nbytes: int) -> torch.Tensor:
        # Allocated for the caller's stream (the stager thread's current stream is another), so
        # memory freed later returns to the pool the caller allocates from.
        with torch.cuda.stream(self._caller[device]):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Host to device, or device to host (saves) into a pinned buffer, on the device's copy stream."""
        with torch.cuda.stream(self._copy[src.device if dst.device.type == "cpu" else dst.device]):
            dst.copy_(src, non_blocking=True)

    def record(self, device):
        event = torch.cuda.Event()
        event.record(self._copy[device])
        return event

    def finish(self) -> None:
        """The returned tensors are safe on the caller's current streams."""
        for d, stream in self._caller.items():
            stream.wait_stream(self._copy[d])

    def close(self) -> None:
        for stream in self._copy.values():
            stream.synchronize()


class MpsBackend:
    device_type = "mps"

    def device(self, target: torch.device) -> torch.device | None:
        return torch.device("mps", 0) if torch.backends.mps.is_available() else None

    def session(self, devices) -> _MpsSession:
        return _MpsSession()


class _MpsSession:
    """MPS has no pinned memory and runs copies and the caller's work on one queue."""

    @staticmethod
    def host_buffer(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    @staticmethod
    def empty(device, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    @staticmethod
    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    @staticmethod
    def record(device):
        event = torch.mps.Event()
        event.record()
        return event

    def finish(self) -> None:
        pass  # one queue: the caller's later work is ordered after the copies

    @staticmethod
    def close() -> None:
        torch.mps.synchronize()


class FakeBackend:
    """A stand-in device for tests: device memory is host memory, each copy runs on a copy thread
    after a random delay. It checks what the ring promises and counts what it saw:

    - ``early_refills``: copies whose source bytes changed between issue and execution (a buffer
      refilled before its copy finished);
    - ``max_host_bytes`` / ``max_in_flight``: peak bytes of live host buffers / of issued, unfinished copies;
    - ``live_host_buffers``: host buffers not yet freed; ``copies``, ``copy_seconds``.

    ``fail_copy=n`` makes the n-th copy (1-based) raise; ``on_copy(n)`` is called before each copy
    on the copy thread (tests raise from it, or interrupt the main thread).
    """

    def __init__(self, device_type: str = "cuda", *, delay=(0.0, 0.0), seed: int = 0, fail_copy=None, on_copy=None):
        self.device_type = device_type
        self.delay = delay
        self.fail_copy = fail_copy
        self.on_copy = on_copy
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.copies = 0
        self.copy_seconds = 0.0
        self.early_refills = 0
        self.host_bytes = self.max_host_bytes = 0
        self.in_flight = self.max_in_flight = 0
        self.live_host_buffers = 0

    def device(self, target: torch.device) -> torch.device:
        return torch.device(self.device_type, target.index or 0)

    def session(self, devices) -> _FakeSession:
        return _FakeSession(self)

    def _host_buffer_freed(self, nbytes: int) -> None:
        with self._lock:
            self.host_bytes -= nbytes
            self.live_host_buffers -= 1


class _FakeEvent:
    def __init__(self, session: _FakeSession, issued: int):
        self._session, self._issued = session, issued

    def synchronize(self) -> None:
        self._session.wait_for(self._issued)


class _FakeSession:
    def __init__(self, backend: FakeBackend):
        self._backend = backend
        self._queue: list = []
        self._changed = threading.Condition()
        self._issued = self._done = 0
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fastckpt-fake-copy", daemon=True)
        self._thread.start()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        b = self._backend
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        with b._lock:
            b.host_bytes += nbytes
            b.max_host_bytes = max(b.max_host_bytes, b.host_bytes)
            b.live_host_buffers += 1
        weakref.finalize(buffer, b._host_buffer_freed, nbytes)
        return buffer

    @staticmethod
    def empty(device, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        b = self._backend
        with b._lock:
            b.in_flight += src.numel()
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
        with self._changed:
            self._queue.append((dst, src, zlib.crc32(src.numpy())))
            self._issued += 1
            self._changed.notify_all()

    def record(self, device) -> _FakeEvent:
        with self._changed:
            return _FakeEvent(self, self._issued)

    def wait_for(self, issued: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._done >= issued)
            if self._error is not None:
                raise self._error

    def finish(self) -> None:
        self.wait_for(self._issued)

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        b = self._backend
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                dst, src, digest = self._queue.pop(0)
            start = time.perf_counter()
            try:
                if self._error is None:  # a failed copy poisons the rest, as a CUDA error does
                    time.sleep(b._random.uniform(*b.delay))
                    b.copies += 1
                    if b.on_copy is not None:
                        b.on_copy(b.copies)
                    if b.copies == b.fail_copy:
                        raise RuntimeError(f"fake device: copy {b.copies} failed")
                    if zlib.crc32(src.numpy()) != digest:
                        b.early_refills += 1
                    dst.copy_(src)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits, as a device error is
                traceback.clear_frames(e.__traceback__)  # no buffer kept alive by a stored error
                self._error = e
            with b._lock:
                b.in_flight -= src.numel()
                b.copy_seconds += time.perf_counter() - start
            del dst, src
            with self._changed:
                self._done += 1
                self._changed.notify_all()


_BACKENDS = {"cuda": CudaBackend(), "mps": MpsBackend()}
_override: contextvars.ContextVar = contextvars.ContextVar("fastckpt_device_backend", default=None)


@contextlib.contextmanager
def use_backend(backend):
    """Loads in this context stage storages for ``backend.device_type`` through `backend`."""
    token = _override.set(backend)
    try:
        yield backend
    finally:
        _override.reset(token)


def backend_for(device_type: str):
    override = _override.get()
    if override is not None and override.device_type == device_type:
        return override
    return _BACKENDS.get(device_type)


# ---- the plan ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Block:
    """One device allocation: a slab of packed storages, or one large storage (at offset 0)."""

    device: torch.device
    nbytes: int = 0
    members: dict = field(default_factory=dict)  # key -> offset
    tensor: torch.Tensor | None = None


@dataclass(eq=False)
class _Chunk:
    """What one ring buffer carries to the device in one copy."""

    block: _Block
    block_offset: int
    nbytes: int
    ranges: list  # (file offset, length, buffer offset)
    names: list  # packed: the whole records read; large: [the record this is part of]
    part_of: int | None = None  # large: the record's size (its CRC is combined over chunks)


def _could_stage(map_location, data_pickle: bytes) -> bool:
    """A cheap test before the scan (0.1 s for 100k storages): could any target be a staged device?
    Targets are map_location's strings or the file's own location tags, which data.pkl holds as text."""
    override = _override.get()
    if override is None and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return False  # nothing to stage to (torch's own path says so for a device-tagged file)
    types = set(_BACKENDS) | ({override.device_type} if override is not None else set())
    if isinstance(map_location, (str, torch.device)):
        targets = [str(map_location)]
    else:
        targets = [str(t) for t in map_location.values()] if isinstance(map_location, dict) else []
        targets += [t for t in types if t.encode() in data_pickle]  # tags the file may carry
    return any(t.split(":")[0] in types for t in targets)


def _torch_deserializers_only() -> bool:
    """Staging replaces torch's restore step; a deserializer registered by others could claim any tag."""
    registry = torch.serialization._package_registry
    return all(getattr(fn, "func", fn).__module__ == "torch.serialization" for _, _, fn in registry)  # some are partials


def _slot_bytes(staging_bytes: int) -> int:
    # A power of two: torch's pinned allocator rounds sizes up to one, which would break the bound.
    return 1 << ((staging_bytes // SLOTS).bit_length() - 1)


def check_staging_bytes(staging_bytes) -> int:
    if staging_bytes is None:
        return DEFAULT_STAGING_BYTES
    if not isinstance(staging_bytes, int) or isinstance(staging_bytes, bool) or staging_bytes < SLOTS * _MIN_SLOT_BYTES:
        raise ValueError(f"staging_bytes must be an integer of at least {SLOTS * _MIN_SLOT_BYTES}, got {staging_bytes!r}")
    return staging_bytes


def plan_staging(archive, data_pickle: bytes, map_location, plan, *, staging_bytes: int, check_crc: bool,
                 threads: int):
    """A Stager for the storages whose target (in `plan`) is a device with a backend, marked staged
    in the plan, or None when there are none.

    A callable map_location, a deserializer registered outside torch, or a pickle the scan refuses
    (the real unpickling then raises its error) leave every storage to torch's per-storage path.
    """
    if plan.target("cpu") is None or not _could_stage(map_location, data_pickle):
        return None
    if not _torch_deserializers_only():
        return None
    try:
        refs = _native.scan_storages(data_pickle)
    except (RuntimeError, ValueError):  # CheckpointError subclasses: the real unpickling says why
        return None
    staged = []
    for key, location in refs:
        try:
            target = torch.device(plan.target(location))
        except RuntimeError:
            continue  # not a device string: torch's path raises its message
        backend = backend_for(target.type)
        device = backend.device(target) if backend is not None else None
        name = f"data/{key}"
        if device is None or name not in archive:
            continue
        record = archive.record(name)
        if record.method == _native.Method.stored:  # deflated records are inflated on the host first
            staged.append((key, record, backend, device))
    if not staged:
        return None
    backends = {b for _, _, b, _ in staged}
    if len(backends) != 1:  # one target type per load in practice (cuda, or mps)
        return None
    for key, _, _, _ in staged:
        plan.stage(key)
    return Stager(archive, staged, backends.pop(), staging_bytes=staging_bytes, check_crc=check_crc, threads=threads)


def _plan_chunks(staged, slot_bytes: int):
    """Blocks per key and chunks in file order; packed storages share a block and a chunk."""
    blocks: dict[str, _Block] = {}
    chunks: list[_Chunk] = []
    open_pack: dict[torch.device, _Chunk] = {}
    pack_limit = min(PACK_BYTES, slot_bytes)
    for key, record, _, device in sorted(staged, key=lambda s: s[1].data_offset):
        size, name = record.size, record.name
        if size <= pack_limit:
            chunk = open_pack.get(device)
            at = -(-chunk.nbytes // _PACK_ALIGN) * _PACK_ALIGN if chunk is not None else 0
            if chunk is None or at + size > slot_bytes:
                chunk = _Chunk(_Block(device), 0, 0, [], [])
                open_pack[device] = chunk
                chunks.append(chunk)
                at = 0
            chunk.block.members[key] = at
            chunk.nbytes = chunk.block.nbytes = at + size
            if size:
                chunk.ranges.append((record.data_offset, size, at))
                chunk.names.append(name)
            blocks[key] = chunk.block
        else:
            block = _Block(device, size, {key: 0})
            blocks[key] = block
            for start in range(0, size, slot_bytes):
                n = min(slot_bytes, size - start)
                chunks.append(_Chunk(block, start, n, [(record.data_offset + start, n, 0)], [name], size))
    return blocks, [c for c in chunks if c.nbytes]


class Stager:
    """Reads and copies the planned storages on a thread of its own while the load unpickles.

    Use as a context manager around the unpickling, and call ``finish()`` at its end: leaving the
    block any other way (an error, Ctrl-C) stops the thread, waits until no copy runs and releases
    every buffer. Requires the GIL for every method.
    """

    def __init__(self, archive, staged, backend, *, staging_bytes: int, check_crc: bool, threads: int):
        self._archive = archive
        self._backend = backend
        self._check_crc = check_crc
        self._threads = threads
        self._blocks, self._chunks = _plan_chunks(staged, _slot_bytes(staging_bytes))
        self._devices = sorted({d for _, _, _, d in staged}, key=str)
        self._slot_bytes = max((c.nbytes for c in self._chunks), default=0)
        self._lock = threading.Lock()  # block allocation: the unpickling and the stager both ask
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._buffers: list = []  # (tensor, numpy view), allocated as the ring first needs them
        self._events: list = []
        self._partial: dict[str, tuple[int, int]] = {}  # large record -> (CRC so far, bytes so far)
        self._session = None
        self._thread: threading.Thread | None = None

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The device storage of `key` (its size checked by the plan), its bytes still arriving until finish()."""
        block = self._blocks[key]
        whole = self._tensor(block).untyped_storage()
        if len(block.members) == 1 and block.nbytes == nbytes:
            return whole
        offset = block.members[key]
        return whole[offset : offset + nbytes]  # a view that keeps the slab alive

    def _tensor(self, block: _Block) -> torch.Tensor:
        with self._lock:
            if block.tensor is None:
                block.tensor = self._session.empty(block.device, block.nbytes)
            return block.tensor

    def __enter__(self):
        self._session = self._backend.session(self._devices)
        self._thread = threading.Thread(target=self._run, name="fastckpt-stager", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for i, chunk in enumerate(self._chunks):
                if self._cancel.is_set():
                    return
                slot = i % SLOTS
                if slot == len(self._buffers):
                    buffer = self._session.host_buffer(self._slot_bytes)
                    self._buffers.append((buffer, buffer.numpy()))
                    self._events.append(None)
                elif self._events[slot] is not None:
                    self._events[slot].synchronize()  # its last copy has finished: refill it
                buffer, view = self._buffers[slot]
                crcs = self._archive.read_ranges(view, chunk.ranges, self._check_crc, self._threads)
                if self._check_crc:
                    self._check(chunk, crcs)
                dst = self._tensor(chunk.block)[chunk.block_offset : chunk.block_offset + chunk.nbytes]
                self._session.copy(dst, buffer[: chunk.nbytes])
                self._events[slot] = self._session.record(chunk.block.device)
            for event in self._events:
                event.synchronize()
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() on the loading thread
            self._error = e

    def _check(self, chunk: _Chunk, crcs) -> None:
        if chunk.part_of is None:
            self._archive.check_crcs(chunk.names, crcs)
            return
        name, (crc, length) = chunk.names[0], (crcs[0], chunk.nbytes)
        if name in self._partial:
            before, done = self._partial.pop(name)
            crc, length = _native.crc32_combine(before, crc, length), done + length
        if length == chunk.part_of:
            self._archive.check_crcs([name], [crc])
        else:
            self._partial[name] = (crc, length)

    def finish(self) -> None:
        """Waits for every read and copy; raises the first failure (IntegrityError for a CRC)."""
        while self._thread.is_alive():
            self._thread.join(0.1)  # timed: a KeyboardInterrupt reaches this thread meanwhile
        if self._error is not None:
            error, self._error = self._error, None
            traceback.clear_frames(error.__traceback__)  # its frames would keep ring buffers alive
            raise error
        self._session.finish()

    def __exit__(self, kind, error, tb):
        self._cancel.set()
        try:
            while self._thread.is_alive():
                self._thread.join(0.1)
            self._error = None  # an error nobody raised: its frames would keep buffers alive
        finally:
            self._session.close()  # no copy runs past here, so buffers and blocks may go
            self._buffers.clear()
            self._events.clear()
            if kind is not None:
                for block in self._blocks.values():
                    block.tensor = None
