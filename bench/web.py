"""Page times of the web view on a big scope.

    python -m bench.web [--queues 10000] [--open 10] [--done 20] [--blocked 100] [--repeats 30]

On a fresh database of its own (created and dropped here), PostgreSQL at 127.0.0.1:
``queues`` queues, each with ``open`` open jobs (100,000 by default) behind ``done`` done
ones (200,000 of history), ``blocked`` of them blocked by a failing head. The rows are
inserted with one SQL statement each (the bench measures reading, not creating).
Each page is requested ``repeats`` times through httpx's ASGI transport (the whole
Starlette app: routing, the queries, the templates; no network), after one warm-up.

Baselines, in the same run: the same overview on an empty scope (the app's fixed
cost), and the facade's ``queue_statuses()`` (every queue's row at once, what the CLI's
``status`` reads) on the big scope. Prints a Markdown table with the load average, as
other processes share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import sqlalchemy as sa

ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BROKER = "memory://"
SCOPE = "bench"

FILL = """
INSERT INTO queuetopia_jobs (scope, queue, action, params, sequence, timeout, max_backoff,
    max_attempts, scheduled_at, status, attempts, attempted_at, done_at, inserted_at, on_exhausted)
SELECT :scope, 'account-' || q, 'charge', '{"amount": 1}', s, 60, 86400, 20,
    now() - interval '1 hour' + s * interval '1 second',
    CASE WHEN s <= :done THEN 'done' ELSE 'pending' END,
    CASE WHEN s <= :done THEN 1 ELSE 0 END,
    CASE WHEN s <= :done THEN now() - interval '1 hour' + s * interval '1 second' END,
    CASE WHEN s <= :done THEN now() - interval '1 hour' + s * interval '1 second' END,
    now() - interval '1 hour', 'skip'
FROM generate_series(1, :queues) AS q, generate_series(1, :done + :open) AS s
"""
QUEUES = """
INSERT INTO queuetopia_queues (scope, queue, last_sequence, due_at, paused)
SELECT :scope, 'account-' || q, :done + :open, now() - interval '1 hour', false
FROM generate_series(1, :queues) AS q
"""
BLOCK = """
UPDATE queuetopia_jobs SET attempts = 3, attempted_at = now() - interval '5 minutes',
    error = 'RuntimeError: payment gateway timed out' || chr(10) || 'Traceback ...',
    next_attempt_at = now() + interval '1 hour'
WHERE scope = :scope AND sequence = :done + 1
  AND queue IN (SELECT 'account-' || q FROM generate_series(1, :blocked) AS q)
"""


def _times(repeats: int, call: Callable[[], Any]) -> list[float]:
    call()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _row(name: str, times: list[float]) -> str:
    times = sorted(times)
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    return f"| {name} | {statistics.median(times):.1f} | {p95:.1f} | {max(times):.1f} |"


def _explain(engine: sa.Engine, get: Callable[[], None]) -> None:
    """Print the plan of each statement one request runs (EXPLAIN ANALYZE)."""
    seen: list[tuple[str, Any]] = []

    def record(*event: Any) -> None:  # (conn, cursor, statement, parameters, context, many)
        statement, parameters = event[2], event[3]
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    get()
    sa.event.remove(engine, "before_cursor_execute", record)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in seen:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            print("\n".join(row[0] for row in cursor.fetchall()), end="\n\n")
    finally:
        raw.close()


def main(args: argparse.Namespace) -> None:
    name = f"qt_bench_web_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        _bench(args, sa.engine.make_url(ADMIN).set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _bench(args: argparse.Namespace, url: str) -> None:
    from celery import Celery

    from queuetopia_celery import Queuetopia, make_engine, migrate
    from queuetopia_celery.web import queuetopia_web

    engine = make_engine(url)
    migrate.upgrade(engine)
    sizes = {"scope": SCOPE, "queues": args.queues, "open": args.open, "done": args.done}
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(FILL), sizes)
        conn.execute(sa.text(QUEUES), sizes)
        conn.execute(sa.text(BLOCK), {**sizes, "blocked": args.blocked})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE queuetopia_jobs"))
        conn.execute(sa.text("VACUUM ANALYZE queuetopia_queues"))
    fill = time.perf_counter() - start
    app = Celery("bench-web", broker=BROKER, set_as_current=False)
    qt = Queuetopia(SCOPE, app=app, engine=engine, disabled=True)
    empty = Queuetopia("bench-empty", app=app, engine=engine, disabled=True)
    web, web_empty = queuetopia_web(qt), queuetopia_web(empty)
    blocked_job = qt.list_jobs(queue="account-1", state="retrying", limit=1)[0]

    loop = asyncio.new_event_loop()

    def getter(asgi: Any, path: str) -> Callable[[], None]:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://bench")

        def get() -> None:
            response = loop.run_until_complete(client.get(path))
            assert response.status_code == 200, (path, response.status_code)

        return get

    last_page = -(-args.queues // 50)
    pages = [
        ("overview, page 1 (blocked queues first)", getter(web, "/")),
        (f"overview, page {last_page} (the last)", getter(web, f"/?page={last_page}")),
        ("a blocked queue (its 10 open and last 10 done jobs)", getter(web, "/queue?name=account-1")),
        ("a job", getter(web, f"/job/{blocked_job.id}")),
        ("baseline: overview of an empty scope", getter(web_empty, "/")),
    ]
    if args.explain:
        _explain(engine, pages[0][1])
    results = [(label, _times(args.repeats, get)) for label, get in pages]
    statuses = _times(max(3, args.repeats // 5), qt.queue_statuses)
    load = os.getloadavg()
    print(
        f"{args.queues} queues, {args.queues * args.open} open jobs, {args.queues * args.done} done, "
        f"{args.blocked} blocked; filled in {fill:.1f} s; load average {load[0]:.2f} {load[1]:.2f} "
        f"({os.cpu_count()} cores)\n"
    )
    print("| page | median ms | p95 ms | max ms |\n| --- | ---: | ---: | ---: |")
    for label, times in results:
        print(_row(label, times))
    print(_row("baseline: `qt.queue_statuses()` (every queue's row, as `status` reads)", statuses))
    engine.dispose()
    loop.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=10000)
    parser.add_argument("--open", type=int, default=10)
    parser.add_argument("--done", type=int, default=20)
    parser.add_argument("--blocked", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--explain", action="store_true", help="print the overview's query plans first")
    main(parser.parse_args())
