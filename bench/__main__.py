"""``python -m bench [--quick] [--only NAME ...] [--runs N]``: run the scenarios of
issue 5 against queuetopia-celery, plain Celery and procrastinate, back to back on the
local PostgreSQL and Redis (db 5), and write ``bench/results/<time>.json`` and a
markdown summary (and the throughput plot with ``--plot``).

``python -m bench --compare REV [--quick] [--only ...] [--runs N]`` runs the
throughput, latency and enqueue scenarios of queuetopia-celery for this checkout and
for the revision REV side by side instead (see ``bench/compare.py``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import compare, report
from .env import Env, load
from .scenarios import SCENARIOS

FULL = {
    "runs": 3,
    "shapes": [(1, 2000), (10, 200), (100, 50), (1000, 5)],
    "latency_samples": 200,
    "enqueue_one": 1000,
    "enqueue_bulk": 20000,
    "scan_queues": [1000, 10000, 100000],
    "scan_done_at": 100000,
    "done_jobs": 1000000,
    "scan_repeats": 5,
    "failure_queues": 10000,
    "memory_jobs": 100000,
    "roundtrip_jobs": 2000,
}
QUICK = {
    **FULL,
    "shapes": [(1, 500), (100, 50)],
    "latency_samples": 50,
    "enqueue_one": 200,
    "enqueue_bulk": 5000,
    "scan_queues": [1000, 10000],
    "scan_done_at": 10000,
    "done_jobs": 100000,
    "failure_queues": 1000,
    "memory_jobs": 10000,
    "roundtrip_jobs": 1000,
}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("queuetopia-celery", "celery", "kombu", "procrastinate", "psycopg", "sqlalchemy", "redis"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    for name, cmd in (("postgresql", ["psql", "--version"]), ("redis-server", ["redis-server", "--version"])):
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            out[name] = "-"
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--runs", type=int, help="repetitions per measurement (default 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--plot", type=Path, help="write the throughput-vs-queues PNG here")
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="compare this checkout with the revision REV (a commit, tag or branch) instead",
    )
    args = parser.parse_args(argv)
    if args.compare is not None:
        bad = sorted(set(args.only or []) - set(compare.COMPARABLE))
        if bad:
            parser.error(f"--compare runs only {', '.join(compare.COMPARABLE)}, not {', '.join(bad)}")
        if args.plot:
            parser.error("--plot does not apply to --compare")
    cfg = dict(QUICK if args.quick else FULL)
    if args.runs:
        cfg["runs"] = args.runs
    names = args.only or list(SCENARIOS)
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "quick": args.quick,
        "config": cfg,
        "machine": machine(),
        "versions": versions(),
        "load_before": load(),
        "scenarios": {},
    }
    # SIGTERM (e.g. from a CI timeout) cleans up like Ctrl-C: workers stopped, databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.compare is not None:
        return compare.run(args.compare, args.only or list(compare.COMPARABLE), cfg, results, args.out)
    env = Env()
    # Recorded because it matters: with autovacuum off the bench vacuums between runs.
    results["machine"]["postgresql_autovacuum"] = env.autovacuum()
    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{results['started'].replace(':', '')}{'-quick' if args.quick else ''}.json"
    try:
        for name in names:
            print(f"== {name} (load {load()})", flush=True)
            t0 = time.perf_counter()
            results["scenarios"][name] = SCENARIOS[name](env, cfg)
            results["scenarios"][name]["_seconds"] = round(time.perf_counter() - t0, 1)
            results["scenarios"][name]["_load_after"] = load()
            path.write_text(json.dumps(results, indent=1))  # partial results survive
    finally:
        env.close()
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["load_after"] = load()
    path.write_text(json.dumps(results, indent=1))
    print(report.markdown(results))
    print(f"results: {path}")
    if args.plot and "throughput" in results["scenarios"]:
        report.plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
