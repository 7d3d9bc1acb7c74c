from __future__ import annotations

import pytest

from queuetopia_celery import JobState
from tests.conftest import events, wait_for

pytestmark = pytest.mark.acceptance


def test_jobs_of_one_queue_run_in_order_on_a_real_worker(qt, engine, scope, start_worker):
    start_worker(concurrency=2, beat=True)
    jobs = [qt.create_job("q1", "work", {"echo": i}) for i in range(10)]
    wait_for(
        lambda: all(qt.get_job(j.id).state is JobState.DONE for j in jobs), timeout=30, message="jobs done"
    )
    seen = [e["sequence"] for e in events(engine, scope)]
    assert seen == sorted(seen) == [j.sequence for j in jobs]
