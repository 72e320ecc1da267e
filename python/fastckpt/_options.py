"""Options every entry point resolves the same way. Torch-free.

``verify`` (whether storage CRC-32s are checked) is resolved by :func:`resolve_verify` alone, in
this order: the call's argument → ``fastckpt.patch(verify=...)`` for calls made through the
patched ``torch.load`` → the ``FASTCKPT_VERIFY`` environment variable (``1``/``0``) → the default:
bytes that are read (eager loads, device staging, ``convert``, the distributed loader) are checked,
bytes that are only mapped (``mmap=True`` storages, ``fastckpt.open``) are not, so a lazy load
touches no page it is not asked for. ``data.pkl`` is checked whatever this says.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

VERIFY_ENV = "FASTCKPT_VERIFY"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# fastckpt.patch(verify=...) for the call in progress through the patched torch.load.
_patched_verify: contextvars.ContextVar[bool | None] = contextvars.ContextVar("fastckpt_patched_verify",
                                                                              default=None)


def resolve_verify(verify: bool | None, *, mapped: bool = False) -> bool:
    """Whether to check storage CRC-32s: `verify` if given, else the patch's, else FASTCKPT_VERIFY,
    else ``not mapped`` (see the module's docstring). Any other FASTCKPT_VERIFY value is ignored."""
    if verify is None:
        verify = _patched_verify.get()
    if verify is None:
        env = os.environ.get(VERIFY_ENV, "").strip().lower()
        if env in _TRUE:
            return True
        if env in _FALSE:
            return False
        return not mapped
    return bool(verify)


@contextlib.contextmanager
def patched_verify(verify: bool | None):
    """The patch's ``verify`` for calls made inside the block (the patched torch.load's)."""
    token = _patched_verify.set(verify)
    try:
        yield
    finally:
        _patched_verify.reset(token)
