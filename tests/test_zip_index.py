"""The zip index agrees with Python's zipfile on every archive torch.save (and
zipfile itself) writes: names, header and data offsets, sizes, CRCs, methods."""

import collections
import io
import os
import shutil
import struct
import zipfile
import zlib

import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402
from fastckpt import _native  # noqa: E402
from fastckpt.archive import open_archive, read_record  # noqa: E402


def zipfile_entries(source):
    """(name, header offset, data offset, compressed size, size, CRC, method, flags)
    of every entry as Python's zipfile sees it; the data offset from the local header."""
    with zipfile.ZipFile(source) as zf:
        fp = zf.fp
        out = []
        for info in zf.infolist():
            fp.seek(info.header_offset)
            header = fp.read(30)
            assert header[:4] == b"PK\x03\x04"
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            data_offset = info.header_offset + 30 + name_len + extra_len
            out.append((info.filename, info.header_offset, data_offset, info.compress_size, info.file_size,
                        info.CRC, info.compress_type, info.flag_bits))
        return out


def check_agrees(archive, source):
    expected = zipfile_entries(source)
    prefix = expected[0][0].split("/")[0]
    assert archive.prefix == prefix
    got = [(f"{prefix}/{r.name}", r.header_offset, r.data_offset, r.compressed_size, r.size,
            r.crc32, int(r.method), r.flags) for r in archive.records()]
    assert got == expected
    for r in archive.records():
        assert r.name in archive
        assert archive.record(r.name) == r
        assert r.alignment == min(4096, r.data_offset & -r.data_offset)  # largest power of 2 dividing it
    assert "missing" not in archive
    return archive


def check_contents(archive, path):
    """Every record reads back as zipfile reads it (zipfile also checks the CRC)."""
    with zipfile.ZipFile(path) as zf:
        for r in archive.records():
            expected = zf.read(f"{archive.prefix}/{r.name}")
            assert read_record(archive, r.name) == expected
            if r.method == _native.Method.stored:
                assert bytes(archive.view(r.name)) == expected


def test_small_layout(small_ckpt):
    archive = check_agrees(_native.Archive.open(str(small_ckpt)), small_ckpt)
    assert archive.prefix == "small"
    assert archive.names() == ["data.pkl", ".format_version", ".storage_alignment", "byteorder",
                               "data/0", "data/1", "data/2", "data/3", "version", ".data/serialization_id"]
    records = {r.name: r for r in archive.records()}
    assert all(r.data_offset % 64 == 0 and r.alignment >= 64 for r in records.values())
    assert records["data/3"].size == 0 and records["data/3"].flags == 0x0800  # no descriptor
    assert records["data/0"].flags == 0x0808
    assert archive.read("byteorder") == b"little"
    last = archive.records()[-1]
    assert archive.central_directory_offset == last.data_offset + last.size + 16  # + descriptor
    assert archive.size == os.path.getsize(small_ckpt)
    check_contents(archive, small_ckpt)


def test_many_tensors(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = collections.OrderedDict((f"layer{i}.weight", torch.randn(i % 37, generator=g)) for i in range(1500))
    path = tmp_path / "many.pt"
    torch.save(state, path)
    archive = check_agrees(_native.Archive.open(str(path)), path)
    assert len(archive.names()) == 1500 + 6
    check_contents(archive, path)


def every_dtype():
    out = []
    for name in ["float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128", "uint8",
                 "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn",
                 "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
                 "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"]:
        dtype = getattr(torch, name, None)
        if dtype is not None:
            out.append(dtype)
    return out


def test_every_dtype(tmp_path):
    raw = torch.arange(96, dtype=torch.uint8) % 2  # 0/1 is valid for bool too
    state = collections.OrderedDict((str(d), raw.clone().view(d)) for d in every_dtype())
    path = tmp_path / "dtypes.pt"
    torch.save(state, path)
    archive = check_agrees(_native.Archive.open(str(path)), path)
    for i, t in enumerate(state.values()):
        assert archive.read(f"data/{i}") == bytes(t.untyped_storage())
    check_contents(archive, path)


@pytest.fixture
def no_crc32():
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(True)


def test_crc32_not_recorded(tmp_path, small_state, no_crc32):
    path = tmp_path / "nocrc.pt"
    torch.save(small_state, path)
    archive = check_agrees(_native.Archive.open(str(path)), path)
    assert all(r.crc32 == 0 for r in archive.records())
    report = fastckpt.verify(path)
    assert report.ok
    assert {r.name: r.status for r in report.records}["data/0"] == "unrecorded"
    assert all(r.status == ("ok" if r.size == 0 else "unrecorded") for r in report.records)
    assert archive.read("data/0", check_crc=True) == bytes(small_state["w"].untyped_storage())


@pytest.mark.parametrize("alignment", [64, 4096])
def test_storage_alignment(tmp_path, small_state, alignment):
    config = torch.utils.serialization.config.save
    previous = config.storage_alignment
    config.storage_alignment = alignment
    try:
        path = tmp_path / f"aligned{alignment}.pt"
        torch.save(small_state, path)
    finally:
        config.storage_alignment = previous
    archive = check_agrees(_native.Archive.open(str(path)), path)
    assert archive.read(".storage_alignment") == str(alignment).encode()
    for r in archive.records():
        assert r.data_offset % alignment == 0
        assert r.alignment >= alignment
    check_contents(archive, path)


def test_file_object_target(tmp_path, small_state):
    buffer = io.BytesIO()
    torch.save(small_state, buffer)
    data = buffer.getvalue()
    path = tmp_path / "fileobj.pt"
    path.write_bytes(data)
    for archive in (_native.Archive.open(str(path)), open_archive(io.BytesIO(data))):
        assert archive.prefix == "archive"
        check_agrees(archive, path)
    # Like torch.load, a file object is read from its current position.
    junk = io.BytesIO(b"\x00junk\x00" + data)
    junk.seek(6)
    archive = open_archive(junk)
    check_agrees(archive, path)
    check_contents(archive, path)


def rezip(source, target, compression):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def test_deflated_rezip(tmp_path, small_ckpt, monkeypatch):
    path = tmp_path / "deflated.pt"
    rezip(small_ckpt, path, zipfile.ZIP_DEFLATED)
    archive = check_agrees(_native.Archive.open(str(path)), path)
    assert {r.method for r in archive.records()} == {_native.Method.deflated}
    with pytest.raises(fastckpt.RecordError, match="compressed"):
        archive.view("data/0")
    with pytest.raises(fastckpt.RecordError, match="compressed"):
        archive.read("data/0")
    check_contents(archive, path)
    report = fastckpt.verify(path)
    assert report.ok and all(r.status == "ok" for r in report.records)
    monkeypatch.setattr(fastckpt.archive, "MAX_INFLATED_BYTES", 16)
    with pytest.raises(fastckpt.LimitError):
        read_record(archive, "data/0")


def test_python_zipfile_writers(tmp_path, small_ckpt):
    """Archives from other writers: stored with sizes in the local header,
    ZIP64 local extras, and streamed entries with data descriptors."""
    with zipfile.ZipFile(small_ckpt) as zin:
        entries = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]

    stored = tmp_path / "stored.pt"
    rezip(small_ckpt, stored, zipfile.ZIP_STORED)

    forced = tmp_path / "zip64.pt"
    with zipfile.ZipFile(forced, "w") as zout:
        for name, data in entries:
            with zout.open(name, "w", force_zip64=True) as f:
                f.write(data)

    class Unseekable(io.RawIOBase):
        def __init__(self):
            self.parts = []

        def writable(self):
            return True

        def write(self, b):
            self.parts.append(bytes(b))
            return len(b)

    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in entries:
            with zout.open(name, "w") as f:
                f.write(data)
    streamed = tmp_path / "streamed.pt"
    streamed.write_bytes(b"".join(sink.parts))

    for path in (stored, forced, streamed):
        archive = check_agrees(_native.Archive.open(str(path)), path)
        check_contents(archive, path)
    assert all(r.flags & 0x08 for r in _native.Archive.open(str(streamed)).records())


def test_zip64_record_over_4gib(tmp_path):
    """A 4 GiB + 100 B record (ZIP64 sizes) followed by records whose headers
    lie past 4 GiB (ZIP64 offsets); skip_data leaves the payload sparse."""
    if shutil.disk_usage(tmp_path).free < 8 << 30:
        pytest.skip("needs room for a 4 GiB sparse file")
    big = torch.empty(2**30 + 25, dtype=torch.float32)  # never touched: no memory used
    path = tmp_path / "big.pt"
    with torch.serialization.skip_data():
        torch.save({"big": big, "small": torch.arange(5)}, path)
    del big
    if os.stat(path).st_blocks * 512 > 100 << 20:
        pytest.skip("the file system does not keep the file sparse")
    archive = check_agrees(_native.Archive.open(str(path)), path)
    records = {r.name: r for r in archive.records()}
    assert records["data/0"].size == 2**32 + 100
    assert records["data/1"].header_offset > 2**32
    assert records["data/1"].data_offset % 64 == 0
    assert archive.central_directory_offset > 2**32
    assert len(archive.view("data/0")) == 2**32 + 100  # not touched: stays sparse
    assert len(archive.read("data/1", check_crc=False)) == 40


def test_crc_matches_zlib(small_ckpt):
    archive = _native.Archive.open(str(small_ckpt))
    for r, status, computed in archive.verify():
        assert computed == zlib.crc32(archive.read(r.name, check_crc=False))
        assert status == "ok"
