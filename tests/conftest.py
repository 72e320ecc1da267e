"""Shared fixtures: small checkpoints written by torch.save, and a spy on fastckpt's load."""

import collections

import pytest


@pytest.fixture(scope="session")
def small_state():
    """A few tensors of different dtypes, including an empty one (a zero-length
    record: no data descriptor, flags 0x0800)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    return collections.OrderedDict(
        w=torch.randn(3, 5, generator=g),
        b=torch.arange(7),
        h=torch.randn(100, generator=g).half(),
        empty=torch.empty(0),
    )


@pytest.fixture
def small_ckpt(tmp_path, small_state):
    import torch

    path = tmp_path / "small.pt"
    torch.save(small_state, path)
    return path


@pytest.fixture
def load_calls(monkeypatch):
    """Record every call that reaches fastckpt's load (also when it comes through a patched torch.load)."""
    from parity import loader_module

    real, calls = loader_module.load, []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module, "load", load)
    return calls
