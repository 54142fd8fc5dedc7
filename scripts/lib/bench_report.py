"""Summarise a scripts/bench.sh run: medians with ranges, ratios to kernel VXLAN, JSON and a PNG chart.

Usage: bench_report.py RAW.jsonl OUTDIR
Prints a Markdown table; writes OUTDIR/results.json (medians, ranges, raw values) and OUTDIR/results.png.
"""
import json
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
]
BASELINE = "kernel-vxlan"


def main():
    raw_path, outdir = sys.argv[1], sys.argv[2]
    values = defaultdict(lambda: defaultdict(list))
    setups, mtu = [], None
    with open(raw_path) as f:
        for line in f:
            r = json.loads(line)
            if r["setup"] not in setups:
                setups.append(r["setup"])
            mtu = r["mtu"]
            if r["value"] is not None:
                values[r["setup"]][r["metric"]].append(float(r["value"]))
    summary = {}
    for s in setups:
        summary[s] = {}
        for m, _, _ in METRICS:
            v = values[s][m]
            if v:
                summary[s][m] = {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
    with open(f"{outdir}/results.json", "w") as f:
        json.dump({"mtu": mtu, "raw": raw_path, "setups": summary}, f, indent=2)

    print(f"Underlay MTU {mtu}; medians of {max((len(x['values']) for s in summary.values() for x in s.values()), default=0)} "
          f"repetitions, [min-max], and the ratio to {BASELINE} where it ran.\n")
    print("| setup | " + " | ".join(label for _, label, _ in METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for s in setups:
        cells = []
        for m, _, _ in METRICS:
            x = summary[s].get(m)
            if not x:
                cells.append("n/a")
                continue
            cell = f"{x['median']:.2f} [{x['min']:.2f}-{x['max']:.2f}]"
            base = summary.get(BASELINE, {}).get(m)
            if base and base["median"] and s != BASELINE:
                cell += f" ({x['median'] / base['median']:.2f}x)"
            cells.append(cell)
        print(f"| {s} | " + " | ".join(cells) + " |")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no PNG: matplotlib missing)")
        return
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    for ax, (m, label, higher) in zip(axes, METRICS):
        names = [s for s in setups if m in summary[s]]
        med = [summary[s][m]["median"] for s in names]
        lo = [summary[s][m]["median"] - summary[s][m]["min"] for s in names]
        hi = [summary[s][m]["max"] - summary[s][m]["median"] for s in names]
        ax.bar(names, med, yerr=[lo, hi], capsize=4,
               color=["#2a9d8f" if n == "sluice" else "#8d99ae" for n in names])
        ax.set_title(label + (" ↑" if higher else " ↓"), fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"Sluice vs kernel dataplanes, underlay MTU {mtu}")
    fig.tight_layout()
    fig.savefig(f"{outdir}/results.png", dpi=90)
    print(f"\nraw: {raw_path}; summary: {outdir}/results.json; chart: {outdir}/results.png")


if __name__ == "__main__":
    main()
