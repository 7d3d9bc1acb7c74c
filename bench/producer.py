"""``python -m bench.producer [--runs N] [--jobs N]``: the producer path's parts, one
by one in one process, alternating run after run (issue 13): ``create_job`` as users
call it (background publish, waited for at the end), its insert alone (what stays in
the caller's path), Celery's ``apply_async`` of the perform message, our ``publish``
of one lease, a raw Redis LPUSH; and ``create_jobs`` of 1,000 jobs returning the jobs
or their ids. A new queue per job. Needs the local PostgreSQL and Redis (db 5)."""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg
import redis

from queuetopia_celery.backends.base import Lease
from queuetopia_celery.jobs import new_job
from queuetopia_celery.tasks import publish

from . import qtapp
from .env import REDIS_URL, load

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    db = f"qt_bench_producer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {db}")
    queue = f"bench-producer-{uuid.uuid4().hex[:6]}"
    app, qt = qtapp.build(
        "producer",
        database_url=f"postgresql://postgres@127.0.0.1:5432/{db}",
        broker_url=REDIS_URL,
        celery_queue=queue,
    )
    r = redis.Redis.from_url(REDIS_URL)
    try:
        qt.migrate()
        perform = app.tasks["queuetopia.producer.perform"]
        lease = Lease("q", 1, "t", 60.0)

        def create_job(n: int) -> None:
            for _ in range(n):
                qt.create_job(uuid.uuid4().hex, "noop")

        def insert_only(n: int) -> None:
            for _ in range(n):
                qt.backend.create_jobs_taking_leases([new_job(uuid.uuid4().hex, "noop", {})], grace=60)

        def apply_async(n: int) -> None:
            for _ in range(n):
                perform.apply_async(args=("q", 1, "t"), queue=queue, time_limit=70)

        def publish_one(n: int) -> None:
            for _ in range(n):
                publish(qt, perform, [lease])

        def lpush(n: int) -> None:
            for _ in range(n):
                r.lpush(f"{queue}-raw", b"x" * 600)

        def bulk(returning: str) -> Callable[[int], None]:
            def run(n: int) -> None:
                # 100 queues (as the bench's bulk/1p/many): new in the first batch only.
                prefix = uuid.uuid4().hex[:8]
                names = [f"{prefix}-{i % 100}" for i in range(1000)]
                for _ in range(0, n * 10, 1000):
                    qt.create_jobs([new_job(name, "noop", {}) for name in names], returning=returning)  # type: ignore[call-overload]

            return run

        parts: dict[str, tuple[Callable[[int], None], int]] = {
            "create_job": (create_job, 1),
            "insert only": (insert_only, 1),
            "Celery apply_async": (apply_async, 1),
            "our publish": (publish_one, 1),
            "Redis LPUSH": (lpush, 1),
            "create_jobs x1000, jobs": (bulk("jobs"), 10),
            "create_jobs x1000, ids": (bulk("ids"), 10),
        }
        rates: dict[str, list[float]] = {name: [] for name in parts}
        print(f"load before: {load()}", flush=True)
        for run in range(args.runs):
            for name, (fn, per) in parts.items():
                t0 = time.perf_counter()
                fn(args.jobs)
                rates[name].append(args.jobs * per / (time.perf_counter() - t0))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
        print(f"load after: {load()}")
        print("\n| part | jobs (messages)/s, median (min-max) |\n|---|---|")
        for name, values in rates.items():
            print(f"| {name} | {statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f}) |")
    finally:
        r.delete(queue, f"{queue}-raw")
        r.close()
        qt.engine.dispose()
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


if __name__ == "__main__":
    main()
