"""Synthetic checkpoints for the benchmark, cached on disk.

Each checkpoint is written twice: with torch.save (`NAME.pt`) and as safetensors (`NAME.safetensors`)
holding the same tensor bytes in the same order, so the per-tensor cost of each format and the
format-neutral data path can be told apart. Files are deterministic (seeded): the same bytes every
time except torch's random `serialization_id` record. `NAME.json` (the manifest, written last) holds
the reference digest every load is checked against.

A spec names a checkpoint: `SCENARIO-SIZE[-DTYPE]`, e.g. `llm-2g`, `llm-100m-fp16`, `small-100k`,
`moe-20k`, `train-1g`. Sizes are bytes (k/m/g suffixes, decimal) for llm and train, tensor counts
(k/m) for small and moe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import zlib
from collections import OrderedDict
from typing import Callable

GENERATOR_VERSION = 2
DISK_RESERVE = 1 << 30  # never fill the disk: keep this much free after writing

_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9}
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    sized_in: str  # "bytes" or "tensors"
    dtypes: tuple[str, ...]  # the first is the default
    models: str  # what real checkpoint it stands for (shown by --list and in the README)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("llm", "bytes", ("bf16", "fp16", "fp32"),
                 "Llama-like decoder state dict (embed, q/k/v/o, gate/up/down, norms, lm_head), ~32 layers: "
                 "bandwidth-bound"),
        Scenario("small", "tensors", ("fp32",),
                 "N independent 16-element fp32 tensors: pure per-tensor overhead (unpickling, records)"),
        Scenario("moe", "tensors", ("bf16", "fp16", "fp32"),
                 "MoE layer stack, 64 experts x (gate, up, down) of 64x192 plus a router per layer: "
                 "tens of thousands of mid-size tensors"),
        Scenario("train", "bytes", ("fp32", "bf16"),
                 "full training checkpoint: transformer-encoder weights + real AdamW state after one step "
                 "(step, exp_avg, exp_avg_sq) + param_groups, scheduler, scaler, RNG state, config"),
    )
}


class BenchError(Exception):
    """A refusal the user can act on (shown as a message, never a traceback)."""


@dataclasses.dataclass(frozen=True)
class Spec:
    scenario: str
    size: float
    dtype: str

    @property
    def name(self) -> str:
        suffix = "" if self.dtype == SCENARIOS[self.scenario].dtypes[0] else f"-{self.dtype}"
        return f"{self.scenario}-{_format_amount(self.size)}{suffix}"


def parse_spec(text: str) -> Spec:
    parts = text.strip().lower().split("-")
    scenario = SCENARIOS.get(parts[0])
    if scenario is None or len(parts) not in (2, 3):
        raise BenchError(f"bad checkpoint spec '{text}': expected SCENARIO-SIZE[-DTYPE] with SCENARIO one of "
                         f"{', '.join(SCENARIOS)} (e.g. llm-2g, small-100k, moe-20k, train-1g)")
    dtype = parts[2] if len(parts) == 3 else scenario.dtypes[0]
    if dtype not in scenario.dtypes:
        raise BenchError(f"bad checkpoint spec '{text}': {scenario.name} comes in {', '.join(scenario.dtypes)}")
    amount = parts[1]
    try:
        size = float(amount[:-1]) * _UNITS[amount[-1]] if amount[-1] in _UNITS else float(amount)
    except ValueError:
        size = -1.0
    if not (size >= 1 and math.isfinite(size)):
        raise BenchError(f"bad checkpoint spec '{text}': size '{amount}' is not a positive number with an "
                         f"optional k/m/g suffix")
    return Spec(scenario.name, size, dtype)


def _format_amount(x: float) -> str:
    for unit, scale in (("g", 1e9), ("m", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def default_cache_dir() -> str:
    return os.environ.get("FASTCKPT_BENCH_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastckpt-bench")


@dataclasses.dataclass(frozen=True)
class UserFile:
    """A checkpoint of the user's own (`fastckpt bench FILE...`): timed as it is, .pt contenders only."""

    path: str
    scenario = "file"

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def ensure(spec: Spec | UserFile, cache_dir: str, log: Callable[[str], None] = lambda msg: None) -> dict:
    """The manifest of `spec` in `cache_dir`, generating the files first unless a valid copy is cached."""
    if isinstance(spec, UserFile):
        return _user_manifest(spec, log)
    manifest_path = os.path.join(cache_dir, spec.name + ".json")
    manifest = _cached(manifest_path)
    if manifest is not None:
        return manifest
    os.makedirs(cache_dir, exist_ok=True)
    need = estimate_bytes(spec)
    free = shutil.disk_usage(cache_dir).free
    if need + DISK_RESERVE > free:
        raise BenchError(f"not generating {spec.name}: it needs about {need / 1e9:.2f} GB in {cache_dir} but only "
                         f"{free / 1e9:.2f} GB is free (and {DISK_RESERVE / 1e9:.1f} GB is kept spare); choose "
                         f"smaller sizes or another --cache-dir")
    log(f"generating {spec.name} (~{need / 2e9:.2f} GB x 2 formats) in {cache_dir}")
    return _write(spec, cache_dir, manifest_path)


def _user_manifest(spec: UserFile, log) -> dict:
    """The reference for correctness is torch.load's own result (weights_only=False: the user's file)."""
    import torch

    from fastckpt.bench.digest import digest, flatten

    if not os.path.isfile(spec.path):
        raise BenchError(f"{spec.path}: no such file")
    log(f"reading {spec.path} once with torch.load for the reference digest")
    obj = torch.load(spec.path, weights_only=False, map_location="cpu")
    return {"name": spec.name, "scenario": spec.scenario, "dtype": "?",
            "files": {"pt": {"path": os.path.abspath(spec.path), "bytes": os.path.getsize(spec.path)}},
            "elements": sum(t.numel() for _, t in flatten(obj) if isinstance(t, torch.Tensor)),
            "digest": digest(obj)}


def estimate_bytes(spec: Spec) -> int:
    """Both files together, rounded up: payload twice plus ~1 KB of zip/pickle/header per tensor."""
    itemsize = 2 if spec.dtype in ("bf16", "fp16") else 4
    if spec.scenario == "small":
        payload, tensors = spec.size * 16 * 4, spec.size
    elif spec.scenario == "moe":
        payload, tensors = spec.size * 64 * 192 * itemsize, spec.size
    else:
        payload, tensors = spec.size, 2000
    return int(2 * payload + 1000 * tensors + (1 << 20))


def _cached(manifest_path: str) -> dict | None:
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("generator_version") != GENERATOR_VERSION:
        return None
    for fmt in ("pt", "safetensors"):
        entry = manifest["files"][fmt]
        if not os.path.isfile(entry["path"]) or os.path.getsize(entry["path"]) != entry["bytes"]:
            return None
    return manifest


def _write(spec: Spec, cache_dir: str, manifest_path: str) -> dict:
    import torch

    from fastckpt.bench.digest import digest, flatten

    obj = _BUILDERS[spec.scenario](spec, _Filler(zlib.crc32(spec.name.encode()), getattr(torch, _DTYPES[spec.dtype])))
    tensors = [(path, leaf) for path, leaf in flatten(obj) if isinstance(leaf, torch.Tensor)]
    # Same stem in the staging directory, because torch.save names the archive after the file.
    staging = os.path.join(cache_dir, f".partial-{os.getpid()}")
    os.makedirs(staging, exist_ok=True)
    try:
        files = {}
        for fmt in ("pt", "safetensors"):
            tmp = os.path.join(staging, f"{spec.name}.{fmt}")
            if fmt == "pt":
                torch.save(obj, tmp)
            else:
                _write_safetensors(tmp, tensors)
            final = os.path.join(os.path.abspath(cache_dir), os.path.basename(tmp))
            os.replace(tmp, final)
            files[fmt] = {"path": final, "bytes": os.path.getsize(final)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {
        "name": spec.name,
        "scenario": spec.scenario,
        "dtype": spec.dtype,
        "generator_version": GENERATOR_VERSION,
        "torch_version": torch.__version__,
        "files": files,
        "elements": sum(t.numel() for _, t in tensors),  # parameters, plus optimizer state for `train`
        "digest": digest(obj),
    }
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest


_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64",
              "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _write_safetensors(path: str, tensors) -> None:
    """Written by hand rather than with safetensors.save_file, which reorders tensors (by dtype, then name)."""
    from fastckpt.bench.digest import tensor_bytes

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in tensors:
            f.write(tensor_bytes(t).numpy().data)


class _Filler:
    """Seeded values at memcpy speed: each tensor copies slices of one random pool at seeded offsets
    (drawing fresh normals for gigabytes would dominate a quick run)."""

    POOL = 1 << 22

    def __init__(self, seed: int, dtype):
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.pool = torch.empty(2 * self.POOL, dtype=dtype).normal_(0.0, 0.02, generator=self.generator)

    def __call__(self, *shape: int):
        import torch

        out = torch.empty(math.prod(shape), dtype=self.dtype)
        pos = 0
        while pos < out.numel():
            start = int(torch.randint(self.POOL, (1,), generator=self.generator))
            n = min(self.POOL, out.numel() - pos)
            out[pos:pos + n] = self.pool[start:start + n]
            pos += n
        return out.view(shape)

    def ones(self, n: int):
        import torch

        return torch.ones(n, dtype=self.dtype)


def _pick_width(params: float, per_layer, fixed, want_layers: int, widths=(64, 128, 256, 512, 768, 1024, 1536,
                                                                           2048, 3072, 4096, 5120, 8192)):
    """The hidden size whose layer count (to reach `params`) is closest to `want_layers`."""
    best = (widths[0], 1)
    for h in widths:
        layers = round((params - fixed(h)) / per_layer(h))
        if layers >= 1 and abs(math.log(layers / want_layers)) < abs(math.log(best[1] / want_layers)):
            best = (h, layers)
    return best


def _llm(spec: Spec, fill: _Filler):
    vocab = 32000
    ffn = lambda h: -(-8 * h // 3 // 64) * 64  # noqa: E731  (SwiGLU width, rounded up to 64)
    h, layers = _pick_width(spec.size / fill.pool.element_size(), lambda h: 4 * h * h + 3 * h * ffn(h) + 2 * h,
                            lambda h: 2 * vocab * h + h, want_layers=32)
    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = fill(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}self_attn.{proj}.weight"] = fill(h, h)
        sd[f"{p}mlp.gate_proj.weight"] = fill(ffn(h), h)
        sd[f"{p}mlp.up_proj.weight"] = fill(ffn(h), h)
        sd[f"{p}mlp.down_proj.weight"] = fill(h, ffn(h))
        sd[f"{p}input_layernorm.weight"] = fill.ones(h)
        sd[f"{p}post_attention_layernorm.weight"] = fill.ones(h)
    sd["model.norm.weight"] = fill.ones(h)
    sd["lm_head.weight"] = fill(vocab, h)
    return sd


def _small(spec: Spec, fill: _Filler):
    return OrderedDict((f"tensor.{i}", fill(16)) for i in range(int(spec.size)))


def _moe(spec: Spec, fill: _Filler):
    experts, hidden, ffn = 64, 192, 64
    sd = OrderedDict()
    for i in range(max(1, round(spec.size / (1 + 3 * experts)))):
        p = f"model.layers.{i}.mlp."
        sd[f"{p}gate.weight"] = fill(experts, hidden)
        for e in range(experts):
            sd[f"{p}experts.{e}.gate_proj.weight"] = fill(ffn, hidden)
            sd[f"{p}experts.{e}.up_proj.weight"] = fill(ffn, hidden)
            sd[f"{p}experts.{e}.down_proj.weight"] = fill(hidden, ffn)
    return sd


def _train(spec: Spec, fill: _Filler):
    import torch

    vocab = 8192
    # weights + exp_avg + exp_avg_sq, all of the model's dtype
    h, layers = _pick_width(spec.size / fill.pool.element_size() / 3, lambda h: 12 * h * h + 13 * h,
                            lambda h: vocab * h, want_layers=12)
    model = OrderedDict()
    model["embedding.weight"] = fill(vocab, h)
    for i in range(layers):  # nn.TransformerEncoderLayer's parameter names and shapes
        p = f"encoder.layers.{i}."
        model[f"{p}self_attn.in_proj_weight"] = fill(3 * h, h)
        model[f"{p}self_attn.in_proj_bias"] = fill(3 * h)
        model[f"{p}self_attn.out_proj.weight"] = fill(h, h)
        model[f"{p}self_attn.out_proj.bias"] = fill(h)
        model[f"{p}linear1.weight"] = fill(4 * h, h)
        model[f"{p}linear1.bias"] = fill(4 * h)
        model[f"{p}linear2.weight"] = fill(h, 4 * h)
        model[f"{p}linear2.bias"] = fill(h)
        for norm in ("norm1", "norm2"):
            model[f"{p}{norm}.weight"] = fill.ones(h)
            model[f"{p}{norm}.bias"] = fill(h)
    params = [torch.nn.Parameter(t) for t in model.values()]  # shares storage: the step updates `model`
    for p in params:
        p.grad = fill(*p.shape)
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    optimizer.step()
    return {
        "model": model,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": {"base_lrs": [3e-4], "last_epoch": 1000, "_step_count": 1001, "_last_lr": [2.97e-4]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 17},
        "epoch": 3,
        "global_step": 1000,
        "rng_state": fill.generator.get_state(),
        "config": {"hidden": h, "layers": layers, "vocab": vocab, "dtype": spec.dtype, "optimizer": "AdamW"},
    }


_BUILDERS = {"llm": _llm, "small": _small, "moe": _moe, "train": _train}
