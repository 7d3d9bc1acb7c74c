#!/usr/bin/env python3
"""The reliability report: run the chaos suite (tests/chaos, marker ``chaos``) and
print, per fault: jobs, faults injected, recovery time (lease expiry to the next start
in the queue), invariant violations and repeated side effects.

    python scripts/reliability.py                 # the CI-sized scenarios, shortened timings
    python scripts/reliability.py --defaults      # the second table: the library's defaults
    python scripts/reliability.py --scale 3       # three times the jobs
    python scripts/reliability.py -k redis        # extra arguments go to pytest

``--defaults`` runs the fault scenarios with Queuetopia's default settings (dispatch
grace, lease margin, time-limit grace; poll_interval 1 s) and prints, per fault: the
time from the fault (the end of an outage) to every queue that had work left running
again, repeated side effects, and perform messages published per job.

Needs PostgreSQL on 127.0.0.1:5432, the ``redis-server`` binary, the PostgreSQL server
binaries (the suite runs a private cluster) and RabbitMQ's (a private node), like the
test suite. Exits non-zero when a test fails (an invariant broken, or a scenario that
did not run).
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


#: The second table: default settings.
DEFAULT_COLUMNS = [
    ("fault", "fault"),
    ("jobs", "jobs"),
    ("faults", "faults injected"),
    ("queues_back_s", "fault to every queue running s (max)"),
    ("repeats", "repeated side effects"),
    ("messages_per_job", "perform messages per job"),
    ("violations", "invariant violations"),
    ("settle_s", "settle s"),
    ("notes", "notes"),
]
#: The scenarios of the default-settings table (those that do not rely on a short
#: dispatch grace to finish in time).
DEFAULT_SELECTION = (
    "kill_9 or warm_shutdown or broker_restarted or redis_unavailable or postgres or paused or soak"
)


def table(rows: list[dict[str, object]], columns: list[tuple[str, str]] = COLUMNS) -> str:
    def cell(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if key == "violations" and "control" in str(row["fault"]):
            return f"{value} (expected > 0)"
        return str(value)

    body = [[cell(row, key) for key, _ in columns] for row in rows]
    heads = [title for _, title in columns]
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
    parser.add_argument(
        "--defaults", action="store_true", help="the default-settings table (poll_interval 1 s aside)"
    )
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "QT_CHAOS_REPORT": str(report), "QT_CHAOS_SCALE": str(args.scale)}
        command = [args.python, "-m", "pytest", "tests/chaos", "-m", "chaos", "-q", "-p", "no:cacheprovider"]
        if args.defaults:
            env["QT_CHAOS_SETTINGS"] = "defaults"
            if "-k" not in pytest_args:
                command += ["-k", DEFAULT_SELECTION]
        began = time.monotonic()
        done = subprocess.run(
            [*command, *pytest_args], check=False, cwd=ROOT, env=env, capture_output=True, text=True
        )
        elapsed = time.monotonic() - began
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    summary = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no pytest output)"]
    print(table(rows, DEFAULT_COLUMNS if args.defaults else COLUMNS))
    print()
    settings = "default settings (poll_interval 1 s)" if args.defaults else "shortened timings"
    print(f"{settings}; scale {args.scale:g}; pytest: {summary[0]}; wall time {elapsed:.0f} s")
    real = [r for r in rows if "control" not in str(r["fault"])]
    print(f"invariant violations outside the control scenario: {sum(int(r['violations']) for r in real)}")
    if done.returncode != 0:
        print(done.stdout[-6000:], file=sys.stderr)
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
