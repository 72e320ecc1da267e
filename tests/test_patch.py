"""fastckpt.patch(), unpatch(), patched(): torch.load becomes fastckpt.load, reversibly."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

from parity import assert_same, loader_module, save_bytes

import fastckpt

fpatch = importlib.import_module("fastckpt.patching")

ORIGINAL = torch.serialization.load


@pytest.fixture(autouse=True)
def restore_torch_load():
    yield
    fpatch.unpatch()
    torch.load = torch.serialization.load = ORIGINAL


def test_exported():
    for _ in range(2):  # stays the function on every lookup
        assert fastckpt.patch is fpatch.patch and fastckpt.unpatch is fpatch.unpatch
        assert fastckpt.patched is fpatch.patched and fastckpt.load is loader_module.load


def test_patch_is_idempotent_and_reversible():
    fpatch.patch()
    first = torch.load
    fpatch.patch()
    assert torch.load is first is torch.serialization.load and first is not ORIGINAL
    fpatch.unpatch()
    assert torch.load is ORIGINAL and torch.serialization.load is ORIGINAL
    fpatch.unpatch()  # no-op
    assert torch.load is ORIGINAL


def test_signature_and_docstring_preserved():
    fpatch.patch()
    assert inspect.signature(torch.load) == inspect.signature(ORIGINAL)
    assert torch.load.__doc__ == ORIGINAL.__doc__ and torch.load.__name__ == ORIGINAL.__name__


def test_patched_context_restores_and_nests():
    with fpatch.patched():
        assert torch.load is not ORIGINAL
        with fpatch.patched():
            assert torch.load is not ORIGINAL
        assert torch.load is not ORIGINAL, "leaving the inner block must not unpatch the outer one"
    assert torch.load is ORIGINAL
    with pytest.raises(KeyError), fpatch.patched():
        raise KeyError
    assert torch.load is ORIGINAL
    fpatch.patch()
    with fpatch.patched():
        pass
    assert torch.load is not ORIGINAL, "patched() inside patch() leaves it patched"


def test_unpatch_leaves_foreign_replacement_alone():
    fpatch.patch()

    def other(*args, **kwargs):
        return ORIGINAL(*args, **kwargs)

    torch.load = other
    fpatch.unpatch()
    assert torch.load is other and torch.serialization.load is ORIGINAL


def test_patched_load_calls_fastckpt(load_calls, tmp_path):
    p = tmp_path / "w.pt"
    p.write_bytes(save_bytes({"w": torch.arange(6.0).view(2, 3)}))
    with fastckpt.patched():
        got = torch.load(p, map_location="cpu", weights_only=True)
        got2 = torch.serialization.load(p, mmap=True)
    assert len(load_calls) == 2 and load_calls[0][1] == {"map_location": "cpu", "weights_only": True}
    ref = ORIGINAL(p, map_location="cpu", weights_only=True)
    assert_same(got, ref)
    assert_same(got2, ref)


def test_delegation_does_not_recurse(load_calls, tmp_path):
    """A legacy file goes fastckpt -> torch; with torch.load patched that must not loop back."""
    p = tmp_path / "legacy.pt"
    p.write_bytes(save_bytes({"w": torch.ones(3)}, _use_new_zipfile_serialization=False))
    with fastckpt.patched():
        got = torch.load(p)
    assert len(load_calls) == 1
    assert_same(got, ORIGINAL(p))


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model, opt, seed):
    torch.manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()


def _resume(path):
    model, opt = _model_and_optimizer(1)
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return model, opt


def test_module_and_optimizer_load_state_dict(load_calls, tmp_path):
    model, opt = _model_and_optimizer(0)
    _train_step(model, opt, 0)
    p = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, p)
    with fastckpt.patched():
        got = _resume(p)
    assert len(load_calls) == 1
    ref = _resume(p)
    for (m_got, o_got), (m_ref, o_ref) in ((got, ref), ((model, opt), ref)):
        for x, y in zip(m_got.state_dict().values(), m_ref.state_dict().values()):
            assert torch.equal(x, y)
    assert_same(got[1].state_dict(), ref[1].state_dict())
    for m, o in (got, ref):
        _train_step(m, o, 2)
    assert_same(got[0].state_dict(), ref[0].state_dict())
    assert_same(got[1].state_dict(), ref[1].state_dict())


def test_import_does_not_import_torch():
    code = "import sys, fastckpt, fastckpt.patching; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
