"""The Prometheus scrape (issue 15): how long reading one scope's gauges takes with
100,000 open jobs in 10,000 queues (and 100,000 done jobs beside them, which the reads
must not touch), next to the cheapest read of every open job in the same session.

``python -m bench --only scrape``. Target: a scrape under 100 ms."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import sqlalchemy as sa

from queuetopia_celery import metrics

from . import qtapp
from .env import REDIS_URL, Env, summary


def log(*args: Any) -> None:
    print(*args, flush=True)


def _seed(env: Env, scope: str, n_queues: int, per_queue: int, done: int) -> None:
    """``n_queues`` queues of ``per_queue`` open jobs, due an hour ago, except: 1% of
    the queues blocked (their head failed once, retried in an hour), 0.1% held, 1% with
    a running head, 10% scheduled for tomorrow, 0.5% paused; and ``done`` done jobs."""
    params = {"s": scope, "n": n_queues, "k": per_queue, "done": done}
    with env.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_queues (scope, queue, last_sequence, due_at, paused)"
                " SELECT :s, 'q' || g, :k + 1000, now() - interval '1 hour', g % 200 = 7"
                " FROM generate_series(1, :n) g"
            ),
            params,
        )
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_jobs (scope, queue, action, params, sequence, timeout, max_backoff,"
                " max_attempts, scheduled_at, status, attempts, inserted_at, next_attempt_at, error)"
                " SELECT :s, 'q' || g, 'noop', '{}', 1000 + k, 60, 86400, 20,"
                "  CASE WHEN g % 10 = 3 THEN now() + interval '1 day' ELSE now() - interval '1 hour' END,"
                "  CASE WHEN k = 1 AND g % 100 = 50 THEN 'running' ELSE 'pending' END,"
                "  CASE WHEN k = 1 AND g % 1000 = 500 THEN 20"
                "       WHEN k = 1 AND g % 100 IN (0, 50) THEN 1 ELSE 0 END,"
                "  now() - interval '1 hour',"
                "  CASE WHEN k = 1 AND g % 1000 = 500 THEN timestamptz '9999-12-31 00:00:00+00'"
                "       WHEN k = 1 AND g % 100 = 0 THEN now() + interval '1 hour' END,"
                "  CASE WHEN k = 1 AND (g % 100 = 0 OR g % 1000 = 500) THEN 'RuntimeError: boom' END"
                " FROM generate_series(1, :n) g, generate_series(1, :k) k"
            ),
            params,
        )
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_jobs (scope, queue, action, params, sequence, timeout, max_backoff,"
                " max_attempts, scheduled_at, status, attempts, inserted_at, done_at)"
                " SELECT :s, 'q' || (g % :n + 1), 'noop', '{}', g / :n + 1, 60, 86400, 20,"
                "  now() - interval '2 hours', 'done', 1, now() - interval '2 hours',"
                "  now() - interval '2 hours'"
                " FROM generate_series(0, :done - 1) g"
            ),
            params,
        )
    env.vacuum()


def _timed(fn: Any, repeats: int) -> dict[str, float]:
    fn()  # warm: connection, plans, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return summary(times)


def scrape(env: Env, cfg: dict[str, Any]) -> dict[str, Any]:
    n_queues = int(cfg.get("scrape_queues", 10_000))
    per_queue = int(cfg.get("scrape_jobs_per_queue", 10))
    done = int(cfg.get("scrape_done_jobs", 100_000))
    repeats = int(cfg.get("scrape_repeats", 20))
    scope = env.unique("scrape")
    t0 = time.perf_counter()
    _seed(env, scope, n_queues, per_queue, done)
    log(
        f"  seeded {n_queues} queues x {per_queue} open jobs + {done} done"
        f" in {time.perf_counter() - t0:.1f} s"
    )
    _, qt = qtapp.build(scope, database_url=env.database_url, broker_url=REDIS_URL, celery_queue="bench-none")
    count_open = sa.text(
        "SELECT count(*) FROM queuetopia_jobs WHERE scope = :s AND status IN ('pending', 'running')"
    )

    def baseline() -> None:
        with qt.engine.connect() as conn:
            conn.execute(count_open, {"s": scope}).scalar_one()

    out: dict[str, Any] = {"open_jobs": n_queues * per_queue, "queues": n_queues, "done_jobs": done}
    try:
        gauges = qt.backend.scope_gauges(top_queues=10)
        out["gauges"] = {
            "open_jobs": gauges.open_jobs,
            "queues_blocked": gauges.queues_blocked,
            "queues_paused": gauges.queues_paused,
        }
        out["count_open_ms"] = _timed(baseline, repeats)
        out["gauges_ms"] = _timed(qt.backend.scope_gauges, repeats)
        out["gauges_top10_ms"] = _timed(lambda: qt.backend.scope_gauges(top_queues=10), repeats)
        server, _ = metrics.serve([qt], port=0, host="127.0.0.1", top_queues=10)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        try:

            def http() -> None:
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert response.status == 200 and b"queuetopia_open_jobs" in response.read()

            out["http_scrape_top10_ms"] = _timed(http, repeats)
        finally:
            server.shutdown()
        server.server_close()
        base = out["count_open_ms"]["median"]
        for key in ("gauges_ms", "gauges_top10_ms", "http_scrape_top10_ms"):
            out[key]["x_count_open"] = round(out[key]["median"] / base, 2)
            log(
                f"  {key}: {out[key]['median']:.1f} ms (x{out[key]['x_count_open']} a count of the open jobs,"
                f" {base:.1f} ms)"
            )
    finally:
        qt.engine.dispose()
        with env.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM queuetopia_jobs WHERE scope = :s"), {"s": scope})
            conn.execute(sa.text("DELETE FROM queuetopia_queues WHERE scope = :s"), {"s": scope})
    return out


def instruments(env: Env, cfg: dict[str, Any]) -> dict[str, Any]:
    """What the worker's instruments (observe.Attempt: the attempt span and counters)
    add to each attempt, in this process, next to one ``SELECT 1`` round trip (a job
    costs at least one): without a tracer provider, and with one recording (no
    exporter). Counters go to the default registry (a multiprocess directory would add
    a file write)."""
    import datetime as dt

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from queuetopia_celery import observe
    from queuetopia_celery.backends.base import Outcome
    from queuetopia_celery.jobs import Job

    now = dt.datetime.now(dt.timezone.utc)
    job = Job(
        id=1, scope="bench", queue="q", action="noop", params={}, result=None, sequence=1, timeout=60.0,
        max_backoff=1.0, max_attempts=20, scheduled_at=now, attempts=1, attempted_at=now,
        attempted_by="bench/1", next_attempt_at=None, done_at=None, error=None, inserted_at=now,
        status="running",
    )  # fmt: skip
    ok = Outcome(True)
    n = int(cfg.get("instrument_attempts", 20_000))

    def per_attempt() -> float:
        for _ in range(1000):
            with observe.Attempt("bench", job) as attempt:
                attempt.ended(ok)
        t0 = time.perf_counter()
        for _ in range(n):
            with observe.Attempt("bench", job) as attempt:
                attempt.ended(ok)
        return (time.perf_counter() - t0) / n * 1e6

    with env.engine.connect() as conn:
        select_one = _timed(lambda: conn.execute(sa.text("SELECT 1")).scalar_one(), 2000)
    out: dict[str, Any] = {"select_1_us": select_one["median"] * 1000}
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        out["no_tracer_provider_us"] = per_attempt()
        trace.set_tracer_provider(TracerProvider())
    out["recording_tracer_us"] = per_attempt()
    for key in ("no_tracer_provider_us", "recording_tracer_us"):
        if key in out:
            out[f"{key}_x_select_1"] = round(out[key] / out["select_1_us"], 3)
            log(f"  {key}: {out[key]:.1f} us per attempt (x{out[f'{key}_x_select_1']} a SELECT 1)")
    return out
