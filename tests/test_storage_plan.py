"""The storage plan: one load's decision of where each storage's bytes come from (mapped, arena,
meta, staged, inflated) and where map_location sends each location tag, made before unpickling."""

import zipfile

import pytest
import torch
from parity import assert_same, rezip, save_bytes, torch_load

import fastckpt
from fastckpt import _native
from fastckpt.archive import open_archive, read_record

Plan = _native.StoragePlan


def _ckpt(tmp_path, data: bytes, name="ckpt.pt"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def shared(tmp_path):
    """Two views of one storage, a second storage and an empty one."""
    base = torch.arange(24, dtype=torch.float32)
    obj = {"a": base[:6], "b": base[4:].view(4, 5), "c": torch.ones(3, dtype=torch.int64), "e": torch.empty(0)}
    return _ckpt(tmp_path, save_bytes(obj))


@pytest.mark.parametrize(("targets", "location", "expected"), [
    (None, "cpu", "cpu"),                           # map_location=None: where it was saved
    (None, "cuda:1", "cuda:1"),
    ("cpu", "cuda:1", "cpu"),                       # a string (or device, as str): every storage there
    ({"cuda:1": "cpu"}, "cuda:1", "cpu"),           # a dict: mapped tags move, others stay
    ({"cuda:1": "cpu"}, "mps", "mps"),
    (lambda s, loc: s, "cpu", None),                # a callable: only Python can say, per storage
    ({"cpu": torch.device("cpu")}, "cpu", None),    # dict values other than strings: torch's per-storage path
])
def test_targets_follow_torch_rules(shared, targets, location, expected):
    plan = Plan(open_archive(shared), Plan.Mode.arena, targets, True)
    assert plan.target(location) == expected


@pytest.mark.parametrize(("targets", "named"), [
    (None, []),                                     # every storage stays where its tag says
    ("cuda:1", ["cuda:1"]),
    ({"cpu": "cuda:0", "cuda:1": "cpu"}, ["cpu", "cuda:0"]),
    (lambda s, loc: s, None),                       # decided per storage, by Python
])
def test_named_targets(shared, targets, named):
    """What the loader decides staging from without scanning the pickle: the targets map_location names."""
    plan = Plan(open_archive(shared), Plan.Mode.arena, targets, True)
    got = plan.named_targets()
    assert (sorted(got) if got is not None else None) == named


def test_destinations_decided_once(tmp_path, monkeypatch):
    """Where storages go is decided by the loader's plan; the stager is handed the staged storages
    and their devices, and map_location is not parsed again (a fake backend claims "cuda")."""
    from fastckpt import devices, loader
    from fastckpt.testing import FakeBackend

    path = _ckpt(tmp_path, save_bytes({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}))
    made = []
    monkeypatch.setattr(devices, "Stager", lambda archive, staged, backend, **kw: made.append(staged) or None)
    archive = open_archive(path)
    data_pickle = fastckpt.archive.read_data_pickle(archive)
    with devices.use_backend(FakeBackend()):
        for map_location, staged in (("cpu", None), ({"cpu": "cuda:1"}, ["0", "1"]), (None, None),
                                     (lambda s, loc: s, None)):
            made.clear()
            plan, _, _ = loader._plan(archive, data_pickle, map_location, mmap=False, verify=None, threads=1,
                                      staging_bytes=devices.DEFAULT_STAGING_BYTES)
            plan.finish()
            assert ([sorted(k for k, _, _ in made[0])] if made else [None]) == [staged], map_location
            if made:
                assert {str(d) for _, _, d in made[0]} == {"cuda:1"}
                assert plan.source("0", 12) == Plan.Source.staged


@pytest.mark.parametrize("mmap", [False, True])
def test_bytes_and_sizes(shared, mmap):
    archive = open_archive(shared)
    plan = Plan(archive, Plan.Mode.mapped if mmap else Plan.Mode.arena, None, True)
    plan.start(True, 2)
    for name in archive.names("data/"):
        key, data = name[5:], read_record(archive, name)
        assert plan.source(key, len(data)) == (Plan.Source.mapped if mmap else Plan.Source.arena)
        assert bytes(plan.bytes(key, len(data))) == data
        with pytest.raises(fastckpt.RecordError, match=f"record '{name}' holds {len(data)} bytes"):
            plan.bytes(key, len(data) + 1)
    with pytest.raises(fastckpt.RecordError, match="not found"):
        plan.source("no-such-key", 0)
    plan.finish()


def test_deflated_records_are_adopted_and_loaded_natively(shared, tmp_path, monkeypatch):
    """A re-zipped (deflated) checkpoint: eager loads inflate each record once into the plan, and the
    native builder makes its storages like any others (views still share one storage)."""
    with open(shared, "rb") as f:
        deflated = _ckpt(tmp_path, rezip(f.read(), compress=zipfile.ZIP_DEFLATED), "deflated.pt")
    archive = open_archive(deflated)
    plan = Plan(archive, Plan.Mode.arena, None, True)
    keys = plan.deflated_keys()
    assert sorted(keys) == sorted(n[5:] for n in archive.names("data/"))
    for key in keys:
        plan.adopt(key, read_record(archive, f"data/{key}"))
    plan.start(True, 1)
    assert {plan.source(k, archive.record(f"data/{k}").size) for k in keys} == {Plan.Source.inflated}

    persistent_loads = []
    original = fastckpt._storages.Storages.persistent_load
    monkeypatch.setattr(fastckpt._storages.Storages, "persistent_load",
                        lambda self, pid: persistent_loads.append(pid) or original(self, pid))
    got = fastckpt.load(deflated, weights_only=True)
    assert_same(got, torch_load(deflated, weights_only=True).value)
    assert persistent_loads == []  # no storage left the native path
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    with pytest.raises(fastckpt.RecordError, match="compressed; mmap=True needs stored records"):
        fastckpt.load(deflated, mmap=True)


def test_staged_and_started_plans_refuse_changes(shared):
    archive = open_archive(shared)
    plan = Plan(archive, Plan.Mode.arena, None, True)
    plan.stage("0")
    assert plan.source("0", archive.record("data/0").size) == Plan.Source.staged
    with pytest.raises(fastckpt.RecordError, match="not read by this load"):
        plan.bytes("0", archive.record("data/0").size)
    plan.start(True, 1)
    with pytest.raises(fastckpt.RecordError, match="cannot stage"):
        plan.stage("1")
    plan.finish()


def test_meta_plans_read_nothing(shared):
    archive = open_archive(shared)
    plan = Plan(archive, Plan.Mode.meta, None, True)
    assert plan.source("0", 0) == Plan.Source.meta  # no size check: torch reads no byte either
    assert plan.data_offset("0") == archive.record("data/0").data_offset


def test_keep_on_cpu(tmp_path):
    """A distributed load leaves the storages this rank did not ask for on the CPU, whatever
    map_location says: neither staged nor restored."""
    from fastckpt import devices, loader
    from fastckpt.testing import FakeBackend

    state = {"a": torch.ones(3), "b": torch.arange(4), "c": torch.zeros(2, dtype=torch.int64)}
    path = _ckpt(tmp_path, save_bytes(state))

    def load(map_location, keep):
        return loader._load_archive(open_archive(path), map_location, None, weights_only=True, mmap=False, verify=None,
                                    threads=1, pickle_load_args={"encoding": "utf-8"}, keep_on_cpu=frozenset(keep))

    got = load({"cpu": "meta"}, {"1"})  # torch.save numbers storages in order: "1" is b's
    assert [got[k].device.type for k in "abc"] == ["meta", "cpu", "meta"]
    assert torch.equal(got["b"], state["b"])
    fake = FakeBackend()
    with devices.use_backend(fake):
        got = load("cuda:0", {"0", "2"})
    assert fake.device_allocations == 1  # only b's storage was staged
    assert_same(got, torch_load(path).get())
