"""N ranks loading one checkpoint, cold page cache: each rank calling torch.load, against
fastckpt.distributed.load over a gloo group (127.0.0.1 / file:// rendezvous).

Reports, per run, the bytes read summed over ranks (/proc/self/io: read_bytes is what reached the
block device, rchar every byte read through read(2)/pread(2) including page-cache hits) and the wall
time from the common start (after a barrier) to the last rank's return.

    python benchmarks/bench_distributed.py --size-mb 512 --ranks 2 4 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import tempfile
import time


def _io() -> dict:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}


def _rank(rank, n, init_file, path, contender, queue):
    import torch
    import torch.distributed as dist

    import fastckpt.distributed as fd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=300))
    dist.barrier()
    before, start = _io(), time.time()
    state = torch.load(path) if contender == "torch" else fd.load(path)
    end, after = time.time(), _io()
    same = None
    if rank == 0 and contender == "fastckpt":  # correctness next to the timing (warm, after the clock)
        ref = torch.load(path)
        same = list(ref) == list(state) and all(torch.equal(ref[k], state[k]) for k in ref)
    dist.barrier()
    queue.put(dict(rank=rank, start=start, end=end, same=same,
                   read_bytes=after["read_bytes"] - before["read_bytes"], rchar=after["rchar"] - before["rchar"]))
    dist.destroy_process_group()


def run(path, n, contender) -> dict:
    from fastckpt.bench.coldcache import COLD_TOLERANCE, evict, resident_fraction

    evict(path)
    resident = resident_fraction(path)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, n, os.path.join(tmp, "rdv"), path, contender, queue))
                 for r in range(n)]
        for p in procs:
            p.start()
        rows = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
    size = os.path.getsize(path)
    return dict(contender=contender, ranks=n, cold=resident <= COLD_TOLERANCE, resident_before=resident,
                wall_s=max(r["end"] for r in rows) - min(r["start"] for r in rows),
                read_bytes_x=sum(r["read_bytes"] for r in rows) / size, rchar_x=sum(r["rchar"] for r in rows) / size,
                same_as_torch=next(r["same"] for r in rows if r["rank"] == 0))


def make_checkpoint(path: str, size_mb: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    per = 4 << 20  # 4 Mi bf16 elements = 8 MiB per tensor, LLM-shaped
    state = {f"layers.{i}.weight": torch.randn(per // 1024, 1024, generator=g).to(torch.bfloat16)
             for i in range(max(1, (size_mb << 20) // (2 * per)))}
    torch.save(state, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the checkpoint is written (a real disk, for cold runs)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        make_checkpoint(path, args.size_mb)
        print(f"checkpoint: {os.path.getsize(path) / 1e6:.0f} MB")
        rows = []
        for repeat in range(args.repeats):
            for n in args.ranks:
                order = ["torch", "fastckpt"] if repeat % 2 == 0 else ["fastckpt", "torch"]  # interleaved
                for contender in order:
                    row = run(path, n, contender)
                    rows.append(row)
                    print(f"N={n} {contender:9s} wall {row['wall_s']:6.2f} s   read_bytes {row['read_bytes_x']:5.2f}x   "
                          f"rchar {row['rchar_x']:5.2f}x   cold={row['cold']} (resident {row['resident_before']:.3f})"
                          + ("" if row["same_as_torch"] is None else f"   same as torch.load: {row['same_as_torch']}"))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
