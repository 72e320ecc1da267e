"""fastckpt.lightning.CheckpointIO against Lightning's default TorchCheckpointIO: a fit that checkpoints
every few steps, and a resume from one of those checkpoints, give the same weights and optimizer state."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from parity import assert_same

import fastckpt
from fastckpt.lightning import CheckpointIO


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        return torch.utils.data.DataLoader(data, batch_size=8)


def fit(folder, plugin, max_steps: int, ckpt_path=None) -> Tiny:
    seed_everything(0, verbose=False)
    model = Tiny()
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, plugins=[plugin], default_root_dir=folder,
                      callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1,
                                                 filename="{step}")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert_same(b["state_dict"], a["state_dict"])
    assert_same(b["optimizer_states"], a["optimizer_states"])


@pytest.mark.parametrize("background", [True, False])
def test_fit_and_resume_match_torch_checkpoint_io(tmp_path, background):
    ref_dir, got_dir = tmp_path / "torch", tmp_path / "fastckpt"
    _, ref_model = fit(ref_dir, TorchCheckpointIO(), 6)
    plugin = CheckpointIO(background=background)
    _, got_model = fit(got_dir, plugin, 6)
    assert sorted(os.listdir(ref_dir)) == sorted(os.listdir(got_dir)) == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    for name in os.listdir(ref_dir):
        assert fastckpt.verify(got_dir / name).ok
        same_training_state(torch.load(ref_dir / name, weights_only=False),
                            torch.load(got_dir / name, weights_only=False))
    assert_same(got_model.state_dict(), ref_model.state_dict())

    # Resume both from step 4 and train to 8: same weights, same optimizer state.
    ref_trainer, ref_model = fit(ref_dir / "resumed", TorchCheckpointIO(), 8, ckpt_path=ref_dir / "step=4.ckpt")
    got_trainer, got_model = fit(got_dir / "resumed", CheckpointIO(background=background), 8,
                                 ckpt_path=got_dir / "step=4.ckpt")
    assert_same(got_model.state_dict(), ref_model.state_dict())
    assert_same(got_trainer.optimizers[0].state_dict(), ref_trainer.optimizers[0].state_dict())


def test_save_checkpoint_while_a_write_is_pending(tmp_path, monkeypatch):
    trainer, model = fit(tmp_path, CheckpointIO(), 2)
    plugin = trainer.strategy.checkpoint_io
    assert isinstance(plugin, CheckpointIO)
    gate = __import__("threading").Event()
    writer = __import__("importlib").import_module("fastckpt.writer")
    real = writer.write_to_path
    monkeypatch.setattr(writer, "write_to_path", lambda *a, **k: (gate.wait(5), real(*a, **k)))
    trainer.save_checkpoint(tmp_path / "a.ckpt")  # its write waits for the gate
    assert not (tmp_path / "a.ckpt").exists()
    __import__("threading").Timer(0.2, gate.set).start()
    trainer.save_checkpoint(tmp_path / "b.ckpt")  # waits for a.ckpt's write, then snapshots
    plugin.remove_checkpoint(tmp_path / "b.ckpt")  # waits for b's write, then removes it
    assert not (tmp_path / "b.ckpt").exists()
    got = plugin.load_checkpoint(tmp_path / "a.ckpt", weights_only=False)["state_dict"]
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    plugin.teardown()
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")
