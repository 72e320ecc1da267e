"""Monkeypatching ``torch.load``: ``patch()``, ``unpatch()`` and ``with patched():``.

After :func:`patch`, ``torch.load`` and ``torch.serialization.load`` are one wrapper with
torch's own signature and docstring that forwards every call to fastckpt's ``load`` (looked up
at call time in ``fastckpt.loader``).
Patching is idempotent (patching twice, then unpatching once, restores the original) and
reversible. Code that did ``from torch import load`` before :func:`patch` keeps torch's function.

A ``torch.load`` call made *while* fastckpt is loading (fastckpt delegating a legacy or
TorchScript file to torch, or a ``__setstate__`` run by ``weights_only=False``) goes to the
original function, so delegation can never recurse into fastckpt.

``patch(save=True)`` also replaces ``torch.save`` and ``torch.serialization.save`` with a wrapper that
forwards to ``fastckpt.save`` (off by default; :func:`unpatch` restores them too).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import threading

__all__ = ["patch", "unpatch", "patched", "is_patched", "original_load"]

# The attributes we replace: (module name, attribute name).
_TARGETS = (("torch", "load"), ("torch.serialization", "load"))

_lock = threading.Lock()
_saved: dict[tuple[str, str], object] = {}  # what each target held before patch()
_wrapper = None  # the installed wrapper, None when not patched
_inside_fastckpt = contextvars.ContextVar("fastckpt_inside_load", default=False)

# torch.save, replaced only by patch(save=True); fastckpt.save never calls torch.save, so no guard.
_SAVE_TARGETS = (("torch", "save"), ("torch.serialization", "save"))
_saved_save: dict[tuple[str, str], object] = {}
_save_wrapper = None


def loader_module():
    """The module that defines fastckpt's ``load`` (imported on first use: it imports torch)."""
    return importlib.import_module("fastckpt.loader")


def _modules():
    import torch
    import torch.serialization

    return {"torch": torch, "torch.serialization": torch.serialization}


def _make_wrapper(original):
    @functools.wraps(original)
    def load(*args, **kwargs):
        if _inside_fastckpt.get():
            return original(*args, **kwargs)
        token = _inside_fastckpt.set(True)
        try:
            return loader_module().load(*args, **kwargs)
        finally:
            _inside_fastckpt.reset(token)

    load.__signature__ = inspect.signature(original)
    load.__fastckpt_original__ = original
    return load


def _make_save_wrapper(original):
    @functools.wraps(original)
    def save(*args, **kwargs):
        return importlib.import_module("fastckpt.writer").save(*args, **kwargs)

    save.__signature__ = inspect.signature(original)
    save.__fastckpt_original__ = original
    return save


def _patch_save(mods) -> None:
    """Requires _lock."""
    global _save_wrapper
    if _save_wrapper is None:
        _saved_save.update({(m, a): getattr(mods[m], a) for m, a in _SAVE_TARGETS})
        _save_wrapper = _make_save_wrapper(_saved_save[("torch.serialization", "save")])
    for m, a in _SAVE_TARGETS:
        setattr(mods[m], a, _save_wrapper)


def _unpatch_save(mods) -> None:
    """Requires _lock. Leaves alone an attribute someone else replaced after patching."""
    global _save_wrapper
    if _save_wrapper is None:
        return
    for m, a in _SAVE_TARGETS:
        if getattr(mods[m], a) is _save_wrapper:
            setattr(mods[m], a, _saved_save[(m, a)])
    _saved_save.clear()
    _save_wrapper = None


def is_patched() -> bool:
    """Whether ``torch.load`` is currently fastckpt's wrapper."""
    return _wrapper is not None and _modules()["torch"].load is _wrapper


def original_load():
    """torch's own ``torch.serialization.load``, whether or not :func:`patch` is active."""
    with _lock:
        if _wrapper is not None:
            return _wrapper.__fastckpt_original__
    return _modules()["torch.serialization"].load


def patch(save: bool = False) -> None:
    """Make ``torch.load`` and ``torch.serialization.load`` call fastckpt's ``load``. Idempotent.

    With ``save=True``, ``torch.save`` and ``torch.serialization.save`` also call ``fastckpt.save``.
    """
    global _wrapper
    mods = _modules()
    with _lock:
        if save:
            _patch_save(mods)
        if _wrapper is not None and all(getattr(mods[m], a) is _wrapper for m, a in _TARGETS):
            return
        if _wrapper is None:
            _saved.clear()
            _saved.update({(m, a): getattr(mods[m], a) for m, a in _TARGETS})
            _wrapper = _make_wrapper(_saved[("torch.serialization", "load")])
        for m, a in _TARGETS:
            setattr(mods[m], a, _wrapper)


def unpatch() -> None:
    """Restore what ``torch.load`` / ``torch.serialization.load`` (and ``torch.save`` /
    ``torch.serialization.save`` after ``patch(save=True)``) were before :func:`patch`.

    An attribute someone else replaced after :func:`patch` is left as it is. No-op when not patched.
    """
    global _wrapper
    mods = _modules()
    with _lock:
        _unpatch_save(mods)
        if _wrapper is None:
            return
        for m, a in _TARGETS:
            if getattr(mods[m], a) is _wrapper:
                setattr(mods[m], a, _saved[(m, a)])
        _saved.clear()
        _wrapper = None


@contextlib.contextmanager
def patched():
    """``with fastckpt.patched():`` patch for the block, then restore the previous state (nests)."""
    was_patched = is_patched()
    patch()
    try:
        yield
    finally:
        if not was_patched:
            unpatch()
