"""Lightning's checkpoint I/O through fastckpt: ``Trainer(plugins=[fastckpt.lightning.CheckpointIO()])``.

Saves go through ``fastckpt.save`` (by default in the background: training goes on once a snapshot of
the checkpoint is taken), loads through ``fastckpt.load``. Importing this module imports Lightning;
``import fastckpt`` does not.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import CheckpointIO as _LightningCheckpointIO

from fastckpt import loader, saver

__all__ = ["CheckpointIO"]


class CheckpointIO(_LightningCheckpointIO):
    """A ``lightning.pytorch.plugins.io.CheckpointIO`` that writes and reads local files with fastckpt.

    ``background=True`` (the default) writes each checkpoint on a :class:`fastckpt.AsyncSaver` of
    its own (``max_in_flight`` snapshots held at most): ``save_checkpoint`` returns after the snapshot,
    ``load_checkpoint`` and ``remove_checkpoint`` of a path wait for its pending write first, and
    ``teardown`` (the end of ``fit``) waits for every write, raising the first failure. Remote paths
    (``scheme://...``) are handed to Lightning's ``TorchCheckpointIO``.
    """

    def __init__(self, background: bool = True, *, max_in_flight: int = 1):
        super().__init__()
        self.background = background
        self._saver = saver.AsyncSaver(max_in_flight) if background else None
        self._pending: dict[str, saver.SaveHandle] = {}
        self._remote = TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            f"`{type(self).__module__}.{type(self).__name__}`")
        path = os.fspath(path)
        if _is_remote(path):
            self._remote.save_checkpoint(checkpoint, path)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if self._saver is None:
            saver.save(checkpoint, path)
            return
        self._pending = {p: h for p, h in self._pending.items() if not h.done()}  # failures: the saver reports
        self._pending[path] = self._saver.save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = os.fspath(path)
        if _is_remote(path):
            return self._remote.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        self._wait_for(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return loader.load(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        path = os.fspath(path)
        if _is_remote(path):
            self._remote.remove_checkpoint(path)
            return
        self._wait_for(path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)

    def teardown(self) -> None:
        """Waits for every pending write; raises the first failure not reported yet."""
        if self._saver is not None:
            self._pending.clear()
            self._saver.wait()

    def _wait_for(self, path: str) -> None:
        handle = self._pending.pop(path, None)
        if handle is not None:
            handle.result()


def _is_remote(path: str) -> bool:
    return "://" in path
