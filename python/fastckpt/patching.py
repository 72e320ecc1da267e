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

from fastckpt._options import patched_verify

__all__ = ["patch", "unpatch", "patched", "is_patched", "original_load"]

_lock = threading.Lock()
_verify = None  # `verify` for patched calls (None: fastckpt.load's default)
_blocks = 0  # `with patched()` blocks open, in all threads
_blocks_patched = False  # whether the first of them patched (then the last one unpatches)
_inside_fastckpt = contextvars.ContextVar("fastckpt_inside_load", default=False)


def loader_module():
    """The module that defines fastckpt's ``load`` (imported on first use: it imports torch)."""
    return importlib.import_module("fastckpt.loader")


def _modules():
    import torch
    import torch.serialization

    return {"torch": torch, "torch.serialization": torch.serialization}


class _Replacement:
    """One torch function replaced in ``torch`` and ``torch.serialization`` by one wrapper.
    Every method requires _lock."""

    def __init__(self, attribute: str, make_wrapper):
        self.targets = (("torch", attribute), ("torch.serialization", attribute))
        self._make_wrapper = make_wrapper
        self._saved: dict[tuple[str, str], object] = {}  # what each target held before install()
        self.wrapper = None  # None when not installed

    def installed(self, mods) -> bool:
        return self.wrapper is not None and getattr(mods["torch"], self.targets[0][1]) is self.wrapper

    def install(self, mods) -> None:
        """Idempotent: installing twice, then removing once, restores the original."""
        if self.wrapper is None:
            self._saved = {(m, a): getattr(mods[m], a) for m, a in self.targets}
            original = self._saved[self.targets[1]]
            self.wrapper = functools.wraps(original)(self._make_wrapper(original))
            self.wrapper.__signature__ = inspect.signature(original)
            self.wrapper.__fastckpt_original__ = original
        for m, a in self.targets:
            setattr(mods[m], a, self.wrapper)

    def remove(self, mods) -> None:
        """Leaves alone an attribute someone else replaced after install()."""
        if self.wrapper is None:
            return
        for m, a in self.targets:
            if getattr(mods[m], a) is self.wrapper:
                setattr(mods[m], a, self._saved[(m, a)])
        self._saved.clear()
        self.wrapper = None


def _load_wrapper(original):
    def load(*args, **kwargs):
        if _inside_fastckpt.get():
            return original(*args, **kwargs)
        token = _inside_fastckpt.set(True)
        try:
            with patched_verify(_verify):  # resolved with the call's own verify by _options.resolve_verify
                return loader_module().load(*args, **kwargs)
        finally:
            _inside_fastckpt.reset(token)

    return load


def _save_wrapper(original):
    # fastckpt.save never calls torch.save, so no guard against recursion is needed.
    def save(*args, **kwargs):
        return importlib.import_module("fastckpt.writer").save(*args, **kwargs)

    return save


_load = _Replacement("load", _load_wrapper)
_save = _Replacement("save", _save_wrapper)  # only by patch(save=True)


def is_patched() -> bool:
    """Whether ``torch.load`` is currently fastckpt's wrapper."""
    return _load.installed(_modules())


def original_load():
    """torch's own ``torch.serialization.load``, whether or not :func:`patch` is active."""
    with _lock:
        if _load.wrapper is not None:
            return _load.wrapper.__fastckpt_original__
    return _modules()["torch.serialization"].load


def patch(verify: bool | None = None, *, save: bool = False) -> None:
    """Make ``torch.load`` and ``torch.serialization.load`` call fastckpt's ``load``. Idempotent.

    ``verify``: fastckpt's ``verify`` for patched calls (True: check every storage's CRC-32, also
    for ``mmap=True`` loads; False: none); None keeps ``load``'s default (and ``FASTCKPT_VERIFY``).
    ``save=True``: ``torch.save`` and ``torch.serialization.save`` also call ``fastckpt.save``.
    """
    global _verify
    with _lock:
        mods = _modules()
        if save:
            _save.install(mods)
        _verify = verify
        _load.install(mods)


def unpatch() -> None:
    """Restore what ``torch.load`` / ``torch.serialization.load`` (and ``torch.save`` /
    ``torch.serialization.save`` after ``patch(save=True)``) were before :func:`patch`.

    An attribute someone else replaced after :func:`patch` is left as it is. No-op when not patched.
    """
    with _lock:
        _unpatch_locked()


def _unpatch_locked() -> None:
    global _verify
    mods = _modules()
    _save.remove(mods)
    _load.remove(mods)
    _verify = None


@contextlib.contextmanager
def patched(verify: bool | None = None):
    """``with fastckpt.patched():`` patch for the block, then restore the previous state.

    Blocks nest and may overlap in several threads: the first to enter patches (unless torch was
    already patched), the last to leave restores. ``verify`` as for :func:`patch`.
    """
    global _blocks, _blocks_patched, _verify
    with _lock:
        if _blocks == 0:
            mods = _modules()
            _blocks_patched = not _load.installed(mods)
            if _blocks_patched:
                _verify = verify
                _load.install(mods)
        _blocks += 1
    try:
        yield
    finally:
        with _lock:
            _blocks -= 1
            if _blocks == 0 and _blocks_patched:
                _unpatch_locked()
                _blocks_patched = False
