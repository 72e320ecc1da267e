"""Saving: fastckpt.save against torch.save (with CRC-32, its default, and with compute_crc32=False).

Every measurement runs in a fresh process, which builds the object (seeded) and times three saves:
"first", the first save of the process (to a scratch path, then deleted); "new", a save to a path where no
file exists; "replace", a save over the file "new" has just written (whose pages are then still dirty in
the page cache: torch truncates them away first, an atomic save keeps them until the new file is
complete). Contenders take turns within each round, the order rotating between rounds, and ratios are
taken pair by pair within a round, so machine noise hits all alike:

    python benchmarks/bench_save.py [--cases llm,small,train] [--llm-mb 2048] [--small 100000]
                                    [--train-mb 256] [--rounds 3] [--dir DIR]

Cases: ``llm`` a Llama-like bf16 state dict of about --llm-mb MB (embed, q/k/v/o, gate/up/down, norms,
lm_head); ``small`` --small tensors of 16 fp32; ``train`` a training checkpoint (an MLP of about
--train-mb MB of fp32 weights, its AdamW state after one step, the RNG state and an LR scheduler).
Files go to --dir (default: a temporary directory on the same disk as /tmp), removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONTENDERS = ("torch", "torch-nocrc", "fastckpt")
KINDS = ("new", "replace", "first")


def build(case: str, args: dict):
    import torch

    torch.manual_seed(0)
    if case == "llm":
        hidden = 2048
        layer = 12 * hidden * hidden + 2 * hidden  # q,k,v,o (4 h^2) + gate,up,down (3 * h * 8/3 h) + norms
        vocab = 32_000
        layers = max(1, (args["llm_mb"] * 2**20 // 2 - 2 * vocab * hidden) // layer)
        shapes = {"model.embed_tokens.weight": (vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
            for name, shape in (("gate_proj", (hidden * 8 // 3, hidden)), ("up_proj", (hidden * 8 // 3, hidden)),
                                ("down_proj", (hidden, hidden * 8 // 3))):
                shapes[p + f"mlp.{name}.weight"] = shape
            shapes[p + "input_layernorm.weight"] = (hidden,)
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes["model.norm.weight"] = (hidden,)
        shapes["lm_head.weight"] = (vocab, hidden)
        return {k: torch.empty(s, dtype=torch.bfloat16).uniform_() for k, s in shapes.items()}
    if case == "small":
        return {f"t{i}": torch.full((16,), float(i)) for i in range(args["small"])}
    if case == "train":
        width = max(64, int((args["train_mb"] * 2**20 / 4 / 4) ** 0.5))
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, width)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100)
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(), "epoch": 1}
    raise ValueError(case)


def worker(spec: dict) -> dict:
    import torch
    from torch.utils.serialization import config

    import fastckpt

    obj = build(spec["case"], spec)
    save = fastckpt.save if spec["contender"] == "fastckpt" else torch.save
    if spec["contender"] == "torch-nocrc":
        config.save.compute_crc32 = False
    path = spec["path"]
    times = {}
    for key, target in (("first", path + ".first"), ("new", path), ("replace", path)):
        t0 = time.perf_counter()
        save(obj, target)
        times[key] = time.perf_counter() - t0
        if key == "first":
            os.unlink(target)
    times["bytes"] = os.path.getsize(path)
    os.unlink(path)
    return times


def run_worker(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="llm,small,train")
    parser.add_argument("--llm-mb", type=int, default=2048)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--train-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    directory = tempfile.mkdtemp(prefix="fastckpt-save-", dir=args.dir)
    sizes = {"llm_mb": args.llm_mb, "small": args.small, "train_mb": args.train_mb}
    for case in args.cases.split(","):
        samples = {c: [] for c in CONTENDERS}
        for r in range(args.rounds):
            order = CONTENDERS[r % 3:] + CONTENDERS[:r % 3]
            for contender in order:
                spec = {"case": case, "contender": contender, "path": os.path.join(directory, f"{case}.pt"), **sizes}
                samples[contender].append(run_worker(spec))
                print(f"{case} round {r} {contender}: {samples[contender][-1]}", file=sys.stderr)
        mb = samples["torch"][0]["bytes"] / 1e6
        print(f"\n{case} ({mb:.0f} MB file), median of {args.rounds} fresh processes:")
        for c in CONTENDERS:
            t = {k: statistics.median(s[k] for s in samples[c]) for k in KINDS}
            print(f"  {c:12s} " + "   ".join(f"{k} {t[k]:7.3f} s" for k in KINDS))
        for ref in ("torch", "torch-nocrc"):
            for key in KINDS:
                ratios = [f[key] / t[key] for f, t in zip(samples["fastckpt"], samples[ref])]
                print(f"  fastckpt / {ref:11s} ({key:7s}): {statistics.median(ratios):.2f} "
                      f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    os.rmdir(directory)


if __name__ == "__main__":
    main()
