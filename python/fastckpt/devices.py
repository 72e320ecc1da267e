"""Device loads: file → reused (pinned) host buffers → device, behind a small backend seam.

A storage whose target is a CUDA or MPS device is not made on the CPU and copied by torch one
storage at a time from pageable or mapped pages. The loader's storage plan decides, once per load,
which storages go to which device (``loader._plan``); a ``Stager`` then reads their bytes on a thread
of its own with the copy engine (pread on worker threads, CRC-32 on the way, GIL released) into a
ring of host buffers, and issues asynchronous copies from there to the device; an event per buffer
gates its reuse, so reads, CRC and copies overlap while host memory stays within ``staging_bytes``.

Every storage is its own device allocation (``torch.empty`` on the caller's stream), as with
``torch.load``: ``record_stream``, IPC sharing, ``resize_`` and freeing behave as users expect, and a
zero-byte storage has data pointer 0. Batching happens in the copies: consecutive storages share a
ring buffer; on CUDA the small ones among them travel in one host→device copy into a temporary
device buffer (allocated on the copy stream, so only later work on that stream reuses it) and are
scattered on the device into their own allocations by one ``_foreach_copy_``. MPS copies each
storage on its own (an MPS storage's data pointer is a buffer handle: no slices of one).

The ring is allocated once per process per backend and reused by later loads (``HostRing``; the
first load allocates its buffers on a helper thread while it reads into the first one).
``release_host_buffers()`` frees the idle ones.

Backends: ``CudaBackend`` (pinned buffers, a copy stream per device, blocking events),
``MpsBackend`` (no pinning on MPS) and ``fastckpt.testing.FakeBackend`` (tests: device memory is host
memory, copies run on a thread of their own). ``use_backend(backend)`` overrides the backend for
``backend.device_type`` in the calling context only, e.g.
``with use_backend(testing.FakeBackend()): fastckpt.load(path, map_location="cuda:0")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import traceback
from dataclasses import dataclass

import torch

from fastckpt import _native

DEFAULT_STAGING_BYTES = 4 * (64 << 20)
SLOTS = 4  # ring buffers: one being read, one being copied, two of slack for uneven steps
PACK_BYTES = 1 << 20  # smaller storages travel to the device together and are scattered there
_ALIGN = 256  # each storage starts in a ring buffer aligned as a cudaMalloc'd one would
_MIN_SLOT_BYTES = 4096
_MIN_PIECE = 64 << 10  # a large storage's first piece fills what a buffer has left if at least this (or 1/8)


# ---- the host ring ------------------------------------------------------------------------------


class HostRing:
    """Host buffers (pinned for CUDA) kept between loads: a process pays their allocation once.

    A load takes up to ``SLOTS`` buffers and gives them back when no copy from them can run any
    more. Idle buffers are kept up to one ring's worth (the largest); concurrent loads allocate
    more, which are freed when given back. Thread-safe: the one pool shared across loads.
    """

    def __init__(self, allocate):
        self._allocate = allocate  # nbytes -> 1-D uint8 tensor
        self._lock = threading.Lock()
        self._idle: list = []  # (tensor, numpy view)
        self.allocations = 0  # buffers ever allocated (tests count reuse with it)

    def take(self, nbytes: int, limit: int):
        """An idle buffer of at least `nbytes` and at most `limit` bytes, else a new one of `nbytes`."""
        with self._lock:
            fits = [b for b in self._idle if nbytes <= b[0].numel() <= limit]
            if fits:
                best = min(fits, key=lambda b: b[0].numel())
                self._idle.remove(best)
                return best
            self.allocations += 1
        tensor = self._allocate(nbytes)  # outside the lock: a pinned allocation takes milliseconds
        return tensor, tensor.numpy()

    def give(self, buffers) -> None:
        with self._lock:
            self._idle.extend(buffers)
            self._idle.sort(key=lambda b: b[0].numel(), reverse=True)
            del self._idle[SLOTS:]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()

    @property
    def idle(self) -> int:
        """Buffers waiting for the next load."""
        with self._lock:
            return len(self._idle)


# ---- backends -----------------------------------------------------------------------------------


class CudaBackend:
    device_type = "cuda"

    def __init__(self):
        self.ring = HostRing(lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self._streams: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return torch.cuda.is_available()

    def device(self, target: torch.device) -> torch.device | None:
        """The device torch.load would use ("cuda" = the current one), or None to leave it to torch."""
        if not torch.cuda.is_available():
            return None  # torch's own path raises its message
        index = torch.cuda.current_device() if target.index is None else target.index
        return torch.device("cuda", index) if index < torch.cuda.device_count() else None

    def copy_stream(self, device: torch.device):
        """One per device and process: temporary device buffers freed on it return to its pool."""
        with self._lock:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            return self._streams[device]

    def session(self, devices) -> _CudaSession:
        return _CudaSession(self, devices)


def _runs(pieces):
    """Consecutive small pieces grouped (one copy and one scatter each); a large piece alone."""
    run: list = []
    for piece in pieces:
        if piece[2] >= PACK_BYTES:
            if run:
                yield run
                run = []
            yield [piece]
        else:
            run.append(piece)
    if run:
        yield run


class _CudaSession:
    def __init__(self, backend: CudaBackend, devices):
        self._caller = {d: torch.cuda.current_stream(d) for d in devices}
        self._copy = {d: backend.copy_stream(d) for d in devices}
        for d in devices:
            # Memory the caller freed may still be read by its queued work: copies start after it.
            self._copy[d].wait_stream(self._caller[d])

    def empty(self, device, nbytes: int) -> torch.Tensor:
        # Allocated for the caller's stream (the stager thread's current stream is another), so the
        # storage is an ordinary block of the caller's pool, freed and reused as torch.load's are.
        with torch.cuda.stream(self._caller[device]):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy(self, device, buffer: torch.Tensor, pieces) -> None:
        """Copies buffer[at : at + n] into each piece's `dst` (device tensors of n bytes)."""
        with torch.cuda.stream(self._copy[device]):
            for run in _runs(pieces):
                if len(run) == 1:
                    dst, at, n = run[0]
                    dst.copy_(buffer[at : at + n], non_blocking=True)
                    continue
                lo, hi = run[0][1], run[-1][1] + run[-1][2]
                # On the copy stream: freed right after this is queued, the block is reused only by
                # later work on the same stream, so no record_stream is needed.
                packed = torch.empty(hi - lo, dtype=torch.uint8, device=device)
                packed.copy_(buffer[lo:hi], non_blocking=True)
                torch._foreach_copy_([dst for dst, _, _ in run], [packed[at - lo : at - lo + n] for _, at, n in run])

    def to_host(self, device, buffer: torch.Tensor, pieces) -> None:
        """Saves: copies each piece's `src` (a device tensor of n bytes) into buffer[at : at + n]."""
        with torch.cuda.stream(self._copy[device]):
            for src, at, n in pieces:
                buffer[at : at + n].copy_(src, non_blocking=True)

    def record(self, device):
        event = torch.cuda.Event(blocking=True)  # a waiting thread sleeps instead of spinning a core
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

    def __init__(self):
        self.ring = HostRing(lambda n: torch.empty(n, dtype=torch.uint8))  # MPS has no pinned memory

    @staticmethod
    def available() -> bool:
        return torch.backends.mps.is_available()

    def device(self, target: torch.device) -> torch.device | None:
        return torch.device("mps", 0) if torch.backends.mps.is_available() else None

    def session(self, devices) -> _MpsSession:
        return _MpsSession()


class _MpsSession:
    """One queue for copies and the caller's work; each storage copied on its own (no packing:
    an MPS storage's data pointer is its buffer's handle, so a device-side slice is no storage)."""

    @staticmethod
    def empty(device, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    @staticmethod
    def copy(device, buffer: torch.Tensor, pieces) -> None:
        for dst, at, n in pieces:
            dst.copy_(buffer[at : at + n], non_blocking=True)

    @staticmethod
    def to_host(device, buffer: torch.Tensor, pieces) -> None:
        for src, at, n in pieces:
            buffer[at : at + n].copy_(src, non_blocking=True)

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


def staging_types() -> set[str]:
    """The device types a load can stage to here (a backend whose device is present, or overridden)."""
    override = _override.get()
    types = {t for t, backend in _BACKENDS.items() if backend.available()}
    return types | {override.device_type} if override is not None else types


def release_host_buffers() -> None:
    """Frees the idle staging buffers the backends keep between loads (256 MiB pinned for CUDA)."""
    for backend in _BACKENDS.values():
        backend.ring.clear()


def staging_device(target: str):
    """(backend, device) when storages bound for `target` (a plan's target string) are staged here,
    else None (torch's per-storage path restores them, and raises its message for a bad target)."""
    kind = target.split(":", 1)[0]
    if kind not in staging_types():
        return None
    try:
        device = torch.device(target)
    except RuntimeError:
        return None
    backend = backend_for(device.type)
    resolved = backend.device(device) if backend is not None else None
    return (backend, resolved) if resolved is not None else None


def slot_bytes(staging_bytes: int) -> int:
    """The size of each of the SLOTS ring buffers that `staging_bytes` allows."""
    # A power of two: torch's pinned allocator rounds sizes up to one, which would break the bound.
    return 1 << ((staging_bytes // SLOTS).bit_length() - 1)


def check_staging_bytes(staging_bytes) -> int:
    if staging_bytes is None:
        return DEFAULT_STAGING_BYTES
    if not isinstance(staging_bytes, int) or isinstance(staging_bytes, bool) or staging_bytes < SLOTS * _MIN_SLOT_BYTES:
        raise ValueError(f"staging_bytes must be an integer of at least {SLOTS * _MIN_SLOT_BYTES}, got {staging_bytes!r}")
    return staging_bytes


# ---- what each ring buffer carries ----------------------------------------------------------------


@dataclass(eq=False)
class _Piece:
    key: str
    record: object  # the storage's zip record
    start: int  # where in the record this piece starts
    nbytes: int
    at: int  # where in the ring buffer it lands


@dataclass(eq=False)
class _Chunk:
    """What one ring buffer carries to one device: whole storages and pieces of large ones."""

    device: torch.device
    nbytes: int = 0
    pieces: list | None = None


def _chunks(staged, slot_bytes: int) -> list:
    """Ring-buffer loads in file order: consecutive storages share a buffer; a storage that fits
    one buffer is never split, a larger one fills buffers in pieces."""
    chunks: list[_Chunk] = []
    open_chunk: dict[torch.device, _Chunk] = {}
    for key, record, device in sorted(staged, key=lambda s: s[1].data_offset):
        size, start = record.size, 0
        while start < size:
            chunk = open_chunk.get(device)
            at = -(-chunk.nbytes // _ALIGN) * _ALIGN if chunk is not None else slot_bytes
            room = slot_bytes - at
            if room <= 0 or (size - start > room and (size - start <= slot_bytes or room < min(_MIN_PIECE, slot_bytes // 8))):
                chunk = open_chunk[device] = _Chunk(device, 0, [])
                chunks.append(chunk)
                at, room = 0, slot_bytes
            n = min(room, size - start)
            chunk.pieces.append(_Piece(key, record, start, n, at))
            chunk.nbytes = at + n
            start += n
    return chunks


# ---- the stager ---------------------------------------------------------------------------------


class Stager:
    """Reads and copies the planned storages on a thread of its own while the load unpickles.

    `staged`: (key, zip record, device) for each storage the plan sends to a device of `backend`.
    Use as a context manager around the unpickling, and call ``finish()`` at its end: leaving the
    block any other way (an error, Ctrl-C) stops the thread, waits until no copy runs and releases
    every buffer and device block it holds. Requires the GIL for every method.
    """

    def __init__(self, archive, staged, backend, *, staging_bytes: int, check_crc: bool, threads: int):
        self._archive = archive
        self._backend = backend
        self._check_crc = check_crc
        self._threads = threads
        self._device = {key: device for key, _, device in staged}
        self._size = {key: record.size for key, record, _ in staged}
        self._limit = slot_bytes(staging_bytes)
        self._chunks = _chunks(staged, self._limit)
        need = max((c.nbytes for c in self._chunks), default=0)
        self._buffer_bytes = 1 << (need - 1).bit_length() if need else 0  # a power of two, as slot_bytes
        self._devices = sorted({d for _, _, d in staged}, key=str)
        self._lock = threading.Lock()  # device allocation: the unpickling and the stager both ask
        self._tensors: dict[str, torch.Tensor] = {}
        self._cancel = threading.Event()
        self._failed = threading.Event()
        self._stopped = threading.Event()  # the stager thread's last act (see _wait)
        self._error: BaseException | None = None
        self._buffers: list = [None] * min(SLOTS, len(self._chunks))  # (tensor, numpy view)
        self._buffers_ready = threading.Condition()
        self._events: list = [None] * len(self._buffers)
        self._partial: dict[str, tuple[int, int]] = {}  # large record -> (CRC so far, bytes so far)
        self._session = None
        self._thread: threading.Thread | None = None
        self._ring_done = True
        self._ring_error: BaseException | None = None
        self._ring_stopped = threading.Event()
        self._ring_stopped.set()
        self._ring_thread: threading.Thread | None = None

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The device storage of `key` (its size checked by the plan), its bytes still arriving until
        finish(). Raises the stager's error at once once it failed: nothing more is allocated."""
        if self._failed.is_set():
            self._wait(self._stopped)
            self._raise_error()
        if nbytes == 0:  # not cached by the load (data pointer 0), as torch's empty storages are not
            return self._session.empty(self._device[key], 0).untyped_storage()
        return self._tensor(key).untyped_storage()

    def _tensor(self, key: str) -> torch.Tensor:
        with self._lock:
            tensor = self._tensors.get(key)
            if tensor is None:
                tensor = self._tensors[key] = self._session.empty(self._device[key], self._size[key])
            return tensor

    def __enter__(self):
        self._session = self._backend.session(self._devices)
        self._thread = threading.Thread(target=self._run, name="fastckpt-stager", daemon=True)
        self._thread.start()
        return self

    def _take_buffers(self) -> None:
        """Takes the ring's buffers after the first (allocated while the first is read into)."""
        try:
            for slot in range(1, len(self._buffers)):
                if self._cancel.is_set():
                    return
                buffer = self._backend.ring.take(self._buffer_bytes, self._limit)
                with self._buffers_ready:
                    self._buffers[slot] = buffer
                    self._buffers_ready.notify_all()
        except BaseException as e:  # noqa: BLE001 - raised by the stager when it needs the buffer
            self._ring_error = e.with_traceback(None)
        finally:
            with self._buffers_ready:
                self._ring_done = True
                self._buffers_ready.notify_all()
            self._ring_stopped.set()

    def _buffer(self, slot: int):
        if slot == 0 and self._buffers[0] is None:
            self._buffers[0] = self._backend.ring.take(self._buffer_bytes, self._limit)
            if len(self._buffers) > 1:
                self._ring_done = False
                self._ring_stopped.clear()
                self._ring_thread = threading.Thread(target=self._take_buffers, name="fastckpt-ring", daemon=True)
                self._ring_thread.start()
        with self._buffers_ready:
            self._buffers_ready.wait_for(lambda: self._buffers[slot] is not None or self._ring_done)
        if self._buffers[slot] is None:
            error, self._ring_error = self._ring_error, None  # kept by no one but the raise: no cycle
            raise error or RuntimeError("staging buffers could not be allocated")
        return self._buffers[slot]

    def _run(self) -> None:
        try:
            for i, chunk in enumerate(self._chunks):
                if self._cancel.is_set():
                    return
                slot = i % len(self._buffers)
                buffer, view = self._buffer(slot)
                if self._events[slot] is not None:
                    self._events[slot].synchronize()  # its last copy has finished: refill it
                ranges = [(p.record.data_offset + p.start, p.nbytes, p.at) for p in chunk.pieces]
                crcs = self._archive.read_ranges(view, ranges, self._check_crc, self._threads)
                if self._check_crc:
                    self._check(chunk, crcs)
                if self._cancel.is_set():
                    return
                pieces = [(self._tensor(p.key)[p.start : p.start + p.nbytes], p.at, p.nbytes) for p in chunk.pieces]
                self._session.copy(chunk.device, buffer, pieces)
                self._events[slot] = self._session.record(chunk.device)
            for event in self._events:
                if event is not None:
                    event.synchronize()
        except BaseException as e:  # noqa: BLE001 - raised on the loading thread by storage() or finish()
            self._error = e
            self._failed.set()
        finally:
            self._stopped.set()

    def _check(self, chunk: _Chunk, crcs) -> None:
        names, whole = [], []
        for piece, crc in zip(chunk.pieces, crcs):
            name = piece.record.name
            if piece.nbytes == piece.record.size:
                names.append(name)
                whole.append(crc)
                continue
            if name in self._partial:
                before, done = self._partial.pop(name)
                crc, length = _native.crc32_combine(before, crc, piece.nbytes), done + piece.nbytes
            else:
                length = piece.nbytes
            if length == piece.record.size:
                names.append(name)
                whole.append(crc)
            else:
                self._partial[name] = (crc, length)
        if names:
            self._archive.check_crcs(names, whole)

    @staticmethod
    def _wait(stopped: threading.Event) -> None:
        # Timed, so a KeyboardInterrupt reaches the loading thread meanwhile; not Thread.join, which
        # an interrupt can leave believing a running thread stopped (CPython 3.11).
        while not stopped.wait(0.1):
            pass

    def finish(self) -> None:
        """Waits for every read and copy; raises the first failure (IntegrityError for a CRC)."""
        self._wait(self._stopped)
        self._raise_error()
        self._session.finish()

    def _raise_error(self) -> None:
        """Raises the stager's error, if any, without a reference cycle: the frames it was raised in
        drop their locals (ring buffers, device blocks) and no frame keeps the error it raises (its
        callers bind none), so a failed load's memory is freed without a garbage collection."""
        error, self._error = self._error, None
        if error is None:
            return
        traceback.clear_frames(error.__traceback__)
        try:
            raise error
        finally:
            del error

    def __exit__(self, kind, error, tb):
        self._cancel.set()
        interrupted = False
        # Nothing may be freed while the threads run or a copy may: a second Ctrl-C waits too.
        for stopped in (self._stopped, self._ring_stopped):
            while True:
                try:
                    self._wait(stopped)
                    break
                except KeyboardInterrupt:
                    interrupted = True
        self._thread.join()
        if self._ring_thread is not None:
            self._ring_thread.join()
        self._error = None  # an error nobody raised: its frames would keep buffers alive
        buffers = [b for b in self._buffers if b is not None]
        self._buffers = []
        self._events = []
        clean = False
        try:
            while not clean:
                try:
                    self._session.close()  # no copy runs past here (idempotent: retried after a Ctrl-C)
                    clean = True
                except KeyboardInterrupt:
                    interrupted = True
        finally:
            self._tensors = {}  # the result holds what it uses; a failed load frees its blocks here
            if clean:
                self._backend.ring.give(buffers)
            # else (a device error): a copy may still read them; they are dropped, not reused
        if interrupted and kind is None:
            raise KeyboardInterrupt
