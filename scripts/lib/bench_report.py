"""Summarise scripts/bench.sh runs: medians with ranges, ratios to kernel VXLAN, the targets, the
policy-scale figure, Sluice's worker counters, the criterion summary; JSON, Markdown and a PNG chart.

Usage: bench_report.py OUTDIR RAW.jsonl [RAW.jsonl ...]
Prints the Markdown report and writes OUTDIR/results.md, OUTDIR/results.json (medians, ranges, raw
values per MTU and setup) and OUTDIR/results.png. Several raw files (e.g. one run at MTU 1500 and
one at 9000) are reported together, one table per MTU; ratios are only taken within one MTU, and
each raw file is one run.
"""
import json
import os
import statistics
import sys
from collections import defaultdict

METRICS = [
    ("tcp1_gbps", "TCP 1 stream (Gbit/s)", True),
    ("tcp2_gbps", "TCP 2 streams (Gbit/s)", True),
    ("udp64_kpps", "UDP 64 B (kpps rx)", True),
    ("udp64_loss_pct", "UDP 64 B loss (%)", False),
    ("lat_p50_us", "latency p50 (us)", False),
    ("lat_p99_us", "latency p99 (us)", False),
    ("same_tcp1_gbps", "same-node TCP (Gbit/s)", True),
]
BASELINE = "kernel-vxlan"
# The Sluice pipeline's criterion groups (bench/benches/pipeline.rs).
CRITERION_GROUPS = ("established/", "new_flow/")


def load(paths):
    values = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # mtu -> setup -> metric
    order = defaultdict(list)  # mtu -> setups in run order
    counters = defaultdict(list)  # mtu -> [(phase, node, workers)]
    criterion = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "criterion" in r:
                    criterion[r["criterion"]] = r
                elif "counters" in r:
                    counters[r["mtu"]].append((r["setup"], r["phase"], r["node"], r["counters"]))
                else:
                    mtu, s = r["mtu"], r["setup"]
                    if s not in order[mtu]:
                        order[mtu].append(s)
                    if r["value"] is not None:
                        values[mtu][s][r["metric"]].append(float(r["value"]))
    return values, order, counters, criterion


def summarise(values, order):
    out = {}
    for mtu in sorted(order):
        out[mtu] = {}
        for s in order[mtu]:
            out[mtu][s] = {}
            for m in [m for m, _, _ in METRICS] + ["policy_publish_s"]:
                v = values[mtu][s][m]
                if v:
                    out[mtu][s][m] = {"median": statistics.median(v), "min": min(v),
                                      "max": max(v), "values": v}
    return out


def med(summary, mtu, setup, metric):
    x = summary.get(mtu, {}).get(setup, {}).get(metric)
    return x["median"] if x else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def table(summary, mtu, lines):
    setups = list(summary[mtu])
    reps = max((len(x["values"]) for s in summary[mtu].values() for x in s.values()), default=0)
    lines.append(f"### Underlay MTU {mtu}\n")
    lines.append(f"Medians of {reps} repetition(s) [min-max]; (ratio to {BASELINE}, same run).\n")
    lines.append("| setup | " + " | ".join(label for _, label, _ in METRICS) + " |")
    lines.append("|---|" + "---|" * len(METRICS))
    for s in setups:
        cells = []
        for m, _, _ in METRICS:
            x = summary[mtu][s].get(m)
            if not x:
                cells.append("")
                continue
            cell = f"{x['median']:.2f}"
            if len(x["values"]) > 1:
                cell += f" [{x['min']:.2f}-{x['max']:.2f}]"
            base = med(summary, mtu, BASELINE, m)
            if base and s != BASELINE and m != "udp64_loss_pct":
                cell += f" ({x['median'] / base:.2f}x)"
            cells.append(cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")


def targets(summary, mtu, lines):
    g = lambda s, m: med(summary, mtu, s, m)  # noqa: E731
    runs = [s for s in ("sluice", "sluice-rt") if g(s, "tcp1_gbps") is not None]
    if not runs:
        return
    rows = [
        ("cross-node TCP >= 1.0x kernel-vxlan", lambda s: ratio(g(s, "tcp1_gbps"), g(BASELINE, "tcp1_gbps")), 1.0, True),
        ("cross-node TCP >= 0.9x host-veth", lambda s: ratio(g(s, "tcp1_gbps"), g("host-veth", "tcp1_gbps")), 0.9, True),
        ("64 B UDP pps >= 1.5x kernel-vxlan", lambda s: ratio(g(s, "udp64_kpps"), g(BASELINE, "udp64_kpps")), 1.5, True),
        ("p99 latency <= kernel-vxlan", lambda s: ratio(g(s, "lat_p99_us"), g(BASELINE, "lat_p99_us")), 1.0, False),
        ("10k policies cost < 5% TCP (pol10k/pol10)", lambda s: ratio(g("sluice-pol10k", "tcp1_gbps"), g("sluice-pol10", "tcp1_gbps")) if s == "sluice" else None, 0.95, True),
    ]
    lines.append(f"Targets at MTU {mtu} (Sluice median / reference median, same run):\n")
    lines.append("| target | " + " | ".join(runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for name, f, bound, higher in rows:
        cells = []
        for s in runs:
            r = f(s)
            met = "" if r is None else (" met" if (r >= bound if higher else r <= bound) else " **not met**")
            cells.append(fmt_ratio(r) + met if r is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    p10, p10k = g("sluice-pol10", "tcp1_gbps"), g("sluice-pol10k", "tcp1_gbps")
    if p10 and p10k:
        lines.append(
            f"Policy scale: TCP {p10:.2f} -> {p10k:.2f} Gbit/s ({fmt_ratio(ratio(p10k, p10))}), "
            f"p50 {g('sluice-pol10', 'lat_p50_us')} -> {g('sluice-pol10k', 'lat_p50_us')} us "
            f"({fmt_ratio(ratio(g('sluice-pol10k', 'lat_p50_us'), g('sluice-pol10', 'lat_p50_us')))}), "
            f"p99 {g('sluice-pol10', 'lat_p99_us')} -> {g('sluice-pol10k', 'lat_p99_us')} us "
            f"({fmt_ratio(ratio(g('sluice-pol10k', 'lat_p99_us'), g('sluice-pol10', 'lat_p99_us')))}), 10,000 vs 10 NetworkPolicies "
            f"(read, compiled and published by both agents after SIGHUP in {g('sluice-pol10k', 'policy_publish_s')} s; "
            "established flows skip policy through conntrack: this shows what a 10,000-policy table costs established traffic, not the cost per new flow).")
    c, s = g("sluice-clusterip", "tcp1_gbps"), g("sluice", "tcp1_gbps")
    if c and s:
        lines.append(
            f"ClusterIP vs pod IP (Sluice): TCP {fmt_ratio(ratio(c, s))}, p99 "
            f"{fmt_ratio(ratio(g('sluice-clusterip', 'lat_p99_us'), g('sluice', 'lat_p99_us')))}.")
    lines.append("")


def counter_summary(counters, mtu, lines):
    """Per phase and node: frames, batches and average batch size (deltas of cumulative counters)."""
    if not counters.get(mtu):
        return
    lines.append(f"Sluice worker counters at MTU {mtu} (per measurement phase; deltas):\n")
    lines.append("| setup | phase | node | rx | tx | batches | frames/batch | ring full | drops |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    prev = {}
    for setup, phase, node, workers in counters[mtu]:
        tot = defaultdict(int)
        drops = defaultdict(int)
        for w in workers:
            for k in ("rx", "tx", "batches", "ring_full"):
                tot[k] += w.get(k, 0)
            for k, v in w.get("drops", {}).items():
                drops[k] += v
        p = prev.get((setup, node), ({}, {}))
        d = {k: tot[k] - p[0].get(k, 0) for k in tot}
        dd = {k: v - p[1].get(k, 0) for k, v in drops.items() if v - p[1].get(k, 0)}
        prev[(setup, node)] = (dict(tot), dict(drops))
        fpb = f"{d['rx'] / d['batches']:.1f}" if d.get("batches") else "n/a"
        dtxt = ", ".join(f"{k} {v}" for k, v in sorted(dd.items())) or "0"
        lines.append(f"| {setup} | {phase} | {node} | {d['rx']} | {d['tx']} | {d['batches']} | {fpb} | {d['ring_full']} | {dtxt} |")
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


def chart(summary, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no PNG: python3-matplotlib missing)"
    mtus = sorted(summary)
    fig, axes = plt.subplots(len(mtus), len(METRICS), figsize=(3.6 * len(METRICS), 4.2 * len(mtus)),
                             squeeze=False)
    for row, mtu in zip(axes, mtus):
        setups = list(summary[mtu])
        for ax, (m, label, higher) in zip(row, METRICS):
            names = [s for s in setups if m in summary[mtu][s]]
            x = [summary[mtu][s][m] for s in names]
            ax.bar(names, [v["median"] for v in x],
                   yerr=[[v["median"] - v["min"] for v in x], [v["max"] - v["median"] for v in x]],
                   capsize=3, color=["#2a9d8f" if n.startswith("sluice") else
                                     "#e76f51" if n == BASELINE else "#8d99ae" for n in names])
            ax.set_title(f"{label} {'higher' if higher else 'lower'} is better\nMTU {mtu}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=40, labelsize=7)
            for lbl in ax.get_xticklabels():
                lbl.set_horizontalalignment("right")
    fig.suptitle("Sluice vs kernel dataplanes (bench/results/results.json)")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "results.png"), dpi=80)
    return None


def main():
    outdir, paths = sys.argv[1], sys.argv[2:]
    values, order, counters, criterion = load(paths)
    summary = summarise(values, order)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"raw": paths, "mtus": {str(k): v for k, v in summary.items()},
                   "criterion": criterion}, f, indent=2)
    lines = []
    for mtu in sorted(summary):
        table(summary, mtu, lines)
        targets(summary, mtu, lines)
        counter_summary(counters, mtu, lines)
    criterion_summary(criterion, lines)
    note = chart(summary, outdir)
    if note:
        lines.append(note)
    lines.append(f"raw: {', '.join(paths)}; summary: {outdir}/results.json; chart: {outdir}/results.png")
    text = "\n".join(lines)
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
