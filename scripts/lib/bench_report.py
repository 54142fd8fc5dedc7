"""Summarise scripts/bench.sh runs: medians with ranges, CPU cost, ratios to kernel VXLAN of the same
layout, the targets, the policy-scale figure, Sluice's worker counters, the criterion summary; JSON,
Markdown and a PNG chart.

Usage: bench_report.py OUTDIR RAW.jsonl [RAW.jsonl ...]
Summarises the raw files into OUTDIR/results-mtu<N>.json, one per underlay MTU found in them
(replacing an earlier summary of that MTU), prints the report of those MTUs, then rebuilds from
every OUTDIR/results-mtu*.json the combined OUTDIR/results.json, OUTDIR/results.md (the report of
all MTUs) and OUTDIR/results.png (every MTU and layout, one panel per figure). Ratios are only taken
within one MTU and one layout; raw files of the same MTU are pooled as repetitions. Raw records
without a layout (runs before layouts existed) count as layout "shared".
"""
import glob
import json
import os
import statistics
import sys
from collections import defaultdict

# (key, label, higher is better); the order of the table's columns.
METRICS = [
    ("tcp1_gbps", "TCP 1 stream (Gbit/s)", True),
    ("tcp1_cpu_s_per_gb", "TCP 1 stream CPU (s/GB)", False),
    ("tcp2_gbps", "TCP 2 streams (Gbit/s)", True),
    ("tcp2_cpu_s_per_gb", "TCP 2 streams CPU (s/GB)", False),
    ("udp64_kpps", "UDP 64 B (kpps rx)", True),
    ("udp64_loss_pct", "UDP 64 B loss (%)", False),
    ("udp64_cpu_s_per_mpkt", "UDP 64 B CPU (s/Mpkt)", False),
    ("udp64_same_load_loss_pct", "UDP 64 B loss at kernel-vxlan's load (%)", False),
    ("lat_p50_us", "latency p50 (us)", False),
    ("lat_p99_us", "latency p99 (us)", False),
    ("same_tcp1_gbps", "same-node TCP (Gbit/s)", True),
    ("same_tcp1_cpu_s_per_gb", "same-node TCP CPU (s/GB)", False),
]
LABEL = {m: label for m, label, _ in METRICS}
HIGHER = {m: h for m, _, h in METRICS}
# Metrics shown without a ratio to the baseline.
NO_RATIO = {"udp64_loss_pct", "udp64_same_load_loss_pct"}
# The chart's panels, row by row (None: the legend's place): throughput, then the CPU cost of the
# same figures below it, then latency and loss.
CHART_GRID = [
    ["tcp1_gbps", "tcp2_gbps", "same_tcp1_gbps", "udp64_kpps"],
    ["tcp1_cpu_s_per_gb", "tcp2_cpu_s_per_gb", "same_tcp1_cpu_s_per_gb", "udp64_cpu_s_per_mpkt"],
    ["lat_p50_us", "lat_p99_us", "udp64_loss_pct", "udp64_same_load_loss_pct"],
]
BASELINE = "kernel-vxlan"
CEILING = "xdp-ceiling"
DEFAULT_LAYOUT = "shared"
# The Sluice pipeline's criterion groups (bench/benches/pipeline.rs).
CRITERION_GROUPS = ("established/", "new_flow/")


def load(paths):
    """Raw records by MTU: values[mtu][layout][setup][metric] (dicts keep run order), counters."""
    values = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    counters = defaultdict(list)  # mtu -> [(layout, setup, phase, node, workers)]
    raws = defaultdict(list)  # mtu -> raw files
    criterion = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "criterion" in r:
                    criterion[r["criterion"]] = r
                    continue
                mtu, layout = r["mtu"], r.get("layout", DEFAULT_LAYOUT)
                if path not in raws[mtu]:
                    raws[mtu].append(path)
                if "counters" in r:
                    counters[mtu].append((layout, r["setup"], r["phase"], r["node"], r["counters"]))
                else:
                    vals = values[mtu][layout][r["setup"]][r["metric"]]
                    if r["value"] is not None:
                        vals.append(float(r["value"]))
    return values, counters, raws, criterion


def counter_rows(counters):
    """Per phase and node: frames, batches and average batch size (deltas of cumulative counters)."""
    rows, prev = [], {}
    for layout, setup, phase, node, workers in counters:
        tot, drops = defaultdict(int), defaultdict(int)
        for w in workers:
            for k in ("rx", "tx", "batches", "ring_full"):
                tot[k] += w.get(k, 0)
            for k, v in w.get("drops", {}).items():
                drops[k] += v
        # Each setup of each layout runs fresh agents: deltas within one (layout, setup, node).
        p = prev.get((layout, setup, node), ({}, {}))
        d = {k: tot[k] - p[0].get(k, 0) for k in ("rx", "tx", "batches", "ring_full")}
        dd = {k: v - p[1].get(k, 0) for k, v in sorted(drops.items()) if v - p[1].get(k, 0)}
        prev[(layout, setup, node)] = (dict(tot), dict(drops))
        rows.append({"layout": layout, "setup": setup, "phase": phase, "node": node, **d,
                     "frames_per_batch": d["rx"] / d["batches"] if d["batches"] else None,
                     "drops": dd})
    return rows


def summarise(values, counters, raws, criterion):
    """One summary per MTU, the shape of results-mtu<N>.json."""
    out = {}
    for mtu in sorted(values):
        layouts = {}
        for layout, setups in values[mtu].items():
            layouts[layout] = {
                s: {m: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
                    for m, v in metrics.items() if v}
                for s, metrics in setups.items()}
        out[mtu] = {"mtu": mtu, "raw": raws[mtu], "layouts": layouts,
                    "counters": counter_rows(counters[mtu]), "criterion": criterion}
    return out


def med(r, layout, setup, metric):
    x = r["layouts"].get(layout, {}).get(setup, {}).get(metric)
    return x["median"] if x else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def fmt_num(v):
    if v is None:
        return "n/a"
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def table(r, lines):
    mtu, layouts = r["mtu"], r["layouts"]
    present = [m for m, _, _ in METRICS
               if any(m in ms for setups in layouts.values() for ms in setups.values())]
    reps = max((len(x["values"]) for setups in layouts.values() for ms in setups.values()
                for x in ms.values()), default=0)
    lines.append(f"### Underlay MTU {mtu}\n")
    lines.append(f"Medians of {reps} repetition(s) [min-max]; (ratio to {BASELINE} of the same "
                 "layout, same run). CPU: CPU seconds of all CPUs per GB received (TCP) or per "
                 "million packets received (UDP); lower is better.\n")
    lines.append("| setup | layout | " + " | ".join(LABEL[m] for m in present) + " |")
    lines.append("|---|---|" + "---|" * len(present))
    for layout, setups in layouts.items():
        for s, ms in setups.items():
            cells = []
            for m in present:
                x = ms.get(m)
                if not x:
                    cells.append("")
                    continue
                cell = fmt_num(x["median"])
                if len(x["values"]) > 1:
                    cell += f" [{fmt_num(x['min'])}-{fmt_num(x['max'])}]"
                base = med(r, layout, BASELINE, m)
                if base and s != BASELINE and m not in NO_RATIO:
                    cell += f" ({x['median'] / base:.2f}x)"
                cells.append(cell)
            lines.append(f"| {s} | {layout} | " + " | ".join(cells) + " |")
    lines.append("")


def targets(r, lines):
    g = lambda lay, s, m: med(r, lay, s, m)  # noqa: E731
    runs = [(lay, s) for lay in r["layouts"] for s in ("sluice", "sluice-rt")
            if g(lay, s, "tcp1_gbps") is not None]
    if not runs:
        return
    # The targets: cross-node TCP >= 0.5x kernel-vxlan at MTU 1500 and 1.0x above (or
    # >= 0.9x xdp-ceiling where the veths cap below that), same-node >= 0.8x kernel-routed (or
    # 0.9x xdp-ceiling), CPU per GB <= 1.5x kernel-vxlan in the dedicated layout, 64 B UDP
    # >= 1.5x, its loss at the same offered load <= 2x kernel-vxlan's, p99 <= kernel-vxlan.
    cross = 0.5 if r["mtu"] <= 1500 else 1.0
    loss_floor = 0.05  # percent: below this, "2x the kernel's" is noise
    rows = [
        (f"cross-node TCP >= {cross}x kernel-vxlan", lambda lay, s: ratio(g(lay, s, "tcp1_gbps"), g(lay, BASELINE, "tcp1_gbps")), cross, True),
        ("cross-node TCP >= 0.9x xdp-ceiling", lambda lay, s: ratio(g(lay, s, "tcp1_gbps"), g(lay, CEILING, "tcp1_gbps")), 0.9, True),
        ("same-node TCP >= 0.8x kernel-routed", lambda lay, s: ratio(g(lay, s, "same_tcp1_gbps"), g(lay, "kernel-routed", "same_tcp1_gbps")), 0.8, True),
        ("same-node TCP >= 0.9x xdp-ceiling", lambda lay, s: ratio(g(lay, s, "same_tcp1_gbps"), g(lay, CEILING, "same_tcp1_gbps")), 0.9, True),
        ("TCP CPU s/GB <= 1.5x kernel-vxlan (dedicated)", lambda lay, s: ratio(g(lay, s, "tcp1_cpu_s_per_gb"), g(lay, BASELINE, "tcp1_cpu_s_per_gb")) if lay == "dedicated" else None, 1.5, False),
        ("64 B UDP pps >= 1.5x kernel-vxlan", lambda lay, s: ratio(g(lay, s, "udp64_kpps"), g(lay, BASELINE, "udp64_kpps")), 1.5, True),
        ("64 B UDP loss at kernel-vxlan's load <= 2x its loss", lambda lay, s: ratio(g(lay, s, "udp64_same_load_loss_pct"), max(g(lay, BASELINE, "udp64_same_load_loss_pct") or 0, loss_floor)) if g(lay, BASELINE, "udp64_same_load_loss_pct") is not None else None, 2.0, False),
        ("p99 latency <= kernel-vxlan", lambda lay, s: ratio(g(lay, s, "lat_p99_us"), g(lay, BASELINE, "lat_p99_us")), 1.0, False),
        ("10k policies cost < 5% TCP (pol10k/pol10)", lambda lay, s: ratio(g(lay, "sluice-pol10k", "tcp1_gbps"), g(lay, "sluice-pol10", "tcp1_gbps")) if s == "sluice" else None, 0.95, True),
    ]
    lines.append(f"Targets at MTU {r['mtu']} (Sluice median / reference median, same layout and run):\n")
    lines.append("| target | " + " | ".join(f"{s} ({lay})" for lay, s in runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for name, f, bound, higher in rows:
        cells = []
        for lay, s in runs:
            x = f(lay, s)
            met = "" if x is None else (" met" if (x >= bound if higher else x <= bound) else " **not met**")
            cells.append(fmt_ratio(x) + met if x is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for lay in r["layouts"]:
        notes(r, lay, lines)
    lines.append("")


def notes(r, lay, lines):
    """The one-line findings of one layout: Sluice against the XDP ceiling, policy scale, ClusterIP."""
    g = lambda s, m: med(r, lay, s, m)  # noqa: E731
    vs = [(m, ratio(g("sluice", m), g(CEILING, m)))
          for m in ("tcp1_gbps", "tcp1_cpu_s_per_gb", "same_tcp1_gbps", "udp64_kpps", "lat_p99_us")]
    vs = [f"{LABEL[m]} {fmt_ratio(x)}" for m, x in vs if x is not None]
    if vs:
        lines.append(f"Sluice / {CEILING} ({lay}): " + ", ".join(vs) + ".")
    p10, p10k = g("sluice-pol10", "tcp1_gbps"), g("sluice-pol10k", "tcp1_gbps")
    if p10 and p10k:
        lines.append(
            f"Policy scale ({lay}): TCP {p10:.2f} -> {p10k:.2f} Gbit/s ({fmt_ratio(ratio(p10k, p10))}), "
            f"p50 {fmt_num(g('sluice-pol10', 'lat_p50_us'))} -> {fmt_num(g('sluice-pol10k', 'lat_p50_us'))} us "
            f"({fmt_ratio(ratio(g('sluice-pol10k', 'lat_p50_us'), g('sluice-pol10', 'lat_p50_us')))}), "
            f"p99 {fmt_num(g('sluice-pol10', 'lat_p99_us'))} -> {fmt_num(g('sluice-pol10k', 'lat_p99_us'))} us "
            f"({fmt_ratio(ratio(g('sluice-pol10k', 'lat_p99_us'), g('sluice-pol10', 'lat_p99_us')))}), 10,000 vs 10 NetworkPolicies "
            f"(read, compiled and published by both agents after SIGHUP in {fmt_num(g('sluice-pol10k', 'policy_publish_s'))} s; "
            "established flows skip policy through conntrack: this shows what a 10,000-policy table costs established traffic, not the cost per new flow).")
    c, s = g("sluice-clusterip", "tcp1_gbps"), g("sluice", "tcp1_gbps")
    if c and s:
        lines.append(
            f"ClusterIP vs pod IP (Sluice, {lay}): TCP {fmt_ratio(ratio(c, s))}, p99 "
            f"{fmt_ratio(ratio(g('sluice-clusterip', 'lat_p99_us'), g('sluice', 'lat_p99_us')))}.")


def counter_summary(r, lines):
    if not r["counters"]:
        return
    lines.append(f"Sluice worker counters at MTU {r['mtu']} (per measurement phase; deltas):\n")
    lines.append("| setup | layout | phase | node | rx | tx | batches | frames/batch | ring full | drops |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in r["counters"]:
        fpb = "n/a" if c["frames_per_batch"] is None else f"{c['frames_per_batch']:.1f}"
        dtxt = ", ".join(f"{k} {v}" for k, v in c["drops"].items()) or "0"
        lines.append(f"| {c['setup']} | {c['layout']} | {c['phase']} | {c['node']} | {c['rx']} | "
                     f"{c['tx']} | {c['batches']} | {fpb} | {c['ring_full']} | {dtxt} |")
    lines.append("")


def criterion_summary(criterion, lines):
    rows = [r for k, r in sorted(criterion.items()) if k.startswith(CRITERION_GROUPS)]
    if not rows:
        return
    lines.append("Criterion, pipeline (`cargo bench -p sluice-bench --bench pipeline`): pure code, no I/O.\n")
    lines.append("| benchmark | time per batch | per packet | packets/s (one core) |")
    lines.append("|---|---|---|---|")
    for r in rows:
        n = r.get("elements") or 1
        per = r["mean_ns"] / n
        lines.append(f"| {r['criterion']} | {r['mean_ns'] / 1e3:.2f} us ({n} pkts) | {per:.1f} ns | {1e3 / per:.2f} M |")
    lines.append("")


def report(summaries, criterion):
    lines = []
    for r in summaries:
        table(r, lines)
        targets(r, lines)
        counter_summary(r, lines)
    criterion_summary(criterion, lines)
    return lines


def series_color(mtu_index, layout_index):
    """One hue per MTU (blue, orange, green, ...), dark for the first layout, light for the next."""
    import matplotlib
    return matplotlib.colormaps["tab20"](2 * (mtu_index % 10) + min(layout_index, 1))


def chart(summaries, path):
    """One panel per figure; in each, setups down the side and one bar per (MTU, layout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "(no PNG: python3-matplotlib missing)"
    layouts = list(dict.fromkeys(lay for r in summaries for lay in r["layouts"]))
    series = [(i, r, layouts.index(lay), lay) for i, r in enumerate(summaries) for lay in r["layouts"]]
    nrows, ncols = len(CHART_GRID), max(len(row) for row in CHART_GRID)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 6.2 * nrows), squeeze=False)
    for row_axes, row in zip(axes, CHART_GRID):
        for ax, m in zip(row_axes, row + [None] * (ncols - len(row))):
            if m is None:
                ax.axis("off")
                continue
            setups = list(dict.fromkeys(s for _, r, _, lay in series
                                        for s, ms in r["layouts"][lay].items() if m in ms))
            ax.set_title(f"{LABEL[m]}\n{'higher' if HIGHER[m] else 'lower'} is better", fontsize=11)
            if not setups:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_yticks([])
                continue
            h = 0.84 / len(series)
            top = max(r["layouts"][lay][s][m]["max"] for _, r, _, lay in series
                      for s in setups if m in r["layouts"][lay].get(s, {}))
            for k, (i, r, li, lay) in enumerate(series):
                ys, xs, lo, hi = [], [], [], []
                for y, s in enumerate(setups):
                    x = r["layouts"][lay].get(s, {}).get(m)
                    if x:
                        ys.append(y + (k - (len(series) - 1) / 2) * h)
                        xs.append(x["median"])
                        lo.append(x["median"] - x["min"])
                        hi.append(x["max"] - x["median"])
                ax.barh(ys, xs, height=h, xerr=[lo, hi], capsize=2, error_kw={"lw": 0.7},
                        color=series_color(i, li), edgecolor="white", linewidth=0.3)
                # The median's value, right of its whisker.
                for y, v, up in zip(ys, xs, hi):
                    ax.text(v + up + top * 0.01, y, f"{v:.0f}" if v >= 100 else f"{v:.3g}",
                            va="center", fontsize=8)
            ax.set_yticks(range(len(setups)), setups, fontsize=9)
            for lbl in ax.get_yticklabels():
                if lbl.get_text() == BASELINE:
                    lbl.set_fontweight("bold")
                elif lbl.get_text().startswith("sluice"):
                    lbl.set_color("#1b7f73")
            ax.set_ylim(len(setups) - 0.5, -0.5)
            ax.set_xlim(0, top * 1.18 if top > 0 else 1)
            ax.grid(axis="x", lw=0.4, alpha=0.5)
            ax.tick_params(axis="x", labelsize=8)
    legend = axes[-1][-1] if CHART_GRID[-1][-1] is None else fig
    legend.legend(handles=[Patch(color=series_color(i, li), label=f"MTU {r['mtu']}, {lay}")
                           for i, r, li, lay in series],
                  loc="center", fontsize=12, title="underlay MTU, layout", title_fontsize=12)
    runs = "; ".join(f"MTU {r['mtu']}: " + ", ".join(os.path.basename(p) for p in r["raw"]) for r in summaries)
    fig.suptitle("Sluice vs kernel dataplanes: medians, whiskers min-max; kernel-vxlan (bold) is the "
                 f"baseline, {CEILING} the most any design with XDP on pod veths reaches\n{runs}",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return None


def main():
    outdir, paths = sys.argv[1], sys.argv[2:]
    run = summarise(*load(paths))
    for mtu, r in run.items():
        with open(os.path.join(outdir, f"results-mtu{mtu}.json"), "w") as f:
            json.dump(r, f, indent=2)
    # Every MTU summarised in OUTDIR so far, this run's included.
    summaries = []
    for p in glob.glob(os.path.join(outdir, "results-mtu*.json")):
        with open(p) as f:
            summaries.append(json.load(f))
    summaries.sort(key=lambda r: r["mtu"])
    # The criterion summary of the newest run that has one (it does not depend on the MTU).
    criterion = next((r["criterion"] for r in sorted(summaries, key=lambda r: max(r["raw"]), reverse=True)
                      if r["criterion"]), {})
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"mtus": {str(r["mtu"]): r for r in summaries}, "criterion": criterion}, f, indent=2)
    png = os.path.join(outdir, "results.png")
    note = chart(summaries, png)
    files = ", ".join(os.path.join(outdir, f"results-mtu{r['mtu']}.json") for r in summaries)
    tail = [note or "", f"summaries: {files}; all MTUs: {outdir}/results.json, {outdir}/results.md; chart: {png}"]
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write("\n".join(report(summaries, criterion) + tail) + "\n")
    crit = next((r["criterion"] for r in run.values() if r["criterion"]), {})
    print("\n".join(report(list(run.values()), crit) + [f"raw: {', '.join(paths)}"] + tail))


if __name__ == "__main__":
    main()
