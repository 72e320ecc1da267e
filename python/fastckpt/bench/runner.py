"""The schedule: checkpoints x devices x warm/cold, each a set of rounds of fresh-process loads.

Within a case every round runs each contender once, in the same order (A B C A B C ...), so that
ratios can be taken pair by pair within a round: on a shared, noisy machine a slow spell then hits
both sides of a ratio instead of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable

from fastckpt.bench import coldcache, generate, summary
from fastckpt.bench.contenders import Contender

SCHEMA = "fastckpt-bench/1"
WORKER_TIMEOUT_S = 3600
CEILING_BYTES = 256 << 20


@dataclasses.dataclass
class Config:
    checkpoints: list[generate.Spec]
    contenders: list[Contender]
    modes: list[str]  # "warm", "cold"
    devices: list[str]  # "cpu", "cuda:N"
    rounds: int
    cache_dir: str
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # contender id -> why it cannot run
    ceilings: bool = True


def run(config: Config, log: Callable[[str], None]) -> dict:
    """Generate what is missing, measure the ceilings, run every case; returns the results document."""
    started = time.time()
    load_before = os.getloadavg()
    manifests = [generate.ensure(spec, config.cache_dir, log) for spec in config.checkpoints]
    ceilings = None
    if config.ceilings:
        cold = "cold" in config.modes
        cuda = next((d for d in config.devices if d.startswith("cuda")), None)
        log(f"measuring ceilings (memcpy, populate, page cache, warm eager{', cold reader search' if cold else ''}"
            f"{', H2D' if cuda else ''})")
        ceilings = call_python("fastckpt.bench.ceilings", {
            "files": [m["files"]["pt"]["path"] for m in manifests], "cuda": cuda, "bytes": CEILING_BYTES,
            "cold": cold})
    grid = [(m, device, mode) for m in manifests for device in config.devices for mode in config.modes]
    runs = sum(len(case_contenders(m, device, config.contenders)) for m, device, _ in grid)
    progress = _Progress(runs * config.rounds, log)
    cases = [run_case(m, mode, device, config.contenders, config.rounds, progress) for m, device, mode in grid]
    results = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": None,
        "machine": machine_facts(ceilings),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "config": {
            "checkpoints": [s.name for s in config.checkpoints],
            "contenders": [{"id": c.id, "label": c.label, "family": c.family, "fmt": c.fmt, "lazy": c.lazy,
                            "device_only": c.device_only} for c in config.contenders],
            "modes": config.modes,
            "devices": config.devices,
            "rounds": config.rounds,
            "cache_dir": config.cache_dir,
        },
        "skipped": config.skipped,
        "ceilings": ceilings,
        "checkpoints": {m["name"]: m for m in manifests},
        "cases": cases,
    }
    summary.annotate(results)
    results["elapsed_s"] = time.time() - started
    return results


def run_case(manifest: dict, mode: str, device: str, contenders: list[Contender], rounds: int,
             progress: "_Progress") -> dict:
    case = {"checkpoint": manifest["name"], "mode": mode, "device": device, "samples": []}
    contenders = case_contenders(manifest, device, contenders)
    if mode == "warm":
        # The warm-up: every file read once, then checked resident (each worker records it again).
        case["warmup_resident"] = {fmt: coldcache.warm(manifest["files"][fmt]["path"])
                                   for fmt in sorted({c.fmt for c in contenders})}
    for r in range(rounds):
        requests = [{"contender": c.id, "path": manifest["files"][c.fmt]["path"], "device": device,
                     "cold": mode == "cold"} for c in contenders]
        for c, sample in zip(contenders, run_batch(requests)):
            sample.update(contender=c.id, round=r, correct=is_correct(sample, manifest["digest"], c, device))
            case["samples"].append(sample)
            progress.step(case, c, r, rounds, sample)
    return case


def case_contenders(manifest: dict, device: str, contenders: list[Contender]) -> list[Contender]:
    """The contenders that run in a case: a user's .pt has no .safetensors twin; some run on a device only."""
    return [c for c in contenders if c.fmt in manifest["files"] and c.runs_on(device)]


def is_correct(sample: dict, reference: dict, contender: Contender, device: str) -> bool | None:
    """Does the load equal the reference (the generator's own object, which torch.load reproduces)?

    A .pt loader must match everything torch.load returns; a safetensors load only the tensors (its
    file has no containers or non-tensor values). None when there is nothing to check.
    """
    got = sample.get("digest")
    if got is None:
        return None
    if got["tensors"] != reference["tensors"] or got["n_tensors"] != reference["n_tensors"]:
        return False
    if contender.fmt == "pt" and got["structure"] != reference["structure"]:
        return False
    return got["devices"] == ([device] if reference["n_tensors"] else [])


def run_batch(requests: list[dict]):
    """Start one worker per request, let them all import side by side, then time them one at a time.

    Yields each result as soon as it is in. Only one worker is ever past its `ready` line, so a
    timed load never shares the machine with another worker's imports.
    """
    workers = [_Worker(request) for request in requests]
    try:
        for w in workers:
            w.wait_ready()
        for w in workers:
            yield w.finish()
    finally:
        for w in workers:
            w.kill()


class _Worker:
    def __init__(self, request: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty import cannot block
        self.proc = subprocess.Popen([sys.executable, "-m", "fastckpt.bench.worker", json.dumps(request)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.early: list[str] = []  # what it printed instead of `ready` (an error found while importing)

    def wait_ready(self) -> None:
        for line in self.proc.stdout:
            if line.strip() == "ready":
                return
            self.early.append(line)

    def finish(self) -> dict:
        try:  # (a worker that already exited is fine: communicate ignores the broken pipe)
            out, _ = self.proc.communicate("go\n", timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {WORKER_TIMEOUT_S} s"}
        self.stderr.seek(0)
        return _last_json("".join(self.early) + out, self.stderr.read(), self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def call_python(module: str, request: dict) -> dict:
    """Run `python -m module REQUEST` and return the JSON object it prints last (or an error record)."""
    try:
        proc = subprocess.run([sys.executable, "-m", module, json.dumps(request)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    return _last_json(proc.stdout, proc.stderr, proc.returncode)


def _last_json(stdout: str, stderr: str, returncode: int) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "error", "error": f"exit status {returncode}: {tail}"}
    return json.loads(lines[-1])


def machine_facts(ceilings: dict | None) -> dict:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in _read_lines("/proc/meminfo")
                if line.startswith("MemTotal:")), None)
    thp = (_read_lines("/sys/kernel/mm/transparent_hugepage/enabled") or [None])[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "transparent_hugepages": thp,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "safetensors": version("safetensors"),
        "numpy": version("numpy"),
        "fastckpt": version("fastckpt"),
        "gpu": (ceilings or {}).get("gpu"),
    }


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


class _Progress:
    """One stderr line per load: where the run is and what the load just measured."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log = total, 0, log

    def step(self, case: dict, c: Contender, r: int, rounds: int, sample: dict) -> None:
        self.done += 1
        if sample["status"] == "ok":
            what = f"ready {sample['ready_s']:.4f} s" + ("" if sample["correct"] else "  WRONG RESULT")
        else:
            what = sample["status"] + (f": {sample['error']}" if "error" in sample else "")
        self.log(f"[{self.done:>{len(str(self.total))}}/{self.total}] {case['checkpoint']} {case['mode']} "
                 f"{case['device']} {c.id} (round {r + 1}/{rounds}): {what}")
