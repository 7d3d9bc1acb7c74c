"""The backend and the Runner on every backend (``backend_url``; Redis for the messages
they publish): leases, fencing tokens, recovery of lost attempts, listing and scopes.
No worker runs here: the Runner is called in this process. A few tests of
PostgreSQL's own connection handling run on PostgreSQL only (``pg_qt``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import Job, JobState, Performer, Queuetopia, schema
from queuetopia_celery.backends import Burst, Outcome
from tests.apps import testapp
from tests.conftest import REDIS_URL, wait_for

UTC = dt.timezone.utc
GRACE = 20.0


@pytest.fixture
def make_qt(backend_url: str, celery_queue: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    """The test app's Queuetopias (a real Redis broker, no worker) on each backend."""
    built: list[Queuetopia] = []

    def make(scope_: str | None = None, **options: Any) -> Queuetopia:
        _, qt = testapp.build(
            scope_ or scope,
            database_url=backend_url,
            broker_url=REDIS_URL,
            celery_queue=celery_queue,
            **options,
        )
        qt.migrate()
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


@pytest.fixture
def pg_qt(database_url: str, celery_queue: str, scope: str) -> Iterator[Queuetopia]:
    _, qt = testapp.build(scope, database_url=database_url, broker_url=REDIS_URL, celery_queue=celery_queue)
    yield qt
    qt.engine.dispose()


def expire_leases(qt: Queuetopia) -> None:
    """Pretend the leases of this scope ran out (a worker died, a message got stuck)."""
    past = dt.datetime.now(UTC) - dt.timedelta(seconds=1)
    with qt.engine.begin() as conn:
        conn.execute(
            sa.update(schema.leases).where(schema.leases.c.scope == qt.scope).values(expires_at=past)
        )


def take(qt: Queuetopia, queue: str) -> Any:
    (dispatch,) = qt.backend.kick([queue], grace=GRACE)
    return dispatch


# --------------------------------------------------------------------------- leases


def test_dispatch_takes_a_queue_once_and_only_for_a_due_head(qt):
    job = qt.create_job("q", "work", {})
    lease = qt.backend.lease_of("q")  # the kick after create_job took it
    assert lease is not None and lease["job_id"] == job.id and lease["started_at"] is None
    assert qt.backend.kick(["q"], grace=GRACE) == []
    assert qt.backend.scan(grace=GRACE) == []

    later = qt.create_job("scheduled", "work", {}, scheduled_at=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    assert qt.backend.kick(["scheduled"], grace=GRACE) == []
    assert qt.backend.scan(grace=GRACE) == []
    assert qt.backend.lease_of("scheduled") is None
    assert qt.get_job(later.id).state is JobState.SCHEDULED


def test_a_scheduled_job_is_dispatched_by_the_scan_once_due(qt, scope):
    job = qt.create_job("s", "work", {}, scheduled_at=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    assert qt.backend.scan(grace=GRACE) == []
    now = dt.datetime.now(UTC)
    jobs, queues = schema.jobs, schema.queues
    with qt.engine.begin() as conn:
        conn.execute(
            sa.update(jobs).where(jobs.c.id == job.id).values(scheduled_at=now - dt.timedelta(seconds=1))
        )
        # What a producer of an earlier job would do: lower the queue's due time.
        conn.execute(
            sa.update(queues).where(queues.c.scope == scope, queues.c.queue == "s").values(due_at=now)
        )
    (taken,) = qt.backend.scan(grace=GRACE)
    assert (taken.queue, taken.job_id) == ("s", job.id)


def test_start_needs_the_current_token_and_counts_the_attempt_once(qt):
    job = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    assert qt.backend.start("q", job.id, "not-the-token", worker="w/1", lease=30) is None
    assert qt.get_job(job.id).attempts == 0

    started = qt.backend.start("q", job.id, token, worker="w/1", lease=30)
    assert started is not None
    assert (started.attempts, started.attempted_by, started.state) == (1, "w/1", JobState.RUNNING)
    assert started.attempted_at is not None
    # The same message delivered twice: the second delivery is dropped.
    assert qt.backend.start("q", job.id, token, worker="w/2", lease=30) is None
    assert qt.get_job(job.id).attempts == 1


def test_finish_hands_the_lease_to_the_next_due_job_with_a_new_token(qt):
    first = qt.create_job("q", "work", {})
    second = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    written, nxt = qt.backend.finish(job, token, Outcome(True, result={"ok": 1}), grace=GRACE)
    assert written and nxt is not None
    assert (nxt.job_id, nxt.queue) == (second.id, "q") and nxt.token != token
    assert qt.get_job(first.id).result == {"ok": 1}
    # The old token neither starts the next job nor writes anything any more.
    assert qt.backend.start("q", second.id, token, worker="w/1", lease=30) is None
    assert qt.backend.finish(job, token, Outcome(False, error="late"), grace=GRACE) == (False, None)
    assert qt.get_job(first.id).state is JobState.DONE
    assert qt.backend.start("q", second.id, nxt.token, worker="w/1", lease=30) is not None


def test_a_failed_attempt_is_retried_later_and_keeps_the_head(qt):
    first = qt.create_job("q", "work", {}, max_attempts=2)
    qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    written, nxt = qt.backend.finish(job, token, Outcome(False, error="boom", backoff=3600), grace=GRACE)
    assert written and nxt is None, "the second job must not overtake a retrying head"
    failed = qt.get_job(first.id)
    assert (failed.state, failed.error, failed.attempts) == (JobState.RETRYING, "boom", 1)
    assert failed.next_attempt_at > failed.attempted_at + dt.timedelta(seconds=3500)
    assert qt.backend.lease_of("q") is None
    assert qt.backend.kick(["q"], grace=GRACE) == []


BURST = Burst(worker="w/1", start_next=True, time_limit_grace=5, lease_margin=10, deadline_left=None)


@pytest.mark.parametrize("last_attempt", [False, True], ids=["retried", "held"])
def test_a_failed_attempt_within_a_burst_keeps_the_head_and_releases_the_queue(qt, last_attempt):
    first = qt.create_job("q", "work", {}, max_attempts=1 if last_attempt else 2, on_exhausted="hold")
    qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    outcome = Outcome(False, error="boom", backoff=3600)
    assert qt.backend.finish_and_start(job, token, outcome, grace=GRACE, burst=BURST) == (True, None, None)
    failed = qt.get_job(first.id)
    assert (failed.state, failed.error) == (JobState.HELD if last_attempt else JobState.RETRYING, "boom")
    assert qt.backend.lease_of("q") is None
    assert qt.backend.kick(["q"], grace=GRACE) == []


def test_an_exhausted_job_within_a_burst_hands_the_queue_to_the_next_one_at_once(qt):
    first = qt.create_job("q", "work", {}, max_attempts=1)
    second = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    written, nxt, started = qt.backend.finish_and_start(
        job, token, Outcome(False, error="boom"), grace=GRACE, burst=BURST
    )
    assert written and nxt is not None and started is not None
    assert started.id == second.id and started.attempts == 1 and nxt.token != token
    assert qt.get_job(first.id).state is JobState.EXHAUSTED
    assert qt.get_job(first.id).error == "boom"
    assert qt.backend.lease_of("q")["started_at"] is not None


# --------------------------------------------------------------------------- the runner


def test_a_stale_perform_message_is_dropped_without_running_the_job(qt, scope):
    job = qt.create_job("q", "work", {"echo": 1})
    old = qt.backend.lease_of("q")["token"]
    qt.backend.release_unstarted("q")  # (what drain does) so that the scan takes a new lease
    assert qt.scan() == 1  # re-dispatched with a new token
    new = qt.backend.lease_of("q")["token"]
    assert new != old
    runner = qt.perform_runner
    assert runner.perform("q", job.id, old, hostname="test", time_limit=None) == 0
    assert qt.get_job(job.id).attempts == 0
    assert qt.backend.lease_of("q")["token"] == new


class Recorder(Performer):
    """A class performer: fails while params fail is true; records hook calls."""

    def __init__(self) -> None:
        self.failed: list[Job] = []

    def perform(self, job: Job) -> Any:
        if job.params.get("fail"):
            raise ValueError(f"refused {job.params['fail']}")
        return {"done": job.id}

    def backoff(self, job: Job) -> float:
        return 1234.0

    def handle_failed_job(self, job: Job) -> None:
        self.failed.append(job)
        if job.params.get("hook_raises"):
            raise KeyError("hook exploded")


@pytest.fixture
def class_qt(backend_url: str, scope: str, celery_queue: str) -> Iterator[tuple[Queuetopia, Recorder]]:
    app = Celery(f"class-{scope}", broker=REDIS_URL)
    recorder = Recorder()
    qt = Queuetopia(scope, app=app, database_url=backend_url, performer=recorder, celery_queue=celery_queue)
    qt.migrate()
    yield qt, recorder
    qt.engine.dispose()


def run_head(qt: Queuetopia, queue: str) -> int:
    lease = qt.backend.lease_of(queue)
    assert lease is not None
    return int(
        qt.perform_runner.perform(queue, lease["job_id"], lease["token"], hostname="h", time_limit=None)
    )


def test_a_class_performer_runs_jobs_and_its_hooks_are_called_after_each_failed_attempt(class_qt):
    qt, recorder = class_qt
    ok = qt.create_job("q", "anything", {})
    bad = qt.create_job("q", "anything", {"fail": "once"})
    after = qt.create_job("q", "anything", {})
    # One task runs the head, then the next due jobs within its burst, stopping at the failure.
    assert run_head(qt, "q") == 2
    assert qt.get_job(ok.id).result == {"done": ok.id}
    failed = qt.get_job(bad.id)
    assert failed.state is JobState.RETRYING
    assert failed.error.startswith("ValueError: refused once")
    waited = (failed.next_attempt_at - failed.attempted_at).total_seconds()
    assert 1234 <= waited < 1234 + 30
    (seen,) = recorder.failed
    assert (seen.id, seen.attempts, seen.error) == (bad.id, 1, failed.error)
    assert qt.get_job(after.id).state is JobState.AVAILABLE


def test_an_exception_in_handle_failed_job_is_recorded_on_the_job(class_qt):
    qt, recorder = class_qt
    job = qt.create_job("q", "anything", {"fail": "always", "hook_raises": True}, max_attempts=1)
    after = qt.create_job("q", "anything", {})
    run_head(qt, "q")
    failed = qt.get_job(job.id)
    assert failed.state is JobState.EXHAUSTED
    assert failed.error.startswith("ValueError: refused always")
    assert "handle_failed_job raised KeyError: 'hook exploded'" in failed.error
    assert len(recorder.failed) == 1
    # Exhausted: the queue moved on; the next job ran in the same burst or was handed on.
    lease = qt.backend.lease_of("q")
    assert qt.get_job(after.id).state is JobState.DONE or (lease is not None and lease["job_id"] == after.id)


def test_a_result_that_is_not_json_fails_the_attempt(backend_url, scope):
    class Bad(Performer):
        def perform(self, job: Job) -> Any:
            return {1, 2}

    other = Queuetopia(
        f"{scope}-x", app=Celery("bad-result", broker=REDIS_URL), database_url=backend_url, performer=Bad()
    )
    other.migrate()
    try:
        job = other.create_job("q", "a", {})
        run_head(other, "q")
        failed = other.get_job(job.id)
        assert failed.state is JobState.RETRYING
        assert failed.error.startswith("ResultNotJSONError")
    finally:
        other.engine.dispose()


# --------------------------------------------------------------------------- lost attempts


def test_an_expired_started_lease_is_recovered_as_a_failed_attempt(qt, scope):
    job = qt.create_job("q", "work", {}, max_attempts=2)
    nxt = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    running = qt.backend.start("q", job.id, token, worker="dead-host/4242", lease=30)
    assert running is not None
    assert qt.scan() == 0, "a live lease is left alone"
    assert qt.get_job(job.id).state is JobState.RUNNING

    expire_leases(qt)
    qt.scan()
    lost = qt.get_job(job.id)
    assert lost.state is JobState.RETRYING
    assert lost.attempts == 1
    assert lost.error.startswith("WorkerLostError: attempt 1 of job")
    assert "dead-host/4242" in lost.error
    assert lost.next_attempt_at is not None
    assert qt.backend.lease_of("q") is None
    assert qt.get_job(nxt.id).state is JobState.AVAILABLE
    # The dead worker's late outcome, if it ever comes, is dropped.
    assert qt.backend.finish(running, token, Outcome(True, result="late"), grace=GRACE) == (False, None)
    assert qt.get_job(job.id).result is None


def test_a_lost_last_attempt_exhausts_the_job_and_the_queue_moves_on(qt, scope):
    job = qt.create_job("q", "work", {}, max_attempts=1)
    nxt = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    assert qt.backend.start("q", job.id, token, worker="w/1", lease=30) is not None
    expire_leases(qt)
    assert qt.scan() == 1
    assert qt.get_job(job.id).state is JobState.EXHAUSTED
    assert qt.backend.lease_of("q")["job_id"] == nxt.id


# --------------------------------------------------------------------------- listing and scopes


def test_list_and_paginate_jobs_filter_and_order_newest_sequence_first(qt, make_qt, scope):
    created = [
        qt.create_job("q1", "work", {"n": 0}),
        qt.create_job("q1", "hooked", {"n": 1}),
        qt.create_job("q2", "work", {"n": 2}),
        qt.create_job("q1", "work", {"n": 3}),
        qt.create_job("q2", "work", {"n": 4}, scheduled_at=dt.datetime.now(UTC) + dt.timedelta(hours=1)),
    ]
    # Make the head of q1 done.
    token = qt.backend.lease_of("q1")["token"]
    head = qt.backend.start("q1", created[0].id, token, worker="w/1", lease=30)
    qt.backend.finish(head, token, Outcome(True, result=None), grace=GRACE, hand_off=False)

    def ns(jobs: list[Job]) -> list[int]:
        return [j.params["n"] for j in jobs]

    assert ns(qt.list_jobs(queue="q1")) == [3, 1, 0]
    assert ns(qt.list_jobs(queue="q2")) == [4, 2]
    assert ns(qt.list_jobs(action="hooked")) == [1]
    assert ns(qt.list_jobs(state="done")) == [0]
    assert ns(qt.list_jobs(state=JobState.SCHEDULED)) == [4]
    assert ns(qt.list_jobs(queue="q1", state="available")) == [3, 1]
    assert ns(qt.list_jobs(queue="q1", action="work", state="available")) == [3]
    assert len(qt.list_jobs()) == 5
    assert len(qt.list_jobs(limit=2)) == 2
    with pytest.raises(ValueError, match="state"):
        qt.list_jobs(state="bogus")

    page = qt.paginate_jobs(2, 1, queue="q1")
    assert (ns(page.items), page.total, page.page_number, page.page_size, page.total_pages) == (
        [3, 1],
        3,
        1,
        2,
        2,
    )
    page2 = qt.paginate_jobs(2, 2, queue="q1")
    assert (ns(page2.items), page2.total) == ([0], 3)
    assert qt.paginate_jobs(10, 5).items == []
    with pytest.raises(ValueError):
        qt.paginate_jobs(0, 1)

    other = make_qt(f"{scope}-other")
    foreign = other.create_job("q1", "work", {"n": 99})
    assert qt.get_job(foreign.id) is None
    assert other.get_job(created[0].id) is None
    assert ns(other.list_jobs()) == [99]
    assert foreign.id not in {j.id for j in qt.list_jobs(queue="q1")}
    assert other.paginate_jobs(10, 1).total == 1


def test_an_error_message_with_nul_or_lone_surrogates_is_stored(backend_url, scope):
    class Nasty(Performer):
        def perform(self, job: Job) -> Any:
            raise ValueError("bad \x00 byte and \ud800 surrogate")

    qt = Queuetopia(scope, app=Celery("nasty", broker=REDIS_URL), database_url=backend_url, performer=Nasty())
    qt.migrate()
    try:
        job = qt.create_job("q", "a", {})
        run_head(qt, "q")
        failed = qt.get_job(job.id)
        assert failed.state is JobState.RETRYING
        assert failed.error.startswith("ValueError: bad \\x00 byte and \\ud800 surrogate")
    finally:
        qt.engine.dispose()


def test_two_racing_scans_record_a_lost_attempt_and_call_the_hook_once(class_qt, scope):
    qt, recorder = class_qt
    job = qt.create_job("q", "anything", {})
    token = qt.backend.lease_of("q")["token"]
    assert qt.backend.start("q", job.id, token, worker="dead/1", lease=30) is not None
    expire_leases(qt)
    # Scan 1 has found the lost attempt; scan 2 looks before scan 1 has recorded it.
    first, _ = qt.backend.recover()
    second, _ = qt.backend.recover()
    assert [lost.job.id for lost in first] == [job.id]
    assert second == [], "the same lost attempt was handed to two scans"
    # The dead worker's late outcome is fenced off as soon as a scan claims the lease.
    running = first[0].job
    assert qt.backend.finish(running, token, Outcome(True, result="late"), grace=GRACE) == (False, None)
    qt.perform_runner._record_lost(first[0])
    assert len(recorder.failed) == 1
    lost = qt.get_job(job.id)
    assert (lost.state, lost.attempts) == (JobState.RETRYING, 1)
    assert lost.error.startswith("WorkerLostError")
    assert qt.backend.lease_of("q") is None


def test_a_claimed_lost_attempt_whose_scan_died_is_recovered_by_a_later_scan(qt, scope):
    job = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    qt.backend.start("q", job.id, token, worker="dead/1", lease=30)
    expire_leases(qt)
    claimed, _ = qt.backend.recover()
    assert len(claimed) == 1
    # The scan that claimed it dies before recording; its claim expires in turn.
    expire_leases(qt)
    qt.scan()
    lost = qt.get_job(job.id)
    assert (lost.state, lost.attempts) == (JobState.RETRYING, 1)
    assert qt.backend.lease_of("q") is None


def test_a_message_without_a_time_limit_still_leases_the_queue_for_the_jobs_timeout(
    database_url: str, scope: str, celery_queue: str, engine: sa.Engine
) -> None:
    app = Celery(f"nolimit-{scope}", broker=REDIS_URL)
    qt = Queuetopia(scope, app=app, database_url=database_url, celery_queue=celery_queue)
    seen: list[float] = []

    @qt.performer("measure")
    def measure(job: Job) -> None:
        with engine.connect() as conn:
            left = conn.execute(
                sa.text(
                    "SELECT extract(epoch FROM expires_at - now()) FROM queuetopia_leases"
                    " WHERE scope = :s AND queue = :q"
                ),
                {"s": scope, "q": job.queue},
            ).scalar_one()
        seen.append(float(left))

    job = qt.create_job("q", "measure", {}, timeout=300)
    token = qt.backend.lease_of("q")["token"]
    assert qt.perform_runner.perform("q", job.id, token, hostname="test", time_limit=None) == 1
    assert qt.get_job(job.id).state is JobState.DONE
    # timeout + time_limit_grace + lease_margin, less the time the test took to get here.
    assert seen and seen[0] > 300 + qt.time_limit_grace
    qt.engine.dispose()


def test_start_replaces_a_connection_found_dead_and_begins_the_attempt(pg_qt, engine):
    """A pooled connection used less than a second ago is handed out without a ping;
    if its backend died meanwhile, the start is tried once more on a new connection
    instead of failing the perform task (which would leave the job waiting for the
    dispatch grace)."""
    qt = pg_qt
    job = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    with qt.backend.pinned():
        with qt.backend._autocommit() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        wait_for(lambda: not backend_alive(engine, pid), message="the backend to be gone")
        started = qt.backend.start("q", job.id, token, worker="w/1", lease=30)
    assert started is not None and started.id == job.id and started.attempts == 1


def backend_alive(engine: sa.Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()
        )
