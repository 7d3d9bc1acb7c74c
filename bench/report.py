"""Markdown tables and the throughput plot from a results file.

``python -m bench.report RESULTS.json [--plot PNG]`` re-renders a saved run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OURS, CELERY, PROC = "queuetopia-celery", "celery", "procrastinate"


def _rate(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    r = entry["rate"]
    return f"{r['median']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b:
        return "-"
    return f"{a['rate']['median'] / b['rate']['median']:.2f}x"


def _mem_row(label: str, m: dict[str, Any], key: str) -> str:
    cells = [m[f"{key}_rss_kb_at_10pct"], m[f"{key}_rss_kb_at_end"], m[f"{key}_peak_kb"]]
    return f"| {label} | " + " | ".join(f"{v / 1024:.1f}" for v in cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    sc = results["scenarios"]
    lines: list[str] = []
    if "throughput" in sc:
        lines += [
            "### Throughput (jobs/s, median (min-max) of runs)",
            "",
            "| queues x jobs | queuetopia-celery | plain Celery | procrastinate (lock per queue)"
            " | vs Celery | vs procrastinate | gap p50 / p99 ms (ours; procrastinate) |",
            "|---|---|---|---|---|---|---|",
        ]
        for shape, entry in sc["throughput"].items():
            if shape.startswith("_"):
                continue
            gaps = "-"
            if OURS in entry and "gap_ms" in entry[OURS]:
                g, p = entry[OURS]["gap_ms"], entry.get(PROC, {}).get("gap_ms")
                gaps = f"{g['p50']:.2f} / {g['p99']:.2f}" + (
                    f"; {p['p50']:.2f} / {p['p99']:.2f}" if p else ""
                )
            lines.append(
                f"| {shape} | {_rate(entry.get(OURS))} | {_rate(entry.get(CELERY))}"
                f" | {_rate(entry.get(PROC))}"
                f" | {_ratio(entry.get(OURS), entry.get(CELERY))}"
                f" | {_ratio(entry.get(OURS), entry.get(PROC))} | {gaps} |"
            )
        lines.append("")
    if "latency" in sc:
        lines += [
            "### Idle latency, enqueue to performer start (ms)",
            "",
            "| system | p50 | p95 | p99 |",
            "|---|---|---|---|",
        ]
        for name, v in sc["latency"].items():
            if not name.startswith("_"):
                lines.append(f"| {name} | {v['p50']:.1f} | {v['p95']:.1f} | {v['p99']:.1f} |")
        lines.append("")
    if "enqueue" in sc:
        lines += [
            "### Enqueue (jobs/s, median (min-max))",
            "",
            "| mode / producers / target | queuetopia-celery | procrastinate | plain Celery |",
            "|---|---|---|---|",
        ]
        for key, v in sc["enqueue"].items():
            if not key.startswith("_"):
                lines.append(
                    f"| {key} | {_rate(v.get(OURS))} | {_rate(v.get(PROC))} | {_rate(v.get(CELERY))} |"
                )
        lines.append("")
    if "floor" in sc:
        lines += ["### The floor: the services alone, one client (median ms)", ""]
        lines += ["| call | ms |", "|---|---|"]
        lines += [f"| {key} | {v:.3f} |" for key, v in sc["floor"].items() if not key.startswith("_")]
        lines.append("")
    if "scan" in sc:
        lines += [
            "### Scan (recover + dispatch, ms; 10 pending jobs per queue)",
            "",
            "| table | median ms (min-max) | leases taken |",
            "|---|---|---|",
        ]
        for key, v in sc["scan"].items():
            if not key.startswith("_"):
                m = v["ms"]
                lines.append(
                    f"| {key} | {m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f}) | {v['leases_taken']} |"
                )
        lines.append("")
    if "failures" in sc:
        lines += ["### Failure-heavy (healthy jobs/s)", "", "| variant | jobs/s |", "|---|---|"]
        for key, v in sc["failures"].items():
            if not key.startswith("_"):
                lines.append(f"| {key} | {_rate(v)} |")
        lines.append("")
    if "memory" in sc:
        m = sc["memory"]
        lines += [
            "### Memory (RSS, MB)",
            "",
            "| process | at 10% of jobs | at the end | peak |",
            "|---|---|---|---|",
            _mem_row("worker child (max of 2)", m, "child"),
            _mem_row("beat", m, "beat"),
            f"\n{m['jobs']:,} jobs in {m['seconds']:.0f} s.",
            "",
        ]
    lines.append(
        f"Load average before / after: {results.get('load_before')} / {results.get('load_after')}; "
        f"total {results.get('seconds')} s."
    )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """The throughput curve, and beside it the paths where we do not lead: idle latency
    (p50, p95) and one-by-one enqueue, so that the picture is the whole one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]
    panels = [name for name in ("throughput", "latency", "enqueue") if name in scenarios]
    widths = {"throughput": 1.6, "latency": 1.0, "enqueue": 1.2}
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4.2 * sum(widths[p] for p in panels), 4.4),
        gridspec_kw={"width_ratios": [widths[p] for p in panels]},
        squeeze=False,
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        {"throughput": _plot_throughput, "latency": _plot_latency, "enqueue": _plot_enqueue}[panel](
            ax, scenarios[panel]
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SYSTEMS = (
    (OURS, "queuetopia-celery", "C0"),
    (CELERY, "plain Celery", "C1"),
    (PROC, "procrastinate", "C2"),
)


def _plot_throughput(ax: Any, data: dict[str, Any]) -> None:
    shapes = [k for k in data if not k.startswith("_")]
    xs = [int(k.split("x")[0]) for k in shapes]
    for name, label in (
        (OURS, "queuetopia-celery (ordered, persisted)"),
        (CELERY, "plain Celery no-op (no order, no persistence)"),
        (PROC, "procrastinate, lock= per queue (1/10 of the jobs)"),
    ):
        med = [data[k][name]["rate"]["median"] if name in data[k] else None for k in shapes]
        lo = [data[k][name]["rate"]["min"] if name in data[k] else None for k in shapes]
        hi = [data[k][name]["rate"]["max"] if name in data[k] else None for k in shapes]
        pts = [(x, m, a, b) for x, m, a, b in zip(xs, med, lo, hi, strict=False) if m is not None]
        if not pts:
            continue
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("number of queues (jobs spread evenly)")
    ax.set_ylabel("jobs/s (median, min-max bars)")
    ax.set_title("No-op throughput, 2 worker processes", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _bars(ax: Any, groups: list[str], values: dict[str, list[float | None]]) -> None:
    """Grouped bars: one group per label in ``groups``, one bar per system."""
    present = [(name, label, color) for name, label, color in SYSTEMS if name in values]
    width = 0.8 / max(len(present), 1)
    for i, (name, label, color) in enumerate(present):
        for g, value in enumerate(values[name]):
            if value is None:
                continue
            x = g + (i - (len(present) - 1) / 2) * width
            ax.bar(x, value, width, color=color, label=label if g == 0 else None)
            ax.annotate(
                f"{value:,.0f}" if value >= 100 else f"{value:.1f}",
                (x, value),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_latency(ax: Any, data: dict[str, Any]) -> None:
    values = {name: [data[name].get(p) for p in ("p50", "p95")] for name, _, _ in SYSTEMS if name in data}
    _bars(ax, ["p50", "p95"], values)
    ax.set_ylabel("ms (lower is better)")
    ax.set_title("Idle latency, enqueue to first line", fontsize=10)


def _plot_enqueue(ax: Any, data: dict[str, Any]) -> None:
    shapes = [("one/1p/many", "1 producer"), ("one/4p/many", "4 producers")]
    shapes = [(key, label) for key, label in shapes if key in data]
    values: dict[str, list[float | None]] = {}
    for name, _, _ in SYSTEMS:
        rates = [data[key].get(name, {}).get("rate", {}).get("median") for key, _ in shapes]
        if any(rate is not None for rate in rates):
            values[name] = rates
    _bars(ax, [label for _, label in shapes], values)
    ax.set_ylabel("jobs/s (higher is better)")
    ax.set_title("Enqueue one by one, a new queue each", fontsize=10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("results", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    print(markdown(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
