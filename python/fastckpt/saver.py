"""Background saves: ``fastckpt.save(obj, path, background=True)`` and :class:`AsyncSaver`.

A background save takes a *snapshot* before it returns: ``data.pkl`` is pickled, and every storage's
bytes are copied into staging memory the saver owns (CPU storages by a parallel native copy with the
GIL released, their CRC-32 computed on the way; CUDA/MPS storages by the ``fastckpt.devices``
backend into its host buffers, on a side stream ordered after the caller's, an event per copy). The
caller may then change or free anything it saved. A writer thread writes the archive from staging
(the same bytes a synchronous ``fastckpt.save`` writes at call time) and replaces the target
atomically. Staging memory is kept for the next save and released by ``close()``.
"""

from __future__ import annotations

import atexit
import collections
import os
import pickle
import sys
import threading
import time
import traceback
import weakref

import torch
import torch.serialization as _ts

from fastckpt import _native, writer
from fastckpt.errors import LimitError

__all__ = ["AsyncSaver", "SaveHandle", "save"]

_ALIGN = 64  # each storage's place in staging memory


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
    background=False,
):
    """Save `obj` like ``torch.save`` does: ``fastckpt.writer.save`` says how, and what ``threads``,
    ``atomic``, ``fsync`` and ``staging_bytes`` (synchronous saves of device storages) do.

    ``background=True`` (a path only) returns a :class:`SaveHandle` once a snapshot of `obj` is taken,
    and writes the file on the default :class:`AsyncSaver`'s thread (one save in flight: the next
    background save waits for this one's write first).
    """
    if not background:
        return writer.save(obj, f, pickle_module, pickle_protocol, _use_new_zipfile_serialization,
                           _disable_byteorder_record, threads=threads, atomic=atomic, fsync=fsync,
                           staging_bytes=staging_bytes)
    return default_saver().save(obj, f, pickle_module, pickle_protocol, _use_new_zipfile_serialization,
                                _disable_byteorder_record, threads=threads, atomic=atomic, fsync=fsync)


class SaveHandle:
    """One background save: ``done()``, ``wait(timeout)``, ``result()`` and what it measured.

    ``bytes``: storage bytes snapshotted; ``snapshot_seconds``: how long ``save()`` held the caller;
    ``write_seconds``: the background write (None until it ends). A failed write raises its exception
    from ``wait()`` and ``result()``; if neither reported it, the saver's next ``save()`` or ``close()``
    does (and, at interpreter exit, it is printed to stderr).
    """

    def __init__(self, path: str, nbytes: int, snapshot_seconds: float):
        self.path = path
        self.bytes = nbytes
        self.snapshot_seconds = snapshot_seconds
        self.write_seconds: float | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._reported = False

    def __repr__(self) -> str:
        state = "pending" if not self.done() else "failed" if self._error is not None else "written"
        return f"<SaveHandle {self.path!r} {state}, {self.bytes} bytes>"

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the write (at most `timeout` seconds); True once it is written, False on timeout.
        Raises the write's exception if it failed."""
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            self._reported = True
            raise self._error
        return True

    def result(self) -> str:
        """Waits for the write and returns the path written; raises the write's exception if it failed."""
        self.wait()
        return self.path

    def _finish(self, error: BaseException | None) -> None:
        if error is not None:
            traceback.clear_frames(error.__traceback__)  # no staging memory kept alive by the error
        self._error = error
        self._done.set()


class _Job:
    __slots__ = ("handle", "pickled", "records", "arenas", "session", "events", "atomic", "fsync", "threads")

    def __init__(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)


class AsyncSaver:
    """Saves checkpoints in the background, with snapshot semantics and staging memory it reuses.

    ``save(obj, path, ...)`` takes ``torch.save``'s arguments (plus ``atomic``, ``fsync``) and returns a
    :class:`SaveHandle` once the snapshot is taken. At most ``max_in_flight`` snapshots are held: a save
    beyond that first waits for the oldest write. Writes run in call order on one thread, so saves to
    one path complete in the order they were made. ``max_staging_bytes`` caps the staging memory one
    snapshot may take (default: what the system reports available).

    ``wait()`` waits for every pending write, ``close()`` too and then releases the staging memory; a
    failed write not yet reported through its handle raises from either, and from the next ``save()``.
    Use as a context manager to close on exit. Pending writes are completed at interpreter exit.

    ``staging_allocations`` counts the staging buffers allocated so far (equal-sized checkpoints reuse
    the first ones). Thread-safe.
    """

    def __init__(self, max_in_flight: int = 1, *, threads: int | None = None, max_staging_bytes: int | None = None):
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        self.max_in_flight = max_in_flight
        self.threads = threads
        self.max_staging_bytes = max_staging_bytes
        self.staging_allocations = 0
        self._lock = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._in_flight = 0
        self._free: list = []  # staging buffers not used by a pending save: (backend or None, tensor)
        self._unreported: list[SaveHandle] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._snapshot_lock = threading.Lock()  # one snapshot at a time
        _SAVERS.add(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the caller's side ---------------------------------------------------------------------

    def save(
        self,
        obj,
        f,
        pickle_module=pickle,
        pickle_protocol=_ts.DEFAULT_PROTOCOL,
        _use_new_zipfile_serialization=True,
        _disable_byteorder_record=False,
        *,
        atomic: bool = True,
        fsync: bool = False,
        threads: int | None = None,
    ) -> SaveHandle:
        if not isinstance(f, (str, os.PathLike)):
            raise ValueError(f"a background save writes to a path (str or os.PathLike), not {type(f).__name__}: "
                             "use fastckpt.save(obj, f) for file objects")
        writer.check_zip_save(f, pickle_module, _use_new_zipfile_serialization)
        path = os.fspath(f)
        threads = threads if threads is not None else self.threads
        with self._snapshot_lock:
            with self._lock:
                if self._closed:
                    raise ValueError("save() on a closed AsyncSaver")
                self._lock.wait_for(lambda: self._in_flight < self.max_in_flight)
                self._raise_unreported()
                self._in_flight += 1
            try:
                with writer.collection_paused():
                    job = self._snapshot(obj, path, pickle_module, pickle_protocol, _disable_byteorder_record,
                                         atomic=atomic, fsync=fsync, threads=threads)
            except BaseException:
                with self._lock:
                    self._in_flight -= 1
                    self._lock.notify_all()
                raise
            with self._lock:
                self._queue.append(job)
                self._start_thread()
                self._lock.notify_all()
        return job.handle

    def wait(self) -> None:
        """Waits for every pending write; raises a failure no handle has reported."""
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0)
            self._raise_unreported()

    def close(self) -> None:
        """Waits for every pending write, stops the writer thread and releases the staging memory;
        raises a failure no handle has reported. Idempotent."""
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._in_flight == 0)
            self._free.clear()
            self._raise_unreported()

    def _raise_unreported(self) -> None:
        """Requires self._lock."""
        while self._unreported:
            handle = self._unreported.pop(0)
            if not handle._reported:
                handle._reported = True
                raise handle._error

    # ---- the snapshot ------------------------------------------------------------------------------

    def _snapshot(self, obj, path, pickle_module, pickle_protocol, disable_byteorder, *, atomic, fsync, threads):
        start = time.perf_counter()
        pickled = writer.pickle_for_save(obj, path, pickle_module, pickle_protocol, disable_byteorder)
        cpu, staged = pickled.placement()
        # Address and size read now, after the pickling (see writer.save).
        cpu_spans = {key: (s.data_ptr(), s.nbytes()) for key, s in cpu.items()}
        staged_bytes = {key: s.nbytes() for key, (s, _) in staged.items()}
        cpu_total = sum(_aligned(n) for _, n in cpu_spans.values())
        staged_total = sum(_aligned(n) for n in staged_bytes.values())
        backend = next(iter({b for _, b in staged.values()}), None)
        if len({b for _, b in staged.values()}) > 1:
            raise ValueError("a background save takes storages of one device type besides the CPU")
        arenas = []
        session = None
        try:
            self._check_memory(cpu_total + staged_total, backend, cpu_total, staged_total)
            sources = {}
            if cpu_total:
                arena = self._arena(None, cpu_total, lambda n: torch.empty(n, dtype=torch.uint8))
                arenas.append((None, arena))
                base, at, copies, keys = arena.data_ptr(), 0, [], []
                for key, (ptr, n) in cpu_spans.items():
                    copies.append((base + at, ptr, n))
                    keys.append(key)
                    at += _aligned(n)
                crcs = _native.copy_memory(copies, pickled.compute_crc32, threads or 0)
                for key, (dst, _, n), crc in zip(keys, copies, crcs):
                    sources[key] = ((dst, n), crc if pickled.compute_crc32 else None)
            for key in cpu_spans.keys() - sources.keys():
                sources[key] = ((0, 0),)
            events = []
            if staged:
                session = backend.session(sorted({s.device for s, _ in staged.values()}, key=str))
                arena = self._arena(backend, staged_total, lambda n: backend.ring.take(n, n)[0])
                arenas.append((backend, arena))
                at = 0
                for key, (storage, _) in staged.items():
                    n = staged_bytes[key]
                    if n:
                        session.to_host(storage.device, arena, [(writer.uint8_view(storage), at, n)])
                        events.append(session.record(storage.device))
                    sources[key] = ((arena.data_ptr() + at, n),)
                    at += _aligned(n)
                session.finish()  # the caller's later work on those devices is ordered after the copies
            records = pickled.records(sources)
            pickled.storages.clear()  # the caller's storages are not needed past the snapshot
        except BaseException:
            if session is not None:
                session.close()
            with self._lock:
                self._free.extend(arenas)
            raise
        handle = SaveHandle(path, sum(n for _, n in cpu_spans.values()) + sum(staged_bytes.values()),
                            time.perf_counter() - start)
        return _Job(handle=handle, pickled=pickled, records=records, arenas=arenas, session=session, events=events,
                    atomic=atomic, fsync=fsync, threads=threads)

    def _check_memory(self, needed: int, backend, cpu_total: int, staged_total: int) -> None:
        """Raises LimitError before anything is copied when the snapshot's staging cannot fit."""
        if self.max_staging_bytes is not None and needed > self.max_staging_bytes:
            raise LimitError(f"a background save needs {needed} bytes of staging memory, more than this saver's "
                             f"max_staging_bytes={self.max_staging_bytes}; nothing was written")
        with self._lock:  # buffers kept from earlier saves that _arena will hand out again
            reusable = sum(total for kind, total in ((None, cpu_total), (backend, staged_total))
                           if total and any(b is kind and t.numel() >= total for b, t in self._free))
        available = _available_memory()
        if available is not None and needed - reusable > available:
            raise LimitError(f"a background save needs {needed} bytes of staging memory ({needed - reusable} new), "
                             f"but the system reports {available} bytes available; nothing was written "
                             "(save synchronously with fastckpt.save(obj, path), or free memory)")

    def _arena(self, backend, nbytes: int, allocate) -> torch.Tensor:
        """A staging buffer of at least `nbytes` for `backend` (None: plain CPU memory): a free one kept
        from an earlier save when one is large enough, else a new one (a smaller free one is dropped)."""
        with self._lock:
            fits = [(t.numel(), i) for i, (b, t) in enumerate(self._free) if b is backend and t.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits)[1])[1]
            smaller = [i for i, (b, _) in enumerate(self._free) if b is backend]
            if smaller:
                self._free.pop(smaller[0])
        arena = allocate(nbytes)
        with self._lock:
            self.staging_allocations += 1
        return arena

    # ---- the writer thread ---------------------------------------------------------------------------

    def _start_thread(self) -> None:
        """Requires self._lock."""
        if self._thread is None:
            # A daemon thread: the atexit hook, not the interpreter's join, completes pending writes. It
            # ends when the queue is empty, so a saver dropped without close() is not kept alive by it.
            self._thread = threading.Thread(target=self._run, name="fastckpt-saver", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                job = self._queue[0]
            start = time.perf_counter()
            error = None
            try:
                self._write(job)
            except BaseException as e:  # noqa: BLE001 - reported through the handle and the saver
                error = e
            job.handle.write_seconds = time.perf_counter() - start
            with self._lock:
                self._queue.popleft()
                self._free.extend(job.arenas)
                if error is not None:
                    self._unreported.append(job.handle)
                job.handle._finish(error)
                self._in_flight -= 1
                self._lock.notify_all()
            del job, error

    @staticmethod
    def _write(job: _Job) -> None:
        if job.session is not None:
            try:
                for event in job.events:
                    event.synchronize()
            finally:
                job.session.close()
        writer.write_to_path(job.handle.path, job.pickled, job.records, job.threads, atomic=job.atomic,
                             fsync=job.fsync)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Condition()
        self._snapshot_lock = threading.Lock()
        self._queue.clear()
        self._in_flight = 0
        self._thread = None
        self._unreported.clear()

    def _finish_at_exit(self) -> None:
        """Completes pending writes and prints failures no one reported to stderr."""
        try:
            with self._lock:
                self._closed = True
                self._lock.wait_for(lambda: self._in_flight == 0)
                failed = [h for h in self._unreported if not h._reported]
                self._unreported.clear()
        except BaseException:  # noqa: BLE001 - Ctrl-C at exit: give up on the rest
            return
        for handle in failed:
            print(f"fastckpt: background save to {handle.path!r} failed: "
                  f"{type(handle._error).__name__}: {handle._error}", file=sys.stderr)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_SAVERS: weakref.WeakSet = weakref.WeakSet()
_DEFAULT: list = []
_DEFAULT_LOCK = threading.Lock()


def default_saver() -> AsyncSaver:
    """The saver behind ``fastckpt.save(..., background=True)`` (one save in flight)."""
    with _DEFAULT_LOCK:
        if not _DEFAULT or _DEFAULT[0]._closed:
            _DEFAULT[:] = [AsyncSaver(max_in_flight=1)]
        return _DEFAULT[0]


@atexit.register
def _complete_pending_saves() -> None:
    for saver in list(_SAVERS):
        saver._finish_at_exit()


def _forget_parent_writes() -> None:
    """In a forked child: the parent's pending writes are the parent's (its writer thread is not
    here), and a lock its thread held stays held here: each saver starts afresh, empty."""
    for saver in list(_SAVERS):
        saver._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_writes)

