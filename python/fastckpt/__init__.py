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

__all__ = [
    "CheckpointError",
    "FormatError",
    "IntegrityError",
    "LimitError",
    "MetadataError",
    "RecordError",
    "UnpicklingError",
    "UnsafeGlobalError",
    "open_archive",
    "verify",
]
