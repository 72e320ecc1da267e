"""Monkeypatching ``torch.load``: ``patch()``, ``unpatch()`` and ``with patched():``.

After :func:`patch`, ``torch.load`` and ``torch.serialization.load`` are one wrapper with
torch's own signature and docstring that forwards every call to fastckpt's ``load`` (looked up
at call time in ``fastckpt.loader``).
Patching is idempotent (patching twice, then unpatching once, restores the original) and
reversible. Code that did ``from torch import load`` before :func:`patch` keeps torch's function.
``patch(verify=...)`` sets fastckpt's ``verify`` for patched calls (clients such as transformers
pass ``mmap=True``, whose default checks no storage CRC). ``with patched():`` blocks may nest and
overlap across threads: torch stays patched until the last block leaves.

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
_verify = None  # `verify` for patched calls (None: fastckpt.load's default)
_blocks = 0  # `with patched()` blocks open, in all threads
_blocks_patched = False  # whether the first of them patched (then the last one unpatches)
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
            if _verify is not None:
                kwargs.setdefault("verify", _verify)
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


def patch(verify: bool | None = None, *, save: bool = False) -> None:
    """Make ``torch.load`` and ``torch.serialization.load`` call fastckpt's ``load``. Idempotent.

    ``verify``: fastckpt's ``verify`` for patched calls (True: check every storage's CRC-32, also
    for ``mmap=True`` loads; False: none); None keeps ``load``'s default (and ``FASTCKPT_VERIFY``).
    ``save=True``: ``torch.save`` and ``torch.serialization.save`` also call ``fastckpt.save``.
    """
    with _lock:
        if save:
            _patch_save(_modules())
        _patch_locked(verify)


def _patch_locked(verify) -> None:
    global _wrapper, _verify
    mods = _modules()
    _verify = verify
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
    with _lock:
        _unpatch_save(_modules())
        _unpatch_locked()


def _unpatch_locked() -> None:
    global _wrapper, _verify
    mods = _modules()
    if _wrapper is None:
        return
    for m, a in _TARGETS:
        if getattr(mods[m], a) is _wrapper:
            setattr(mods[m], a, _saved[(m, a)])
    _saved.clear()
    _wrapper = None
    _verify = None


@contextlib.contextmanager
def patched(verify: bool | None = None):
    """``with fastckpt.patched():`` patch for the block, then restore the previous state.

    Blocks nest and may overlap in several threads: the first to enter patches (unless torch was
    already patched), the last to leave restores. ``verify`` as for :func:`patch`.
    """
    global _blocks, _blocks_patched
    with _lock:
        if _blocks == 0:
            _blocks_patched = not (_wrapper is not None and _modules()["torch"].load is _wrapper)
            if _blocks_patched:
                _patch_locked(verify)
        _blocks += 1
    try:
        yield
    finally:
        with _lock:
            _blocks -= 1
            if _blocks == 0 and _blocks_patched:
                _unpatch_locked()
                _blocks_patched = False
