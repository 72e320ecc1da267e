"""The loaders under test. Each one is built in the worker (imports done) before the clock starts.

A contender is named by its id (one of CONTENDERS), by a pattern or `all` (see `resolve`), or as
`module:function` for any loader called as `function(path, map_location)` on
the .pt file (handy to benchmark a branch, and how the tests feed in a deliberately wrong loader).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Contender:
    id: str
    label: str
    family: str
    fmt: str  # which file it reads: "pt" or "safetensors"
    lazy: bool  # on CPU it returns before the bytes are read (mmap): timed as returned and touched
    make: Callable[[str, str], Callable[[], object]]  # (path, device) -> load(), imports done
    requires: tuple[str, str | None]  # (module, attribute) that must exist for it to run
    device_only: bool = False  # meaningless on CPU: runs in device cases only

    def runs_on(self, device: str) -> bool:
        return device != "cpu" or not self.device_only


def _torch_load(weights_only: bool, mmap: bool):
    def make(path: str, device: str):
        import torch

        location = None if device == "cpu" else device
        return lambda: torch.load(path, map_location=location, weights_only=weights_only, mmap=mmap)

    return make


def _torch_mmap_then_move(path: str, device: str):
    """torch.load(mmap=True) to the CPU, then every tensor moved with .to(device) (a common recipe)."""
    import torch

    def load():
        state = torch.load(path, mmap=True, weights_only=True)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    return load


def _fastckpt_load(weights_only: bool, mmap: bool):
    def make(path: str, device: str):
        import fastckpt

        load = fastckpt.load  # imports fastckpt.loader now, not in the timed call
        location = None if device == "cpu" else device
        return lambda: load(path, map_location=location, weights_only=weights_only, mmap=mmap)

    return make


def _from_file_object(module: str):
    """An eager weights_only load from an open file (what Lightning does on every resume)."""

    def make(path: str, device: str):
        load = getattr(importlib.import_module(module), "load")
        location = None if device == "cpu" else device

        def run():
            with open(path, "rb") as f:
                return load(f, map_location=location, weights_only=True)

        return run

    return make


def _second_load(make_first):
    """The second eager load in one process: the first (untimed, freed) warms the allocator, as a
    training job reloading checkpoints does."""

    def make(path: str, device: str):
        load = make_first(path, device)
        load()  # freed before the clock starts
        return load

    return make


def _safetensors_load_file(path: str, device: str):
    from safetensors.torch import load_file

    return lambda: load_file(path, device=device)


def _safetensors_open(path: str, device: str):
    from safetensors import safe_open

    def load():
        with safe_open(path, framework="pt", device=device) as f:
            return {key: f.get_tensor(key) for key in f.keys()}

    return load


def _custom(spec: str) -> Contender:
    module, _, function = spec.partition(":")

    def make(path: str, device: str):
        fn = getattr(importlib.import_module(module), function)
        location = None if device == "cpu" else device
        return lambda: fn(path, location)

    return Contender(spec, spec, "custom", "pt", False, make, (module, function))


CONTENDERS = {
    c.id: c
    for c in (
        Contender("torch", "torch.load wo=T mmap=F", "torch", "pt", False, _torch_load(True, False), ("torch", None)),
        Contender("torch-mmap", "torch.load wo=T mmap=T", "torch", "pt", True, _torch_load(True, True),
                  ("torch", None)),
        Contender("torch-mmap-to", "torch.load mmap=T + .to(dev)", "torch", "pt", False, _torch_mmap_then_move,
                  ("torch", None), device_only=True),
        Contender("torch-pickle", "torch.load wo=F mmap=F", "torch", "pt", False, _torch_load(False, False),
                  ("torch", None)),
        Contender("torch-pickle-mmap", "torch.load wo=F mmap=T", "torch", "pt", True, _torch_load(False, True),
                  ("torch", None)),
        Contender("st-load", "safetensors load_file", "safetensors", "safetensors", True, _safetensors_load_file,
                  ("safetensors.torch", None)),
        Contender("st-open", "safetensors safe_open", "safetensors", "safetensors", True, _safetensors_open,
                  ("safetensors", None)),
        Contender("fastckpt", "fastckpt.load mmap=F", "fastckpt", "pt", False, _fastckpt_load(True, False),
                  ("fastckpt", "load")),
        Contender("fastckpt-mmap", "fastckpt.load mmap=T", "fastckpt", "pt", True, _fastckpt_load(True, True),
                  ("fastckpt", "load")),
        Contender("fastckpt-pickle", "fastckpt.load wo=F mmap=F", "fastckpt", "pt", False,
                  _fastckpt_load(False, False), ("fastckpt", "load")),
        Contender("torch-fileobj", "torch.load(open file) mmap=F", "torch", "pt", False, _from_file_object("torch"),
                  ("torch", None)),
        Contender("fastckpt-fileobj", "fastckpt.load(open file) mmap=F", "fastckpt", "pt", False,
                  _from_file_object("fastckpt"), ("fastckpt", "load")),
        Contender("torch-again", "torch.load mmap=F, 2nd in process", "torch", "pt", False,
                  _second_load(_torch_load(True, False)), ("torch", None)),
        Contender("fastckpt-again", "fastckpt.load mmap=F, 2nd in process", "fastckpt", "pt", False,
                  _second_load(_fastckpt_load(True, False)), ("fastckpt", "load")),
    )
}
BASELINE = "torch"  # every contender's time is also shown relative to the default torch.load


def resolve(ids: list[str]) -> list[Contender]:
    """Contenders for ids, patterns and module:function specs, in order, without duplicates.

    An exact id names that contender alone (`torch` is torch.load's default call, not its family);
    `safetensors` (a family that is no id) names both of its calls; a shell pattern (`fastckpt*`,
    `*mmap*`) the ids it matches; `all` every built-in contender."""
    out: dict[str, Contender] = {}
    for name in ids:
        if ":" in name:
            out.setdefault(name, _custom(name))
            continue
        if name in CONTENDERS:
            members = [CONTENDERS[name]]
        elif name == "all":
            members = list(CONTENDERS.values())
        else:
            members = [c for c in CONTENDERS.values() if c.family == name or fnmatch.fnmatchcase(c.id, name)]
        if not members:
            from fastckpt.bench.generate import BenchError

            raise BenchError(f"unknown contender '{name}': choose from {', '.join(CONTENDERS)}, all, safetensors, "
                             f"a pattern such as 'fastckpt*', or module:function")
        for c in members:
            out.setdefault(c.id, c)
    return list(out.values())


def unavailable(c: Contender) -> str | None:
    """Why `c` cannot run here, or None. Checked in the parent so a missing package is a message, not a crash."""
    module, attribute = c.requires
    try:
        if attribute is None:
            found = importlib.util.find_spec(module) is not None
        else:
            found = hasattr(importlib.import_module(module), attribute)
    except ImportError:
        found = False
    if found:
        return None
    what = module if attribute is None else f"{module}.{attribute}"
    return f"{what} is not available in this environment"


def get(contender_id: str) -> Contender:
    return CONTENDERS[contender_id] if ":" not in contender_id else _custom(contender_id)
