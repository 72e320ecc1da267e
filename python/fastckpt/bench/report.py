"""What a run shows: a terminal table, results.json (every raw sample) and a PNG plot."""

from __future__ import annotations

import json
import os

from fastckpt.bench.contenders import BASELINE
from fastckpt.bench.summary import FASTCKPT_FAMILY


def _num(x: float | None) -> str:
    """Three significant digits, without exponents for the magnitudes a load produces."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _spread(s: dict | None) -> str:
    """A ratio: two significant digits are all the noise on a shared machine allows."""
    return "-" if not s else f"{s['median']:.2g} ({s['min']:.2g}-{s['max']:.2g})"


def format_table(results: dict) -> str:
    contenders = {c["id"]: c for c in results["config"]["contenders"]}
    machine, load = results["machine"], results["load_average"]
    lines = [f"fastckpt bench: {results['config']['rounds']} round(s) per case, fresh process per load; "
             f"{machine['cpu']}, {machine['cores_usable']} cores; load average {load['before'][0]:.1f} -> "
             f"{load['after'][0]:.1f}"]
    for cid, reason in results.get("skipped", {}).items():
        lines.append(f"skipped {cid}: {reason}")
    lines += _ceiling_lines(results)
    for case in results["cases"]:
        lines += [""] + _case_lines(case, results["checkpoints"][case["checkpoint"]], contenders)
    return "\n".join(line.rstrip() for line in lines)


def _ceiling_lines(results: dict) -> list[str]:
    c = results.get("ceilings")
    if not c:
        return ["ceilings: not measured"]
    if c.get("status") == "error":
        return [f"ceilings: failed ({c['error']})"]
    line = f"ceilings: memcpy (1 core) {c['memcpy_1core']:.1f} GB/s, populate fresh memory (all cores) {c['populate']:.1f} GB/s"
    if "h2d_pinned" in c:
        line += f", H2D pinned {c['h2d_pinned']:.1f} GB/s, pageable {c['h2d_pageable']:.1f} GB/s ({c['gpu']})"
    lines = [line]
    for path, f in c["files"].items():
        if f["cold_read"]:
            how = f["cold_read_config"]
            cold = (f"{f['cold_read']:.2f} GB/s ({how['threads']} threads x {how['block'] >> 20} MiB"
                    f"{', O_DIRECT' if how['direct'] else ''}{_ahead(how)})")
        else:
            cold = f"not measured: {f['cold_read_note']}"
        lines.append(f"  {os.path.basename(path)}: warm eager {f['warm_eager']:.1f} GB/s, page-cache read "
                     f"{f['pagecache_read']:.1f} GB/s, page-cache map {f['pagecache_map']:.1f} GB/s, cold read {cold}")
    return lines


def _ahead(how: dict) -> str:
    return f", WILLNEED {how['ahead'] >> 20} MiB ahead" if how.get("ahead") else ""


def _case_lines(case: dict, manifest: dict, contenders: dict) -> list[str]:
    d = manifest["digest"]
    lines = [f"{case['checkpoint']}  {case['mode']}  {case['device']}  ({d['n_tensors']:,} tensors, "
             f"{_count(manifest['elements'])} elements, {d['storage_bytes'] / 1e9:.3g} GB)",
             f"  {'contender':<24} {'lazy':<4} {'load s':>7} {'ready s':>7} {'GB/s':>6}  {'% of ceiling':<22} "
             f"{'us/tensor':>9} {'CPU s':>6} {'+RSS MB':>7} {'dev MB':>7} {'correct':<7} ready / torch.load"]
    ratios = {(r["a"], r["b"], r["metric"]): r for r in case["ratios"]}
    for cid, s in case["summary"].items():
        name = f"  {contenders[cid]['label']:<24} {'lazy' if s['lazy'] else '':<4}"
        if not s["ok"]:
            why = s["errors"][0] if s["errors"] else f"not cold in {s['not_cold']}/{s['runs']} runs (file stayed cached)"
            lines.append(f"{name} {why}")
            continue
        ceil = s["ceiling"]
        ceil_text = f"{ceil['percent']:.0f}% of {ceil['name']}" if ceil else "-"
        ratio = "1 (baseline)" if cid == BASELINE else _spread(ratios.get((cid, BASELINE, "ready_s")))
        lines.append(f"{name} {_num(s['load_s']['median']):>7} {_num(s['ready_s']['median']):>7} {_num(s['gbps']):>6}  "
                     f"{ceil_text:<22} {_num(s['us_per_tensor']):>9} {_num(s['cpu_ready_s']['median']):>6} "
                     f"{s['rss_growth_bytes']['median'] / 1e6:>7.0f} {_device_mb(s):>7} "
                     f"{'yes' if s['correct'] else 'NO':<7} {ratio}")
        if s["not_cold"] or s["errors"]:
            lines.append(f"  {'':<29} ({s['not_cold']} run(s) not cold, {len(s['errors'])} error(s): "
                         f"{'; '.join(s['errors'])})")
    return lines + _fastckpt_ratio_lines(case, contenders, ratios)


def _device_mb(summary: dict) -> str:
    """Peak device memory allocated during the load (torch's allocator), for device cases."""
    peak = summary["cuda_max_allocated"]
    return f"{peak['median'] / 1e6:.0f}" if peak else "-"


def _fastckpt_ratio_lines(case: dict, contenders: dict, ratios: dict) -> list[str]:
    """A matrix: one row per other contender, a column per fastckpt variant and comparable time."""
    columns = [(f, metric) for f, c in contenders.items() if c["family"] == FASTCKPT_FAMILY
               for metric in ("ready_s", "load_s") if metric == "ready_s" or case["summary"][f]["lazy"]]
    rows = [(c["label"], [_spread(ratios.get((f, b, m))) if f != b else "" for f, m in columns])
            for b, c in contenders.items()]
    rows = [(label, cells) for label, cells in rows if any(cell not in ("", "-") for cell in cells)]
    if not rows:
        return []
    title = {"ready_s": "ready", "load_s": "as returned"}
    return (["  fastckpt / other: time ratio, median (min-max) over rounds; below 1 = fastckpt faster",
             f"  {'other':<29} " + " ".join(f"{f + ' ' + title[m]:<20}" for f, m in columns)]
            + [f"  {label:<29} " + " ".join(f"{cell:<20}" for cell in cells) for label, cells in rows])


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def plot(results: dict, path: str) -> None:
    """Ready time and GB/s per case and contender (log scales); lazy loads' as-returned time hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = results["config"]["contenders"]
    cases = results["cases"]
    width = 0.8 / max(1, len(contenders))
    fig, (ax_time, ax_bw) = plt.subplots(2, 1, figsize=(max(8, 2 + 1.6 * len(cases)), 8), sharex=True)
    for i, c in enumerate(contenders):
        shown = [(x, case["summary"][c["id"]]) for x, case in enumerate(cases)
                 if c["id"] in case["summary"] and case["summary"][c["id"]]["ok"]]
        if not shown:
            continue
        xs = [x + (i - (len(contenders) - 1) / 2) * width for x, _ in shown]
        ready = [s["ready_s"] for _, s in shown]
        medians = [r["median"] for r in ready]
        spread = [[r["median"] - r["min"] for r in ready], [r["max"] - r["median"] for r in ready]]
        ax_time.bar(xs, medians, width, yerr=spread, capsize=2, color=f"C{i}", label=c["label"])
        lazy = [(x, s["load_s"]["median"]) for x, (_, s) in zip(xs, shown) if s["lazy"]]
        if lazy:
            ax_time.bar(*zip(*lazy), width, fill=False, hatch="///", edgecolor="white", linewidth=0)
        ax_bw.bar(xs, [s["gbps"] for _, s in shown], width, color=f"C{i}")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("seconds until every tensor is readable")
    ax_time.set_title("fastckpt bench: median with min-max; hatched part = lazy load as returned")
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel("GB/s (storage bytes / ready time)")
    ax_bw.set_xticks(range(len(cases)))
    ax_bw.set_xticklabels([f"{c['checkpoint']}\n{c['mode']} {c['device']}" for c in cases], fontsize=8)
    fig.legend(loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
