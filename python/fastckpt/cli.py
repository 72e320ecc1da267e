"""The `fastckpt` command: verify, inspect, convert, bench.

Exit codes, the same for every command: 0 ok; 1 integrity failure (a CRC-32
mismatch); 2 the input cannot be read as a torch checkpoint (missing, not a
checkpoint, truncated or malformed), or bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from fastckpt.errors import CheckpointError, IntegrityError, MissingDtypeError

EXIT_OK, EXIT_INTEGRITY, EXIT_UNREADABLE = 0, 1, 2


class _Unreadable(Exception):
    """The input is not something the command can work on; the message says what it is."""


def _files(path, command: str) -> list[str]:
    """The zip files `command` works on: the file itself, or every shard of a sharded checkpoint."""
    from fastckpt._formats import find_index, read_index
    from fastckpt.inspection import identify

    kind, what = identify(path)
    if kind == "sharded":
        index = read_index(find_index(path))
        shards = [os.fspath(index.shard_path(shard)) for shard in index.shards()]
        if not shards:
            raise _Unreadable(f"{what}, but its index maps no tensor to a shard")
        return shards
    if kind == "checkpoint" or (kind == "torchscript" and command == "verify"):
        return [os.fspath(path)]
    raise _Unreadable(what)


# Inputs at least this large get a progress bar (tqdm, when installed and stderr is a terminal).
_PROGRESS_FROM_BYTES = 1 << 30


@contextlib.contextmanager
def _progress(total: int, what: str):
    """A callable taking bytes done, or None when no bar is shown."""
    tqdm = None
    if total >= _PROGRESS_FROM_BYTES and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
    if tqdm is None:
        yield None
        return
    with tqdm(total=total, desc=what, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
        yield bar.update


def _verify_file(path: str, threads) -> dict:
    from fastckpt._tree import tensors_by_record
    from fastckpt.archive import verify
    from fastckpt.inspection import read_tree

    with _progress(os.path.getsize(path), f"verify {os.path.basename(path)}") as progress:
        report = verify(path, threads=threads, progress=progress)
    owners: dict[str, list[str]] = {}
    if not report.ok:
        try:  # name the tensors a bad record belongs to (the pickle itself may be the bad record)
            owners = tensors_by_record(read_tree(path)[1])
        except (CheckpointError, ValueError):
            pass
    records = [
        {"name": r.name, "size": r.size, "status": r.status, "stored_crc32": r.stored_crc32,
         "computed_crc32": r.computed_crc32, "tensors": owners.get(r.name, [])}
        for r in report.records
    ]
    return {"path": path, "ok": report.ok, "crc32_implementation": report.crc32_implementation, "records": records}


def _crc_text(r: dict) -> str:
    computed = "-" if r["computed_crc32"] is None else f"0x{r['computed_crc32']:08x}"
    return f"stored 0x{r['stored_crc32']:08x}, computed {computed}"


def _verify(args) -> int:
    results = [_verify_file(f, args.threads) for f in _files(args.path, "verify")]
    ok = all(r["ok"] for r in results)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return EXIT_OK if ok else EXIT_INTEGRITY
    for result in results:
        for r in result["records"]:
            if args.verbose or r["status"] not in ("ok", "unrecorded"):
                owner = f"  (tensor {', '.join(r['tensors'][:3])})" if r["tensors"] else ""
                print(f"  {r['status']:<10} {r['size']:>14,d} B  {_crc_text(r)}  {r['name']}{owner}")
        counts: dict[str, int] = {}
        for r in result["records"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        total = sum(r["size"] for r in result["records"])
        print(f"{result['path']}: {len(result['records'])} records, {total:,d} bytes ({summary}); "
              f"crc32 via {result['crc32_implementation']}")
    if not ok:
        bad = [(res, r) for res in results for r in res["records"] if r["status"] not in ("ok", "unrecorded")]
        res, r = bad[0]
        owner = f" (storage of tensor '{r['tensors'][0]}')" if r["tensors"] else ""
        print(f"CORRUPT: record '{r['name']}'{owner} in {res['path']} fails its CRC-32 check: {_crc_text(r)} "
              f"({len(bad)} record(s) bad)", file=sys.stderr)
        return EXIT_INTEGRITY
    unrecorded = any(r["status"] == "unrecorded" for res in results for r in res["records"])
    print("OK" if not unrecorded else "OK (some records carry no CRC-32: saved with compute_crc32=False)")
    return EXIT_OK


def _inspect(args) -> int:
    from fastckpt.inspection import inspect_checkpoint, inspect_report

    files = _files(args.path, "inspect")
    if args.json:
        reports = [inspect_report(f, max_items=args.max_items) for f in files]
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        print("\n\n".join(inspect_checkpoint(f, max_items=args.max_items) for f in files))
    return EXIT_OK


def _convert(args) -> int:
    from fastckpt.converter import convert

    total = sum(os.path.getsize(f) for f in _files(args.src, "convert"))
    with _progress(total, f"convert {os.path.basename(os.fspath(args.src))}") as progress:
        written = convert(args.src, args.dst, max_shard_size=args.max_shard_size,
                          drop_non_tensors=args.drop_non_tensors, progress=progress,
                          allow_expansion=args.allow_expansion)
    for path in written:
        print(path)
    return EXIT_OK


def _bench(rest: list[str]) -> int:
    from fastckpt.bench.cli import main as bench_main

    return bench_main(rest)


def _parser() -> argparse.ArgumentParser:
    from fastckpt import __version__

    parser = argparse.ArgumentParser(prog="fastckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every record's CRC-32 (parallel); a file, a sharded folder or index")
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="one line per record")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p = sub.add_parser("inspect", help="the object tree, tensors, globals and totals (nothing is executed)")
    p.add_argument("path")
    p.add_argument("--max-items", type=int, default=200, help="entries shown per container")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p = sub.add_parser("convert", help="write a checkpoint's tensors as safetensors (streaming, CRC-checked)")
    p.add_argument("src", help="a .pt/.bin file, a sharded checkpoint's folder or *.index.json")
    p.add_argument("dst", help="the .safetensors file (or folder) to write")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB: write shards and model.safetensors.index.json")
    p.add_argument("--drop-non-tensors", action="store_true", help="leave out epoch, config... instead of refusing")
    p.add_argument("--allow-expansion", action="store_true",
                   help="write expanded (stride-0) views even where the output is over 4x the checkpoint")
    sub.add_parser("bench", help="benchmark fastckpt against torch.load and safetensors (see `fastckpt bench -h`)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version: 0; bad arguments: argparse's 2
        return int(e.code or 0)
    try:
        return {"verify": _verify, "inspect": _inspect, "convert": _convert}[args.command](args)
    except _Unreadable as e:
        print(f"fastckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    except IntegrityError as e:
        print(f"fastckpt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTEGRITY
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; Python would complain flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (CheckpointError, OSError, ValueError, MissingDtypeError) as e:
        print(f"fastckpt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNREADABLE


if __name__ == "__main__":
    sys.exit(main())
