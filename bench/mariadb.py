"""``python -m bench.mariadb [--jobs N] [--runs N]``: queuetopia-celery on MariaDB beside
PostgreSQL, back to back in one run on this machine: throughput (one hot queue, 10 and
100 queues; no-op jobs, 2 worker processes, the defaults) and enqueue (``create_job``
one by one with its kick, ``create_jobs`` in batches of 1,000; one producer process).
The same drivers as ``python -m bench`` (bench/systems.py, bench/scenarios.py), run
once on the bench's PostgreSQL database and once on a fresh MariaDB database
(``BENCH_MARIADB_ADMIN_URL``, root on 127.0.0.1:3306 by default), alternating per run.
Prints a markdown table with the medians and MariaDB's ratio to PostgreSQL."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import sqlalchemy as sa

from queuetopia_celery import make_engine, migrate

from . import qtapp
from .env import REDIS_URL, Env, summary, wait_for
from .scenarios import enqueue_once
from .systems import CONCURRENCY, dispatch_all, open_count, seed

MARIADB_ADMIN_URL = os.environ.get("BENCH_MARIADB_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def throughput_once(env: Env, queues: int, per_queue: int) -> float:
    """Jobs/s of ``queues`` x ``per_queue`` no-op jobs (as ``Ours.run``)."""
    scope, celery_queue = env.unique("qt"), env.unique("qtq")
    _, qt = qtapp.build(scope, database_url=env.database_url, broker_url=REDIS_URL, celery_queue=celery_queue)
    envvars = env.qt_env(scope, celery_queue, BENCH_POLL="1.0")
    worker = env.celery_worker("bench.qtapp", celery_queue, envvars, concurrency=CONCURRENCY)
    try:
        names = [f"r-{i}" for i in range(queues)]
        seed(qt, names, per_queue)
        t0 = time.perf_counter()
        dispatch_all(qt, names)
        wait_for(lambda: open_count(qt, "r-") == 0, interval=0.02)
        return queues * per_queue / (time.perf_counter() - t0)
    finally:
        env.stop(worker)
        qt.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mariadb", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per throughput run (default 2000)")
    parser.add_argument("--enqueue", type=int, default=1000, help="jobs per enqueue run (default 1000)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    env = Env(procrastinate=False)
    name = f"qt_bench_{env.tag}"
    admin = sa.create_engine(MARIADB_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    mariadb_url = sa.engine.make_url(MARIADB_ADMIN_URL).set(database=name)
    mariadb_url = mariadb_url.render_as_string(hide_password=False)
    engine = make_engine(mariadb_url)
    migrate.upgrade(engine)
    engine.dispose()
    databases = {"postgresql": env.database_url, "mariadb": mariadb_url}
    scenarios: dict[str, Any] = {
        f"throughput 1 x {args.jobs} (hot queue)": lambda: throughput_once(env, 1, args.jobs),
        f"throughput 10 x {args.jobs // 10}": lambda: throughput_once(env, 10, args.jobs // 10),
        f"throughput 100 x {args.jobs // 100}": lambda: throughput_once(env, 100, args.jobs // 100),
        f"enqueue create_job x {args.enqueue}, new queue each": lambda: enqueue_once(
            env, "queuetopia-celery", mode="one", procs=1, target="many", n_total=args.enqueue
        ),
        f"enqueue create_job x {args.enqueue}, one queue": lambda: enqueue_once(
            env, "queuetopia-celery", mode="one", procs=1, target="one_queue", n_total=args.enqueue
        ),
        f"enqueue create_jobs of 1000 x {10 * args.enqueue}, 100 queues": lambda: enqueue_once(
            env, "queuetopia-celery", mode="bulk", procs=1, target="many", n_total=10 * args.enqueue
        ),
    }
    rates: dict[str, dict[str, list[float]]] = {s: {d: [] for d in databases} for s in scenarios}
    pg_engine = env.engine
    try:
        for run in range(args.runs):
            for scenario, measure in scenarios.items():
                for database, url in databases.items():
                    env.database_url = url
                    if database == "postgresql":
                        env.engine = pg_engine
                        env.vacuum()
                    rate = measure()
                    rates[scenario][database].append(rate)
                    print(f"run {run + 1}: {scenario} on {database}: {rate:.0f} jobs/s", flush=True)
    finally:
        env.database_url, env.engine = databases["postgresql"], pg_engine
        env.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()
    print(f"\nload average at the end: {os.getloadavg()}; runs: {args.runs}\n")
    print("| scenario | PostgreSQL jobs/s | MariaDB jobs/s | MariaDB / PostgreSQL |")
    print("|---|---|---|---|")
    for scenario, by_db in rates.items():
        pg, my = summary(by_db["postgresql"]), summary(by_db["mariadb"])
        print(
            f"| {scenario} | {pg['median']:.0f} ({pg['min']:.0f}-{pg['max']:.0f}) "
            f"| {my['median']:.0f} ({my['min']:.0f}-{my['max']:.0f}) | {my['median'] / pg['median']:.2f} |"
        )


if __name__ == "__main__":
    main()
