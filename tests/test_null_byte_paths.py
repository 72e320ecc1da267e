"""A path with an embedded NUL byte names a different file once it becomes a C string
("model.pt\\0.safetensors" would open model.pt). Every entry point raises
ValueError("embedded null byte"), as Python's open() does, and touches no file; the CLI
reports it (exit 2) without a traceback."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

import fastckpt
from fastckpt import _native, cli


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder holding model.pt (what the truncated names would reach) and nothing else."""
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(2)}, "model.pt")
    return tmp_path


NUL_NAMES = ["model.pt\0.safetensors", "model.pt\0.pt"]


def _refused(fn):
    with pytest.raises(ValueError, match="embedded null byte"):
        fn()


@pytest.mark.parametrize("name", NUL_NAMES, ids=repr)
def test_readers_refuse(folder, name):
    _refused(lambda: fastckpt.open(name))
    _refused(lambda: fastckpt.open(name, verify=True))
    _refused(lambda: fastckpt.verify(name))
    _refused(lambda: fastckpt.open_archive(name))
    _refused(lambda: fastckpt.get_unsafe_globals_in_checkpoint(name))
    _refused(lambda: fastckpt.convert(name, "out.safetensors"))
    assert sorted(os.listdir(folder)) == ["model.pt"]


@pytest.mark.parametrize("name", ["model.pt\0.pt", "model.pt\0"], ids=repr)
@pytest.mark.parametrize("mmap", [False, True])
def test_load_refuses(folder, name, mmap):
    _refused(lambda: fastckpt.load(name, mmap=mmap))
    _refused(lambda: torch.load(name, mmap=mmap))  # what torch does


def test_load_of_a_safetensors_name_fails_as_torch_load_does(folder):
    """A '.safetensors' name is handed to torch.load (and on to safetensors), which refuses it too."""
    name = "model.pt\0.safetensors"
    with pytest.raises(Exception) as ours:
        fastckpt.load(name)
    with pytest.raises(Exception) as theirs:
        torch.load(name)
    assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("dst", ["saved.pt\0.x", "model.pt\0.x"], ids=repr)
def test_writers_refuse(folder, dst):
    before = (folder / "model.pt").read_bytes()
    _refused(lambda: fastckpt.save({"w": torch.zeros(3)}, dst))
    _refused(lambda: fastckpt.convert("model.pt", dst))
    _refused(lambda: _native.replace_file("model.pt", dst))
    _refused(lambda: _native.replace_file(dst, "model.pt"))
    assert sorted(os.listdir(folder)) == ["model.pt"] and (folder / "model.pt").read_bytes() == before


@pytest.mark.parametrize("argv", [["inspect", "model.pt\0x"], ["verify", "model.pt\0x"],
                                  ["convert", "model.pt\0x", "out.safetensors"],
                                  ["convert", "model.pt", "out\0.safetensors"]], ids=lambda a: a[0] + repr(a[1:]))
def test_cli_reports_without_traceback(folder, argv):
    """argv cannot hold a NUL from a shell; the entry point is called as a program embedding the CLI would."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    assert code == 2
    assert "embedded null byte" in err.getvalue() and "Traceback" not in err.getvalue()
    assert sorted(os.listdir(folder)) == ["model.pt"]


def test_native_path_conversion(folder):
    """The one conversion every binding taking a path uses: str, bytes and os.PathLike, as open()."""
    size = (folder / "model.pt").stat().st_size
    for name in ("model.pt", b"model.pt", folder / "model.pt"):
        assert _native.Archive.open(name).size == size
    for name in ("model.pt", folder / "model.pt"):
        assert torch.equal(fastckpt.load(name)["w"], torch.ones(2))
    _refused(lambda: _native.Archive.open(b"model.pt\0"))
    with pytest.raises(TypeError, match="os.PathLike"):
        _native.Archive.open(3)
    with pytest.raises(FileNotFoundError) as info:  # a name that is not UTF-8 comes back as given
        _native.Archive.open(b"missing\xff.pt")
    assert info.value.filename == b"missing\xff.pt"
