"""A ``task_prerun`` stamp for the bench's worker apps: with ``BENCH_PRERUN_LIST`` set,
each task's start (before its body) is pushed to that Redis list, where ``python -m
bench.latency_parts`` reads it to split the idle latency."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import signals


def stamp_task_starts(broker_url: str) -> None:
    """Connect the stamp (once per process; a no-op without ``BENCH_PRERUN_LIST``)."""
    key = os.environ.get("BENCH_PRERUN_LIST")
    if not key:
        return
    client = redis.Redis.from_url(broker_url)

    def _prerun(**_: Any) -> None:
        client.rpush(key, time.time())

    signals.task_prerun.connect(_prerun, weak=False)
