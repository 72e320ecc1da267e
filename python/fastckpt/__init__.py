"""fastckpt: load PyTorch checkpoints faster and more safely than torch.load."""

from fastckpt.errors import (
    CheckpointError,
    FormatError,
    IntegrityError,
    LimitError,
    MetadataError,
    RecordError,
    UnpicklingError,
    UnsafeGlobalError,
)
from fastckpt.archive import open_archive, verify
from fastckpt.patching import patch, patched, unpatch

__version__ = "0.1.0"


_LAZY = {
    "load": "fastckpt.loader",
    "get_unsafe_globals_in_checkpoint": "fastckpt.inspection",
    "open": "fastckpt.reader",
    "load_sharded": "fastckpt.loader",
    "convert": "fastckpt.converter",
    "save": "fastckpt.saver",
    "AsyncSaver": "fastckpt.saver",
}


def __getattr__(name):
    # torch is imported on first use of the loader or the writer, not by `import fastckpt`
    # (fastckpt.open, inspect, verify and convert never import it).
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "distributed":  # a submodule: imports torch.distributed
        return importlib.import_module("fastckpt.distributed")
    raise AttributeError(f"module 'fastckpt' has no attribute {name!r}")

__all__ = [
    "AsyncSaver",
    "CheckpointError",
    "FormatError",
    "IntegrityError",
    "LimitError",
    "MetadataError",
    "RecordError",
    "UnpicklingError",
    "UnsafeGlobalError",
    "get_unsafe_globals_in_checkpoint",
    "convert",
    "load",
    "load_sharded",
    "open",
    "open_archive",
    "patch",
    "patched",
    "save",
    "unpatch",
    "verify",
]
