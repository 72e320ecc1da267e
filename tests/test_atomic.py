"""fastckpt._atomic: temporaries created exclusively, published by rename, stale ones removed safely."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
import traceback

import pytest

from fastckpt import _atomic


def write_bytes(data: bytes):
    def write(target):
        if isinstance(target, int):
            os.write(target, data)
        else:
            target.write(data)
    return write


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def temporaries(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".fastckpt-" in n)


def dead_writer(target: str) -> str:
    """The temporary of a writer killed before its rename: its name, in the target's folder."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        tmp = _atomic.Temporary(target)
        os.write(tmp.fd, b"partial")
        os.write(w, os.path.basename(tmp.path).encode())
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    name = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return name


def test_publish_replaces_and_leaves_nothing(tmp_path):
    p = str(tmp_path / "m.bin")
    _atomic.write_file(p, True, True, write_bytes(b"one"))
    _atomic.write_file(p, True, False, write_bytes(b"two"))
    assert _read(p) == b"two" and os.listdir(tmp_path) == ["m.bin"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = str(tmp_path / "m.bin")
    _atomic.write_file(p, True, False, write_bytes(b"old"))

    def fails(fd):
        os.write(fd, b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _atomic.write_file(p, True, False, fails)
    assert _read(p) == b"old" and os.listdir(tmp_path) == ["m.bin"]


def test_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    p = str(tmp_path / "m.bin")
    names = [dead_writer(p) for _ in range(3)]
    assert temporaries(tmp_path) == sorted(names)
    for name in names:
        assert name.startswith(".m.bin.fastckpt-") and name.endswith(".tmp")
    _atomic.write_file(p, True, False, write_bytes(b"x"))
    assert os.listdir(tmp_path) == ["m.bin"]


def test_live_writers_are_never_removed(tmp_path):
    p = str(tmp_path / "m.bin")
    live = _atomic.Temporary(p)  # this process: alive and locked
    # A dead pid's name but a held lock (a writer in another PID namespace of this host): kept.
    locked = dead_writer(p)
    fd = os.open(tmp_path / locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    # Another host's temporary: its pid means nothing here; kept.
    foreign = ".m.bin.fastckpt-00000000-1-0123456789ab.tmp"
    (tmp_path / foreign).write_bytes(b"")
    # Not a regular file (never opened blocking, never removed).
    fifo = dead_writer(p)
    os.unlink(tmp_path / fifo)
    os.mkfifo(tmp_path / fifo)
    stale = dead_writer(p)
    removed = _atomic.remove_stale(str(tmp_path))
    assert [token for _, token in removed] == [stale.rsplit("-", 1)[1].removesuffix(".tmp")]
    assert temporaries(tmp_path) == sorted([os.path.basename(live.path), locked, foreign, fifo])
    assert live.token in _atomic.live_tokens(str(tmp_path))
    os.close(fd)
    assert _atomic.remove_stale(str(tmp_path)) == [("m.bin", locked.rsplit("-", 1)[1].removesuffix(".tmp"))]
    live.publish(False)
    assert os.path.exists(p)


def test_temporary_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    monkeypatch.setattr(_atomic.secrets, "token_hex", lambda n: "ab" * n)  # a name the neighbour guessed
    name = f".m.bin.fastckpt-{_atomic._host_tag()}-{os.getpid()}-{'ab' * 6}.tmp"
    os.symlink(victim, tmp_path / name)
    with pytest.raises(FileExistsError):
        _atomic.write_file(str(tmp_path / "m.bin"), True, False, write_bytes(b"evil"))
    assert victim.read_bytes() == b"precious" and not (tmp_path / "m.bin").exists()


def test_missing_folder_is_named(tmp_path):
    folder = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        _atomic.write_file(str(folder / "m.bin"), True, False, write_bytes(b"x"))
    assert info.value.filename == str(folder)


def test_read_only_target_refused_as_torch_save_refuses():
    """As a user who is not root: over a file its owner made read-only (444) torch.save's open(f, "wb")
    raises PermissionError; fastckpt.save must raise the same, and leave the file as it was."""
    torch = pytest.importorskip("torch")
    import fastckpt

    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o777)
    locked = tempfile.mkdtemp()  # a folder the user may read but not write in
    os.chmod(locked, 0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            outcome = {}
            for name, save in (("torch", torch.save), ("fastckpt", fastckpt.save)):
                p = os.path.join(folder, f"{name}.pt")
                save({"w": torch.ones(2)}, p)
                os.chmod(p, 0o444)
                try:
                    save({"w": torch.zeros(5)}, p)
                    outcome[name] = "replaced"
                except Exception as e:  # noqa: BLE001 - reported to the parent
                    outcome[name] = [isinstance(e, RuntimeError), isinstance(e, PermissionError), str(e)]
                outcome[name + "_kept"] = torch.load(p)["w"].shape == (2,)
                outcome[name + "_files"] = sorted(n for n in os.listdir(folder) if n.startswith(f".{name}"))
            for name, save in (("torch_dir", torch.save), ("fastckpt_dir", fastckpt.save)):
                try:
                    save({"w": torch.ones(2)}, os.path.join(locked, "new.pt"))
                    outcome[name] = "written"
                except Exception as e:  # noqa: BLE001 - reported to the parent
                    outcome[name] = [isinstance(e, RuntimeError), isinstance(e, PermissionError), str(e)]
            os.write(w, json.dumps(outcome).encode())
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"child": traceback.format_exc()}).encode())
        finally:
            os._exit(0)
    os.close(w)
    outcome = json.loads(os.read(r, 1 << 16).decode())
    os.close(r)
    os.waitpid(pid, 0)
    shutil.rmtree(folder)
    shutil.rmtree(locked)
    assert "child" not in outcome, outcome.get("child")
    # torch's C++ writer: a RuntimeError saying "Permission denied"; fastckpt's is also a PermissionError.
    assert outcome["torch"][0] and "Permission denied" in outcome["torch"][2]
    assert outcome["fastckpt"][:2] == [True, True] and "Permission denied" in outcome["fastckpt"][2]
    assert outcome["fastckpt"][2].endswith("fastckpt.pt'")
    assert outcome["torch_kept"]
    assert outcome["fastckpt_kept"] and outcome["fastckpt_files"] == []
    assert outcome["torch_dir"][0] and "Permission denied" in outcome["torch_dir"][2]
    assert outcome["fastckpt_dir"][:2] == [True, True] and outcome["fastckpt_dir"][2].endswith("new.pt'")



def test_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    torch = pytest.importorskip("torch")
    import fastckpt

    p = tmp_path / "ckpt.pt"
    big = {"w": torch.zeros(48 << 20, dtype=torch.uint8)}
    fastckpt.save({"w": torch.ones(2)}, p)
    for _ in range(5):  # killed while its temporary exists (it may rarely be renamed in between: again)
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    fastckpt.save(big, p)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 30
        while not temporaries(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if temporaries(tmp_path):
            break
    assert temporaries(tmp_path)
    fastckpt.save({"w": torch.ones(3)}, p)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.load(p)["w"].shape == (3,)
