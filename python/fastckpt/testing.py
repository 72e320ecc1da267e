"""Test support for code that loads (or saves) device tensors with fastckpt, on a machine without a GPU.

``FakeBackend`` stands in for a device type's staging backend (see :mod:`fastckpt.devices`): device
memory is host memory and each copy runs on a copy thread of its own after a random delay, so the
ordering the real backend relies on (a ring buffer is refilled only after its copy finished, the
host memory stays bounded, errors reach the loading thread) is checked by real concurrency::

    from fastckpt import devices, testing

    fake = testing.FakeBackend("cuda", delay=(0, 0.002))
    with devices.use_backend(fake):
        state = fastckpt.load(path, map_location="cuda:0")  # CPU tensors, staged like CUDA ones
    assert fake.early_refills == 0 and fake.live_host_buffers == 0

The tensors it returns are CPU tensors: it tests the staging, not the device.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
import weakref
import zlib

import torch

__all__ = ["FakeBackend"]


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
