"""The GPU check's measurements (run by benchmarks/gpu_check.sh after it built and installed fastckpt).

    python benchmarks/gpu_check.py --out DIR --repo CHECKOUT --deadline-s SECONDS

Steps, each recorded in DIR/results.json as soon as it ends (a timeout keeps what was measured):
the CUDA tests; an 8 GB bf16 LLM-shaped checkpoint (generated once, kept in $FASTCKPT_BENCH_DIR, which
must not be tmpfs); the ceilings of this run (pinned host→device copy, and pread of the page-cached
file into pinned buffers on every core); loads in fresh processes — fastckpt (warm page cache),
torch.load(map_location="cuda") (warm), fastckpt mmap=True (warm), fastckpt after eviction (cold,
checked with mincore) — each row's tensors digested on the device and compared with torch.load's;
fastckpt.save against torch.save of the same CUDA tensors (bytes, peak RSS). Exit status 0 only when
every check passes and every target is met; one line with the figures is printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
import zipfile

WARM_TARGET = 0.85  # of min(pinned H2D, pread into pinned)
SPEEDUP_TARGET = 3.0  # over torch.load(map_location="cuda"), warm
GB = 1e9


# --------------------------------------------------------------------------- workers (fresh processes)


def _cuda_ready():
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")  # the context exists before any clock starts
    return torch


def _state(torch, layers: int, device: str):
    """Llama-shaped bf16 weights (hidden 4096, MLP 11008, vocab 32000): ~0.4 GB a layer."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden, mlp, vocab = 4096, 11008, 32000

    def w(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}self_attn.{proj}.weight"] = w(hidden, hidden)
        for proj, shape in (("gate_proj", (mlp, hidden)), ("up_proj", (mlp, hidden)), ("down_proj", (hidden, mlp))):
            sd[f"{p}mlp.{proj}.weight"] = w(*shape)
        sd[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=device)
        sd[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    sd["lm_head.weight"] = w(vocab, hidden)
    return sd


def _digest(torch, obj) -> list:
    """Per tensor: key, dtype, shape, stride, offset, device and two integer sums of its bytes,
    computed on the device (exact: a moved or changed byte changes the weighted sum)."""
    out = []
    for key, t in obj.items():
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        s1 = s2 = 0
        step = 1 << 26
        for start in range(0, b.numel(), step):
            part = b[start : start + step].to(torch.int64)
            weights = (torch.arange(start, start + part.numel(), device=b.device, dtype=torch.int64) % 65521) + 1
            s1 += int(part.sum())
            s2 += int((part * weights).sum())
        out.append([key, str(t.dtype), list(t.shape), list(t.stride()), t.storage_offset(), str(t.device), s1, s2])
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_generate(path: str, layers: int) -> dict:
    torch = _cuda_ready()
    sd = {k: v.cpu() for k, v in _state(torch, layers, "cuda").items()}
    tmp = path + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return {"bytes": os.path.getsize(path), "tensors": len(sd)}


def worker_ceilings(path: str) -> dict:
    torch = _cuda_ready()
    out = {}
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    out["h2d_pinned"] = src.numel() / best / GB
    del src, dst

    size, block = os.path.getsize(path), 64 << 20
    threads = os.cpu_count() or 1
    buffers = [torch.empty(block, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    views = [memoryview(b.numpy()) for b in buffers]
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(i):
            for off in range(i * block, size, threads * block):
                os.preadv(fd, [views[i][: min(block, size - off)]], off)

        best = float("inf")
        for _ in range(2):
            workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t)
    finally:
        os.close(fd)
    out["pread_pinned"] = size / best / GB
    out["threads"] = threads
    return out


def worker_load(path: str, contender: str, repeat: int) -> dict:
    torch = _cuda_ready()
    import fastckpt

    def load():
        if contender == "torch":
            return torch.load(path, map_location="cuda", weights_only=True)
        return fastckpt.load(path, map_location="cuda", mmap=contender == "fastckpt-mmap")

    seconds, result = [], None
    for _ in range(repeat):
        result = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = load()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    return {"seconds": seconds, "cuda_peak": torch.cuda.max_memory_allocated(), "max_rss_mb": _rss_mb(),
            "digest": _digest(torch, result)}


def worker_save(path: str, writer: str, layers: int) -> dict:
    torch = _cuda_ready()
    import fastckpt

    sd = _state(torch, layers, "cuda")
    torch.cuda.synchronize()
    rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    t = time.perf_counter()
    (torch.save if writer == "torch" else fastckpt.save)(sd, path)
    return {"seconds": time.perf_counter() - t, "rss_before_mb": rss_before, "max_rss_mb": _rss_mb()}


WORKERS = {"generate": worker_generate, "ceilings": worker_ceilings, "load": worker_load, "save": worker_save}


# --------------------------------------------------------------------------- the orchestrator


class Check:
    def __init__(self, out: str, deadline_s: float):
        self.out = out
        self.deadline = time.monotonic() + deadline_s
        self.results: dict = {"facts": {}, "steps": {}, "failures": []}
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = os.path.join(self.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, os.path.join(self.out, "results.json"))

    def record(self, name: str, value) -> None:
        self.results["steps"][name] = value
        self.save()

    def fail(self, why: str) -> None:
        self.results["failures"].append(why)
        self.save()

    def worker(self, name: str, kind: str, *args, cap: float):
        """Runs a worker in a fresh process under min(cap, time left); its result, or None (recorded)."""
        limit = min(cap, self.left() - 5)
        if limit < 5:
            self.fail(f"{name}: no time left")
            return None
        cmd = [sys.executable, os.path.abspath(__file__), "worker", kind, json.dumps(args)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            self.fail(f"{name}: timed out after {limit:.0f} s")
            return None
        if done.returncode != 0:
            with open(os.path.join(self.out, f"{name}.log"), "w") as f:
                f.write(done.stdout + done.stderr)
            self.fail(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}")
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])


def _fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (the longest matching mount point)."""
    path, best, kind = os.path.realpath(path), "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            mount = mount.replace("\\040", " ")
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind


def _tests(check: Check, repo: str) -> None:
    cap = min(150, check.left() - 200)  # leave the benchmark its time
    if cap < 30:
        check.fail("tests: no time left")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_devices.py",
           "tests/test_cuda.py"]
    try:
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=cap)
        log, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    with open(os.path.join(check.out, "tests.log"), "w") as f:
        f.write(log)
    summary = next((line for line in reversed(log.splitlines()) if " in " in line and ("passed" in line or "failed" in line)), "")
    check.record("tests", {"rc": rc, "summary": summary.strip("= ")})
    if rc != 0:
        check.fail(f"CUDA tests: {summary.strip('= ') or rc}")


def _same_archives(a: str, b: str) -> tuple[bool, str]:
    """Every record of the two archives equal, but the serialization id (random per save)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False, f"sizes {os.path.getsize(a)} vs {os.path.getsize(b)}"
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        names = [i.filename for i in za.infolist()]
        if names != [i.filename for i in zb.infolist()]:
            return False, "record names differ"
        for name in names:
            if name.endswith("serialization_id"):
                continue
            ha, hb = hashlib.blake2b(), hashlib.blake2b()
            with za.open(name) as fa, zb.open(name) as fb:
                for f, h in ((fa, ha), (fb, hb)):
                    while chunk := f.read(16 << 20):
                        h.update(chunk)
            if ha.digest() != hb.digest():
                return False, f"record {name} differs"
    return True, "equal"


def orchestrate(out: str, repo: str, deadline_s: float) -> int:
    import torch

    from fastckpt.bench import coldcache

    check = Check(out, deadline_s)
    check.results["facts"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "fastckpt": __import__("fastckpt").__version__,
    }
    check.save()
    _tests(check, repo)

    data = os.environ.get("FASTCKPT_BENCH_DIR") or os.path.join(repo, ".gpu-check-data")
    os.makedirs(data, exist_ok=True)
    fs = _fs_type(data)
    check.record("bench_dir", {"path": data, "fs": fs})
    if fs in ("tmpfs", "ramfs"):
        check.fail(f"{data} is on {fs}: cold loads would read memory; set FASTCKPT_BENCH_DIR to a disk")
        return finish(check)
    path = os.path.join(data, "llm-8g-bf16.pt")
    if not os.path.exists(path):
        made = check.worker("generate", "generate", path, 19, cap=150)
        if made is None:
            return finish(check)
    size = os.path.getsize(path)
    check.record("file", {"path": path, "bytes": size, "warm_resident": coldcache.warm(path)})

    ceilings = check.worker("ceilings", "ceilings", path, cap=60)
    if ceilings is not None:
        ceilings["ceiling"] = min(ceilings["h2d_pinned"], ceilings["pread_pinned"])
        check.record("ceilings", ceilings)

    rows = {}
    for name, contender, cold, repeat in (("fastckpt warm", "fastckpt", False, 2), ("torch warm", "torch", False, 1),
                                          ("fastckpt-mmap warm", "fastckpt-mmap", False, 1),
                                          ("fastckpt cold", "fastckpt", True, 1)):
        row = {"contender": contender, "cold": cold}
        if cold:
            coldcache.evict(path)
            row["resident_before"] = coldcache.resident_fraction(path)
            if row["resident_before"] > 0.02:
                check.fail(f"{name}: eviction left {row['resident_before']:.0%} of the file cached")
        else:
            row["resident_before"] = coldcache.warm(path)
        got = check.worker(name, "load", path, contender, repeat, cap=120)
        if got is None:
            continue
        row.update(got)
        row["gbps"] = size / got["seconds"][0] / GB
        rows[name] = row
        check.record("rows", {k: {kk: vv for kk, vv in v.items() if kk != "digest"} for k, v in rows.items()})
    ref = rows.get("torch warm", {}).get("digest")
    identical = {name: ref is not None and row["digest"] == ref for name, row in rows.items()}
    check.record("identical_to_torch", identical)
    for name, same in identical.items():
        if not same:
            check.fail(f"{name}: result differs from torch.load(map_location='cuda')" if ref else
                       f"{name}: no torch.load row to compare with")

    saves = {}
    for writer in ("torch", "fastckpt"):
        folder = os.path.join(data, f"save-{writer}")
        os.makedirs(folder, exist_ok=True)
        got = check.worker(f"save {writer}", "save", os.path.join(folder, "state.pt"), writer, 4, cap=90)
        if got is not None:
            saves[writer] = got
    if len(saves) == 2:
        same, why = _same_archives(*(os.path.join(data, f"save-{w}", "state.pt") for w in ("torch", "fastckpt")))
        saves["identical"], saves["why"] = same, why
        if not same:
            check.fail(f"fastckpt.save of CUDA tensors: {why}")
    check.record("save", saves)
    for writer in ("torch", "fastckpt"):
        with_file = os.path.join(data, f"save-{writer}", "state.pt")
        if os.path.exists(with_file):
            os.remove(with_file)
    return finish(check)


def finish(check: Check) -> int:
    s = check.results["steps"]
    rows, ceilings = s.get("rows", {}), s.get("ceilings")
    facts = check.results["facts"]
    parts = [f"gpu_check: torch {facts.get('torch')} {facts.get('gpu')}",
             f"tests {s.get('tests', {}).get('summary') or 'not run'}"]
    warm, base = rows.get("fastckpt warm"), rows.get("torch warm")
    if warm:
        line = f"fastckpt warm {warm['gbps']:.1f} GB/s ({warm['seconds'][0]:.2f} s; 2nd in process {warm['seconds'][-1]:.2f} s)"
        if ceilings:
            percent = warm["gbps"] / ceilings["ceiling"]
            line += (f" = {percent:.0%} of min(H2D pinned {ceilings['h2d_pinned']:.1f}, pread->pinned "
                     f"{ceilings['pread_pinned']:.1f} GB/s)")
            if percent < WARM_TARGET:
                check.fail(f"warm load at {percent:.0%} of the ceiling (< {WARM_TARGET:.0%})")
        else:
            check.fail("no ceiling measured")
        parts.append(line)
        if base:
            speedup = base["seconds"][0] / warm["seconds"][0]
            parts.append(f"{speedup:.1f}x torch.load ({base['seconds'][0]:.2f} s)")
            if speedup < SPEEDUP_TARGET:
                check.fail(f"speed-up {speedup:.1f}x < {SPEEDUP_TARGET:.0f}x over torch.load")
    else:
        check.fail("no warm fastckpt row")
    for name in ("fastckpt-mmap warm", "fastckpt cold"):
        if name in rows:
            parts.append(f"{name} {rows[name]['gbps']:.1f} GB/s")
    ident = s.get("identical_to_torch", {})
    parts.append("rows identical to torch.load" if ident and all(ident.values()) else "ROWS DIFFER OR MISSING")
    save = s.get("save", {})
    if "fastckpt" in save and "torch" in save:
        parts.append(f"save {'bytes equal' if save.get('identical') else 'BYTES DIFFER'}, peak RSS torch "
                     f"{save['torch']['max_rss_mb']:.0f} MB / fastckpt {save['fastckpt']['max_rss_mb']:.0f} MB "
                     f"(state on device; {save['fastckpt']['rss_before_mb']:.0f} MB before)")
    failures = check.results["failures"]
    parts.append("PASS" if not failures else "FAIL: " + "; ".join(failures))
    check.results["line"] = " | ".join(parts)
    check.results["passed"] = not failures
    check.save()
    print(check.results["line"])
    return 0 if not failures else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        result = WORKERS[argv[1]](*json.loads(argv[2]))
        print(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--deadline-s", type=float, default=400)
    args = p.parse_args(argv)
    return orchestrate(args.out, args.repo, args.deadline_s)


if __name__ == "__main__":
    sys.exit(main())
