"""A catalogue of malformed archives built from a valid torch.save file. Each
must end in the right fastckpt.CheckpointError subclass: never another
exception, a crash, or an allocation sized by a field that was not checked
(the whole catalogue runs again in a subprocess under RLIMIT_AS = 1 GiB)."""

import dataclasses
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest

torch = pytest.importorskip("torch")

import fastckpt  # noqa: E402
from fastckpt.archive import open_archive, read_record  # noqa: E402

LH = struct.Struct("<IHHHHHIIIHH")
LH_FIELDS = ("sig", "version", "flags", "method", "time", "date", "crc", "csize", "usize", "name_len", "extra_len")
CD = struct.Struct("<IHHHHHHIIIHHHHHII")
CD_FIELDS = ("sig", "made_by", "version", "flags", "method", "time", "date", "crc", "csize", "usize", "name_len",
             "extra_len", "comment_len", "disk", "internal", "external", "offset")
EOCD = struct.Struct("<IHHHHIIH")
EOCD_FIELDS = ("sig", "disk", "cd_disk", "disk_entries", "entries", "cd_size", "cd_offset", "comment_len")
Z64 = struct.Struct("<IQHHIIQQQQ")
Z64_FIELDS = ("sig", "size", "made_by", "version", "disk", "cd_disk", "disk_entries", "entries", "cd_size",
              "cd_offset")
LOC = struct.Struct("<IIQI")
LOC_FIELDS = ("sig", "disk", "offset", "disks")


def unpack(st, names, data, offset):
    return dict(zip(names, st.unpack_from(data, offset)))


def pack(st, names, fields):
    return st.pack(*(fields[n] for n in names))


@dataclasses.dataclass
class Entry:
    lh: dict
    lname: bytes
    lextra: bytes
    data: bytes
    dd: bytes
    cd: dict
    cname: bytes
    cextra: bytes
    comment: bytes
    gap: bytes = b""  # written before the local header


@dataclasses.dataclass
class Layout:
    """Where build() put each structure, for raw patches afterwards."""
    lh: list
    dd: list
    cd: list
    eocd: int
    z64: int | None
    loc: int | None


class Model:
    """An editable zip: entries (in file order) and end records, re-laid out by
    build() with consistent offsets, so each case breaks exactly one rule."""

    def __init__(self, data: bytes):
        e = unpack(EOCD, EOCD_FIELDS, data, len(data) - EOCD.size)
        assert e["sig"] == 0x06054B50 and e["comment_len"] == 0
        self.zip64 = data[len(data) - EOCD.size - LOC.size:][:4] == b"PK\x06\x07"
        self.comment = b""
        self.cd_order = None
        self.entries = []
        pos = e["cd_offset"]
        for _ in range(e["entries"]):
            cd = unpack(CD, CD_FIELDS, data, pos)
            p = pos + CD.size
            cname = data[p:p + cd["name_len"]]
            cextra = data[p + cd["name_len"]:p + cd["name_len"] + cd["extra_len"]]
            comment = data[p + cd["name_len"] + cd["extra_len"]:p + cd["name_len"] + cd["extra_len"] + cd["comment_len"]]
            pos = p + cd["name_len"] + cd["extra_len"] + cd["comment_len"]
            o = cd["offset"]
            lh = unpack(LH, LH_FIELDS, data, o)
            q = o + LH.size
            lname = data[q:q + lh["name_len"]]
            lextra = data[q + lh["name_len"]:q + lh["name_len"] + lh["extra_len"]]
            start = q + lh["name_len"] + lh["extra_len"]
            body = data[start:start + cd["csize"]]
            dd = data[start + cd["csize"]:start + cd["csize"] + 16] if lh["flags"] & 8 else b""
            self.entries.append(Entry(lh, lname, lextra, body, dd, cd, cname, cextra, comment))

    def build(self) -> tuple[bytes, Layout]:
        out = bytearray()
        layout = Layout([], [], [], 0, None, None)
        for e in self.entries:
            out += e.gap
            e.cd["offset"] = len(out)
            layout.lh.append(len(out))
            lh = dict(e.lh, name_len=len(e.lname), extra_len=len(e.lextra))
            out += pack(LH, LH_FIELDS, lh) + e.lname + e.lextra + e.data
            layout.dd.append(len(out))
            out += e.dd
        cd_offset = len(out)
        for e in self.cd_order or self.entries:
            layout.cd.append(len(out))
            cd = dict(e.cd, name_len=len(e.cname), extra_len=len(e.cextra), comment_len=len(e.comment))
            out += pack(CD, CD_FIELDS, cd) + e.cname + e.cextra + e.comment
        cd_size = len(out) - cd_offset
        n = len(self.entries)
        if self.zip64:
            layout.z64 = len(out)
            out += Z64.pack(0x06064B50, 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_offset)
            layout.loc = len(out)
            out += LOC.pack(0x07064B50, 0, layout.z64, 1)
        layout.eocd = len(out)
        out += EOCD.pack(0x06054B50, 0, 0, n, n, cd_size, cd_offset, len(self.comment)) + self.comment
        return bytes(out), layout

    def rename(self, i, name: bytes):
        self.entries[i].lname = self.entries[i].cname = name

    def set_flags(self, i, flags):
        self.entries[i].lh["flags"] = self.entries[i].cd["flags"] = flags


def patch(data: bytes, at: int, st: struct.Struct, names, **changes) -> bytes:
    out = bytearray(data)
    fields = unpack(st, names, out, at)
    fields.update(changes)
    out[at:at + st.size] = pack(st, names, fields)
    return bytes(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_state):
    """The valid archive: prefix 'p'; entries 0 data.pkl ... 4-7 data/0-3
    (data/3 empty: no descriptor), 8 version, 9 .data/serialization_id."""
    path = tmp_path_factory.mktemp("ref") / "p.pt"
    torch.save(small_state, path)
    data = path.read_bytes()
    model = Model(data)
    assert model.build()[0] == data  # the model round-trips torch's layout byte for byte
    assert [e.cname for e in model.entries][4:8] == [b"p/data/0", b"p/data/1", b"p/data/2", b"p/data/3"]
    return data


def python_zip(names_and_data, **kwargs) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", **kwargs) as zf:
        for name, data in names_and_data:
            zf.writestr(name, data)
    return buffer.getvalue()


# Each case: (id, function(reference bytes) -> bytes, expected class name, message fragment).
CASES = []


def case(expected, match=""):
    def register(fn):
        CASES.append((fn.__name__, fn, expected, match))
        return fn
    return register


def model_case(expected, match=""):
    """A case that edits the model and lets build() lay it out consistently."""
    def register(fn):
        def run(data):
            m = Model(data)
            fn(m)
            return m.build()[0]
        run.__name__ = fn.__name__
        return case(expected, match)(run)
    return register


def layout_case(expected, match=""):
    """A case that patches bytes of the rebuilt reference at known places."""
    def register(fn):
        def run(data):
            m = Model(data)
            built, layout = m.build()
            return fn(built, layout, m)
        run.__name__ = fn.__name__
        return case(expected, match)(run)
    return register


# -- not a zip / end records ------------------------------------------------------------------

@case("FormatError", "too short")
def empty_file(data):
    return b""


@case("FormatError", "no end-of-central-directory")
def random_bytes(data):
    return bytes((i * 131 + 7) % 251 for i in range(5000))


@case("FormatError", "no end-of-central-directory")
def legacy_pickle_stream(data):
    buffer = io.BytesIO()
    torch.save({"x": torch.arange(3)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@case("FormatError", "before the archive")
def prefix_junk(data):
    return b"\x00" * 4096 + data


@case("FormatError", "trailing bytes")
def trailing_junk(data):
    return data + b"junk"


@case("FormatError")
def two_archives_concatenated(data):
    return data + data


@layout_case("FormatError", "disagree on the entries on this disk")
def classic_count_disagrees(data, layout, m):
    n = len(m.entries) + 1
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, entries=n, disk_entries=n)


@layout_case("FormatError", "disagree on the central directory size")
def classic_cd_size_disagrees(data, layout, m):
    e = unpack(EOCD, EOCD_FIELDS, data, layout.eocd)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, cd_size=e["cd_size"] - 46)


@layout_case("FormatError", "disagree on the central directory offset")
def classic_cd_offset_disagrees(data, layout, m):
    e = unpack(EOCD, EOCD_FIELDS, data, layout.eocd)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, cd_offset=e["cd_offset"] + 1)


@layout_case("FormatError", "disk number")
def classic_disk_number(data, layout, m):
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, disk=1)


@layout_case("FormatError", "multi-disk")
def zip64_disk_number(data, layout, m):
    return patch(data, layout.z64, Z64, Z64_FIELDS, cd_disk=1)


@layout_case("FormatError", "multi-disk")
def locator_two_disks(data, layout, m):
    return patch(data, layout.loc, LOC, LOC_FIELDS, disks=2)


@layout_case("FormatError", "ZIP64 end locator points")
def locator_points_elsewhere(data, layout, m):
    return patch(data, layout.loc, LOC, LOC_FIELDS, offset=layout.z64 - 1)


@layout_case("FormatError", "extensible data")
def zip64_extensible_data(data, layout, m):
    return patch(data, layout.z64, Z64, Z64_FIELDS, size=45)


@layout_case("FormatError", "entries on this disk")
def zip64_disk_entries_differ(data, layout, m):
    return patch(data, layout.z64, Z64, Z64_FIELDS, disk_entries=3)


@layout_case("FormatError", "more than a central directory")
def count_beyond_directory(data, layout, m):
    data = patch(data, layout.z64, Z64, Z64_FIELDS, entries=1 << 40, disk_entries=1 << 40)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, entries=0xFFFF, disk_entries=0xFFFF)


@layout_case("FormatError", "runs past the end of the central directory")
def count_one_too_many(data, layout, m):
    n = len(m.entries) + 1
    data = patch(data, layout.z64, Z64, Z64_FIELDS, entries=n, disk_entries=n)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, entries=n, disk_entries=n)


@layout_case("FormatError", "bytes left in the central directory")
def count_one_too_few(data, layout, m):
    n = len(m.entries) - 1
    data = patch(data, layout.z64, Z64, Z64_FIELDS, entries=n, disk_entries=n)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, entries=n, disk_entries=n)


@layout_case("FormatError", "does not end where the end records start")
def cd_offset_lies(data, layout, m):
    z = unpack(Z64, Z64_FIELDS, data, layout.z64)
    data = patch(data, layout.z64, Z64, Z64_FIELDS, cd_offset=z["cd_offset"] - 10)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, cd_offset=0xFFFFFFFF)


@layout_case("FormatError", "does not end where the end records start")
def cd_size_overflows(data, layout, m):
    data = patch(data, layout.z64, Z64, Z64_FIELDS, cd_size=(1 << 64) - 1)
    return patch(data, layout.eocd, EOCD, EOCD_FIELDS, cd_size=0xFFFFFFFF)


@case("FormatError", "saturated")
def saturated_without_zip64(data):
    m = Model(data)
    m.zip64 = False
    built, layout = m.build()
    return patch(built, layout.eocd, EOCD, EOCD_FIELDS, cd_size=0xFFFFFFFF)


@case("FormatError", "multi-disk")
def classic_multi_disk_without_zip64(data):
    m = Model(data)
    m.zip64 = False
    built, layout = m.build()
    return patch(built, layout.eocd, EOCD, EOCD_FIELDS, disk=1, cd_disk=1)


@model_case("FormatError", "no records")
def no_records(m):
    m.entries = []


@model_case("FormatError", "trailing bytes")
def fake_end_record_in_comment(m):
    m.comment = b"PK\x05\x06" + b"\x00" * 30


# -- entries: layout -----------------------------------------------------------------------------

@model_case("FormatError", "unaccounted bytes")
def gap_between_entries(m):
    m.entries[5].gap = b"\x00" * 16


@model_case("FormatError", "before the archive")
def gap_before_first_entry(m):
    m.entries[0].gap = b"\x00" * 16


@model_case("FormatError", "unaccounted bytes between the last entry")
def gap_before_central_directory(m):
    m.entries[-1].dd += b"\x00" * 8


@model_case("FormatError", "in central-directory order")
def central_directory_out_of_file_order(m):
    m.cd_order = m.entries[:4] + [m.entries[5], m.entries[4]] + m.entries[6:]


@layout_case("FormatError", "overlaps")
def overlapping_entries(data, layout, m):
    return patch(data, layout.cd[5], CD, CD_FIELDS, offset=layout.lh[4])


@layout_case("FormatError", "run into the central directory")
def entry_runs_into_central_directory(data, layout, m):
    last = len(m.entries) - 1
    size = m.entries[last].cd["usize"] + 64
    return patch(data, layout.cd[last], CD, CD_FIELDS, csize=size, usize=size)


@model_case("FormatError", "duplicate name")
def duplicate_names(m):
    m.rename(5, b"p/data/0")


# -- entries: local header vs central directory --------------------------------------------------

@model_case("FormatError", "name 'p/data/9' differs")
def local_name_differs(m):
    m.entries[4].lname = b"p/data/9"


@model_case("FormatError", "method 8 differs")
def local_method_differs(m):
    m.entries[4].lh["method"] = 8


@model_case("FormatError", "flags 0x8 differ")
def local_flags_differ(m):
    m.entries[4].lh["flags"] = 0x0008


@model_case("FormatError", "sizes differ")
def local_size_differs_without_descriptor(m):
    m.entries[7].lh["usize"] = m.entries[7].lh["csize"] = 5  # data/3: empty, sizes in the local header


@model_case("FormatError", "sizes differ")
def local_crc_differs(m):
    m.entries[4].lh["crc"] = 1


@model_case("FormatError", "sizes differ")
def local_deferred_size_lies(m):
    m.entries[4].lh["usize"] = m.entries[4].lh["csize"] = 4


@model_case("FormatError", "no data descriptor signature")
def descriptor_missing(m):
    m.entries[4].dd = b""


@model_case("FormatError", "no data descriptor signature")
def descriptor_without_signature(m):
    m.entries[4].dd = m.entries[4].dd[4:]


@model_case("FormatError", "disagrees with the central directory")
def descriptor_crc_differs(m):
    dd = bytearray(m.entries[4].dd)
    dd[4] ^= 1
    m.entries[4].dd = bytes(dd)


@model_case("FormatError", "disagrees with the central directory")
def descriptor_size_differs(m):
    dd = bytearray(m.entries[4].dd)
    dd[12] ^= 1
    m.entries[4].dd = bytes(dd)


@model_case("FormatError", "no data descriptor signature")
def descriptor_without_flag(m):
    m.set_flags(7, 0x0808)  # the empty record has no descriptor


@model_case("FormatError", "encrypted")
def encrypted(m):
    m.set_flags(4, 0x0809)


@model_case("FormatError", "unsupported general-purpose flags 0x80a")
def unknown_flag_bit(m):
    m.set_flags(4, 0x080A)


@model_case("FormatError", "unsupported general-purpose flags 0x2808")
def flag_bit_13(m):
    m.set_flags(4, 0x2808)


@model_case("FormatError", "compression method 12")
def unknown_method(m):
    m.entries[4].lh["method"] = m.entries[4].cd["method"] = 12


@model_case("FormatError", "is stored but its compressed size")
def stored_sizes_differ(m):
    m.entries[4].cd["csize"] += 1


@model_case("FormatError", "starts on disk 1")
def entry_on_other_disk(m):
    m.entries[4].cd["disk"] = 1


@model_case("FormatError", "no ZIP64 value")
def saturated_size_without_extra(m):
    m.entries[4].cd["usize"] = m.entries[4].cd["csize"] = 0xFFFFFFFF


@model_case("FormatError", "ZIP64 extra field has 16 bytes, expected 0")
def zip64_extra_not_needed(m):
    m.entries[4].cextra = struct.pack("<HHQQ", 1, 16, 60, 60)


@model_case("FormatError", "ZIP64 extra field of 12 bytes")
def local_zip64_extra_odd_size(m):
    m.entries[4].lextra = struct.pack("<HHQI", 1, 12, 0, 0) + m.entries[4].lextra


@model_case("FormatError", "different header offset")
def local_zip64_extra_wrong_offset(m):
    m.entries[4].lextra = struct.pack("<HHQ", 1, 8, 12345) + m.entries[4].lextra


@model_case("FormatError", "extra field block ends inside a field header")
def local_extra_ragged(m):
    m.entries[4].lextra += b"\x00\x00"


@model_case("FormatError", "runs past the end of its block")
def central_extra_overruns(m):
    m.entries[4].cextra = struct.pack("<HH", 0x4246, 10) + b"ZZ"


@model_case("FormatError", "two ZIP64 extra fields")
def two_zip64_fields(m):
    m.entries[4].lextra = struct.pack("<HHQ", 1, 8, 0) * 2 + m.entries[4].lextra


# -- names ---------------------------------------------------------------------------------------

def name_case(match, index, name, flags=None):
    def fn(m):
        m.rename(index, name)
        if flags is not None:
            m.set_flags(index, flags)
    fn.__name__ = "name_" + name.decode("latin-1").encode("unicode_escape").decode().replace("/", "|")
    model_case("FormatError", match)(fn)


name_case("'.' or '..'", 4, b"p/../a/0")
name_case("'.' or '..'", 4, b"p/./ta/0")
name_case("backslash", 4, b"p/da\\a/0")
name_case("NUL", 4, b"p/dat\x00/0")
name_case("empty path component", 4, b"p//ata/0")
name_case("empty path component", 4, b"p/data0/")
name_case("does not start with the archive prefix 'p'", 4, b"q/data/0")
name_case("absolute path", 0, b"/pdata.pkl")
name_case("not inside an archive directory", 0, b"p_data.pkl")
name_case("'.' or '..'", 0, b"./data.pkl")
name_case("archive prefix contains a backslash", 0, b"p\\/ata.pkl")
name_case("not valid UTF-8", 4, b"p/dat\xff/0")
name_case("not valid UTF-8", 4, b"p/d\xc0\xafa/0")  # overlong '/'
name_case("not valid UTF-8", 4, b"p/d\xed\xa0\x80/0")  # surrogate
name_case("non-ASCII name without the UTF-8 flag", 4, b"p/d\xc3\xa9a/0", flags=0x0008)


@case("LimitError", "over the limit of 4096")
def name_too_long(data):
    return python_zip([("p/data.pkl", b"x"), ("p/" + "a" * 5000, b"")])


@case("FormatError", "has nothing after the archive prefix")
def directory_entry(data):
    return python_zip([("p/", b""), ("p/data.pkl", b"x")])


def outcome(data: bytes):
    """The exception class name opening and fully reading `data` ends in, or 'ok'."""
    try:
        archive = open_archive(io.BytesIO(data))
        for name in archive.names():
            read_record(archive, name)
    except fastckpt.CheckpointError as e:
        return type(e).__name__, str(e)
    return "ok", ""


@pytest.mark.parametrize("name,fn,expected,match", CASES, ids=[c[0] for c in CASES])
def test_case(reference, name, fn, expected, match):
    data = fn(reference)
    assert data != reference
    kind, message = outcome(data)
    assert (kind, match in message) == (expected, True), message
    assert "\n" not in message


def test_accepted_variants(reference):
    """What the rules must not refuse: a comment on the end record, UTF-8 names, no ZIP64 records."""
    m = Model(reference)
    m.comment = b"saved by a test"
    m.rename(4, "p/dé/0".encode())
    data = m.build()[0]
    archive = open_archive(io.BytesIO(data))
    assert "dé/0" in archive.names()
    assert read_record(archive, "dé/0") == read_record(open_archive(io.BytesIO(reference)), "data/0")
    m.zip64 = False
    assert open_archive(io.BytesIO(m.build()[0])).prefix == "p"


def test_declared_deflate_over_stored_bytes(reference):
    m = Model(reference)
    m.entries[4].lh["method"] = m.entries[4].cd["method"] = 8
    archive = open_archive(io.BytesIO(m.build()[0]))
    with pytest.raises(fastckpt.RecordError, match="compressed"):
        archive.view("data/0")
    with pytest.raises((fastckpt.RecordError, fastckpt.IntegrityError)):
        read_record(archive, "data/0")


# -- sweeps, and everything again under RLIMIT_AS -------------------------------------------------

def data_owners(reference):
    """{offset: record name} for every byte of record data; the rest are headers."""
    owner = {}
    for r in open_archive(io.BytesIO(reference)).records():
        owner.update(dict.fromkeys(range(r.data_offset, r.data_offset + r.size), r.name))
    return owner


def flip(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


CHILD = textwrap.dedent("""
    import io, json, pickle, resource, sys
    import fastckpt
    from fastckpt import _native  # builds the extension (if needed) before the cap
    from fastckpt.archive import open_archive, read_record

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    reference_records, cases = pickle.load(open(sys.argv[1], "rb"))
    failures = []
    for label, data, kind, arg in cases:
        try:
            archive = open_archive(io.BytesIO(data))
        except fastckpt.CheckpointError as e:
            if kind != "integrity" and type(e).__name__ in arg:
                continue
            failures.append(f"{label}: open raised {type(e).__name__}: {e}")
            continue
        except BaseException as e:
            failures.append(f"{label}: open raised {type(e).__name__}: {e}")
            continue
        if kind == "error":
            failures.append(f"{label}: opened, expected {arg}")
            continue
        fields = [(r.name, r.header_offset, r.data_offset, r.compressed_size, r.size, r.crc32, int(r.method), r.flags)
                  for r in archive.records()]
        if fields != reference_records:
            failures.append(f"{label}: opened with different records")
            continue
        try:
            report = fastckpt.verify(io.BytesIO(data))
            bad = [r.name for r in report.failures]
            expected_bad = [arg] if kind == "integrity" else []
            if bad != expected_bad:
                failures.append(f"{label}: verify reported {bad}, expected {expected_bad}")
            for name in archive.names():
                try:
                    read_record(archive, name)
                    if name == arg:
                        failures.append(f"{label}: reading {name} did not raise IntegrityError")
                except fastckpt.IntegrityError:
                    if name != arg:
                        failures.append(f"{label}: reading {name} raised IntegrityError")
        except BaseException as e:
            failures.append(f"{label}: raised {type(e).__name__}: {e}")
    json.dump({"cases": len(cases), "failures": failures}, sys.stdout)
""")


def test_catalogue_and_sweeps_under_rlimit(reference, tmp_path):
    """Every truncation point, a bit flip at every header byte and at every data
    byte, and the named cases, in a subprocess whose address space is capped at
    1 GiB: headers → FormatError/RecordError (or an identical index when the
    byte is one readers ignore, such as a timestamp), data → IntegrityError
    from verify and read, never a crash or another exception."""
    cases = [(name, fn(reference), "error", (expected,)) for name, fn, expected, _ in CASES]
    cases += [(f"truncated to {n}", reference[:n], "error", ("FormatError",)) for n in range(len(reference))]
    owner = data_owners(reference)
    for i in range(len(reference)):
        if i not in owner:
            cases.append((f"header flip at {i}", flip(reference, i, i % 8), "same-or-error",
                          ("FormatError", "RecordError")))
    for i, name in owner.items():
        cases.append((f"data flip at {i}", flip(reference, i, i % 8), "integrity", name))
    reference_records = [(r.name, r.header_offset, r.data_offset, r.compressed_size, r.size, r.crc32, int(r.method),
                          r.flags) for r in open_archive(io.BytesIO(reference)).records()]  # fields, as CHILD compares
    case_file = tmp_path / "cases.pickle"
    case_file.write_bytes(pickle.dumps((reference_records, cases)))
    run = subprocess.run([sys.executable, "-c", CHILD, str(case_file)], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["cases"] == len(cases) > 3000
    assert result["failures"] == []
