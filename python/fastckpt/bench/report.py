"""What a run shows: a terminal table, results.json (every raw sample) and a PNG plot."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import zlib

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


WIDTH = 100  # every line of the table fits a 100-column terminal
ID_WIDTH = 17  # the longest built-in contender id; longer (module:function) ids are cut, the legend has them
_CEILING_SHORT = {"warm eager": "eager", "page-cache map": "map", "cold read": "cold", "H2D pinned": "H2D"}


def _gbps(x: float | None) -> str:
    """GB/s in at most 6 characters (a many-tiny-tensor load moves well under 0.01 GB/s)."""
    if x is None:
        return "-"
    return _num(x) if x >= 0.01 else f"{x:.1e}".replace("e-0", "e-")


def _short_id(cid: str) -> str:
    return cid if len(cid) <= ID_WIDTH else cid[:ID_WIDTH - 1] + "~"


def _named(cid: str, label: str, sep: str = ": ") -> str:
    """`id: what it calls`, or the id alone where that is the call (module:function)."""
    return cid if label == cid else f"{cid}{sep}{label}"


def ran(results: dict) -> list[str]:
    """The contenders that ran in some case, in the configured order (device-only ones sit out CPU cases)."""
    present = {cid for case in results["cases"] for cid in case["summary"]}
    return [c["id"] for c in results["config"]["contenders"] if c["id"] in present]


def _wrap(text: str, indent: str = "", first: str | None = None) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent if first is None else first, subsequent_indent=indent,
                         break_on_hyphens=False)


def format_table(results: dict) -> str:
    configured = {c["id"]: c for c in results["config"]["contenders"]}
    contenders = {cid: configured[cid] for cid in ran(results)}
    idw = max([len("contender")] + [len(_short_id(cid)) for cid in contenders])
    machine, load = results["machine"], results["load_average"]
    lines = [f"fastckpt bench: {results['config']['rounds']} round(s) per case, a fresh process per load; load "
             f"average {load['before'][0]:.1f} -> {load['after'][0]:.1f}"]
    lines += _wrap(f"machine: {machine['cpu']}, {machine['cores_usable']} cores"
                   + (f", {machine['gpu']}" if machine.get("gpu") else ""))
    for cid, reason in results.get("skipped", {}).items():
        lines += _wrap(f"skipped {cid}: {reason}", "  ", "")
    lines += _ceiling_lines(results)
    lines += _legend_lines(contenders)
    for case in results["cases"]:
        lines += [""] + _case_lines(case, results["checkpoints"][case["checkpoint"]], contenders, idw)
    return "\n".join(line.rstrip() for line in lines)


def _legend_lines(contenders: dict) -> list[str]:
    names = "; ".join(_named(cid, c["label"], " = ") + (" (baseline)" if cid == BASELINE else "")
                      for cid, c in contenders.items())
    return (_wrap(f"contenders: {names}", "  ", "")
            + _wrap("columns: load s = the call as it returns, ready s = every page of every tensor touched (the "
                    "same for eager loads); % ceil = GB/s as a share of the ceiling named; us/t = microseconds per "
                    "tensor; RSS MB = peak resident memory growth; vs torch = ready time / torch's, median "
                    "(min-max) over rounds; WRONG = a load did not return what torch.load returns; "
                    "wo = weights_only", "  ", ""))


def _ceiling_lines(results: dict) -> list[str]:
    c = results.get("ceilings")
    if not c:
        return ["ceilings: not measured"]
    if c.get("status") == "error":
        return _wrap(f"ceilings: failed ({c['error']})", "  ", "")
    lines = [f"ceilings: memcpy (1 core) {c['memcpy_1core']:.1f} GB/s, populate fresh memory (all cores) "
             f"{c['populate']:.1f} GB/s"]
    if "h2d_pinned" in c:
        lines += _wrap(f"H2D ({c['gpu']}): pinned {c['h2d_pinned']:.1f} GB/s, pageable {c['h2d_pageable']:.1f} GB/s",
                       "    ", "  ")
    for path, f in c["files"].items():
        lines += _wrap(f"{os.path.basename(path)}: warm eager {f['warm_eager']:.1f}, page-cache read "
                       f"{f['pagecache_read']:.1f}, page-cache map {f['pagecache_map']:.1f} GB/s", "    ", "  ")
        if f["cold_read"]:
            how = f["cold_read_config"]
            lines.append(f"    cold read {f['cold_read']:.2f} GB/s ({how['threads']} threads x {how['block'] >> 20} MiB"
                         f"{', O_DIRECT' if how['direct'] else ''}{_ahead(how)})")
        elif f.get("cold_read_note") != "no cold runs":
            lines.append(f"    cold read not measured: {f['cold_read_note']}")
    return lines


def _ahead(how: dict) -> str:
    return f", WILLNEED {how['ahead'] >> 20} MiB ahead" if how.get("ahead") else ""


def _case_lines(case: dict, manifest: dict, contenders: dict, idw: int) -> list[str]:
    d = manifest["digest"]
    summaries = case["summary"]
    with_lazy = any(s["lazy"] for s in summaries.values())
    on_device = case["device"] != "cpu"
    # (header, width) per column; the lazy column only where something is lazy, device memory only on a device
    columns = ([("contender", idw)] + ([("lazy", 4)] if with_lazy else [])
               + [("load s", 7), ("ready s", 7), ("GB/s", 6), ("% ceil", 10), ("us/t", 6), ("CPU s", 6),
                  ("RSS MB", 6)] + ([("dev MB", 6)] if on_device else []) + [("vs torch", 0)])

    def row(cells: list[str]) -> str:
        return "  " + " ".join(f"{cell:<{w}}" if i == 0 or head in ("lazy", "% ceil", "vs torch") else f"{cell:>{w}}"
                               for i, (cell, (head, w)) in enumerate(zip(cells, columns)))

    lines = _wrap(f"{case['checkpoint']}  {case['mode']}  {case['device']}  ({d['n_tensors']:,} tensors, "
                  f"{_count(manifest['elements'])} elements, {d['storage_bytes'] / 1e9:.3g} GB)", "  ", "")
    lines.append(row([head for head, _ in columns]))
    ratios = {(r["a"], r["b"], r["metric"]): r for r in case["ratios"]}
    for cid, s in summaries.items():
        lazy = ["lazy" if s["lazy"] else ""] if with_lazy else []
        if not s["ok"]:
            why = s["errors"][0] if s["errors"] else f"not cold in {s['not_cold']}/{s['runs']} runs (file stayed cached)"
            lines += _wrap(why, " " * (idw + 3), row([_short_id(cid)] + lazy) + " ")
            continue
        ceil = s["ceiling"]
        ceil_text = f"{ceil['percent']:.0f}% {_CEILING_SHORT.get(ceil['name'], ceil['name'])}" if ceil else "-"
        if s["correct"] is False:
            ratio = "WRONG"
        else:
            ratio = "1 (baseline)" if cid == BASELINE else _spread(ratios.get((cid, BASELINE, "ready_s")))
        device = [_device_mb(s)] if on_device else []
        lines.append(row([_short_id(cid)] + lazy + [
            _num(s["load_s"]["median"]), _num(s["ready_s"]["median"]), _gbps(s["gbps"]), ceil_text,
            _num(s["us_per_tensor"]), _num(s["cpu_ready_s"]["median"]), f"{s['rss_growth_bytes']['median'] / 1e6:.0f}"]
            + device + [ratio]))
        notes = ([f"{s['not_cold']} run(s) not cold"] if s["not_cold"] else []) + [f"error: {e}" for e in s["errors"]]
        if notes:
            lines += _wrap(f"({'; '.join(notes)})", " " * (idw + 3))
    return lines + _fastckpt_ratio_lines(case, contenders, ratios, idw)


def _device_mb(summary: dict) -> str:
    """Peak device memory allocated during the load (torch's allocator), for device cases."""
    peak = summary["cuda_max_allocated"]
    return f"{peak['median'] / 1e6:.0f}" if peak else "-"


def _fastckpt_ratio_lines(case: dict, contenders: dict, ratios: dict, idw: int) -> list[str]:
    """A matrix: one row per other contender, a column per fastckpt variant and comparable time; columns
    that would not fit in WIDTH go to a further block below."""
    columns = [(f, metric) for f, c in contenders.items() if c["family"] == FASTCKPT_FAMILY and f in case["summary"]
               for metric in ("ready_s", "load_s") if metric == "ready_s" or case["summary"][f]["lazy"]]
    rows = [(b, [_spread(ratios.get((f, b, m))) if f != b else "" for f, m in columns]) for b in contenders]
    rows = [(b, cells) for b, cells in rows if any(cell not in ("", "-") for cell in cells)]
    if not rows:
        return []
    title = {"ready_s": "ready", "load_s": "load"}
    heads = [f"{_short_id(f)} {title[m]}" for f, m in columns]
    widths = [max(len(heads[j]), *(len(cells[j]) for _, cells in rows)) for j in range(len(columns))]
    blocks, block, used = [], [], 2 + idw
    for j, w in enumerate(widths):
        if block and used + 1 + w > WIDTH:
            blocks.append(block)
            block, used = [], 2 + idw
        block.append(j)
        used += 1 + w
    blocks.append(block)
    lines = ["  fastckpt / other: time ratio, median (min-max) over rounds; below 1 = fastckpt faster"]
    for block in blocks:
        lines.append(f"  {'other':<{idw}} " + " ".join(f"{heads[j]:<{widths[j]}}" for j in block))
        lines += [f"  {_short_id(b):<{idw}} " + " ".join(f"{cells[j]:<{widths[j]}}" for j in block)
                  for b, cells in rows if any(cells[j] not in ("", "-") for j in block)]
    return lines


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


# One colour per contender id, the same in every panel and run: Okabe-Ito's colour-blind-safe eight for the
# headline contenders, Paul Tol's muted set for the variants; fastckpt warm hues, torch blues, safetensors greens.
COLOURS = {
    "torch": "#0072B2", "torch-mmap": "#56B4E9", "torch-pickle": "#332288", "torch-pickle-mmap": "#88CCEE",
    "torch-fileobj": "#6699CC", "torch-again": "#999999", "torch-mmap-to": "#44AA99",
    "st-load": "#009E73", "st-open": "#117733",
    "fastckpt": "#D55E00", "fastckpt-mmap": "#E69F00", "fastckpt-pickle": "#CC79A7", "fastckpt-fileobj": "#882255",
    "fastckpt-again": "#000000",
}
# For module:function contenders: picked by a hash of the id (stable across runs), the next free one on a clash.
EXTRA_COLOURS = ("#AA4499", "#DDCC77", "#CC6677", "#999933", "#661100", "#F0E442", "#BBBBBB", "#117799")


def colours(ids: list[str]) -> dict[str, str]:
    """A colour per id: the built-in ones fixed, others stable for a given set of ids and distinct within it."""
    out = {cid: COLOURS[cid] for cid in ids if cid in COLOURS}
    for cid in ids:
        if cid not in out:
            start = zlib.crc32(cid.encode())
            free = [EXTRA_COLOURS[(start + k) % len(EXTRA_COLOURS)] for k in range(len(EXTRA_COLOURS))]
            out[cid] = next((c for c in free if c not in out.values()), free[0])
    return out


def bar_positions(results: dict) -> tuple[dict[tuple[int, str], float], float]:
    """Where each bar goes: {(case index, contender id): x} and the bar width. A case's group holds only the
    contenders that ran in it (and succeeded), side by side and centred on the case's tick, so no group
    keeps a slot for a contender that did not run there."""
    order = [c["id"] for c in results["config"]["contenders"]]
    shown = [[cid for cid in order if cid in case["summary"] and case["summary"][cid]["ok"]]
             for case in results["cases"]]
    width = 0.84 / max([1] + [len(ids) for ids in shown])
    return {(x, cid): x + (i - (len(ids) - 1) / 2) * width
            for x, ids in enumerate(shown) for i, cid in enumerate(ids)}, width


def figure(results: dict):
    """The plot as a matplotlib figure: ready time and GB/s per case and contender (log scales), the
    as-returned part of lazy loads hatched, the legend below the x labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = {c["id"]: c["label"] for c in results["config"]["contenders"]}
    cases = results["cases"]
    positions, width = bar_positions(results)
    drawn = [cid for cid in labels if any(key[1] == cid for key in positions)]
    colour = colours(drawn)
    per_case = max([1] + [sum(1 for x, _ in positions if x == i) for i in range(len(cases))])
    wide = min(12.0, max(7.5, 1.0 + 0.34 * per_case * len(cases)))
    fig, (ax_time, ax_bw) = plt.subplots(2, 1, figsize=(wide, 7), sharex=True)
    for (x, cid), at in positions.items():
        s = cases[x]["summary"][cid]
        ready = s["ready_s"]
        ax_time.bar(at, ready["median"], width, color=colour[cid], edgecolor="#333333", linewidth=0.4,
                    yerr=[[ready["median"] - ready["min"]], [ready["max"] - ready["median"]]], capsize=1.5,
                    error_kw={"elinewidth": 0.7, "ecolor": "#333333"})
        if s["lazy"]:
            ax_time.bar(at, s["load_s"]["median"], width, fill=False, hatch="////", edgecolor="white", linewidth=0)
        ax_bw.bar(at, s["gbps"], width, color=colour[cid], edgecolor="#333333", linewidth=0.4)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("ready time, s (log)")
    ax_time.set_title("fastckpt bench: median, min-max bars; hatched = lazy load as returned", fontsize=10)
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel("GB/s = storage bytes / ready time (log)")
    ax_bw.set_xticks(range(len(cases)))
    ax_bw.set_xticklabels([f"{c['checkpoint']}\n{c['mode']} {c['device']}" for c in cases], fontsize=9)
    ax_bw.set_xlim(-0.5, len(cases) - 0.5)
    for ax in (ax_time, ax_bw):
        ax.grid(axis="y", which="major", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
    fig.tight_layout()
    handles = [Patch(facecolor=colour[cid], edgecolor="#333333", linewidth=0.4, label=_named(cid, labels[cid]))
               for cid in drawn]
    # Below the x labels, in the figure's own width (a README shows it scaled to about that width).
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, max(1, len(handles))),
               fontsize=9, frameon=False, handlelength=1.2, columnspacing=1.2)
    return fig


def plot(results: dict, path: str) -> None:
    fig = figure(results)  # (first: it selects the non-interactive backend)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    """`python -m fastckpt.bench.report RESULTS_JSON [PNG]`: the table of an earlier run, and its plot redrawn."""
    if not 1 <= len(argv) <= 2:
        print("usage: python -m fastckpt.bench.report RESULTS_JSON [PNG]", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        results = json.load(f)
    print(format_table(results))
    if len(argv) == 2:
        plot(results, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
