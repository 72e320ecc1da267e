"""The `fastckpt` command: verify, inspect, bench."""

from __future__ import annotations

import argparse
import sys

from fastckpt.errors import CheckpointError


def _verify(args) -> int:
    from fastckpt.archive import verify

    report = verify(args.path, threads=args.threads)
    if args.verbose or not report.ok:
        for r in report.records:
            if args.verbose or r.status not in ("ok", "unrecorded"):
                computed = "-" if r.computed_crc32 is None else f"{r.computed_crc32:08x}"
                print(f"  {r.status:<10} {r.size:>14,d} B  crc {r.stored_crc32:08x}/{computed}  {r.name}")
    counts: dict[str, int] = {}
    for r in report.records:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    total = sum(r.size for r in report.records)
    print(f"{args.path}: {len(report.records)} records, {total:,d} bytes ({summary}); crc32 via {report.crc32_implementation}")
    if not report.ok:
        bad = report.failures[0]
        print(f"CORRUPT: record '{bad.name}' fails its CRC-32 check ({len(report.failures)} record(s) bad)", file=sys.stderr)
        return 1
    print("OK" if counts.get("unrecorded", 0) == 0 else "OK (some records carry no CRC-32: saved with compute_crc32=False)")
    return 0


def _inspect(args) -> int:
    from fastckpt.inspection import inspect_checkpoint

    print(inspect_checkpoint(args.path, max_items=args.max_items))
    return 0


def _bench(args, rest: list[str]) -> int:
    from fastckpt.bench.cli import main as bench_main

    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every record's CRC-32 (parallel)")
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="one line per record")
    p = sub.add_parser("inspect", help="the object tree, tensors, globals and totals")
    p.add_argument("path")
    p.add_argument("--max-items", type=int, default=200, help="entries shown per container")
    sub.add_parser("bench", help="benchmark fastckpt against torch.load and safetensors (see `fastckpt bench -h`)",
                   add_help=False)
    if argv[:1] == ["bench"]:
        return _bench(None, argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"verify": _verify, "inspect": _inspect}[args.command](args)
    except (CheckpointError, OSError) as e:
        print(f"fastckpt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
