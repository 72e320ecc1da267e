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

__version__ = "0.1.0"


def __getattr__(name):
    # torch is imported on first use of the loader, not by `import fastckpt`.
    if name == "load":
        from fastckpt.loader import load

        return load
    raise AttributeError(f"module 'fastckpt' has no attribute {name!r}")

__all__ = [
    "CheckpointError",
    "FormatError",
    "IntegrityError",
    "LimitError",
    "MetadataError",
    "RecordError",
    "UnpicklingError",
    "UnsafeGlobalError",
    "load",
    "open_archive",
    "verify",
]
