"""Plain Celery: no-op tasks, json, ignore_result. The ceiling: no ordering, no
persistence."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

from .prerun import stamp_task_starts

app = Celery("bench-celery", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/5"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_redis: redis.Redis | None = None


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    return None


@app.task(name="bench.stamp", ignore_result=True)
def stamp(key: str, sent: float) -> None:
    """Record the delay()-to-start latency in a Redis list."""
    global _redis
    now = time.time()
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    _redis.rpush(key, now - sent)


stamp_task_starts(app.conf.broker_url)


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        Path(path).write_text(str(os.getpid()))
