"""The surfaces besides fastckpt.load, under pyfuzz's mutated inputs (pyfuzz.py --surfaces).

For every input: ``fastckpt.open`` (keys, info, get_tensor, get_slice with numpy indexes compared
with numpy's own indexing of the whole tensor, metadata; the numpy and "pt" frameworks list the
same keys), ``convert`` (read back with safetensors: the same arrays as open's; output bounded by a
multiple of the input), the CLI (``inspect``/``verify``/``convert`` through ``cli.main``: never an
exception, exit 0/1/2, bounded output), and a sharded folder holding the input as its shard with a
mutated ``*.index.json`` (open, load_sharded, the CLI; open and load_sharded agree on the keys).
Refusals must be CheckpointErrors (or the documented TypeError for a dtype numpy cannot hold).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil

MAX_KEYS = 16  # tensors read per input
MAX_TOUCH = 1 << 22  # elements summed per array; bigger ones are touched at their corners
MAX_CLI_OUTPUT = 8 << 20
CONVERT_GROWTH, CONVERT_SLACK = 4, 16 << 20  # convert refuses more output than 4x its input + 16 MiB (README)
SHARD = "model-00001-of-00001.pt"


def _refusal(e: BaseException) -> bool:
    import fastckpt

    if isinstance(e, (fastckpt.CheckpointError, FileNotFoundError)):  # (a shard the index names is missing)
        return True
    return isinstance(e, TypeError) and "cannot hold" in str(e)  # documented: a dtype/kind numpy has no type for


class Finding(Exception):
    def __init__(self, kind: str, exc: BaseException | None, msg: str = ""):
        super().__init__(kind)
        self.kind, self.exc, self.msg = kind, exc, msg


def _guard(kind: str, fn, *args, **kwargs):
    """fn's result, or None for a proper refusal; anything else is a Finding of `kind`."""
    try:
        return fn(*args, **kwargs)
    except Finding:
        raise
    except Exception as e:  # noqa: BLE001
        if _refusal(e):
            return None
        raise Finding(kind, e) from e


def touch(array):
    """Reads the array's bytes (all of them when small), so a bad view faults here."""
    import numpy as np

    a = np.asarray(array)
    if a.size == 0:
        return
    if a.size <= MAX_TOUCH:
        a.tobytes()
    else:
        a[(0,) * a.ndim].tobytes()
        a[(-1,) * a.ndim].tobytes()


def random_index(rng: random.Random, ndim: int):
    parts, used = [], 0
    ellipsis = False
    while used < ndim and rng.random() < 0.8:
        r = rng.random()
        if r < 0.15:
            parts.append(None)
        elif r < 0.25 and not ellipsis:
            parts.append(Ellipsis)
            ellipsis = True
        elif r < 0.45:
            parts.append(rng.choice((0, -1)))
            used += 1
        else:
            parts.append(slice(rng.choice((None, 0, 1, -2)), rng.choice((None, -1, 2, 5)), rng.choice((None, 1, 2, -1))))
            used += 1
    return tuple(parts) if len(parts) != 1 or rng.random() < 0.5 else parts[0]


def _same(got, want, what: str):
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        raise Finding("get_slice differs from numpy", None, f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}")
    if want.size <= MAX_TOUCH and got.tobytes() != want.tobytes():
        raise Finding("get_slice differs from numpy", None, f"{what}: values differ")


def check_open(path: str, rng: random.Random) -> tuple[list, dict] | None:
    """(open's keys, {key: array} of what it read); None when it refused the file."""
    import fastckpt

    def run():
        out: dict = {}
        with fastckpt.open(path) as f:
            keys = f.keys()
            f.metadata()
            for key in keys[:MAX_KEYS]:
                f.info(key)
                array = _guard("open.get_tensor", f.get_tensor, key)
                if array is None:
                    continue
                touch(array)
                out[key] = array
                index = random_index(rng, array.ndim)
                try:
                    want = array[index]
                except IndexError:
                    continue
                got = _guard("open.get_slice", f.get_slice(key).__getitem__, index)
                if got is not None:
                    touch(got)
                    _same(got, want, f"{key}[{index!r}]")
        return keys, out

    found = _guard("open", run)
    if found is not None:
        pt = _guard("open(framework='pt')", lambda: fastckpt.open(path, framework="pt").keys())
        if pt is not None and pt != found[0]:
            raise Finding("open's frameworks list different keys", None, f"{pt[:5]} vs numpy's {found[0][:5]}")
    return found


def check_convert(path: str, work: str, arrays: dict | None):
    import fastckpt

    out = os.path.join(work, "out.safetensors")
    with contextlib.suppress(FileNotFoundError):
        os.remove(out)
    written = _guard("convert", fastckpt.convert, path, out, drop_non_tensors=True)
    if written is None:
        return
    size = sum(os.path.getsize(p) for p in written)
    if size > CONVERT_GROWTH * os.path.getsize(path) + CONVERT_SLACK:
        raise Finding("convert output not bounded by its input", None, f"{size} bytes from {os.path.getsize(path)}")
    if arrays:
        from safetensors.numpy import load_file

        try:
            back = load_file(out)
        except Exception as e:  # noqa: BLE001 - numpy cannot read every dtype safetensors holds (bf16)
            if "bfloat16" in str(e) or "F8" in str(e) or "dtype" in str(e).lower():
                return
            raise Finding("convert wrote a file safetensors cannot read", e) from e
        for key, want in arrays.items():
            if key in back and want.size <= MAX_TOUCH and (back[key].shape != want.shape
                                                           or back[key].tobytes() != want.tobytes()):
                raise Finding("convert differs from open", None, key)


def check_cli(target: str, work: str):
    from fastckpt.cli import main

    out = os.path.join(work, "cli.safetensors")
    for argv in (["inspect", target], ["inspect", "--json", target], ["verify", target],
                 ["convert", "--drop-non-tensors", target, out]):
        stdout, stderr = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = main(argv)
        except BaseException as e:  # noqa: BLE001 - the CLI prints a traceback for anything that escapes
            raise Finding(f"CLI {argv[0]} raised (a traceback)", e) from e
        if rc not in (0, 1, 2):
            raise Finding(f"CLI {argv[0]} exit {rc}", None, stderr.getvalue()[-300:])
        if len(stdout.getvalue()) + len(stderr.getvalue()) > MAX_CLI_OUTPUT:
            raise Finding(f"CLI {argv[0]} output not bounded", None, str(len(stdout.getvalue())))
        if rc == 2 and not stderr.getvalue().strip():
            raise Finding(f"CLI {argv[0]} exit 2 without a message", None, "")


def index_text(rng: random.Random, keys: list[str]) -> bytes:
    """A *.index.json for a folder whose one shard is SHARD: right, or wrong in one of many ways."""
    keys = list(keys) or ["w"]
    weight_map = {k: SHARD for k in keys}
    choice = rng.randrange(16)
    doc: object = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    if choice == 1:
        weight_map.pop(rng.choice(keys))  # the shard holds a key the index does not map
    elif choice == 2:
        weight_map["not.in.the.shard"] = SHARD
    elif choice == 3:
        weight_map[keys[0]] = rng.choice(("../" + SHARD, "/etc/passwd", "sub/" + SHARD, "", ".", "missing.pt", "\0x"))
    elif choice == 4:
        doc = {"weight_map": rng.choice(([SHARD], 7, None, "x", {keys[0]: 7}, {keys[0]: [SHARD]}))}
    elif choice == 5:
        doc = rng.choice(([], 3, "weight_map", None, {"metadata": {}}))
    elif choice == 6:
        doc["metadata"] = [list(range(100))] * 100
    text = json.dumps(doc).encode()
    if choice == 7:
        return text[: rng.randrange(len(text))]  # truncated JSON
    if choice == 8:
        k = rng.randrange(len(text))
        return text[:k] + rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\0")) + text[k:]  # not UTF-8 / NUL
    if choice == 9:
        depth = rng.choice((1000, 100_000))
        return b'{"weight_map": ' + b"[" * depth + b"]" * depth + b"}"
    if choice == 10:
        return b'{"weight_map": {"' + keys[0].encode() + b'": "' + SHARD.encode() + b'"}, "weight_map": {}}'
    if choice == 11:
        return b"\xef\xbb\xbf" + text  # a UTF-8 byte order mark
    if choice == 12:
        return b""
    if choice == 13:
        return text.replace(b"}", b", }", 1)  # trailing comma
    return text


def check_sharded(data: bytes, work: str, rng: random.Random, keys: list[str]):
    import fastckpt

    folder = os.path.join(work, "sharded")
    shutil.rmtree(folder, ignore_errors=True)
    os.mkdir(folder)
    with open(os.path.join(folder, SHARD), "wb") as f:
        f.write(data)
    with open(os.path.join(folder, "model.index.json"), "wb") as f:
        f.write(index_text(rng, keys))

    def read_all():
        with fastckpt.open(folder) as f:
            names = f.keys()
            f.metadata()
            for key in names[:MAX_KEYS]:
                _guard("open(sharded).get_tensor", lambda k=key: touch(f.get_tensor(k)))
            return names

    opened = _guard("open(sharded)", read_all)
    merged = _guard("load_sharded", fastckpt.load_sharded, folder, mmap=True)
    if opened is not None and merged is not None:
        import torch

        from fastckpt._graph import flatten

        names = list(_guard("flatten", flatten, merged, lambda x: isinstance(x, torch.Tensor)) or ())
        if sorted(opened) != sorted(names):  # one reading of the folder: the same tensors by the same names
            raise Finding("sharded readers disagree", None, f"open {sorted(opened)[:4]} vs load_sharded {names[:4]}")
    check_cli(folder, work)


def seeds() -> dict[str, bytes]:
    """Seeds for the walks and shapes these surfaces add: shared and cyclic graphs, tied weights,
    stride-0 and size-1 views with odd strides, empty dims (added to pyfuzz.make_seeds' in --surfaces)."""
    import torch

    def save(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    t = torch.arange(6.0)
    block = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    x = torch.arange(4, dtype=torch.int16)
    for _ in range(6):
        x = [x, x]
    loop: list = [torch.arange(3.0), {"lr": 0.5}]
    loop.append(loop)
    return {
        "surf_shared": save({"a": block, "b": block, "tied1": t, "tied2": t, "view": t[1:4], "paths": x}),
        "surf_cycle": save(loop),
        "surf_shapes": save({"expanded": torch.ones(3).expand(4, 3), "one": torch.zeros(4).as_strided((1, 1), (7, 9)),
                             "empty": torch.empty(0, 5), "scalar": torch.tensor(1.5), "t": torch.randn(3, 5).t(),
                             "bf16": torch.arange(8.0).bfloat16().view(2, 4)[:, ::2]}),
    }


def judge_surfaces(data: bytes, path: str, work: str, rng: random.Random, phase) -> dict | None:
    """None when every surface handled the input, else a finding (a dict, as pyfuzz.judge's)."""
    import traceback

    current = ["open"]

    def enter(name):
        current[0] = name
        phase(name)

    try:
        enter("open")
        keys, arrays = check_open(path, rng) or ([], None)
        enter("convert")
        check_convert(path, work, arrays)
        enter("cli")
        check_cli(path, work)
        enter("index")
        check_sharded(data, work, rng, keys)
    except Finding as f:
        e = f.exc
        return {"kind": f"{current[0]}: {f.kind}", "exc": type(e).__name__ if e is not None else "-",
                "msg": (str(e) if e is not None else f.msg)[:500], "torch": "",
                "where": "".join(traceback.format_tb(e.__traceback__)[-2:])[-600:] if e is not None else ""}
    return None
