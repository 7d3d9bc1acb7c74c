"""Issue 12's features users ask for, through the API, on PostgreSQL and on SQLite:
unique jobs, paused queues, bulk retry and abort by filter, and explain_queue."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import InvalidJobError, Job, JobState, JobStateError, QueueNotFoundError, Queuetopia
from queuetopia_celery.jobs import HELD_UNTIL
from queuetopia_celery.schema import UTCDateTime
from tests.integration.test_connection_loss import CREATE, Cutter

UTC = dt.timezone.utc


def _build(url: str, scope: str, **options: Any) -> Queuetopia:
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
    return Queuetopia(scope, app=app, database_url=url, **options)


@pytest.fixture
def build(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(**options: Any) -> Queuetopia:
        qt = _build(backend_url, scope, **options)
        qt.migrate()
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def _count(qt: Queuetopia, **where: Any) -> int:
    jobs = qt.backend.list_jobs()
    return sum(1 for job in jobs if all(getattr(job, k) == v for k, v in where.items()))


# ---------------------------------------------------------------------- unique jobs


def test_a_unique_key_held_by_an_open_job_returns_that_job(build):
    qt = build()
    first = qt.create_job("q1", "work", {"n": 1}, unique_key="invoice-7")
    again = qt.create_job("q1", "work", {"n": 2}, unique_key="invoice-7")
    elsewhere = qt.create_job("q2", "work", {"n": 3}, unique_key="invoice-7")
    assert again.id == first.id and elsewhere.id == first.id
    assert again.params == {"n": 1} and first.unique_key == "invoice-7"
    other = qt.create_job("q1", "work", unique_key="invoice-8")
    assert other.id != first.id
    assert _count(qt) == 2


def test_a_unique_key_is_free_again_once_its_job_is_done_or_aborted(build):
    qt = build(disabled=True)

    @qt.performer("work")
    def work(job: Job) -> None:
        return None

    first = qt.create_job("q", "work", unique_key="k")
    assert qt.drain().succeeded == 1
    second = qt.create_job("q", "work", unique_key="k")
    assert second.id != first.id
    qt.abort_job(second.id, "not needed")
    third = qt.create_job("q", "work", unique_key="k")
    assert len({first.id, second.id, third.id}) == 3
    # Keys are per scope: another scope's job with the same key is not compared.
    other = _build(str(qt.engine.url.render_as_string(hide_password=False)), qt.scope + "-b", disabled=True)
    try:
        assert other.create_job("q", "work", unique_key="k").id != third.id
    finally:
        other.engine.dispose()


def test_unique_keys_in_bulk_within_the_call_and_against_open_jobs(build):
    qt = build()
    held = qt.create_job("a", "work", unique_key="k1")
    jobs = qt.create_jobs(
        [
            {"queue": "a", "action": "work", "params": {"i": 0}},
            {"queue": "a", "action": "work", "params": {"i": 1}, "unique_key": "k1"},
            {"queue": "b", "action": "work", "params": {"i": 2}, "unique_key": "k2"},
            {"queue": "a", "action": "work", "params": {"i": 3}, "unique_key": "k2"},
            {"queue": "a", "action": "work", "params": {"i": 4}},
        ]
    )
    assert jobs[1].id == held.id
    assert jobs[3].id == jobs[2].id and jobs[2].queue == "b"
    assert [j.params for j in (jobs[0], jobs[4])] == [{"i": 0}, {"i": 4}]
    assert _count(qt) == 4
    # Order within queue a is kept (a gap where k1 was refused is harmless).
    a = [j for j in qt.list_jobs(queue="a")][::-1]
    assert [j.id for j in a] == [held.id, jobs[0].id, jobs[4].id]
    assert [j.sequence for j in a] == sorted(j.sequence for j in a)


def test_unique_job_in_the_callers_transaction(build):
    qt = build()
    with qt.engine.connect() as conn, conn.begin():
        first = qt.create_job("q", "work", unique_key="tx", connection=conn)
        again = qt.create_job("q", "work", unique_key="tx", connection=conn)
        assert again.id == first.id
    assert qt.create_job("q", "work", unique_key="tx").id == first.id
    with qt.engine.connect() as conn, conn.begin() as tx:
        rolled = qt.create_job("q", "work", unique_key="rolled", connection=conn)
        tx.rollback()
    assert qt.get_job(rolled.id) is None
    assert qt.create_job("q", "work", unique_key="rolled", params={"n": 2}).params == {"n": 2}
    assert _count(qt) == 2


@pytest.mark.parametrize(
    ("key", "reason"),
    [("x" * 256, "at most 255"), ("   ", "blank"), ("", "blank"), (42, "must be a string"), ("a\x00", "NUL")],
)
def test_a_bad_unique_key_is_refused_and_nothing_written(build, key, reason):
    qt = build()
    with pytest.raises(InvalidJobError, match=reason) as info:
        qt.create_job("q", "work", unique_key=key)
    assert info.value.field == "unique_key"
    with pytest.raises(InvalidJobError, match=reason):
        qt.create_jobs(
            [{"queue": "q", "action": "work"}, {"queue": "q", "action": "work", "unique_key": key}]
        )
    assert _count(qt) == 0
    assert qt.create_job("q", "work", unique_key="x" * 255).unique_key == "x" * 255


def _produce(url: str, scope: str, barrier: Any, results: Any, bulk: bool) -> None:
    qt = _build(url, scope)
    try:
        barrier.wait(30)
        if bulk:
            jobs = qt.create_jobs(
                [{"queue": f"q{i % 3}", "action": "work", "unique_key": f"k{i}"} for i in range(20)]
            )
            results.put([job.id for job in jobs])
        else:
            results.put([qt.create_job("q", "work", unique_key="same").id])
    except BaseException as exc:
        results.put(repr(exc))
        raise
    finally:
        qt.engine.dispose()


@pytest.mark.parametrize("bulk", [False, True], ids=["one", "bulk"])
def test_concurrent_producers_of_one_key_create_one_job(build, backend_url, scope, bulk):
    qt = build()
    producers = 6
    # spawn: forking a process with threads is deprecated (Python 3.12).
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(producers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_produce, args=(backend_url, scope, barrier, results, bulk))
        for _ in range(producers)
    ]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert all(isinstance(ids, list) for ids in got), got
    assert all(ids == got[0] for ids in got), got
    jobs = qt.list_jobs()
    assert len(jobs) == (20 if bulk else 1)
    assert sorted(job.id for job in jobs) == sorted(got[0])


# ---------------------------------------------------------------------- paused queues


def test_pause_and_resume_say_what_changed_and_refuse_an_unknown_queue(build):
    qt = build()
    with pytest.raises(QueueNotFoundError, match="no queue 'nope'") as info:
        qt.pause_queue("nope")
    assert info.value.queue == "nope"
    with pytest.raises(QueueNotFoundError):
        qt.resume_queue("nope")
    with pytest.raises(InvalidJobError):
        qt.pause_queue("  ")
    qt.create_job("q", "work")
    assert qt.backend.lease_of("q") is not None  # taken by the create (unstarted)
    assert qt.pause_queue("q") is True
    assert qt.backend.lease_of("q") is None  # let go: its message is dropped as stale
    assert qt.pause_queue("q") is False
    assert qt.backend.scan(grace=20) == []
    assert qt.backend.kick(["q"], grace=20) == []
    assert qt.backend.fill_slots(None, grace=20, max_concurrent=5) == []
    # A new job in a paused queue is accepted and does not start either.
    qt.create_job("q", "work")
    assert qt.backend.lease_of("q") is None
    (status,) = qt.queue_statuses(queue="q")
    assert status.paused and status.pending == 2
    assert status.to_dict()["paused"] is True
    assert qt.resume_queue("q") is True
    assert qt.backend.lease_of("q") is not None  # resume woke it at once
    assert qt.resume_queue("q") is False
    assert qt.queue_statuses(queue="q")[0].paused is False


def test_a_paused_empty_queue_is_listed(build):
    qt = build(disabled=True)

    @qt.performer("work")
    def work(job: Job) -> None:
        return None

    qt.create_job("q", "work")
    qt.drain()
    assert qt.queue_statuses() == []
    qt.pause_queue("q")
    (status,) = qt.queue_statuses()
    assert status.queue == "q" and status.paused and status.pending == 0


def test_a_paused_queue_hands_nothing_on_and_a_stale_message_cannot_start(build):
    from queuetopia_celery.backends import Burst, Outcome

    qt = build(disabled=True)
    store = qt.backend
    first = qt.create_job("q", "work")
    second = qt.create_job("q", "work")
    (lease,) = store.kick(["q"], grace=20)
    job = store.start("q", lease.job_id, lease.token, worker="w/1", lease=30)
    assert job is not None and job.id == first.id
    assert qt.pause_queue("q") is True
    assert store.lease_of("q") is not None  # the running job keeps its lease
    burst = Burst(worker="w/1", start_next=True, time_limit_grace=1, lease_margin=1, deadline_left=None)
    written, nxt, started = store.finish_and_start(job, lease.token, Outcome(True), grace=20, burst=burst)
    assert written and nxt is None and started is None
    assert store.lease_of("q") is None
    assert qt.get_job(second.id).state is JobState.AVAILABLE
    # A message sent before the pause (its lease taken in a race with it) cannot start.
    qt.resume_queue("q")
    (lease,) = store.kick(["q"], grace=20)
    _set(qt, "UPDATE queuetopia_queues SET paused = true WHERE scope = :s AND queue = 'q'")
    assert store.start("q", lease.job_id, lease.token, worker="w/1", lease=30) is None
    # The scan lets such a lease go once its wait is over instead of re-sending it.
    _set(
        qt,
        "UPDATE queuetopia_leases SET expires_at = :t WHERE scope = :s",
        t=dt.datetime(2000, 1, 1, tzinfo=UTC),
    )
    lost, resent = store.recover()
    assert lost == [] and resent == []
    assert store.lease_of("q") is None
    assert qt.get_job(second.id).state is JobState.AVAILABLE


# ---------------------------------------------------------------------- bulk retry and abort


def _set(qt: Queuetopia, sql: str, **params: Any) -> None:
    """Run ``sql`` (``:s`` is the scope); datetimes are bound as the columns store them."""
    statement = sa.text(sql).bindparams(
        *(sa.bindparam(k, type_=UTCDateTime()) for k, v in params.items() if isinstance(v, dt.datetime))
    )
    with qt.engine.begin() as conn:
        conn.execute(statement, {"s": qt.scope, **params})


def test_bulk_retry_of_5000_jobs_one_transaction(build):
    qt = build(disabled=True)
    qt.create_jobs([{"queue": "bulk", "action": "work", "max_attempts": 1} for _ in range(5000)])
    qt.create_job("other", "work")
    # Every job of 'bulk' failed its last attempt and is held.
    _set(
        qt,
        "UPDATE queuetopia_jobs SET attempts = 1, error = 'boom', next_attempt_at = :held "
        "WHERE scope = :s AND queue = 'bulk'",
        held=HELD_UNTIL,
    )
    assert qt.backend.count_jobs(queue="bulk", state=JobState.HELD) == 5000
    dry = qt.retry_jobs(queue="bulk", dry_run=True)
    assert (dry.count, dry.dry_run, dry.skipped) == (5000, True, {})
    assert qt.backend.count_jobs(queue="bulk", state=JobState.HELD) == 5000
    done = qt.retry_jobs(queue="bulk", state="held")
    assert done.count == 5000 and done.queues == ("bulk",)
    assert qt.backend.count_jobs(queue="bulk", state=JobState.RETRYING) == 5000
    assert qt.backend.count_jobs(queue="other", state=JobState.AVAILABLE) == 1


def test_bulk_retry_of_exhausted_jobs_keeps_the_moved_on_rule(build):
    qt = build(disabled=True)
    jobs = qt.create_jobs([{"queue": "q", "action": "work", "max_attempts": 1} for _ in range(3)])
    other = qt.create_job("r", "other", max_attempts=1)
    _set(qt, "UPDATE queuetopia_jobs SET status = 'exhausted', attempts = 1, error = 'x' WHERE scope = :s")
    # In 'q', jobs 1 and 2 were followed by jobs that ran: retrying them would run them
    # out of order. The last of 'q', and 'r''s only job, are retried.
    result = qt.retry_jobs(action="work")
    assert result.count == 1 and result.skipped == {"moved_on": 2}
    assert qt.get_job(jobs[2].id).state is JobState.RETRYING
    assert qt.get_job(jobs[0].id).state is JobState.EXHAUSTED
    assert qt.get_job(other.id).state is JobState.EXHAUSTED  # another action
    forced = qt.retry_jobs(queue="q", state=["exhausted"], force=True)
    assert forced.count == 2 and forced.skipped == {}
    assert qt.retry_jobs(queue="r", state="retrying").count == 0


def test_bulk_retry_skips_an_exhausted_job_whose_unique_key_is_taken(build):
    qt = build(disabled=True)
    old = qt.create_job("q", "work", unique_key="k")
    _set(qt, "UPDATE queuetopia_jobs SET status = 'exhausted', attempts = 1 WHERE scope = :s")
    new = qt.create_job("q2", "work", unique_key="k")
    assert new.id != old.id
    result = qt.retry_jobs(queue="q")
    assert result.count == 0 and result.skipped == {"unique_key": 1}
    assert qt.get_job(old.id).state is JobState.EXHAUSTED
    with pytest.raises(JobStateError, match=f"job {new.id} holds its unique_key now"):
        qt.retry_job(old.id)
    qt.abort_job(new.id, "superseded")
    assert qt.retry_job(old.id).state is JobState.RETRYING


def test_bulk_abort_of_5000_pending_jobs_skips_the_running_one(build):
    qt = build(disabled=True)
    qt.create_jobs([{"queue": "bulk", "action": "work"} for _ in range(5000)])
    keep = qt.create_job("other", "work")
    (lease,) = qt.backend.kick(["bulk"], grace=20)
    running = qt.backend.start("bulk", lease.job_id, lease.token, worker="w/1", lease=30)
    assert running is not None
    dry = qt.abort_jobs(queue="bulk", reason="bad deploy", dry_run=True)
    assert (dry.count, dry.skipped) == (4999, {"running": 1})
    assert qt.backend.count_jobs(state=JobState.ABORTED) == 0
    result = qt.abort_jobs(queue="bulk", reason="bad deploy")
    assert (result.count, result.skipped) == (4999, {"running": 1})
    aborted = qt.list_jobs(queue="bulk", state="aborted", limit=1)[0]
    assert aborted.abort_reason == "bad deploy" and aborted.aborted_at is not None
    assert qt.get_job(running.id).state is JobState.RUNNING
    assert qt.get_job(keep.id).state is JobState.AVAILABLE


def test_bulk_actions_refuse_the_whole_scope_without_all_and_bad_input(build):
    qt = build(disabled=True)
    qt.create_job("q", "work")
    with pytest.raises(InvalidJobError, match="all=True"):
        qt.retry_jobs()
    with pytest.raises(InvalidJobError, match="all=True"):
        qt.abort_jobs(reason="x")
    with pytest.raises(InvalidJobError, match="reason"):
        qt.abort_jobs(queue="q", reason=" ")
    with pytest.raises(InvalidJobError, match="bulk retry takes"):
        qt.retry_jobs(queue="q", state="done")
    with pytest.raises(InvalidJobError, match="state"):
        qt.retry_jobs(queue="q", state="nonsense")
    assert qt.backend.count_jobs(state=JobState.AVAILABLE) == 1
    assert qt.abort_jobs(all=True, reason="everything").count == 1


# ---------------------------------------------------------------------- explain


def test_explain_says_why_the_head_is_not_running(build):
    qt = build(disabled=True, max_concurrent_queues=1)

    @qt.performer("work")
    def work(job: Job) -> None:
        return None

    assert qt.explain_queue("nope").reason == "unknown_queue"
    job = qt.create_job("q", "work")
    answer = qt.explain_queue("q")
    assert answer.reason == "waiting_for_dispatch", answer
    assert answer.summary.startswith("Queue 'q' is due: job #")
    assert any(f"job #{job.id} (work)" in line for line in answer.details)
    qt.check_actions = False  # as a producer that does not know the workers' performers
    qt.create_job("unknown-action", "nobody")
    qt.check_actions = True
    assert qt.explain_queue("unknown-action").reason == "no_performer"

    (lease,) = qt.backend.kick(["q"], grace=20)
    assert qt.explain_queue("q").reason == "dispatched"
    _set(
        qt,
        "UPDATE queuetopia_leases SET expires_at = :t WHERE scope = :s",
        t=dt.datetime(2000, 1, 1, tzinfo=UTC),
    )
    assert qt.explain_queue("q").reason == "resend_due"
    assert qt.explain_queue("unknown-action").reason == "concurrency_limit"
    started = qt.backend.start("q", lease.job_id, lease.token, worker="host/123", lease=30)
    assert started is not None
    answer = qt.explain_queue("q")
    assert answer.reason == "running" and "host/123" in answer.summary
    _set(
        qt,
        "UPDATE queuetopia_leases SET expires_at = :t WHERE scope = :s",
        t=dt.datetime(2000, 1, 1, tzinfo=UTC),
    )
    assert qt.explain_queue("q").reason == "lease_expired"
    # The scan records the lost attempt: the job waits for its retry.
    qt.scan()
    answer = qt.explain_queue("q")
    assert answer.reason == "retry_wait" and "retry at" in answer.summary, answer
    qt.pause_queue("q")
    assert qt.explain_queue("q").reason == "paused"
    qt.resume_queue("q")
    _set(
        qt,
        "UPDATE queuetopia_jobs SET next_attempt_at = :held WHERE scope = :s AND queue = 'q'",
        held=HELD_UNTIL,
    )
    assert qt.explain_queue("q").reason == "held"
    qt.create_job("later", "work", scheduled_at=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    assert qt.explain_queue("later").reason == "scheduled"
    qt.abort_jobs(queue="later", reason="not needed")
    answer = qt.explain_queue("later")
    assert answer.reason == "empty" and answer.to_dict()["head"] is None


@pytest.fixture
def cutting_qt(make_qt: Callable[..., Queuetopia], database_url: str) -> tuple[Queuetopia, Cutter]:
    """A Queuetopia whose connections can be cut (see test_connection_loss.py)."""
    qt = make_qt()
    cutter = Cutter(sa.engine.make_url(database_url).set(drivername="postgresql").render_as_string(False))
    factory = cutter.cursor_class()

    @sa.event.listens_for(qt.engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.cursor_factory = factory

    qt.engine.dispose()
    return qt, cutter


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_bulk_create_with_unique_keys_whose_reply_is_lost_is_found_again(cutting_qt, when):
    """PostgreSQL: the insert is retried on a new connection; after a lost reply the
    retry finds the jobs of the first try (by its create key) and, for an item refused
    for its key, the job holding it."""
    qt, cutter = cutting_qt
    holder = qt.create_job("a", "work", unique_key="taken")
    cutter.arm(CREATE, when)
    jobs = qt.create_jobs(
        [
            {"queue": "a", "action": "work", "params": {"i": 0}},
            {"queue": "a", "action": "work", "params": {"i": 1}, "unique_key": "taken"},
            {"queue": "a", "action": "work", "params": {"i": 2}, "unique_key": "new"},
            {"queue": "b", "action": "work", "params": {"i": 3}},
        ]
    )
    assert cutter.cuts == 1
    assert jobs[1].id == holder.id
    assert [job.params for job in jobs] == [{"i": 0}, {}, {"i": 2}, {"i": 3}]
    assert jobs[2].unique_key == "new"
    assert len(qt.list_jobs()) == 4
