"""The one exception hierarchy of fastckpt.

Every malformed or unsafe input raises a subclass of :class:`CheckpointError`
(a ``RuntimeError``, as torch's own zip errors are). Errors raised while
unpickling are also ``pickle.UnpicklingError``\\ s, so code that catches torch's
exceptions keeps working. Operating-system failures stay ``OSError``.
"""

from __future__ import annotations

import pickle


class CheckpointError(RuntimeError):
    """Base class: the checkpoint cannot be loaded as it is."""


class FormatError(CheckpointError):
    """The file is not a zip archive fastckpt accepts (structure or strictness rule)."""


class IntegrityError(CheckpointError):
    """A record's CRC-32 does not match its bytes.

    Attributes, set where the error is raised (never parsed from the message):

    - ``record``: the name of the record in the archive (``"data/0"``, ``"data.pkl"``),
      or None when unknown;
    - ``keys``: a tuple of the tensor names (or storage keys) the record holds, when
      known; empty otherwise.
    """

    def __init__(self, *args, record: str | None = None, keys=()):
        super().__init__(*args)
        self.record = record
        self.keys = tuple(keys)


class RecordError(CheckpointError):
    """A record is missing, compressed where it must be stored, or of the wrong size."""


class LimitError(CheckpointError):
    """A safety cap (pickle size, nesting depth, memo size, inflated size...) was exceeded."""


class MetadataError(CheckpointError):
    """Tensor or storage metadata is malformed or out of the storage's bounds."""


class UnpicklingError(CheckpointError, pickle.UnpicklingError):
    """The data pickle is malformed."""


class UnsafeGlobalError(UnpicklingError):
    """weights_only refused a global or an operation on it."""


class MissingDtypeError(ImportError):
    """A tensor's dtype needs an optional package (bfloat16 / float8 in numpy: ml_dtypes) that is
    not installed; the message names the tensor and what to install. Not a CheckpointError: the
    file is fine."""


__all__ = [
    "CheckpointError",
    "FormatError",
    "IntegrityError",
    "RecordError",
    "LimitError",
    "MetadataError",
    "UnpicklingError",
    "UnsafeGlobalError",
    "MissingDtypeError",
]
