"""The `fastckpt` command as a newcomer meets it: every kind of input, one exit-code scheme."""

import argparse
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from fastckpt.cli import main  # noqa: E402
from test_reader import save_sharded  # noqa: E402


def fastckpt_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastckpt", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def files(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:400])
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    return tmp_path


@pytest.mark.parametrize("name, words", [
    ("legacy.pt", "legacy (non-zip"), ("ts.pt", "TorchScript archive"), ("trunc.pt", "truncated or damaged"),
    ("m.safetensors", "safetensors file (1 tensors)"), ("absent.pt", "FileNotFoundError"),
])
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_other_formats_are_named_not_tracebacks(files, name, words, command):
    run = fastckpt_cli(command, files / name)
    if command == "verify" and name == "ts.pt":  # a TorchScript archive is a zip with CRC-32s
        assert run.returncode == 0 and run.stdout.splitlines()[-1] == "OK"
        return
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert words in run.stderr


def test_verify_names_the_tensor_and_labels_crcs(files):
    from fastckpt.reader import open as open_checkpoint

    with open_checkpoint(files / "good.pt") as f:
        offset = f.descriptor("b").storage.data_offset
    data = bytearray((files / "good.pt").read_bytes())
    data[offset] ^= 0xFF
    (files / "good.pt").write_bytes(data)
    run = fastckpt_cli("verify", files / "good.pt")
    assert run.returncode == 1
    assert "record 'data/1' (storage of tensor 'b')" in run.stderr and "stored 0x" in run.stderr and ", computed 0x" in run.stderr
    report = json.loads(fastckpt_cli("verify", "--json", files / "good.pt").stdout)
    bad = [r for r in report["records"] if r["status"] == "mismatch"]
    assert [r["tensors"] for r in bad] == [["b"]]


def test_inspect_counts_all_tensors_and_shows_unknown_objects(tmp_path, capsys):
    torch.save({"args": argparse.Namespace(lr=0.1, arch="vit"), **{f"t{i}": torch.ones(1) for i in range(30)}},
               tmp_path / "timm.pt")
    assert main(["inspect", "--max-items", "5", str(tmp_path / "timm.pt")]) == 0
    out = capsys.readouterr().out
    assert "totals: 30 tensors" in out
    assert "<argparse.Namespace>" in out and "lr=0.1" in out and "arch='vit'" in out
    assert "argparse.Namespace  (not allowed by weights_only)" in out
    assert main(["inspect", "--json", str(tmp_path / "timm.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 30


def test_sharded_checkpoints(tmp_path, capsys):
    folder = save_sharded(tmp_path, {f"l{i}": torch.ones(2) for i in range(4)}, parts=2)
    assert main(["verify", str(folder)]) == 0
    assert capsys.readouterr().out.count("records") == 2
    assert main(["inspect", str(folder / "pytorch_model.bin.index.json")]) == 0
    assert capsys.readouterr().out.count("totals: 2 tensors") == 2
    assert main(["convert", str(folder), str(tmp_path / "all.safetensors")]) == 0
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "all.safetensors")) == ["l0", "l1", "l2", "l3"]


def test_convert_refuses_non_tensors_with_exit_2(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "epoch": 1}, tmp_path / "c.pt")
    assert main(["convert", str(tmp_path / "c.pt"), str(tmp_path / "c.safetensors")]) == 2
    assert "--drop-non-tensors" in capsys.readouterr().err
    assert main(["convert", "--drop-non-tensors", str(tmp_path / "c.pt"), str(tmp_path / "c.safetensors")]) == 0


def test_version_and_closed_pipe(tmp_path):
    run = fastckpt_cli("--version")
    assert run.returncode == 0 and run.stdout.startswith("fastckpt ")
    torch.save({f"t{i}": torch.ones(1) for i in range(3000)}, tmp_path / "many.pt")
    pipe = subprocess.run(f"{sys.executable} -m fastckpt verify -v {tmp_path / 'many.pt'} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in pipe.stderr and "BrokenPipe" not in pipe.stderr
