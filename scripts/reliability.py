#!/usr/bin/env python3
"""The reliability report: run the chaos suite (tests/chaos, marker ``chaos``) and
print, per fault: jobs, faults injected, recovery time (lease expiry to the next start
in the queue), invariant violations and repeated side effects.

    python scripts/reliability.py                 # the CI-sized scenarios
    python scripts/reliability.py --scale 3       # three times the jobs
    python scripts/reliability.py -k redis        # extra arguments go to pytest

Needs PostgreSQL on 127.0.0.1:5432 and the ``redis-server`` binary (the suite runs a
private Redis so that it can restart it), like the test suite. Exits non-zero when a
test fails (an invariant broken, or a scenario that did not run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COLUMNS = [
    ("fault", "fault"),
    ("jobs", "jobs"),
    ("faults", "faults injected"),
    ("recovery_s", "recovery s (max)"),
    ("violations", "invariant violations"),
    ("repeats", "repeated side effects"),
    ("settle_s", "settle s"),
    ("notes", "notes"),
]


def table(rows: list[dict[str, object]]) -> str:
    def cell(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if key == "violations" and "control" in str(row["fault"]):
            return f"{value} (expected > 0)"
        return str(value)

    body = [[cell(row, key) for key, _ in COLUMNS] for row in rows]
    heads = [title for _, title in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in body)]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the workload sizes")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that has the test deps")
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "QT_CHAOS_REPORT": str(report), "QT_CHAOS_SCALE": str(args.scale)}
        command = [args.python, "-m", "pytest", "tests/chaos", "-m", "chaos", "-q", "-p", "no:cacheprovider"]
        began = time.monotonic()
        done = subprocess.run(
            [*command, *pytest_args], check=False, cwd=ROOT, env=env, capture_output=True, text=True
        )
        elapsed = time.monotonic() - began
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    summary = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no pytest output)"]
    print(table(rows))
    print()
    print(f"scale {args.scale:g}; pytest: {summary[0]}; wall time {elapsed:.0f} s")
    real = [r for r in rows if "control" not in str(r["fault"])]
    print(f"invariant violations outside the control scenario: {sum(int(r['violations']) for r in real)}")
    if done.returncode != 0:
        print(done.stdout[-6000:], file=sys.stderr)
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
