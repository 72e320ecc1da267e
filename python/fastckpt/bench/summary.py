"""Medians, % of ceiling and pairwise ratios, computed from the raw samples of a results document.

Times: `load_s` is the call as it returns, `ready_s` adds touching every page of every storage. An
eager load is ready when it returns; a lazy (mmap) one is not, so `load_s` is compared only between
lazy contenders, and `ready_s` between any two.
"""

from __future__ import annotations

import statistics

from fastckpt.bench.contenders import BASELINE

FASTCKPT_FAMILY = "fastckpt"


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def annotate(results: dict) -> None:
    """Add `summary` (per contender) and `ratios` (per pair) to every case of `results`, in place."""
    contenders = {c["id"]: c for c in results["config"]["contenders"]}
    for case in results["cases"]:
        manifest = results["checkpoints"][case["checkpoint"]]
        ran = {s["contender"] for s in case["samples"]}  # device-only contenders sit out CPU cases
        here = {cid: c for cid, c in contenders.items() if cid in ran}
        lazy = {cid: c["lazy"] and case["device"] == "cpu" for cid, c in here.items()}
        case["summary"] = {cid: _summarize(case, cid, lazy[cid], manifest, results["ceilings"]) for cid in here}
        case["ratios"] = _ratios(case, here, lazy)


def _summarize(case: dict, cid: str, lazy: bool, manifest: dict, ceilings: dict | None) -> dict:
    samples = [s for s in case["samples"] if s["contender"] == cid]
    ok = [s for s in samples if s["status"] == "ok"]
    ready = stats([s["ready_s"] for s in ok])
    out = {
        "lazy": lazy,
        "runs": len(samples),
        "ok": len(ok),
        "not_cold": sum(s["status"] == "not-cold" for s in samples),
        "errors": sorted({s["error"] for s in samples if s["status"] == "error"}),
        "correct": all(s["correct"] for s in ok) if ok else None,
        "load_s": stats([s["load_s"] for s in ok]),
        "ready_s": ready,
        "cpu_ready_s": stats([s["cpu_ready_s"] for s in ok]),
        "rss_growth_bytes": stats([s["rss_ready"] - s["rss_base"] for s in ok]),
        "cuda_max_allocated": stats([s["cuda_max_allocated"] for s in ok if "cuda_max_allocated" in s]),
        "gbps": None,
        "us_per_tensor": None,
        "ceiling": None,
    }
    if ready:
        out["gbps"] = manifest["digest"]["storage_bytes"] / ready["median"] / 1e9
        out["us_per_tensor"] = ready["median"] / max(1, manifest["digest"]["n_tensors"]) * 1e6
        limit = ceiling(ceilings, manifest["files"]["pt"]["path"], case["mode"], case["device"], lazy,
                        same_state_map=max((s["map_gbps"] for s in ok if "map_gbps" in s), default=None))
        if limit:
            out["ceiling"] = {"name": limit[0], "gbps": limit[1], "percent": 100 * out["gbps"] / limit[1]}
    return out


def ceiling(ceilings: dict | None, path: str, mode: str, device: str, lazy: bool,
            same_state_map: float | None = None) -> tuple[str, float] | None:
    """The relevant physical limit (name, GB/s) for a load, or None when it was not measured.

    For warm lazy loads that is mapping the file, measured by the contender's workers right after
    their loads (`same_state_map`, the best of them: the file they loaded, in the page-cache state
    they saw); the run-wide figure is taken in another state."""
    files = (ceilings or {}).get("files", {}).get(path)
    if not files:
        return None
    candidates = []
    if device == "cpu":
        if mode == "cold":
            candidates.append(("cold read", files.get("cold_read")))
        else:
            candidates.append(("page-cache map", same_state_map or files["pagecache_map"]) if lazy
                              else ("warm eager", files["warm_eager"]))
    else:
        candidates.append(("H2D pinned", ceilings.get("h2d_pinned")))
        if mode == "cold":
            candidates.append(("cold read", files.get("cold_read")))
    measured = [c for c in candidates if c[1]]
    return min(measured, key=lambda c: c[1]) if measured else None


def _ratios(case: dict, contenders: dict, lazy: dict) -> list[dict]:
    """time(a) / time(b) per round, over rounds where both loads ran and were correct."""
    ids = list(contenders)
    pairs = [(a, BASELINE) for a in ids if a != BASELINE and BASELINE in ids]
    pairs += [(a, b) for a in ids if contenders[a]["family"] == FASTCKPT_FAMILY for b in ids if b != a]
    by_round: dict[tuple[str, int], dict] = {
        (s["contender"], s["round"]): s for s in case["samples"] if s["status"] == "ok" and s["correct"]}
    rounds = sorted({s["round"] for s in case["samples"]})
    out = []
    for a, b in dict.fromkeys(pairs):
        for metric in ("ready_s", "load_s"):
            if metric == "load_s" and not (lazy[a] and lazy[b]):
                continue
            values = [by_round[a, r][metric] / by_round[b, r][metric] for r in rounds
                      if (a, r) in by_round and (b, r) in by_round]
            if values:
                out.append({"a": a, "b": b, "metric": metric, **stats(values)})
    return out
