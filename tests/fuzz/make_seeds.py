"""Writes the fuzz seeds (run once; the outputs are committed).

seeds/zip/: small checkpoints written by torch.save (protocols 2 and 4), and
zipfile archives with a deflated member, ZIP64 local headers, data descriptors.
seeds/pickle/: those checkpoints' data.pkl, and one pickle per protocol 0-5 of
a value using every container and scalar type pickle has an opcode for.
The regression-* files beside them are reproducers of findings, written by hand.
"""

import collections
import io
import pathlib
import pickle
import zipfile

import torch

HERE = pathlib.Path(__file__).parent / "seeds"


class Unseekable(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += b
        return len(b)

    def tell(self):
        raise OSError("not seekable")


def checkpoint(protocol):
    base = torch.arange(6, dtype=torch.float32)
    obj = collections.OrderedDict(
        w=base.view(2, 3),  # two views of one storage
        b=base[2:4],
        h=torch.ones(3, dtype=torch.float16),
        e=torch.empty(0),
        meta={"step": 3, "lr": 0.5, "name": "x"},
    )
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    return buf.getvalue()


def main():
    for protocol in (2, 4):
        data = checkpoint(protocol)
        (HERE / "zip" / f"ckpt_p{protocol}.pt").write_bytes(data)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            (HERE / "pickle" / f"ckpt_p{protocol}.pkl").write_bytes(zf.read("archive/data.pkl"))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        with zf.open(zipfile.ZipInfo("archive/data/0"), "w", force_zip64=True) as f:
            f.write(bytes(range(64)))
        zf.writestr("archive/version", b"3\n", compress_type=zipfile.ZIP_DEFLATED)
    (HERE / "zip" / "zipfile_zip64_deflate.zip").write_bytes(buf.getvalue())

    # Written to a stream that cannot seek: data descriptors, a ZIP64 one first.
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w") as zf:
        with zf.open(zipfile.ZipInfo("archive/data.pkl"), "w", force_zip64=True) as f:
            f.write(pickle.dumps([1], protocol=2))
        zf.writestr("archive/version", b"3\n")
    (HERE / "zip" / "zipfile_stream_descriptors.zip").write_bytes(bytes(stream.data))

    shared = [1, 2]
    value = {
        "ints": [0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31 - 1, 2**63, -(2**70)],
        "floats": (0.5, -1e300, float("inf")),
        "text": ("", "ascii", "ünïcode", "x" * 300),
        "bytes": (b"", b"\x00\xff", bytearray(b"ba")),
        "flags": (True, False, None),
        "sets": ({1, 2}, frozenset({3})),
        "shared": (shared, shared),
        "nested": [[[()]], {}],
        "od": collections.OrderedDict(k=1),
    }
    for protocol in range(6):
        (HERE / "pickle" / f"value_p{protocol}.pkl").write_bytes(pickle.dumps(value, protocol=protocol))


if __name__ == "__main__":
    main()
