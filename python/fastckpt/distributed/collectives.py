"""The group's collectives over host buffers, with failures carried to every rank.

:meth:`Comm.agree` runs a step on every rank and then makes all ranks raise the first failing rank's
error (rebuilt from a JSON report), so a failure is collective, never a hang. With NCCL every message
is staged through the rank's CUDA device: host bytes are copied into pinned buffers and uploaded
asynchronously, received bytes come back the same way, and point-to-point messages are posted in
waves (:func:`schedule.waves`), so a rank holds at most one wave's transit buffers on its device.
"""

from __future__ import annotations

import json
import os
import pickle

import torch
import torch.distributed as dist

from fastckpt import errors
from fastckpt.distributed import schedule


class CollectiveError(RuntimeError):
    """A collective failed: a rank died, left, or did not take part within the group's timeout."""


def describe(error: BaseException) -> dict:
    """A JSON report of `error`, from which :func:`rebuild` makes the same exception on another rank."""
    message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    report = {"type": f"{type(error).__module__}.{type(error).__qualname__}", "message": str(message)}
    if isinstance(error, OSError) and error.errno is not None:
        report.update(errno=error.errno, strerror=error.strerror, filename=error.filename)
    return report


_RAISABLE = {f"{c.__module__}.{c.__qualname__}": c for c in (
    *(getattr(errors, name) for name in errors.__all__), CollectiveError, KeyError, TypeError, ValueError,
    RuntimeError, OSError, pickle.UnpicklingError)}


def rebuild(report: dict, rank: int) -> BaseException:
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


def rank_device(group) -> torch.device:
    """The CUDA device NCCL moves this rank's messages through: the group's bound device, the only
    visible one, or the one the rank chose with torch.cuda.set_device. A rank started by torchrun with
    LOCAL_RANK > 0 that is still on cuda:0 never chose one (every rank would share GPU 0): refused."""
    bound = getattr(group, "bound_device_id", None)
    if bound is not None:
        return torch.device(bound)
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("fastckpt.distributed.load: the group's backend is NCCL but no CUDA device is visible")
    index = torch.cuda.current_device()
    local = os.environ.get("LOCAL_RANK", "")
    if count > 1 and index == 0 and local.isdigit() and int(local) != 0:
        raise RuntimeError(
            f"fastckpt.distributed.load: this rank (LOCAL_RANK={local}) has not chosen its CUDA device, so it "
            f"would use cuda:0 with local rank 0; call torch.cuda.set_device({local}) (or init_process_group("
            f"device_id=torch.device('cuda', {local}))) before loading")
    return torch.device("cuda", index)


class Comm:
    """One group's collectives for one load."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("fastckpt.distributed.load needs torch.distributed.init_process_group() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of `group`")
        nccl = dist.get_backend(self.group) == "nccl"  # NCCL moves device tensors only
        self.device = rank_device(self.group) if nccl else torch.device("cpu")

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise CollectiveError(f"fastckpt.distributed.load: {what} failed on rank {self.rank}: {e} (a rank "
                                  "died, or did not take part within the process group's timeout)") from e

    # ---- host <-> wire ------------------------------------------------------------------------
    def _upload(self, host):
        """The wire tensor holding `host`'s bytes: `host` itself on CPU, else a device copy (through pinned memory)."""
        if self.device.type == "cpu":
            return host
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(self.device, non_blocking=True)  # the caching host allocator keeps `pinned` until it ran

    def _room(self, host):
        """A wire tensor to receive into: `host` itself on CPU, else an empty device tensor (nothing uploaded)."""
        return host if self.device.type == "cpu" else torch.empty(host.shape, dtype=host.dtype, device=self.device)

    def _download(self, pairs) -> None:
        """Copies each (host, wire) pair's received bytes back to host (through pinned memory, one sync)."""
        pairs = [(host, wire) for host, wire in pairs if wire is not host]
        if not pairs:
            return
        staged = []
        for host, wire in pairs:
            pinned = torch.empty(wire.shape, dtype=wire.dtype, pin_memory=True)
            pinned.copy_(wire, non_blocking=True)
            staged.append((host, pinned))
        torch.cuda.current_stream(self.device).synchronize()
        for host, pinned in staged:
            host.copy_(pinned)

    # ---- small messages -----------------------------------------------------------------------
    def _broadcast(self, host, src: int) -> None:
        wire = self._upload(host) if self.rank == src else self._room(host)
        self._run("a broadcast", dist.broadcast, wire, group=self.group, group_src=src)
        if self.rank != src:
            self._download([(host, wire)])

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
        mine = torch.tensor([len(data)], dtype=torch.int64)
        self._run("an all_gather", dist.all_gather, lengths, self._upload(mine), group=self.group)
        sizes = [int(n) for n in lengths]
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.empty(max(sizes), dtype=torch.uint8, device=self.device) for _ in range(self.size)]
        self._run("an all_gather", dist.all_gather, gathered, self._upload(padded), group=self.group)
        return [json.loads(g[:n].cpu().numpy().tobytes()) for g, n in zip(gathered, sizes)]

    def agree(self, fn):
        """Runs fn() here, then all ranks learn whether any failed; all raise the first rank's error."""
        try:
            value, error = fn(), None
        except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
            value, error = None, e
        first = torch.tensor([self.rank if error is not None else self.size], dtype=torch.int64)
        wire = self._upload(first)
        self._run("agreeing on a step's outcome", dist.all_reduce, wire, op=dist.ReduceOp.MIN, group=self.group)
        failed = int(wire)
        if failed == self.size:
            return value
        report = self.broadcast_json(describe(error) if failed == self.rank else None, failed)
        raise rebuild(report, failed) from error

    def from_root(self, fn):
        """fn() on rank 0 only; its JSON result (or its error) on every rank."""
        error = None
        if self.rank == 0:
            try:
                message = {"ok": fn()}
            except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
                error, message = e, {"error": describe(e)}
        reply = self.broadcast_json(message if self.rank == 0 else None, 0)
        if "error" in reply:
            raise rebuild(reply["error"], 0) from error
        return reply["ok"]

    # ---- the file images ----------------------------------------------------------------------
    def exchange(self, images, schedules) -> None:
        """Every message of every schedule: the broadcasts in a fixed order, then the point-to-point
        messages this rank takes part in, wave by wave."""
        wholes = [torch.frombuffer(image, dtype=torch.uint8) if image is not None else None for image in images]
        messages = schedule.transfers(schedules, self.size)
        for m in messages:
            if m.dst is None:
                self._broadcast_bucket(wholes[m.file], m.bucket, m.src)
        # Waves are cut from everyone's messages, so a message is in the same wave on both its ranks.
        for wave in schedule.waves([m for m in messages if m.dst is not None]):
            mine = [m for m in wave if self.rank in (m.src, m.dst)]
            if mine:
                self._point_to_point(wholes, mine)

    def _point_to_point(self, wholes, wave) -> None:
        ops, landings = [], []
        for m in wave:
            whole = wholes[m.file]
            sending = self.rank == m.src
            host = _bucket_tensor(whole, m.bucket, sending=sending)
            wire = self._upload(host) if sending else self._room(host)
            op = dist.isend if sending else dist.irecv
            ops.append(dist.P2POp(op, wire, group=self.group, group_peer=m.dst if sending else m.src, tag=m.tag))
            if not sending:
                landings.append((whole, m.bucket, host, wire))
        works = self._run("a point-to-point exchange", dist.batch_isend_irecv, ops)
        for work in works:
            self._run("a point-to-point exchange", work.wait)
        self._download([(host, wire) for _, _, host, wire in landings])
        for whole, bucket, host, _ in landings:
            _unpack(whole, bucket, host)

    def _broadcast_bucket(self, whole, bucket, src: int) -> None:
        host = _bucket_tensor(whole, bucket, sending=self.rank == src)
        self._broadcast(host, src)
        if self.rank != src:
            _unpack(whole, bucket, host)


def _bucket_tensor(whole, bucket, *, sending: bool):
    """The bytes of a bucket: in place for one segment, else a packed copy (or room for one)."""
    if len(bucket) == 1:
        a, b = bucket[0]
        return whole[a:b]
    if sending:
        return torch.cat([whole[a:b] for a, b in bucket])
    return torch.empty(sum(b - a for a, b in bucket), dtype=torch.uint8)


def _unpack(whole, bucket, packed) -> None:
    if len(bucket) == 1:
        return
    pos = 0
    for a, b in bucket:
        whole[a:b] = packed[pos:pos + b - a]
        pos += b - a
