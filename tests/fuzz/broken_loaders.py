"""Deliberately wrong loaders: the fuzz harness must report each (tests/test_fuzz_load.py)."""

import ctypes
import time

import torch

import fastckpt


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    for v in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ():
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def segfaults(f, **kw):
    fastckpt.load(f, **kw)
    ctypes.string_at(0)  # SIGSEGV, as a native bug would


def hangs(f, **kw):
    fastckpt.load(f, **kw)
    time.sleep(3600)


def raises_value_error(f, **kw):
    fastckpt.load(f, **kw)
    raise ValueError("not a CheckpointError")


def perturbs(f, **kw):
    """Loads, then changes one value of a floating tensor: a silent wrong result."""
    out = fastckpt.load(f, **kw)
    t = _first_tensor(out)
    if t is not None and t.is_floating_point() and t.numel() and t.layout == torch.strided and t.is_contiguous():
        with torch.no_grad():
            t.add_(1)
    return out
