"""fastckpt.distributed's pure parts without a process group: the schedule, its messages and waves,
the ranges, the device choice for NCCL, the graph walk for keys=."""

from __future__ import annotations

import itertools
import random

import pytest

torch = pytest.importorskip("torch")

from fastckpt import errors  # noqa: E402
from fastckpt.distributed import collectives, schedule, selection  # noqa: E402


def synthetic_file(sizes, gap=64, tail=100) -> dict:
    """A file of storages of `sizes` bytes separated by `gap`-byte headers, then a tail (the directory)."""
    records, pos = [], gap
    for i, size in enumerate(sizes):
        records.append([f"data/{i}", pos, size, 0, True])
        pos += size + gap
    return {"path": "f.pt", "size": pos + tail, "records": records}


def apply(file, needs, schedules=None):
    """Runs a schedule as the ranks would: each reads its pieces, then every message is delivered.
    Returns what each rank holds (a set of byte offsets) and the bytes each rank read."""
    n = len(needs)
    s = schedule.Schedule(file, needs)
    held = [set() for _ in range(n)]
    read = [0] * n
    for rank, pieces in s.reads.items():
        for a, b, _ in pieces:
            held[rank].update(range(a, b))
            read[rank] += b - a
    for m in schedule.transfers([s], n):
        data = {x for a, b in m.bucket for x in range(a, b)}
        assert data <= held[m.src], "a rank sends bytes it does not hold"
        for dst in ([m.dst] if m.dst is not None else [r for r in range(n) if r != m.src]):
            held[dst] |= data
    return held, read, s


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_everyone_gets_what_they_need_and_each_piece_is_read_once(n):
    rng = random.Random(n)
    file = synthetic_file([rng.randrange(1, 5000) for _ in range(30)])
    file["ranges"] = schedule.balanced_ranges(file, n)
    for trial in range(20):
        needs = []
        for r in range(n):
            spans = [[a, min(a + rng.randrange(1, 3000), file["size"])] for a in
                     sorted(rng.randrange(file["size"]) for _ in range(rng.randrange(0, 6)))]
            needs.append(schedule.merged(spans) if trial % 3 else [[0, file["size"]]])
        held, read, s = apply(file, needs)
        for r in range(n):
            assert {x for a, b in needs[r] for x in range(a, b)} <= held[r]
        pieces = [p for ps in s.reads.values() for p in ps]
        assert len(pieces) == len(set(pieces)), "a piece read twice"
        for a, b, record in pieces:  # records are read whole (their CRC can be checked)
            if record is not None:
                assert (a, b) == (file["records"][record][1], file["records"][record][1] + file["records"][record][2])


def test_balanced_ranges_cut_at_storages_and_cover_the_file():
    file = synthetic_file([1000] * 8)
    ranges = schedule.balanced_ranges(file, 4)
    assert [owner for _, owner in ranges] == [0, 1, 2, 3] and ranges[0][0] == 0
    starts = {r[1] for r in file["records"]}
    assert all(start in starts for start, _ in ranges[1:])
    assert [start for start, _ in ranges] == sorted(start for start, _ in ranges)


def test_assign_whole_balances_by_size():
    assert schedule.assign_whole([10, 1, 1, 9], 2) == [0, 1, 0, 1]  # loads 11 and 10
    assert schedule.assign_whole([], 3) == []


def test_out_of_bounds_needs_are_refused():
    file = synthetic_file([100])
    file["ranges"] = [[0, 0]]
    for bad in ([[0, file["size"] + 1]], [[5, 5]], [[10, 20], [15, 30]], [[-1, 4]]):
        with pytest.raises(errors.FormatError):
            schedule.Schedule(file, [[], bad])


def test_buckets_pack_small_and_split_large_segments():
    big = 3 * schedule.BUCKET_BYTES // 2
    got = list(schedule.buckets([[0, 10], [20, 30], [100, 100 + big]]))
    assert got[0] == [(100, 100 + schedule.BUCKET_BYTES)]
    assert got[1] == [(100 + schedule.BUCKET_BYTES, 100 + big)]
    assert got[2] == [(0, 10), (20, 30)]
    assert all(sum(b - a for a, b in g) <= schedule.BUCKET_BYTES for g in got)


def test_waves_are_bounded_and_the_same_for_both_ends_of_every_message():
    rng = random.Random(3)
    n = 4
    messages = [schedule.Transfer(0, src, dst, ((0, rng.randrange(1, 100)),), tag)
                for tag, (src, dst) in enumerate(itertools.permutations(range(n), 2)) for _ in range(5)]
    rng.shuffle(messages)
    waves = schedule.waves(messages, limit=150)
    assert [m for w in waves for m in w] == messages  # order kept: every rank posts the same sequence
    for w in waves:
        assert len(w) == 1 or sum(m.nbytes for m in w) <= 150


def test_transfers_broadcast_when_all_others_need_the_same():
    file = synthetic_file([500, 500])
    file["ranges"] = [[0, 0]]
    whole = [[0, file["size"]]]
    s = schedule.Schedule(file, [whole, whole, whole])
    messages = schedule.transfers([s], 3)
    assert messages and all(m.dst is None and m.src == 0 for m in messages)
    s = schedule.Schedule(file, [whole, [[0, 100]], whole])
    messages = schedule.transfers([s], 3)
    assert {m.dst for m in messages} == {1, 2}
    tags = [(m.src, m.dst, m.tag) for m in messages]
    assert len(tags) == len(set(tags))


def test_tensors_visits_shared_and_cyclic_containers_once():
    t = torch.ones(2)
    level = [t]
    for _ in range(40):  # 2^40 paths as a tree
        level = [level, level]
    cyclic: list = [t]
    cyclic.append(cyclic)
    assert list(selection.tensors({"a": level, "b": cyclic})) == [t]


class _Group:
    bound_device_id = None


def test_rank_device_for_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match=r"torch.cuda.set_device\(2\)"):
        collectives.rank_device(_Group())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert collectives.rank_device(_Group()) == torch.device("cuda", 2)
    bound = _Group()
    bound.bound_device_id = torch.device("cuda", 3)
    assert collectives.rank_device(bound) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collectives.rank_device(_Group()) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        collectives.rank_device(_Group())


def test_error_reports_rebuild_the_same_exception():
    for error in (errors.IntegrityError("CRC-32 mismatch in x"), KeyError("k"), FileNotFoundError(2, "No such file", "p"),
                  collectives.CollectiveError("gone"), ArithmeticError("odd")):
        again = collectives.rebuild(collectives.describe(error), 1)
        expected = RuntimeError if type(error) is ArithmeticError else type(error)
        assert type(again) is expected
        assert str(error) in str(again) or (isinstance(error, KeyError) and str(again) == str(error))


def test_unwanted_storages_are_named_for_the_storage_plan():
    """A partial load leaves the storages a rank did not ask for on the CPU: their keys go to the load's
    storage plan (keep_on_cpu), the one place that decides a storage's destination."""
    file = {"records": [["data.pkl", 0, 64, 0, False], ["data/0", 64, 100, 0, True], ["data/1", 164, 50, 0, True],
                        ["data/2", 214, 0, 0, True], ["data/3", 214, 30, 0, True], ["version", 244, 2, 0, False]]}
    assert selection.unwanted_keys(file, [[64, 164]]) == {"1", "3"}
    assert selection.unwanted_keys(file, [[170, 180], [220, 221]]) == {"0"}
    assert selection.unwanted_keys(file, []) == {"0", "1", "3"}
