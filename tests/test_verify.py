"""fastckpt.verify and the `fastckpt verify` command."""

import pickle
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402


def corrupt(path, record, delta=3):
    """Flip one bit inside the data of `record`."""
    offset = fastckpt.open_archive(path).record(record).data_offset + delta
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_sound_file(small_ckpt, small_state):
    report = fastckpt.verify(small_ckpt)
    assert report.ok and report.failures == []
    assert report.path == str(small_ckpt)
    assert report.prefix == "small"
    assert [r.status for r in report.records] == ["ok"] * 10
    by_name = {r.name: r for r in report.records}
    w = by_name["data/0"]
    assert w.size == small_state["w"].numel() * 4
    assert w.stored_crc32 == w.computed_crc32
    assert w.data_offset % 64 == 0 and w.alignment >= 64
    assert fastckpt.verify(str(small_ckpt), threads=1).records == report.records


def test_crc_mismatch_is_reported_not_raised(small_ckpt):
    corrupt(small_ckpt, "data/1")
    report = fastckpt.verify(small_ckpt)
    assert not report.ok
    assert [(r.name, r.status) for r in report.failures] == [("data/1", "mismatch")]
    bad = report.failures[0]
    assert bad.computed_crc32 != bad.stored_crc32
    archive = fastckpt.open_archive(small_ckpt)
    with pytest.raises(fastckpt.IntegrityError, match="data/1"):
        archive.read("data/1")
    assert archive.read("data/1", check_crc=False)  # the bytes are still reachable on request


def test_verify_reads_the_file_not_the_private_mapping(small_ckpt):
    """Bytes written through a view are private to the process: verifying checks the file."""
    archive = fastckpt.open_archive(small_ckpt)
    name = next(n for n in archive.names() if n.startswith("data/"))
    view = memoryview(archive.view(name))
    view[0] ^= 0xFF
    assert all(status == "ok" for _, status, _ in archive.verify(None, 0))
    assert all(status == "ok" for _, status, _ in archive.verify([name], 1))


def test_malformed_file_raises(small_ckpt):
    small_ckpt.write_bytes(small_ckpt.read_bytes() + b"junk")
    with pytest.raises(fastckpt.FormatError, match="trailing bytes"):
        fastckpt.verify(small_ckpt)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastckpt.verify(tmp_path / "absent.pt")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastckpt", "verify", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_sound(small_ckpt):
    run = run_cli(small_ckpt)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "OK"
    assert "10 records" in run.stdout and "(10 ok)" in run.stdout
    verbose = run_cli("-v", small_ckpt)
    assert verbose.returncode == 0 and "data/3" in verbose.stdout


def test_cli_no_crc(tmp_path, small_state):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(small_state, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    run = run_cli(tmp_path / "nocrc.pt")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("OK (some records carry no CRC-32")


@pytest.mark.parametrize("damage", ["crc", "truncated", "missing"])
def test_cli_failures(small_ckpt, damage):
    if damage == "crc":
        corrupt(small_ckpt, "data.pkl")
    elif damage == "truncated":
        small_ckpt.write_bytes(small_ckpt.read_bytes()[:1000])
    else:
        small_ckpt.unlink()
    run = run_cli(small_ckpt)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    expected = {"crc": "CORRUPT: record 'data.pkl'", "truncated": "FormatError", "missing": "FileNotFoundError"}
    assert expected[damage] in lines[0]


def test_console_script(small_ckpt):
    exe = shutil.which("fastckpt")
    if exe is None:
        pytest.skip("the fastckpt console script is not on PATH")
    run = subprocess.run([exe, "verify", str(small_ckpt)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == "OK", run.stderr


def test_verify_reports_progress_in_batches(tmp_path, monkeypatch):
    import fastckpt.archive as archive_mod

    monkeypatch.setattr(archive_mod, "_PROGRESS_BATCH_BYTES", 1000)
    p = tmp_path / "p.pt"
    torch.save({f"t{i}": torch.arange(300.0) for i in range(5)}, p)
    done = []
    report = fastckpt.verify(p, progress=done.append)
    assert report.ok and len(done) > 1
    assert sum(done) == sum(r.size for r in report.records)
    assert fastckpt.verify(p).records == report.records


def test_report_repr_is_one_summary_line(small_ckpt):
    report = fastckpt.verify(small_ckpt)
    text = repr(report)
    total = sum(r.size for r in report.records)
    assert "\n" not in text and len(text) < 200
    assert text == f"<VerifyReport {str(small_ckpt)!r}: ok, 10 records (10 ok), {total:,} bytes>"
    assert str(report) == text and len(report.records) == 10  # the records are a list away
    corrupt(small_ckpt, "data/1")
    assert repr(fastckpt.verify(small_ckpt)).endswith(
        f": FAILED, 10 records (1 mismatch, 9 ok), {total:,} bytes; failed: data/1>")


@pytest.mark.parametrize("surface", ["load", "load_mmap", "open", "archive", "data_pkl"])
def test_integrity_error_carries_its_record(small_ckpt, surface):
    """IntegrityError names the failing record and the tensors it holds as attributes (.record, .keys),
    set where it is raised: no caller parses the message."""
    corrupt(small_ckpt, "data.pkl" if surface == "data_pkl" else "data/1")
    with pytest.raises(fastckpt.IntegrityError) as info:
        if surface in ("load", "data_pkl"):
            fastckpt.load(small_ckpt)
        elif surface == "load_mmap":
            fastckpt.load(small_ckpt, mmap=True, verify=True)
        elif surface == "open":
            with fastckpt.open(small_ckpt, verify=True) as f:
                f.get_tensor("b")
        else:
            fastckpt.open_archive(small_ckpt).read("data/1")
    e = info.value
    assert e.record == ("data.pkl" if surface == "data_pkl" else "data/1")
    assert e.keys == (() if surface in ("archive", "data_pkl") else ("b",))
    assert "CRC-32 mismatch" in str(e) and str(small_ckpt) in str(e)
    assert pickle.loads(pickle.dumps(e)).record == e.record  # survives transport (distributed errors)


def test_core_crc_rule_for_records_known_by_fields():
    """The verdict for a record known only by its fields (no Archive at hand): 0 is "not recorded"."""
    from fastckpt import _native

    _native.check_crc("data/0", 0x1234, 8, 64, 0x1234, "x.pt")
    _native.check_crc("data/0", 0, 8, 64, 0x1234, "x.pt")  # written with compute_crc32=False
    with pytest.raises(fastckpt.IntegrityError, match=r"record 'data/0' of x.pt .*storage of tensor 'w'") as info:
        _native.check_crc("data/0", 0x1234, 8, 64, 0x4321, "x.pt", ["w"])
    assert (info.value.record, info.value.keys) == ("data/0", ("w",))
