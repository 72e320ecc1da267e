"""`fastckpt inspect` and get_unsafe_globals_in_checkpoint: look inside a checkpoint without running it."""

from __future__ import annotations

import os
import pickletools

from fastckpt.archive import open_archive, read_record

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def globals_in_pickle(data: bytes) -> list[str]:
    """Every "module.name" a pickle's GLOBAL / STACK_GLOBAL opcodes name, in first-seen order.

    STACK_GLOBAL operands are followed through the memo where they are plain
    strings; anything else is reported as "<dynamic>" rather than guessed.
    """
    import _compat_pickle

    found: dict[str, None] = {}
    recent: list = []  # the strings most recently pushed, for STACK_GLOBAL
    memo: dict[int, object] = {}
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, qualname = arg.split(" ", 1)
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and all(isinstance(x, str) for x in recent[-2:]):
                module, qualname = recent[-2], recent[-1]
            else:
                module, qualname = "<dynamic>", "<dynamic>"
        else:
            if name in _STRING_OPS:
                recent.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(arg))
            elif name not in ("FRAME", "PROTO"):
                recent.append(None)
            continue
        if (module, qualname) in _compat_pickle.NAME_MAPPING:
            module, qualname = _compat_pickle.NAME_MAPPING[(module, qualname)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found[f"{module}.{qualname}"] = None
        recent.append(None)
    return list(found)


def get_unsafe_globals_in_checkpoint(f) -> list[str]:
    """Like torch.serialization.get_unsafe_globals_in_checkpoint: the globals weights_only would refuse."""
    from torch import _weights_only_unpickler as wo

    archive = _archive_or_value_error(f)
    allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    return [g for g in globals_in_pickle(read_record(archive, "data.pkl")) if g not in allowed]


def _archive_or_value_error(f):
    from fastckpt.errors import FormatError

    try:
        archive = open_archive(f)
    except FormatError:
        raise ValueError("Expected input to be a checkpoint returned by torch.save") from None
    if "constants.pkl" in archive:
        raise ValueError("Expected input to be a checkpoint returned by torch.save but got a torchscript checkpoint")
    return archive


def _tensor_line(t) -> str:
    import torch

    kind = "tensor" if type(t) is torch.Tensor else type(t).__name__
    dtype = str(t.dtype).removeprefix("torch.")
    if t.layout != torch.strided or t.is_nested:
        return f"{kind} {dtype}{list(t.shape) if not t.is_nested else ''} {t.layout}"
    return (f"{kind} {dtype}{list(t.shape)} stride={t.stride()} storage_offset={t.storage_offset()}"
            f" storage_bytes={t.untyped_storage().nbytes()}")


def _describe(obj, label: str, indent: str, lines: list[str], max_items: int) -> None:
    """Appends `label` + obj to lines: containers as nested blocks, leaves on one line."""
    import torch

    if isinstance(obj, torch.Tensor):
        lines.append(f"{indent}{label}{_tensor_line(obj)}")
        return
    if isinstance(obj, dict):
        items = [(f"{k!r}: ", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple, set)) and not isinstance(obj, torch.Size):
        items = [("", v) for v in obj]
    else:
        text = repr(obj)
        lines.append(f"{indent}{label}{text if len(text) <= 120 else text[:117] + '...'}")
        return
    lines.append(f"{indent}{label}{type(obj).__name__} ({len(items)} items)")
    for key, value in items[:max_items]:
        _describe(value, key, indent + "  ", lines, max_items)
    if len(items) > max_items:
        lines.append(f"{indent}  ... {len(items) - max_items} more")


def inspect_checkpoint(path, max_items: int = 200) -> str:
    """A text report: records, the object tree (tensors with dtype, shape, storage, bytes), globals, totals.

    Nothing in the file is executed: the tree is built with weights_only=True
    on the meta device (no tensor data is read); a checkpoint that needs other
    globals is reported with its globals only.
    """
    from fastckpt.loader import load

    archive = _archive_or_value_error(path)
    records = archive.records()
    data = [r for r in records if r["name"].startswith("data/")]
    lines = [f"{os.fspath(path)}: {len(records)} records, prefix '{archive.prefix}/', {archive.size:,d} bytes"]
    min_align = min((r["alignment"] for r in data), default=0)
    lines.append(f"storages: {len(data)} records, {sum(r['size'] for r in data):,d} bytes, "
                 f"data aligned to {min_align} bytes or better")
    pickle_globals = globals_in_pickle(read_record(archive, "data.pkl"))
    unsafe = set(get_unsafe_globals_in_checkpoint(path))
    lines.append("globals:")
    lines += [f"  {g}{'  (not allowed by weights_only)' if g in unsafe else ''}" for g in pickle_globals]
    lines.append("objects:")
    if unsafe:
        lines.append("  (not shown: the pickle needs globals weights_only does not allow)")
    else:
        tree: list[str] = []
        _describe(load(path, map_location="meta", weights_only=True), "", "  ", tree, max_items)
        lines += tree
        tensors = sum(1 for line in tree if " stride=" in line)
        lines.append(f"totals: {tensors} tensors, {len(data)} storages, {sum(r['size'] for r in data):,d} bytes of tensor data")
    return "\n".join(lines)
