"""``python -m bench.latency_parts [--samples N] [--rounds N]``: the idle latency of the
bench (enqueue to the performer's first line, 20 ms between jobs, an idle prefork -c 2
worker) split in three parts, for queuetopia-celery and plain Celery side by side:

- the producer's call (``create_job``, or ``apply_async``),
- from its return to the task's ``task_prerun`` signal in the worker (broker, prefork),
- from ``task_prerun`` to the performer's first line (for us: the start of the
  attempt, one durable statement).

Also the services alone in the same idle rhythm (``SELECT 1``, a durable one-row
INSERT, a Redis PING, each after 20 ms of idleness and back to back): the floor of each
part. Prints a markdown table; p50 in ms."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy as sa

from .env import REDIS_URL, Env, load
from .systems import CONCURRENCY, Ours

IDLE = 0.02  # seconds between jobs, as in the latency scenario


def _parts(env: Env, create: Callable[[int, str, float], Any], prerun: str, samples: int) -> dict[str, float]:
    """``create(i, key, sent)`` enqueues the i-th stamp job, whose performer pushes its
    latency to ``key``; the worker pushes each task's start time to ``prerun``."""
    r = redis.Redis.from_url(REDIS_URL)
    key = env.unique("lat")
    call, to_prerun, to_first, total = [], [], [], []
    for i in range(samples + 5):
        r.delete(prerun)
        t0 = time.time()
        create(i, key, t0)
        t1 = time.time()
        _, value = r.blpop([key], timeout=30)  # type: ignore[misc]
        first = t0 + float(value)
        begun = float(r.lpop(prerun))  # type: ignore[arg-type]
        if i >= 5:  # warm-up
            call.append(t1 - t0)
            to_prerun.append(begun - t1)
            to_first.append(first - begun)
            total.append(first - t0)
        time.sleep(IDLE)
    return {
        name: round(statistics.median(values) * 1000, 3)
        for name, values in (
            ("call", call),
            ("to_prerun", to_prerun),
            ("to_first_line", to_first),
            ("total", total),
        )
    }


def _floor(env: Env, idle: bool) -> dict[str, float]:
    r = redis.Redis.from_url(REDIS_URL)
    out: dict[str, float] = {}
    with env.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, v jsonb)"))
        calls: dict[str, Callable[[], Any]] = {
            "SELECT 1": lambda: conn.execute(sa.text("SELECT 1")).all(),
            "INSERT, autocommit": lambda: conn.execute(
                sa.text("INSERT INTO bench_floor (v) VALUES ('{}') RETURNING id")
            ).all(),
            "redis PING": r.ping,
        }
        for name, fn in calls.items():
            times = []
            for _ in range(220):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                if idle:
                    time.sleep(IDLE)
            out[name] = round(statistics.median(times[20:]) * 1000, 3)
        conn.execute(sa.text("DROP TABLE bench_floor"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency_parts", description=__doc__)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"load {load()}")
    env = Env(procrastinate=False)
    try:
        ours_prerun = env.unique("prerun")
        ours = Ours(env, BENCH_PRERUN_LIST=ours_prerun)
        from . import celeryapp

        celery_queue = env.unique("idle")
        celery_prerun = env.unique("prerun")
        env.celery_worker(
            "bench.celeryapp", celery_queue, {"BENCH_PRERUN_LIST": celery_prerun}, concurrency=CONCURRENCY
        )
        stamp = celeryapp.app.tasks["bench.stamp"]
        rows: dict[str, list[dict[str, float]]] = {"queuetopia-celery": [], "celery": []}
        for _ in range(args.rounds):
            rows["queuetopia-celery"].append(
                _parts(
                    env,
                    lambda i, key, sent: ours.qt.create_job(
                        f"lat-{i % 10}", "stamp", {"key": key, "sent": sent}
                    ),
                    ours_prerun,
                    args.samples,
                )
            )
            rows["celery"].append(
                _parts(
                    env,
                    lambda i, key, sent: stamp.apply_async(args=(key, sent), queue=celery_queue),
                    celery_prerun,
                    args.samples,
                )
            )
        print("\n| part, p50 ms (each round) | queuetopia-celery | plain Celery |\n|---|---|---|")
        for part, label in (
            ("call", "the producer's call (`create_job` / `apply_async`)"),
            ("to_prerun", "its return to the task's `task_prerun` (broker, prefork)"),
            ("to_first_line", "`task_prerun` to the performer's first line"),
            ("total", "total"),
        ):
            cells = [" / ".join(f"{row[part]:.2f}" for row in rows[system]) for system in rows]
            print(f"| {label} | {cells[0]} | {cells[1]} |")
        hot, idle = _floor(env, idle=False), _floor(env, idle=True)
        print("\n| the service alone, p50 ms | back to back | after 20 ms idle |\n|---|---|---|")
        for name in hot:
            print(f"| {name} | {hot[name]:.3f} | {idle[name]:.3f} |")
        ours.close()
        print(f"\nload {load()}")
    finally:
        env.close()


if __name__ == "__main__":
    main()
