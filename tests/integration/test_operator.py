"""The operator API: queue status, blocked queues, retry, abort, purge, cleanup,
on_exhausted. On every backend (``backend_url``) with a real Redis broker (no worker: a
kick shows up as the queue's lease being taken)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import (
    InvalidJobError,
    Job,
    JobNotFoundError,
    JobState,
    JobStateError,
    Queuetopia,
    schema,
)
from tests.conftest import REDIS_URL, wait_for


@pytest.fixture
def make_qt(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    """Queuetopias with a real Redis broker (kicks publish; no worker consumes) and the
    performers 'ok' and 'fail'."""
    built: list[Queuetopia] = []

    def make(scope_: str | None = None, **options: Any) -> Queuetopia:
        app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker=REDIS_URL)
        qt = Queuetopia(
            scope_ or scope,
            app=app,
            database_url=backend_url,
            celery_queue=f"qt-op-{uuid.uuid4().hex[:8]}",
            dispatch_grace=20,
            **options,
        )
        qt.migrate()
        failing(qt)
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def failing(qt: Queuetopia) -> None:
    @qt.performer("fail")
    def fail(job: Job) -> None:
        raise RuntimeError("card declined")

    @qt.performer("ok")
    def ok(job: Job) -> None:
        return None


def test_retry_job_makes_it_due_now_and_wakes_its_queue(make_qt):
    qt = make_qt()
    job = qt.create_job("q", "fail", max_attempts=5)
    qt.drain()  # fails once; next retry in 2 s
    before = qt.get_job(job.id)
    assert before.state is JobState.RETRYING and qt.backend.lease_of("q") is None
    retried = qt.retry_job(job.id)
    assert retried.next_attempt_at <= dt.datetime.now(dt.timezone.utc)
    lease = qt.backend.lease_of("q")
    assert lease is not None and lease["job_id"] == job.id  # the kick dispatched it


def test_retry_of_an_exhausted_job_gives_it_one_more_attempt_at_its_place(make_qt):
    qt = make_qt()
    job = qt.create_job("q", "fail", max_attempts=1)
    later = qt.create_job("q", "ok", scheduled_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    assert qt.drain().exhausted == 1
    assert qt.get_job(later.id).state is JobState.SCHEDULED  # the queue has not moved on yet
    assert qt.retry_job(job.id).state is JobState.RETRYING
    assert qt.drain().exhausted == 1  # one more attempt, exhausted again
    assert qt.get_job(job.id).attempts == 2


def test_retry_of_an_exhausted_job_whose_queue_moved_on_needs_force(make_qt):
    """In skip mode the queue went on after the job exhausted: retried now, it would
    run after later jobs. Refused (nothing changes) unless forced."""
    qt = make_qt()
    job = qt.create_job("q", "fail", max_attempts=1)
    later = qt.create_job("q", "ok")
    assert qt.drain().exhausted == 1
    assert qt.get_job(later.id).state is JobState.DONE
    with pytest.raises(
        JobStateError, match=f"job {later.id}, after it in the queue, has already run"
    ) as info:
        qt.retry_job(job.id)
    assert (info.value.job_id, info.value.state, info.value.action) == (job.id, "exhausted", "retry")
    assert "force" in str(info.value)
    assert qt.get_job(job.id).state is JobState.EXHAUSTED and qt.backend.lease_of("q") is None
    assert qt.retry_job(job.id, force=True).state is JobState.RETRYING
    assert qt.drain().exhausted == 1
    assert qt.get_job(job.id).attempts == 2


def test_retry_and_abort_refuse_jobs_they_do_not_apply_to(make_qt, scope):
    qt = make_qt()
    done = qt.create_job("q", "ok")
    qt.drain()
    with pytest.raises(JobStateError, match=f"cannot retry job {done.id}: it is done"):
        qt.retry_job(done.id)
    with pytest.raises(JobStateError, match="it is no longer in its queue"):
        qt.abort_job(done.id, "late")
    with pytest.raises(JobNotFoundError):
        qt.retry_job(10**12)
    other = make_qt(scope + "-other")
    theirs = other.create_job("q", "ok")
    with pytest.raises(JobNotFoundError, match=f"no job {theirs.id} in scope"):
        qt.abort_job(theirs.id, "not mine")
    with pytest.raises(InvalidJobError, match="reason"):
        qt.abort_job(theirs.id, "  ")
    with pytest.raises(InvalidJobError, match="job_id"):
        qt.retry_job("12")  # type: ignore[arg-type]


def test_a_running_job_cannot_be_aborted(make_qt):
    qt = make_qt()
    job = qt.create_job("q", "ok")  # the kick took the lease
    lease = qt.backend.lease_of("q")
    assert lease is not None
    started = qt.backend.start("q", job.id, lease["token"], worker="test/1", lease=60)
    assert started is not None
    with pytest.raises(JobStateError, match="it is running; its attempt is in progress"):
        qt.abort_job(job.id, "stop")
    with pytest.raises(JobStateError, match="running"):
        qt.retry_job(job.id)


def test_abort_releases_a_dispatched_lease_so_the_queue_moves_on(make_qt):
    qt = make_qt()
    job = qt.create_job("q", "ok")
    nxt = qt.create_job("q", "ok")
    lease = qt.backend.lease_of("q")
    assert lease is not None and lease["job_id"] == job.id
    qt.abort_job(job.id, "duplicate order")
    # The stale message for the aborted job would be dropped; the kick leased the next one.
    assert qt.backend.start("q", job.id, lease["token"], worker="test/1", lease=60) is None
    lease = qt.backend.lease_of("q")
    assert lease is not None and lease["job_id"] == nxt.id
    aborted = qt.get_job(job.id)
    assert aborted.status == "aborted" and aborted.abort_reason == "duplicate order"


def test_queue_statuses_put_blocked_queues_first_with_head_and_lease(make_qt):
    qt = make_qt()
    for _ in range(3):
        qt.create_job("a-fine", "ok")
    qt.create_job("z-broken", "fail")
    qt.create_job("z-broken", "ok")
    qt.drain("z-broken")
    lease = qt.backend.lease_of("a-fine")
    assert lease is not None  # taken by the kick of create_job
    rows = qt.queue_statuses()
    assert [r.queue for r in rows] == ["z-broken", "a-fine"]
    broken, fine = rows
    assert broken.blocked and broken.pending == 2
    assert broken.head is not None and broken.head.action == "fail" and broken.head.attempts == 1
    assert broken.error == "RuntimeError: card declined"
    assert broken.blocked_since is not None and broken.blocked_since <= broken.head.attempted_at
    assert not fine.blocked and fine.pending == 3 and fine.head.sequence == 1
    assert fine.locked_until == lease["expires_at"]
    assert fine.oldest_pending_at == fine.head.inserted_at
    as_json = broken.to_dict()
    assert as_json["head"]["error"] == "RuntimeError: card declined"
    assert as_json["head"]["state"] == "retrying"
    assert [b.queue for b in qt.blocked_queues()] == ["z-broken"]


def test_a_held_job_from_a_lost_worker_blocks_its_queue(make_qt):
    qt = make_qt(on_exhausted="hold")
    job = qt.create_job("q", "ok", max_attempts=1)
    qt.create_job("q", "ok")
    lease = qt.backend.lease_of("q")
    # A worker starts it with a very short lease and dies.
    assert qt.backend.start("q", job.id, lease["token"], worker="dead/1", lease=0.05) is not None
    wait_for(lambda: (qt.scan(), qt.get_job(job.id).state)[1] is JobState.HELD, message="held")
    assert "WorkerLostError" in (qt.get_job(job.id).error or "")
    assert qt.backend.lease_of("q") is None
    assert [b.queue for b in qt.blocked_queues()] == ["q"]
    assert qt.drain(with_scheduled=True).attempted == 0


def test_purge_deletes_only_done_jobs_past_retention(make_qt, scope):
    qt = make_qt()
    old = qt.create_job("q", "ok")
    recent = qt.create_job("q", "ok")
    kept = qt.create_job("r", "fail", max_attempts=1)
    qt.drain()
    with qt.engine.begin() as conn:
        eight_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
        conn.execute(sa.update(schema.jobs).where(schema.jobs.c.id == old.id).values(done_at=eight_days_ago))
    assert qt.purge_jobs() == 1  # default retention: 7 days
    assert qt.get_job(old.id) is None
    assert qt.get_job(recent.id) is not None and qt.get_job(kept.id) is not None
    assert qt.purge_jobs(older_than=0) == 1
    assert qt.get_job(kept.id).state is JobState.EXHAUSTED


def test_cleanup_runs_from_beat_when_configured(database_url, scope, engine):
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker=REDIS_URL)
    qt = Queuetopia(
        scope,
        app=app,
        database_url=database_url,
        cleanup_interval=dt.timedelta(hours=1),
        job_retention=dt.timedelta(days=1),
    )
    try:
        entry = app.conf.beat_schedule[f"queuetopia.{scope}.cleanup"]
        assert entry["task"] == f"queuetopia.{scope}.cleanup"
        assert entry["schedule"] == dt.timedelta(hours=1)

        @qt.performer("ok")
        def ok(job: Job) -> None:
            return None

        job = qt.create_job("q", "ok")
        qt.drain()
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE queuetopia_jobs SET done_at = now() - interval '25 hours' WHERE id = :id"),
                {"id": job.id},
            )
        assert qt.cleanup_task() == 1  # the task beat sends, run here
        assert qt.get_job(job.id) is None
    finally:
        qt.engine.dispose()


def test_on_exhausted_is_validated(make_qt):
    with pytest.raises(Exception, match="on_exhausted"):
        make_qt(on_exhausted="never")


@pytest.mark.acceptance
def test_held_job_on_a_real_worker_waits_for_retry_then_the_queue_goes_on(
    database_url, scope, celery_queue, engine, start_worker
):
    from tests.conftest import events

    start_worker(concurrency=2, beat=True)
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker=REDIS_URL)
    qt = Queuetopia(scope, app=app, database_url=database_url, celery_queue=celery_queue, on_exhausted="hold")
    try:
        first = qt.create_job("q", "fast_retry", {"fail_times": 2}, max_attempts=2)
        second = qt.create_job("q", "work", {})
        wait_for(lambda: qt.get_job(first.id).state is JobState.HELD, timeout=60, message="held")
        assert qt.get_job(second.id).state is JobState.AVAILABLE
        assert [b.queue for b in qt.blocked_queues()] == ["q"]
        qt.retry_job(first.id)  # attempt 3 succeeds
        wait_for(lambda: qt.get_job(second.id).state is JobState.DONE, timeout=60, message="second done")
        seen = [(e["sequence"], e["attempt"]) for e in events(engine, scope)]
        assert seen == [(1, 1), (1, 2), (1, 3), (2, 1)]
        assert qt.blocked_queues() == []
    finally:
        qt.engine.dispose()


def test_the_failure_hook_sees_the_state_the_job_will_have(make_qt):
    qt = make_qt(on_exhausted="hold")
    seen: list[JobState] = []

    @qt.performer("hooked", on_failure=lambda job: seen.append(job.state))
    def hooked(job: Job) -> None:
        raise RuntimeError("no")

    qt.create_job("q", "hooked", max_attempts=2)
    qt.create_job("r", "hooked", max_attempts=1, on_exhausted="skip")
    qt.drain("q", with_scheduled=True)
    qt.drain("r")
    assert seen == [JobState.RETRYING, JobState.HELD, JobState.EXHAUSTED]
