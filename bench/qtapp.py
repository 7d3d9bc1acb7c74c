"""The queuetopia-celery side of the benchmarks: one Celery app with one Queuetopia,
configured by BENCH_* environment variables (so that worker and beat processes and the
driver build the same app)."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

from queuetopia_celery import Job, Queuetopia

from .prerun import stamp_task_starts

_redis: redis.Redis | None = None


def build(
    scope: str,
    *,
    database_url: str,
    broker_url: str,
    celery_queue: str,
    poll_interval: float = 1.0,
    burst_jobs: int = 50,
    burst_seconds: float = 0.25,
) -> tuple[Celery, Queuetopia]:
    app = Celery(f"bench-qt-{scope}", broker=broker_url)
    app.conf.update(
        task_default_queue=celery_queue,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        timezone="UTC",
        worker_hijack_root_logger=False,
    )
    options: dict[str, Any] = {
        "database_url": database_url,
        "poll_interval": poll_interval,
        "celery_queue": celery_queue,
        "dispatch_grace": 60,
        "burst_jobs": burst_jobs,
        "burst_seconds": burst_seconds,
    }
    # `python -m bench --compare REV` runs this module against an older revision too:
    # pass only the options that revision's Queuetopia knows.
    known = inspect.signature(Queuetopia).parameters
    qt = Queuetopia(scope, app=app, **{k: v for k, v in options.items() if k in known})

    @qt.performer("noop")
    def noop(job: Job) -> Any:
        return None

    @qt.performer("stamp")
    def stamp(job: Job) -> Any:
        """Record the create_job-to-start latency in a Redis list, as Celery's
        ``bench.stamp`` does for delay() (the driver runs on the same machine)."""
        global _redis
        now = time.time()
        if _redis is None:
            _redis = redis.Redis.from_url(broker_url)
        _redis.rpush(job.params["key"], now - job.params["sent"])
        return None

    @qt.performer("fail", backoff=lambda job: 1.0)
    def fail(job: Job) -> Any:
        raise RuntimeError("planned failure")

    return app, qt


if os.environ.get("BENCH_SCOPE"):
    app, qt = build(
        os.environ["BENCH_SCOPE"],
        database_url=os.environ["BENCH_DATABASE_URL"],
        broker_url=os.environ["BENCH_BROKER_URL"],
        celery_queue=os.environ["BENCH_CELERY_QUEUE"],
        poll_interval=float(os.environ.get("BENCH_POLL", "1.0")),
        burst_jobs=int(os.environ.get("BENCH_BURST_JOBS", "50")),
        burst_seconds=float(os.environ.get("BENCH_BURST_SECONDS", "0.25")),
    )

    @signals.worker_ready.connect
    def _ready(**_: Any) -> None:
        Path(os.environ["BENCH_READY_FILE"]).write_text(str(os.getpid()))

    stamp_task_starts(os.environ["BENCH_BROKER_URL"])

    @signals.beat_init.connect
    def _beat_ready(**_: Any) -> None:
        path = os.environ.get("BENCH_BEAT_READY_FILE")
        if path:
            Path(path).write_text(str(os.getpid()))
