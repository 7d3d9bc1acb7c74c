"""max_concurrent_queues (Queuetopia's number_of_concurrent_jobs) caps the queues of a
scope running at once, across workers."""

from __future__ import annotations

import pytest

from queuetopia_celery import JobState
from tests.conftest import events, wait_for

pytestmark = pytest.mark.acceptance


def _overlaps(rows: list[dict]) -> int:
    """The largest number of attempts running at the same instant."""
    edges = sorted([(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_at_most_max_concurrent_queues_run_at_once(make_qt, engine, scope, start_worker):
    qt = make_qt(max_concurrent_queues=2)
    env = {"QT_TEST_MAX_CONCURRENT": "2"}
    start_worker(concurrency=3, beat=True, env=env)
    start_worker(concurrency=2, env=env)
    jobs = [qt.create_job(f"q{i % 5}", "work", {"sleep": 0.3}) for i in range(15)]
    wait_for(
        lambda: all(qt.get_job(j.id).state is JobState.DONE for j in jobs),
        timeout=90,
        message="all jobs done",
    )
    rows = events(engine, scope)
    assert len(rows) == 15
    assert _overlaps(rows) <= 2
    # The limit is a cap, not a serialization: two queues did run side by side.
    assert _overlaps(rows) == 2
