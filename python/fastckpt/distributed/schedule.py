"""Who reads and who sends what: pure functions of the plan and of every rank's needs (no I/O, no
process group), so every rank computes the same schedule and it is tested on its own.

A file is a list of byte spans (:func:`pieces`); each rank needs some of them (sorted, merged
``[start, end)`` segments). A :class:`Schedule` says which rank reads each piece (whole, so its
CRC-32 can be checked) and which segments each rank sends to each other rank; :func:`transfers`
turns the schedules into the ordered list of messages every rank posts, and :func:`waves` bounds
how many bytes of point-to-point messages are in flight at once.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from fastckpt import errors

# One message's size: large enough to run collectives near link speed, small enough that a packed
# bucket's staging copy stays modest.
BUCKET_BYTES = 64 << 20
# Segments below this travel packed into shared buckets; larger ones are sent in place.
PACK_BELOW = 1 << 20
# Point-to-point bytes posted together (what a receiver holds in transit buffers at most).
WAVE_BYTES = 4 * BUCKET_BYTES
READ_CHUNK = 16 << 20


def pieces(file: dict):
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


def metadata_segments(file: dict) -> list:
    """Everything but the storages' bytes: headers, data.pkl, small records, the central directory."""
    records = file["records"]
    return merged([[s, e] for s, e, i in pieces(file) if i is None or not records[i][4]])


def merged(segments) -> list:
    """Sorted segments with overlapping and touching ones joined; empty ones dropped."""
    out = []
    for a, b in sorted(segments):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif a < b:
            out.append([a, b])
    return out


def balanced_ranges(file: dict, ranks: int) -> list:
    """[start, owner] of `ranks` contiguous ranges of about equal bytes, cut where storages start."""
    starts = [start for _, start, _, _, storage in file["records"] if storage]
    cuts, size = [0], file["size"]
    for k in range(1, ranks):
        target = size * k // ranks
        i = bisect.bisect_left(starts, target)
        near = min(starts[max(i - 1, 0):i + 1], key=lambda s: abs(s - target), default=0)
        cuts.append(max(near, cuts[-1]))
    return [[cut, rank] for rank, cut in enumerate(cuts)]


def assign_whole(sizes: list[int], ranks: int) -> list[int]:
    """The owner of each file read whole (a shard): largest first, each to the least loaded rank."""
    owners = [0] * len(sizes)
    load = [0] * ranks
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = load.index(min(load))
        owners[i] = owner
        load[owner] += sizes[i]
    return owners


class Schedule:
    """For one file and everyone's needs: the pieces each rank reads (``reads``: rank -> [(start, end,
    record index or None)]) and the segments each rank sends to each other rank (``sends``: src ->
    {dst: [[a, b]]}). Deterministic, so every rank computes the same one."""

    def __init__(self, file: dict, needs: list):
        size, n = file["size"], len(needs)
        for segments in needs:  # sizes from peers are checked before they size anything
            if any(not (0 <= a < b <= size) for a, b in segments) or segments != merged(segments):
                raise errors.FormatError(f"a rank asked for byte ranges outside {file['path']} ({size} bytes)")
        range_starts = [start for start, _ in file["ranges"]]
        self.reads = collections.defaultdict(list)
        self.sends = collections.defaultdict(dict)
        cursor = [0] * n
        for start, end, record in pieces(file):
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
                targets[r] = merged(targets[r])


def buckets(segments):
    """Segments grouped for one message each: large ones alone (split at BUCKET_BYTES), small ones packed."""
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


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One message: bytes `bucket` (segments of file `file`) from rank `src` to `dst` (None: to every
    other rank, a broadcast); `tag` numbers the messages between one pair of ranks."""

    file: int
    src: int
    dst: int | None
    bucket: tuple
    tag: int = 0

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.bucket)


def transfers(schedules: list[Schedule], ranks: int) -> list[Transfer]:
    """Every message of every schedule in the order all ranks post them: a source's segments go by
    broadcast when every other rank needs the same ones, point to point otherwise."""
    out, tags = [], collections.Counter()
    for i, schedule in enumerate(schedules):
        for src in range(ranks):
            targets = schedule.sends.get(src, {})
            lists = list(targets.values())
            if targets and len(targets) == ranks - 1 and all(s == lists[0] for s in lists):
                out.extend(Transfer(i, src, None, tuple(b)) for b in buckets(lists[0]))
                continue
            for dst, segments in sorted(targets.items()):
                for b in buckets(segments):
                    out.append(Transfer(i, src, dst, tuple(b), tags[src, dst]))
                    tags[src, dst] += 1
    return out


def waves(messages: list[Transfer], limit: int = WAVE_BYTES) -> list[list[Transfer]]:
    """Point-to-point messages in groups posted together, each under `limit` bytes in all (or one
    message): a group's receive buffers are all a rank holds in transit. Every rank computes the same
    groups, so each group's sends and receives match."""
    out, size = [], 0
    for m in messages:
        if not out or size + m.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(m)
        size += m.nbytes
    return out


def batches(indices, records, target=READ_CHUNK):
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
