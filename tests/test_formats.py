"""_formats (file kinds, sharded indexes, the shard rule) and _options (verify), and the surfaces
that use them: fastckpt.open and load_sharded read a sharded folder the same way, the CLI
answers malformed inputs without a traceback, inspect/verify run without importing torch, and
bf16 needs ml_dtypes only where a numpy dtype is made."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap

import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402
from fastckpt import _formats  # noqa: E402
from fastckpt._formats import Kind  # noqa: E402
from fastckpt._options import patched_verify, resolve_verify  # noqa: E402
from fastckpt.cli import main  # noqa: E402
from fastckpt.errors import FormatError, IntegrityError  # noqa: E402

from test_reader import save_sharded  # noqa: E402



def _python(code: str, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- file kinds


def test_sniff_tells_every_kind(tmp_path):
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(state, tmp_path / "legacy4.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)
    with open(tmp_path / "legacy0.pt", "wb") as f:
        pickle.dump(_formats.TORCH_MAGIC_NUMBER, f, protocol=0)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    with tarfile.open(tmp_path / "old.tar", "w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("storages")
        info.size = 4
        t.addfile(info, io.BytesIO(b"abcd"))
    from safetensors.torch import save_file

    save_file(state, tmp_path / "m.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    huge_header = (10**9).to_bytes(8, "little") + b"{" + b" " * 100  # declares more than the file and the cap
    (tmp_path / "lookalike.safetensors").write_bytes(huge_header)
    expected = {"zip.pt": Kind.ZIP, "legacy.pt": Kind.LEGACY, "legacy4.pt": Kind.LEGACY, "legacy0.pt": Kind.LEGACY,
                "ts.pt": Kind.TORCHSCRIPT, "old.tar": Kind.TAR, "m.safetensors": Kind.SAFETENSORS, "empty.pt": Kind.EMPTY,
                "random.pt": Kind.UNKNOWN, "lookalike.safetensors": Kind.UNKNOWN}
    assert {name: _formats.sniff(tmp_path / name) for name in expected} == expected
    assert _formats.sniff(tmp_path / "ts.pt", records=False) is Kind.ZIP  # the first bytes only
    # file objects: from their current position, which is left where it was
    with open(tmp_path / "legacy.pt", "rb") as f:
        buffer = io.BytesIO(b"junk" + f.read())
    buffer.seek(4)
    assert _formats.sniff(buffer) is Kind.LEGACY and buffer.tell() == 4
    assert {k.torch_reads for k in (Kind.LEGACY, Kind.TAR, Kind.TORCHSCRIPT)} == {True}
    assert not Kind.ZIP.torch_reads
    with pytest.raises(FileNotFoundError):
        _formats.sniff(tmp_path / "absent.pt")


def test_loader_hands_what_torch_reads_to_torch(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(fastckpt.load(tmp_path / "legacy.pt")["w"], torch.arange(3))
    (tmp_path / "random.pt").write_bytes(b"\x00" * 17 + b"PK\x03\x04" + os.urandom(64))
    with pytest.raises(FormatError, match="a zip signature is at offset 17"):
        fastckpt.load(tmp_path / "random.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "m.bin")
    with pytest.raises(FormatError, match="a safetensors file"):
        fastckpt.load(tmp_path / "m.bin")


# --------------------------------------------------------------------------- index files


def _index(tmp_path, content: bytes | str, name="pytorch_model.bin.index.json"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


BAD_INDEXES = {
    "not-json": b'{"weight_map": {"a": "s.bin",}',
    "not-utf8": b'{"weight_map": {"\xff\xfe": "s.bin"}}',
    "utf16": '{"weight_map": {}}'.encode("utf-16"),
    "deep-list": b"[" * 100_000 + b"]" * 100_000,
    "deep-in-map": b'{"weight_map": {"a": "s.bin"}, "metadata": ' + b'{"x": ' * 5000 + b"1" + b"}" * 5001,
    "deep-unclosed": b'{"weight_map": ' + b"[" * 1_000_000,
    "top-list": b'[{"weight_map": {}}]',
    "no-map": b'{"metadata": {}}',
    "map-list": b'{"weight_map": [["a", "s.bin"]]}',
    "shard-int": b'{"weight_map": {"a": 3}}',
    "shard-null": b'{"weight_map": {"a": null}}',
    "metadata-list": b'{"weight_map": {"a": "s.bin"}, "metadata": [1]}',
    "duplicate-key": b'{"weight_map": {"a": "s1.bin", "a": "s2.bin"}}',
    "absolute": b'{"weight_map": {"a": "/etc/passwd"}}',
    "dotdot": b'{"weight_map": {"a": ".."}}',
    "parent": b'{"weight_map": {"a": "../other/s.bin"}}',
    "subfolder": b'{"weight_map": {"a": "sub/s.bin"}}',
    "backslash": b'{"weight_map": {"a": "..\\\\s.bin"}}',
    "empty-name": b'{"weight_map": {"a": ""}}',
    "nul": b'{"weight_map": {"a": "s.bin\\u0000x"}}',
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_malformed_index_is_a_format_error_naming_the_file(tmp_path, case):
    path = _index(tmp_path, BAD_INDEXES[case])
    with pytest.raises(FormatError) as e:
        _formats.read_index(path)
    assert type(e.value) is FormatError and str(path) in str(e.value)
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    # every surface that reads an index says the same
    with pytest.raises(FormatError):
        fastckpt.open(tmp_path)
    with pytest.raises(FormatError):
        fastckpt.load_sharded(path)


@pytest.mark.parametrize("case", ["not-json", "not-utf8", "deep-list", "absolute"])
@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_cli_on_a_malformed_index_exits_2_without_traceback(tmp_path, case, command, capsys):
    _index(tmp_path, BAD_INDEXES[case])
    args = [command, str(tmp_path)] + ([str(tmp_path / "out.safetensors")] if command == "convert" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "FormatError" in err and "pytorch_model.bin.index.json" in err


def test_huge_sparse_index_is_refused_before_reading(tmp_path):
    path = tmp_path / "pytorch_model.bin.index.json"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes: costs no disk, but GBs of memory if read
    code = """
        import resource, sys
        from fastckpt import _formats
        from fastckpt.errors import LimitError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            _formats.read_index(sys.argv[1])
        except LimitError as e:
            print("LimitError", e)
        print("grew_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
    run = _python(code, path)
    assert run.returncode == 0, run.stderr
    assert "LimitError" in run.stdout and str(1 << 30) in run.stdout
    # reading the cap's 64 MiB (let alone the file) would grow the process by more than this
    assert int(run.stdout.split("grew_kib")[1]) < 16 << 10


def test_index_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pytorch_model.bin.index.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(FormatError, match="not a regular file"):
        _formats.read_index(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        fastckpt.open(tmp_path)


def test_errors_do_not_quote_files_outside_the_folder(tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"weight_map": {"TOKEN-abc123": "../SECRET-xyz"}}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin.index.json").symlink_to(outside / "config.json")
    with pytest.raises(FormatError) as e:
        _formats.read_index(ckpt / "pytorch_model.bin.index.json")
    assert "TOKEN" not in str(e.value) and "SECRET" not in str(e.value)
    # the same index as a file of the folder is quoted, to say what is wrong
    (ckpt / "pytorch_model.bin.index.json").unlink()
    (ckpt / "pytorch_model.bin.index.json").write_text((outside / "config.json").read_text())
    with pytest.raises(FormatError, match="SECRET-xyz"):
        _formats.read_index(ckpt / "pytorch_model.bin.index.json")


def test_read_index_and_shards(tmp_path):
    path = _index(tmp_path, json.dumps({"metadata": {"total_size": 12},
                                        "weight_map": {"b": "s2.bin", "a": "s1.bin", "c": "s2.bin"}}))
    index = _formats.read_index(path)
    assert index.path == path and index.folder == tmp_path and index.metadata == {"total_size": 12}
    assert index.shards() == {"s1.bin": ["a"], "s2.bin": ["b", "c"]}
    assert index.shard_path("s1.bin") == tmp_path / "s1.bin"
    _formats.check_shard_keys(index, "s2.bin", ["c", "b"])  # order does not matter
    for keys, words in [(["b"], "lacks 'c'"), (["b", "c", "a"], "holds 'a', which the index maps to s1.bin"),
                        (["b", "c", "z"], "holds 'z', which the index does not name"),
                        ([1, "b", "c"], "holds 1, which the index does not name")]:
        with pytest.raises(FormatError, match=words):
            _formats.check_shard_keys(index, "s2.bin", keys)
    with pytest.raises(FormatError, match="holds a list, not a state dict"):
        _formats.check_shard(index, "s1.bin", [1])


def test_find_index(tmp_path):
    assert _formats.find_index(tmp_path) is None
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # names safetensors shards: not ours
    assert _formats.find_index(tmp_path) is None
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    assert _formats.find_index(tmp_path) == tmp_path / "pytorch_model.bin.index.json"
    assert _formats.find_index(str(tmp_path / "x.index.json")) == tmp_path / "x.index.json"  # as given
    assert _formats.find_index(tmp_path / "model.bin") is None
    (tmp_path / "other.bin.index.json").write_text("{}")
    with pytest.raises(FormatError, match="several index files"):
        _formats.find_index(tmp_path)


# --------------------------------------------------------------------------- one rule for open and load_sharded


def _state():
    return {f"layer.{i}.weight": torch.full((2, 2), float(i)) for i in range(6)}


def _open_all(folder):
    with fastckpt.open(folder) as f:
        return {k: torch.from_numpy(f.get_tensor(k).copy()) for k in f.keys()}


def _outcome(read, folder):
    try:
        return read(folder)
    except FormatError as e:
        return FormatError, str(e)


def _tamper(folder, case):
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".bin")
    first = torch.load(shards[0])
    if case == "key-mapped-elsewhere":  # shard 1 also holds a key the index maps to shard 2
        second_key = next(iter(torch.load(shards[1])))
        first[second_key] = torch.full((2, 2), -1.0)
    elif case == "missing-key":
        first.pop(next(iter(first)))
    elif case == "extra-key":
        first["not.in.index"] = torch.zeros(1)
    elif case == "not-a-state-dict":
        first = list(first.values())
    elif case == "nested":  # the index's dotted names, but nested in the shard
        first = {"layer": first}
    torch.save(first, shards[0])


@pytest.mark.parametrize("case", ["consistent", "key-mapped-elsewhere", "missing-key", "extra-key",
                                  "not-a-state-dict", "nested"])
def test_open_and_load_sharded_agree(tmp_path, case):
    folder = save_sharded(tmp_path, _state())
    if case != "consistent":
        _tamper(folder, case)
    opened, loaded = _outcome(_open_all, folder), _outcome(fastckpt.load_sharded, folder)
    if case == "consistent":
        assert set(opened) == set(loaded) == set(_state())
        assert all(torch.equal(opened[k], loaded[k]) for k in opened)
        return
    assert opened[0] is FormatError and loaded[0] is FormatError, (opened, loaded)
    assert "pytorch_model-00001-of-00003.bin" in opened[1] and "pytorch_model-00001-of-00003.bin" in loaded[1]


# --------------------------------------------------------------------------- verify, resolved once


def test_resolve_verify_order(monkeypatch):
    monkeypatch.delenv("FASTCKPT_VERIFY", raising=False)
    assert resolve_verify(None) is True and resolve_verify(None, mapped=True) is False
    monkeypatch.setenv("FASTCKPT_VERIFY", "0")
    assert resolve_verify(None) is False and resolve_verify(True) is True
    monkeypatch.setenv("FASTCKPT_VERIFY", "1")
    assert resolve_verify(None, mapped=True) is True and resolve_verify(False) is False
    with patched_verify(False):
        assert resolve_verify(None) is False  # the patch's before the environment
        assert resolve_verify(True) is True  # the call's before the patch's
    monkeypatch.setenv("FASTCKPT_VERIFY", "maybe")  # not a value it knows: ignored
    assert resolve_verify(None) is True and resolve_verify(None, mapped=True) is False


def _corrupt_storage(path, key="b"):
    with fastckpt.open(path) as f:
        offset = f.descriptor(key).storage.data_offset
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_open_and_patch_honour_fastckpt_verify(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    torch.save({"a": torch.zeros(4), "b": torch.ones(4)}, path)
    _corrupt_storage(path)
    monkeypatch.delenv("FASTCKPT_VERIFY", raising=False)
    with fastckpt.open(path) as f:
        f.get_tensor("b")  # lazy reads are not checked by default
    monkeypatch.setenv("FASTCKPT_VERIFY", "1")
    with fastckpt.open(path) as f, pytest.raises(IntegrityError):
        f.get_tensor("b")
    with fastckpt.open(path, verify=False) as f:
        f.get_tensor("b")
    monkeypatch.delenv("FASTCKPT_VERIFY")
    with fastckpt.patched(verify=True), pytest.raises(IntegrityError):
        torch.load(path, mmap=True)
    monkeypatch.setenv("FASTCKPT_VERIFY", "1")
    with fastckpt.patched(verify=False):
        torch.load(path, mmap=False)  # the patch's verify=False wins over the environment
    assert fastckpt.load(path, mmap=True, verify=False)["b"].shape == (4,)


# --------------------------------------------------------------------------- no torch for inspect / verify


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_cli_imports_only_what_the_answer_needs(tmp_path, command):
    path = tmp_path / "small.pt"
    state = {"w": torch.ones(3), "h": torch.ones(2, 3).bfloat16(), "ht": torch.ones(2, 3).bfloat16().t()}
    torch.save(state if command == "convert" else {**state, "step": 3}, path)
    code = """
        import sys
        from fastckpt.cli import main
        rc = main(sys.argv[1:])
        loaded = sorted(m for m in ("torch", "numpy", "ml_dtypes") if m in sys.modules)
        print("RC", rc, "LOADED", loaded)
    """
    extra = [tmp_path / "out.safetensors"] if command == "convert" else []
    run = _python(code, command, path, *extra)
    assert run.returncode == 0, run.stderr
    # convert makes strided tensors contiguous with numpy; bf16 elements are moved, never interpreted
    assert run.stdout.splitlines()[-1] == f"RC 0 LOADED {['numpy'] if command == 'convert' else []}"


def test_inspect_imports_torch_to_judge_other_globals(tmp_path):
    import argparse

    path = tmp_path / "ns.pt"
    torch.save({"w": torch.ones(3), "args": argparse.Namespace(lr=0.1)}, path)
    code = """
        import sys
        from fastckpt.inspection import inspect_report
        marks = {g["name"]: g["weights_only"] for g in inspect_report(sys.argv[1])["globals"]}
        print(marks)
    """
    run = _python(code, path)
    assert run.returncode == 0, run.stderr
    marks = eval(run.stdout)  # noqa: S307  (our own dict repr)
    assert marks["argparse.Namespace"] is False and marks["torch._utils._rebuild_tensor_v2"] is True


def test_static_allowlist_is_part_of_torchs():
    from torch import _weights_only_unpickler as wo

    from fastckpt._pickles import WEIGHTS_ONLY_DEFAULTS

    assert WEIGHTS_ONLY_DEFAULTS <= set(wo._get_allowed_globals())


# --------------------------------------------------------------------------- bf16 without ml_dtypes


def test_bf16_without_ml_dtypes(tmp_path):
    state = {"w": torch.randn(4, 6).bfloat16(), "t": torch.randn(6, 4).bfloat16().t(), "f": torch.ones(3)}
    torch.save(state, tmp_path / "bf16.pt")
    code = """
        import sys
        sys.modules["ml_dtypes"] = None  # `import ml_dtypes` raises ImportError
        import fastckpt
        from fastckpt.cli import main
        from fastckpt.errors import MissingDtypeError
        src, dst = sys.argv[1], sys.argv[2]
        with fastckpt.open(src) as f:
            assert f.keys() == ["w", "t", "f"] and f.info("w")["dtype"] == "bfloat16"
            assert f.get_tensor("f").tolist() == [1.0, 1.0, 1.0]
            try:
                f.get_tensor("w")
            except MissingDtypeError as e:
                assert isinstance(e, ImportError)
                print("MESSAGE", e)
        for argv in (["inspect", src], ["verify", src], ["convert", src, dst]):
            assert main(argv) == 0, argv
        print("DONE")
    """
    run = _python(code, tmp_path / "bf16.pt", tmp_path / "out.safetensors")
    assert run.returncode == 0, run.stderr
    assert "DONE" in run.stdout and "Traceback" not in run.stderr
    message = run.stdout.split("MESSAGE ")[1].splitlines()[0]
    assert "'w'" in message and "bfloat16" in message and "pip install fastckpt[bf16]" in message
    from safetensors.torch import load_file

    converted = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(converted[k], state[k].contiguous()) for k in state)


# --------------------------------------------------------------------------- the CLI on malformed inputs


def _malformed(tmp_path, case):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(64)}, good)
    path = tmp_path / "in.pt"
    if case == "truncated-zip":
        path.write_bytes(good.read_bytes()[:300])
    elif case == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "missing":
        path = tmp_path / "absent.pt"
    elif case == "bad-index":
        path = _index(tmp_path, b'{"weight_map": ')
    elif case == "index-missing-shard":
        path = _index(tmp_path, b'{"weight_map": {"w": "absent.bin"}}')
    return path


@pytest.mark.parametrize("case", ["truncated-zip", "random-bytes", "empty", "directory", "missing", "bad-index",
                                  "index-missing-shard"])
@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_cli_on_malformed_inputs_exits_2_without_traceback(tmp_path, case, command, capsys):
    path = _malformed(tmp_path, case)
    args = [command, str(path)] + ([str(tmp_path / "out.safetensors")] if command == "convert" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastckpt {command}: ") and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()
