"""``python -m bench.scaling``: what one PostgreSQL primary pays per job, with 2, 4, 8
and 16 worker processes (docs/scaling.md).

A private PostgreSQL cluster (initdb in a temporary directory, run as the ``postgres``
user when started as root, as the chaos suite does) with ``pg_stat_statements`` and the
durability settings of a production server (fsync, synchronous_commit on, autovacuum
on). For each number of worker processes W (one ``celery worker -P prefork -c W``):

1. **create**: one producer (this process) creates Q x J no-op jobs one by one with
   ``create_job`` (each with its wake-up), round-robin over Q queues, with no worker
   running; then the unstarted leases are given back and the perform messages dropped;
2. **run**: the worker starts and, once it is ready, the queues are woken (as producers'
   kicks would) and drained.

For each phase: the CPU time of the whole cluster (the postmaster with its reaped
children, plus every live child: backends, WAL writer, checkpointer, autovacuum), the
statements the server ran (``pg_stat_statements`` calls, BEGIN/COMMIT included), the
WAL written, the worker's and the producer's CPU, each per job, and the server
connections held; the measuring connections are subtracted. Optional extra rows: with
``prepare_threshold=none`` direct, and through a PgBouncer in transaction mode
(``--pgbouncer``, tests/pgbouncer.py). A small unreported round runs first (cold caches).

Results: printed as a markdown table and written to
``bench/results/<time>-scaling.json``. Redis: ``BENCH_REDIS_URL`` (db 5).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis

from queuetopia_celery import migrate
from queuetopia_celery.app import make_engine

from . import qtapp
from .env import REDIS_URL, ROOT, Proc, load, wait_for
from .systems import dispatch_all

TICK = os.sysconf("SC_CLK_TCK")
PROBE = (
    "SELECT 1 /* bench-probe */ FROM queuetopia_jobs"
    " WHERE scope = %s AND status IN ('pending', 'running') LIMIT 1"
)


def cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds of ``pid`` (with its reaped children's when ``reaped``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree of depth one (PostgreSQL, a prefork worker): the
    parent with every child it reaped, plus its live children."""
    return cpu(pid, reaped=True) + sum(cpu(child) for child in children(pid))


class Cluster:
    """A private PostgreSQL cluster with pg_stat_statements and production durability."""

    def __init__(self) -> None:
        from tests.chaos.harness import PostgresCluster

        self.pg = PostgresCluster()
        self.pg.init()
        with (self.pg.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
                "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track_utility = on\n"
            )
        self.pg.start()
        self.port = self.pg.port

    def postmaster(self) -> int:
        return int((self.pg.data / "postmaster.pid").read_text().split()[0])

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def url(self, database: str, query: str = "") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}{query}"

    def destroy(self) -> None:
        self.pg.destroy()


class Meter:
    """Cluster CPU, statements and transactions of one database, less the meter's own."""

    def __init__(self, cluster: Cluster, database: str) -> None:
        self.cluster = cluster
        self.database = database
        self.admin = psycopg.connect(cluster.dsn("postgres"), autocommit=True)
        self.admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.probe = psycopg.connect(cluster.dsn(database), autocommit=True, prepare_threshold=None)
        self.own = [self.admin.info.backend_pid, self.probe.info.backend_pid]

    def snapshot(self) -> dict[str, Any]:
        # One row per statement (pg_stat_statements may keep several entries of one
        # queryid: per user, top level or not).
        rows = self.admin.execute(
            """SELECT s.queryid, sum(s.calls), left(regexp_replace(min(s.query), '\\s+', ' ', 'g'), 90)
               FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
               WHERE d.datname = %s AND s.query NOT LIKE '%%bench-probe%%' GROUP BY s.queryid""",
            (self.database,),
        ).fetchall()
        (evicted,) = self.admin.execute("SELECT dealloc FROM pg_stat_statements_info").fetchone()  # type: ignore[misc]
        (wal,) = self.admin.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()  # type: ignore[misc]
        return {
            "cpu": tree_cpu(self.cluster.postmaster()) - sum(cpu(pid) for pid in self.own),
            "wal": float(wal),
            "evicted": int(evicted),
            "calls": {row[0]: (int(row[1]), row[2]) for row in rows},
            "wall": time.perf_counter(),
        }

    def open_jobs(self, scope: str) -> bool:
        return self.probe.execute(PROBE, (scope,)).fetchone() is not None

    def close(self) -> None:
        self.admin.close()
        self.probe.close()


def per_job(before: dict[str, Any], after: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Rates and costs per job between two snapshots; the statements that ran most."""
    seconds = after["wall"] - before["wall"]
    calls = {
        text: count - before["calls"].get(queryid, (0, ""))[0]
        for queryid, (count, text) in after["calls"].items()
    }
    calls = {text: count for text, count in calls.items() if count > 0}
    control = sum(n for text, n in calls.items() if text.upper() in ("BEGIN", "COMMIT", "ROLLBACK"))
    return {
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
        "db_cpu_ms_per_job": (after["cpu"] - before["cpu"]) * 1000 / jobs,
        "db_cpu_cores": (after["cpu"] - before["cpu"]) / seconds,
        "statements_per_job": sum(calls.values()) / jobs,
        # Statement entries pg_stat_statements evicted meanwhile (their calls are lost).
        "evicted": after["evicted"] - before["evicted"],
        "wal_bytes_per_job": (after["wal"] - before["wal"]) / jobs,
        "begin_commit_per_job": control / jobs,
        "top_statements": sorted(((n / jobs, text) for text, n in calls.items()), reverse=True)[:8],
    }


def point(
    cluster: Cluster, meter: Meter, url: str, workers: int, *, queues: int, per_queue: int, tmp: Path
) -> dict[str, Any]:
    """One row: create Q x J jobs one by one, then run them with ``workers`` processes."""
    tag = uuid.uuid4().hex[:8]
    scope, celery_queue, sink = f"scale-{tag}", f"scale-q-{tag}", f"scale-sink-{tag}"
    names = [f"q{i}" for i in range(queues)]
    jobs = queues * per_queue
    broker = redis.Redis.from_url(REDIS_URL)
    _, producer = qtapp.build(scope, database_url=url, broker_url=REDIS_URL, celery_queue=sink)
    _, driver = qtapp.build(scope, database_url=url, broker_url=REDIS_URL, celery_queue=celery_queue)
    worker: Proc | None = None
    try:
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        before = meter.snapshot()
        for _ in range(per_queue):
            for name in names:
                producer.create_job(name, "noop", {})
        after = meter.snapshot()
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        create = per_job(before, after, jobs)
        create["producer_cpu_ms_per_job"] = (
            (client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime) * 1000 / jobs
        )
        producer.backend.release_unstarted(None)
        broker.delete(sink)
        vacuum(cluster, meter.database)

        ready = tmp / f"ready-{tag}"
        env = {
            "BENCH_SCOPE": scope,
            "BENCH_DATABASE_URL": url,
            "BENCH_BROKER_URL": REDIS_URL,
            "BENCH_CELERY_QUEUE": celery_queue,
            "BENCH_READY_FILE": str(ready),
        }
        args = [
            sys.executable, "-m", "celery", "-A", "bench.qtapp", "worker",
            "-P", "prefork", "-c", str(workers), "-Q", celery_queue, "-n", f"scale-{tag}@%h",
            "--loglevel", "WARNING",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        worker = Proc(args, env, tmp)
        wait_for(lambda: worker.check() and ready.exists(), timeout=120, interval=0.05)
        time.sleep(1.0)  # the children's own start (imports, first connections) outside the timing
        before = meter.snapshot()
        worker0 = tree_cpu(worker.pid)
        dispatch_all(driver, names)
        wait_for(lambda: not meter.open_jobs(scope), timeout=600, interval=0.02)
        after = meter.snapshot()
        run = per_job(before, after, jobs)
        run["worker_cpu_ms_per_job"] = (tree_cpu(worker.pid) - worker0) * 1000 / jobs
        # Server connections the workers (and this driver) hold now, the meter's aside.
        (held,) = meter.admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
            (meter.database, meter.probe.info.backend_pid),
        ).fetchone()  # type: ignore[misc]
        run["server_connections"] = int(held)
        return {"workers": workers, "jobs": jobs, "create": create, "run": run, "load": load()}
    finally:
        if worker is not None:
            worker.stop()
        broker.delete(sink, celery_queue)
        broker.close()
        producer.engine.dispose()
        driver.engine.dispose()


def vacuum(cluster: Cluster, database: str) -> None:
    with psycopg.connect(cluster.dsn(database), autocommit=True) as conn:
        for table in ("queuetopia_jobs", "queuetopia_queues", "queuetopia_leases"):
            conn.execute(f"VACUUM (ANALYZE) {table}")


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| setup | W | jobs/s (run) | DB CPU ms/job: create + run | DB cores busy (run) | statements/job:"
        " create + run | of which BEGIN/COMMIT | WAL bytes/job: create + run | worker CPU ms/job |"
        " producer CPU ms/job | server connections |"
    )
    out = [head, "|" + "---|" * 11]
    for r in rows:
        c, u = r["create"], r["run"]
        out.append(
            f"| {r['setup']} | {r['workers']} | {u['jobs_per_s']:,.0f} | {c['db_cpu_ms_per_job']:.2f} +"
            f" {u['db_cpu_ms_per_job']:.2f} | {u['db_cpu_cores']:.2f} | {c['statements_per_job']:.2f} +"
            f" {u['statements_per_job']:.2f} | {c['begin_commit_per_job']:.2f} +"
            f" {u['begin_commit_per_job']:.2f} | {c['wal_bytes_per_job']:,.0f} +"
            f" {u['wal_bytes_per_job']:,.0f} |"
            f" {u['worker_cpu_ms_per_job']:.2f} | {c['producer_cpu_ms_per_job']:.2f} |"
            f" {u['server_connections']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--queues", type=int, default=200)
    parser.add_argument("--jobs-per-queue", type=int, default=15)
    parser.add_argument(
        "--pgbouncer",
        type=int,
        nargs="*",
        default=None,
        help="also run these W through a PgBouncer (transaction mode, pool of 4), and W=4 direct"
        " with prepare_threshold=none (default W: 4 16)",
    )
    parser.add_argument("--pool-size", type=int, default=4)
    args = parser.parse_args(argv)

    started = dt.datetime.now(dt.timezone.utc)
    print(f"uptime (load average before): {load()}", flush=True)
    cluster = Cluster()
    bouncer = None
    tmp = cluster.pg.workdir
    rows: list[dict[str, Any]] = []
    try:
        admin = psycopg.connect(cluster.dsn("postgres"), autocommit=True)
        admin.execute('CREATE DATABASE "qt_scaling"')
        admin.close()
        engine = make_engine(cluster.url("qt_scaling"))
        migrate.upgrade(engine)
        engine.dispose()
        meter = Meter(cluster, "qt_scaling")
        setups: list[tuple[str, str, int]] = [("direct", cluster.url("qt_scaling"), w) for w in args.workers]
        if args.pgbouncer is not None:
            from tests.pgbouncer import PgBouncer

            bouncer = PgBouncer({"qt_scaling": ("qt_scaling", args.pool_size)}, server_port=cluster.port)
            bouncer.start()
            setups.append(
                ("direct, prepare_threshold=none", cluster.url("qt_scaling", "?prepare_threshold=none"), 4)
            )
            for w in args.pgbouncer or [4, 16]:
                setups.append(
                    (
                        f"PgBouncer pool {args.pool_size}",
                        bouncer.url("qt_scaling", "?prepare_threshold=none"),
                        w,
                    )
                )
        # A small round first, not reported: the new tables' first pages, the catalog
        # caches and autovacuum's first ANALYZE would otherwise fall on the first row.
        point(cluster, meter, cluster.url("qt_scaling"), 2, queues=50, per_queue=4, tmp=tmp)
        for setup, url, workers in setups:
            bouncer0 = bouncer.cpu_seconds() if bouncer is not None else 0.0
            row = point(
                cluster, meter, url, workers, queues=args.queues, per_queue=args.jobs_per_queue, tmp=tmp
            )
            row["setup"] = setup
            if bouncer is not None and setup.startswith("PgBouncer"):
                row["pgbouncer_cpu_ms_per_job"] = (bouncer.cpu_seconds() - bouncer0) * 1000 / row["jobs"]
            rows.append(row)
            print(
                f"{setup} W={workers}: run {row['run']['jobs_per_s']:.0f} jobs/s, DB CPU"
                f" {row['create']['db_cpu_ms_per_job']:.2f} + {row['run']['db_cpu_ms_per_job']:.2f} ms/job,"
                f" load {row['load']}",
                flush=True,
            )
        meter.close()
    finally:
        if bouncer is not None:
            bouncer.stop()
        cluster.destroy()
    print(f"uptime (load average after): {load()}")
    print()
    print(table(rows))
    for row in rows[:1]:
        for phase in ("create", "run"):
            print(f"\nStatements per job, {phase} ({row['setup']}, W={row['workers']}):")
            for n, text in row[phase]["top_statements"]:
                print(f"  {n:6.3f}  {text}")
    for row in rows:
        if "pgbouncer_cpu_ms_per_job" in row:
            cost = row["pgbouncer_cpu_ms_per_job"]
            print(f"PgBouncer CPU, W={row['workers']}: {cost:.3f} ms per job (create + run)")
    out = ROOT / "bench" / "results" / f"{started.strftime('%Y-%m-%dT%H%M%S%z')}-scaling.json"
    out.write_text(json.dumps({"started": started.isoformat(), "args": vars(args), "rows": rows}, indent=1))
    print(f"raw data: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
