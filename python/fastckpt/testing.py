"""Test support for code that loads device tensors with fastckpt, on a machine without a GPU.

``FakeBackend`` stands in for a device type's staging backend (see :mod:`fastckpt.devices`): device
memory is host memory and the copies run in order on a copy thread of their own after a random
delay, as on a device's copy stream. What the real backend relies on (a ring buffer is refilled
only after its copy finished, host memory stays bounded, the ring is reused by the next load, a
failed load frees its device blocks without a garbage collection, errors reach the loading thread)
is then checked under real concurrency::

    import fastckpt
    from fastckpt import devices, testing

    fake = testing.FakeBackend("cuda", delay=(0, 0.002))
    with devices.use_backend(fake):
        state = fastckpt.load(path, map_location="cuda:0")  # staged as for a GPU, as CPU tensors
    assert fake.early_refills == 0 and fake.live_device_blocks == len(state)

The tensors it returns are CPU tensors: it tests the staging, not the device.
"""

from __future__ import annotations

import random
import threading
import time
import weakref
import zlib

import numpy
import torch

from fastckpt.devices import HostRing

__all__ = ["FakeBackend"]


class FakeBackend:
    """A stand-in staging backend for `device_type` ("cuda" or "mps"). Counters:

    - ``early_refills``: copies whose source bytes changed between issue and execution (a ring
      buffer refilled before its copy finished);
    - ``host_allocations`` / ``live_host_buffers`` / ``max_host_bytes``: ring buffers ever allocated /
      alive now / peak bytes alive (the ring is kept between loads of one backend, as the real
      backends keep theirs for the process);
    - ``device_allocations`` / ``live_device_blocks``: device allocations made / alive now (each
      non-empty storage is one); ``host_threads``: the thread that allocated each ring buffer;
    - ``copies_after_close``: copies issued after the load closed its session (must stay 0);
    - ``max_in_flight``: peak bytes of issued, unfinished copies; ``copies`` (executed);
    - ``log``: ``("issue", n)``, ``("start", n)`` and ``("done", n)`` for the n-th copy (1-based), in
      the order they happened (issue: the stager queued it; start/done: the copy thread ran it).

    ``fail_copy=n`` makes the n-th copy raise; ``on_copy(n)`` is called before the n-th copy runs,
    on the copy thread (tests raise from it, wait in it, or interrupt the main thread);
    ``on_alloc(n)`` before the n-th device allocation, on the allocating thread.
    """

    def __init__(self, device_type: str = "cuda", *, delay=(0.0, 0.0), seed: int = 0, fail_copy=None, on_copy=None,
                 on_alloc=None):
        self.device_type = device_type
        self.delay = delay
        self.fail_copy = fail_copy
        self.on_copy = on_copy
        self.on_alloc = on_alloc
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.ring = HostRing(self._host_buffer)
        self.copies = 0
        self.early_refills = 0
        self.host_bytes = self.max_host_bytes = 0
        self.live_host_buffers = 0
        self.device_allocations = self.live_device_blocks = 0
        self.copies_after_close = 0
        self.host_threads: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.log: list[tuple[str, int]] = []

    @property
    def host_allocations(self) -> int:
        return self.ring.allocations

    @staticmethod
    def available() -> bool:
        return True

    def device(self, target: torch.device) -> torch.device:
        return torch.device(self.device_type, target.index or 0)

    def session(self, devices) -> _FakeSession:
        return _FakeSession(self)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        memory = numpy.empty(nbytes, numpy.uint8)
        with self._lock:
            self.host_bytes += nbytes
            self.max_host_bytes = max(self.max_host_bytes, self.host_bytes)
            self.live_host_buffers += 1
            self.host_threads.append(threading.current_thread().name)
        weakref.finalize(memory, self._count, "host", -nbytes)  # freed with the last tensor over it
        return torch.from_numpy(memory)

    def _device_block(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # data pointer 0, as a device's empty storage
        with self._lock:
            self.device_allocations += 1
            n = self.device_allocations
        if self.on_alloc is not None:
            self.on_alloc(n)
        memory = numpy.empty(nbytes, numpy.uint8)
        self._count("device", 1)
        weakref.finalize(memory, self._count, "device", -1)
        return torch.from_numpy(memory)

    def _count(self, what: str, delta: int) -> None:
        with self._lock:
            if what == "host":
                self.host_bytes += delta
                self.live_host_buffers -= 1
            else:
                self.live_device_blocks += delta

    def _logged(self, what: str, n: int) -> None:
        with self._lock:
            self.log.append((what, n))


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
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastckpt-fake-copy", daemon=True)
        self._thread.start()

    def empty(self, device, nbytes: int) -> torch.Tensor:
        return self._backend._device_block(nbytes)

    def copy(self, device, buffer: torch.Tensor, pieces) -> None:
        self._issue([(dst, buffer[at : at + n]) for dst, at, n in pieces])

    def to_host(self, device, buffer: torch.Tensor, pieces) -> None:
        """Saves: each piece's `src` (n bytes of "device" memory) into buffer[at : at + n]."""
        self._issue([(buffer[at : at + n], src) for src, at, n in pieces])

    def _issue(self, pairs) -> None:
        """Queues the (destination, source) copies as one; early_refills compares the sources' bytes
        now with theirs when the copy runs."""
        b = self._backend
        nbytes = sum(src.numel() for _, src in pairs)
        with b._lock:
            b.in_flight += nbytes
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
        digest = zlib.crc32(b"".join(src.numpy().tobytes() for _, src in pairs))
        with self._changed:
            if self._closing:
                b.copies_after_close += 1
            self._issued += 1
            b._logged("issue", self._issued)
            self._queue.append((self._issued, pairs, nbytes, digest))
            self._changed.notify_all()

    def record(self, device) -> _FakeEvent:
        with self._changed:
            return _FakeEvent(self, self._issued)

    def wait_for(self, issued: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._done >= issued)
            if self._error is not None:  # a new error each time, as a device's sticky error is
                raise type(self._error)(*self._error.args)

    def finish(self) -> None:
        self.wait_for(self._issued)

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        while not self._stopped.wait(0.1):  # interruptible, and retried by the caller after a Ctrl-C
            pass
        self._thread.join()  # it has returned or is returning

    def _run(self) -> None:
        b = self._backend
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    self._stopped.set()
                    return
                n, pairs, nbytes, digest = self._queue.pop(0)
            try:
                if self._error is None:  # a failed copy poisons the rest, as a CUDA error does
                    b._logged("start", n)
                    time.sleep(b._random.uniform(*b.delay))
                    b.copies += 1
                    if b.on_copy is not None:
                        b.on_copy(n)
                    if n == b.fail_copy:
                        raise RuntimeError(f"fake device: copy {n} failed")
                    if zlib.crc32(b"".join(src.numpy().tobytes() for _, src in pairs)) != digest:
                        b.early_refills += 1
                    for dst, src in pairs:
                        dst.copy_(src)
                    b._logged("done", n)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits, as a device error is
                self._error = e.with_traceback(None)  # its frames (this one's blocks) are not kept
            with b._lock:
                b.in_flight -= nbytes
            pairs = None  # no block outlives its copy here
            with self._changed:
                self._done += 1
                self._changed.notify_all()
