"""The same behaviour on PostgreSQL and on SQLite (the embedded default), through
``drain()``: the store's real transitions, run in this process without workers."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from queuetopia_celery import InvalidJobError, Job, JobState, Queuetopia
from queuetopia_celery.testing import assert_job_created, refute_job_created

UTC = dt.timezone.utc


@pytest.fixture
def build(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(scope_: str | None = None, **options: Any) -> Queuetopia:
        app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
        qt = Queuetopia(scope_ or scope, app=app, database_url=backend_url, disabled=True, **options)
        qt.migrate()
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def recorder(qt: Queuetopia) -> list[tuple[str, int, int]]:
    """Register 'work' (fails while attempts <= params.fail) and record each attempt."""
    ran: list[tuple[str, int, int]] = []

    @qt.performer("work", backoff=lambda job: 30)
    def work(job: Job) -> Any:
        ran.append((job.queue, job.sequence, job.attempts))
        if job.attempts <= job.params.get("fail", 0):
            raise RuntimeError(f"planned failure {job.attempts}")
        return {"seq": job.sequence}

    return ran


def test_jobs_run_in_queue_order_across_queues(build):
    qt = build()
    ran = recorder(qt)
    for i in range(5):
        for queue in ("a", "b", "c"):
            qt.create_job(queue, "work", {"i": i})
    result = qt.drain()
    assert (result.succeeded, result.failed, result.exhausted) == (15, 0, 0)
    for queue in ("a", "b", "c"):
        assert [seq for q, seq, _ in ran if q == queue] == [1, 2, 3, 4, 5]
    assert qt.backend.count_jobs(state=JobState.DONE) == 15


def test_a_failing_head_blocks_only_its_queue_until_its_retry(build):
    qt = build()
    ran = recorder(qt)
    qt.create_job("blocked", "work", {"fail": 1})
    qt.create_job("blocked", "work", {})
    qt.create_job("free", "work", {})
    result = qt.drain()
    assert (result.succeeded, result.failed, result.exhausted) == (1, 1, 0)
    assert ("blocked", 2, 1) not in ran
    [status] = qt.blocked_queues()
    assert status.queue == "blocked"
    assert status.head is not None and status.head.sequence == 1
    assert status.error == "RuntimeError: planned failure 1"
    # The retry is due in 30 s: drain(with_scheduled=True) moves the clock for it.
    result = qt.drain(with_scheduled=True)
    assert (result.succeeded, result.failed, result.exhausted) == (2, 0, 0)
    assert [(s, a) for q, s, a in ran if q == "blocked"] == [(1, 1), (1, 2), (2, 1)]
    assert qt.blocked_queues() == []
    assert qt.list_jobs(queue="blocked")[-1].error is None  # a success clears the error


def test_exhausted_job_is_skipped_by_default(build):
    qt = build()
    ran = recorder(qt)
    first = qt.create_job("q", "work", {"fail": 99}, max_attempts=3)
    qt.create_job("q", "work", {})
    result = qt.drain(with_scheduled=True)
    assert (result.succeeded, result.failed, result.exhausted) == (1, 2, 1)
    assert [(s, a) for _, s, a in ran] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    job = qt.get_job(first.id)
    assert job is not None and job.state is JobState.EXHAUSTED and job.attempts == 3


def test_hold_keeps_the_queue_blocked_until_retry_or_abort(build):
    qt = build(on_exhausted="hold")
    ran = recorder(qt)
    first = qt.create_job("q", "work", {"fail": 2}, max_attempts=2)
    second = qt.create_job("q", "work", {})
    skipped = qt.create_job("other", "work", {"fail": 9}, max_attempts=1, on_exhausted="skip")
    result = qt.drain(with_scheduled=True)
    assert (result.succeeded, result.failed, result.exhausted) == (0, 1, 2)
    assert qt.get_job(first.id).state is JobState.HELD
    assert qt.get_job(skipped.id).state is JobState.EXHAUSTED
    assert [s.queue for s in qt.blocked_queues()] == ["q"]
    # Held means held: nothing runs however long we wait.
    assert qt.drain(with_scheduled=True).attempted == 0
    qt.retry_job(first.id)
    result = qt.drain()
    assert (result.succeeded, result.failed, result.exhausted) == (2, 0, 0)
    assert [(s, a) for q, s, a in ran if q == "q"] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert qt.get_job(second.id).state is JobState.DONE


def test_abort_lets_the_queue_move_on_and_keeps_the_job(build):
    qt = build(on_exhausted="hold")
    ran = recorder(qt)
    first = qt.create_job("q", "work", {"fail": 9}, max_attempts=1)
    qt.create_job("q", "work", {})
    assert qt.drain().exhausted == 1
    aborted = qt.abort_job(first.id, "bad card number, refunded by hand")
    assert aborted.state is JobState.ABORTED
    assert aborted.abort_reason == "bad card number, refunded by hand"
    assert aborted.aborted_at is not None
    assert qt.drain().succeeded == 1
    assert [(s, a) for _, s, a in ran] == [(1, 1), (2, 1)]
    assert qt.get_job(first.id) is not None
    assert qt.list_jobs(state="aborted") == [qt.get_job(first.id)]


def test_scheduled_jobs_wait_unless_drained_with_scheduled_in_schedule_order(build):
    qt = build()
    ran = recorder(qt)
    now = dt.datetime.now(UTC)
    qt.create_job("q", "work", {"n": "late"}, scheduled_at=now + dt.timedelta(hours=2))
    qt.create_job("q", "work", {"n": "early"}, scheduled_at=now + dt.timedelta(hours=1))
    qt.create_job("q", "work", {"n": "now"})
    assert qt.drain().succeeded == 1
    assert qt.list_jobs(state="scheduled") != []
    assert qt.drain(with_scheduled=True).succeeded == 2
    assert [s for _, s, _ in ran] == [3, 2, 1]


def test_scopes_do_not_see_each_other(build, scope):
    mine = build()
    theirs = build(scope + "-other")
    ran_mine, ran_theirs = recorder(mine), recorder(theirs)
    mine.create_job("shared-name", "work", {"who": "mine"})
    theirs.create_job("shared-name", "work", {"who": "theirs"})
    assert mine.drain().succeeded == 1
    assert ran_theirs == [] and len(ran_mine) == 1
    assert_job_created(theirs, queue="shared-name", params={"who": "theirs"}, state="available")
    refute_job_created(theirs, params={"who": "mine"})
    assert mine.queue_statuses() == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"queue": "", "action": "work"}, "queue"),
        ({"queue": "q", "action": "work", "params": {"x": float("nan")}}, "params"),
        ({"queue": "q", "action": "work", "params": {1: "x"}}, "params"),
        ({"queue": "q", "action": "work", "timeout": -1}, "timeout"),
        ({"queue": "q", "action": "work", "on_exhausted": "explode"}, "on_exhausted"),
        ({"queue": "q", "action": "work", "scheduled_at": dt.datetime(2030, 1, 1)}, "scheduled_at"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(build, kwargs, field):
    qt = build()
    kwargs = dict(kwargs)
    queue, action = kwargs.pop("queue"), kwargs.pop("action")
    with pytest.raises(InvalidJobError) as info:
        qt.create_job(queue, action, **kwargs)
    assert info.value.field == field
    with pytest.raises(InvalidJobError):
        qt.create_jobs([{"queue": "q", "action": "work"}, {"queue": queue, "action": action, **kwargs}])
    assert qt.list_jobs() == []
