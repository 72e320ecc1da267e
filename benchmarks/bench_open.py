"""Opening (indexing) a 100,000-record checkpoint: fastckpt vs torch's zip reader.

Writes the checkpoint once (cached in --dir), then times both readers
interleaved A B A B in one process, so machine noise hits both alike:

    python benchmarks/bench_open.py [--records 100000] [--repeat 15] [--dir DIR]

fastckpt: ``Archive.open(path)`` (mmap + end records + central directory +
every local header, all strictness checks). torch: ``PyTorchFileReader(open(path,
'rb'))``, what torch.load does before unpickling (reads and sorts the central
directory; no local headers).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time


def checkpoint(directory: str, records: int) -> str:
    path = os.path.join(directory, f"open_{records}.pt")
    if not os.path.exists(path):
        import torch

        state = collections.OrderedDict((f"t{i}", torch.full((16,), float(i))) for i in range(records))
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="tensors in the checkpoint")
    parser.add_argument("--repeat", type=int, default=15, help="timed rounds per reader")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "fastckpt-bench"))
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    path = checkpoint(args.dir, args.records)

    import torch

    from fastckpt import _native

    def fastckpt_open():
        archive = _native.Archive.open(path)
        assert "data.pkl" in archive

    def torch_open():
        with open(path, "rb") as f:
            reader = torch._C.PyTorchFileReader(f)
            assert reader.has_record("data.pkl")

    readers = {"fastckpt Archive.open": fastckpt_open, "torch PyTorchFileReader": torch_open}
    times: dict[str, list[float]] = {name: [] for name in readers}
    for fn in readers.values():  # warm the page cache and both code paths
        fn()
    for _ in range(args.repeat):
        for name, fn in readers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    count = len(_native.Archive.open(path).names())
    print(f"{path}: {os.path.getsize(path):,d} bytes, {count:,d} records, {args.repeat} rounds, warm cache")
    for name, ts in times.items():
        print(f"  {name:<26} median {statistics.median(ts) * 1e3:7.2f} ms   "
              f"min-max {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} ms")
    ours, theirs = (statistics.median(ts) for ts in times.values())
    print(f"  torch / fastckpt = {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()
