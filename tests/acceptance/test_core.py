"""The core's behaviour (issue 2) on real PostgreSQL, Redis and ``celery worker`` processes.

Performers of tests/apps/testapp.py write one event per attempt (database clock), so
order and overlap are checked from what really ran, not from what the store says.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from queuetopia_celery import Job, JobState
from tests.conftest import events, wait_for

pytestmark = pytest.mark.acceptance

UTC = dt.timezone.utc
ATTEMPT_KINDS = ("started", "succeeded", "failed")


def attempts_by_queue(evts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Attempt events (not hook calls) per queue, in start order."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evts:
        if e["kind"] in ATTEMPT_KINDS:
            out[e["queue"]].append(e)
    return out


def assert_one_at_a_time(evts: list[dict[str, Any]]) -> None:
    """No two attempts of one queue overlap. An attempt without ended_at was killed:
    the next one must start after its last heartbeat, if any, which the caller checks."""
    for queue, items in attempts_by_queue(evts).items():
        for before, after in itertools.pairwise(items):
            if before["ended_at"] is not None:
                assert before["ended_at"] <= after["started_at"], f"overlap in queue {queue!r}"


def done(qt: Any, *jobs: Job) -> bool:
    return all(qt.get_job(j.id).state is JobState.DONE for j in jobs)


def state(qt: Any, job: Job) -> JobState:
    return qt.get_job(job.id).state  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- ordering


def test_queues_run_one_job_at_a_time_by_schedule_then_sequence_and_a_slow_queue_delays_no_other(
    qt, engine, scope, start_worker
):
    start_worker(concurrency=2, beat=True)
    slow = qt.create_job("slow", "work", {"sleep": 12})
    wait_for(lambda: state(qt, slow) is JobState.RUNNING, message="the slow job to start")

    with engine.connect() as conn, conn.begin():
        now = conn.execute(sa.select(sa.func.now())).scalar_one()
        # One transaction: nothing runs before the commit, so the order below is
        # decided by (scheduled_at, sequence) alone.
        a = [qt.create_job("a", "work", {"sleep": 0.05, "echo": i}, connection=conn) for i in range(5)]
        early = qt.create_job(
            "a", "work", {"echo": "early"}, scheduled_at=now - dt.timedelta(minutes=1), connection=conn
        )
        b = [qt.create_job("b", "work", {"sleep": 0.05, "echo": i}, connection=conn) for i in range(5)]
        later = qt.create_job(
            "c", "work", {"echo": "later"}, scheduled_at=now + dt.timedelta(seconds=2), connection=conn
        )
        assert qt.get_job(later.id) is None, "visible before commit"
    assert early.sequence > a[-1].sequence
    assert qt.get_job(later.id).state is JobState.SCHEDULED

    wait_for(lambda: done(qt, *a, early, *b, later), timeout=60, message="queues a, b, c done")
    # The slow queue held one worker process all along and delayed nobody.
    assert state(qt, slow) is JobState.RUNNING

    evts = events(engine, scope)
    assert_one_at_a_time(evts)
    runs = attempts_by_queue(evts)
    assert [e["job_id"] for e in runs["a"]] == [early.id] + [j.id for j in a]
    assert [e["job_id"] for e in runs["b"]] == [j.id for j in b]
    assert [e["kind"] for q in "abc" for e in runs[q]] == ["succeeded"] * 12
    (c_run,) = runs["c"]
    assert c_run["started_at"] >= later.scheduled_at, "a scheduled job ran before scheduled_at"


# --------------------------------------------------------------------------- failures


def test_a_failing_job_is_retried_with_backoff_blocks_only_its_queue_and_is_then_exhausted(
    qt, engine, scope, start_worker
):
    worker = start_worker(concurrency=2, beat=True)
    bad = qt.create_job("bad", "hooked", {"fail_times": 99, "backoff": 3}, max_attempts=3)
    after_bad = qt.create_job("bad", "work", {"echo": "after bad"})
    good = [qt.create_job("good", "work", {"echo": i}) for i in range(3)]
    flaky = qt.create_job("flaky", "fast_retry", {"fail_times": 1, "echo": "flaky"})
    boom = qt.create_job(
        "boom", "hooked", {"fail_times": 1, "backoff": 0.2, "hook_raises": True}, max_attempts=1
    )
    after_boom = qt.create_job("boom", "work", {"echo": "after boom"})

    def failed_attempt(n: int) -> Job | None:
        job = qt.get_job(bad.id)
        return job if job.attempts == n and job.state is JobState.RETRYING else None

    first = wait_for(lambda: failed_attempt(1), message="bad's first failed attempt")
    assert first.error.startswith("RuntimeError: planned failure 1")
    assert "Traceback" in first.error
    assert first.attempted_at is not None and first.attempted_by
    assert first.attempted_by.endswith(tuple(f"/{pid}" for pid in worker.children()))
    # Custom backoff hook honoured: 3 s after the end of the attempt.
    wait = (first.next_attempt_at - first.attempted_at).total_seconds()
    assert 3 <= wait < 13

    # Other queues are not held back by the failing one.
    wait_for(lambda: done(qt, *good, flaky), message="good and flaky queues done")
    assert qt.get_job(bad.id).state is not JobState.EXHAUSTED
    assert state(qt, after_bad) is JobState.AVAILABLE

    second = wait_for(lambda: failed_attempt(2), message="bad's second failed attempt")
    assert second.error.startswith("RuntimeError: planned failure 2")
    assert second.attempted_at > first.attempted_at
    assert second.next_attempt_at > first.next_attempt_at

    wait_for(lambda: done(qt, after_bad, after_boom), timeout=60, message="the queues moved on")
    final = qt.get_job(bad.id)
    assert final.state is JobState.EXHAUSTED
    assert (final.attempts, final.next_attempt_at) == (3, None)
    assert final.error.startswith("RuntimeError: planned failure 3")

    # A success clears the error and stores the result.
    ok = qt.get_job(flaky.id)
    assert (ok.attempts, ok.error, ok.result) == (2, None, {"attempt": 2, "echo": "flaky"})
    assert ok.done_at is not None

    # A raising on_failure hook is recorded on the job and crashes nothing.
    boomed = qt.get_job(boom.id)
    assert boomed.state is JobState.EXHAUSTED
    assert "planned failure 1" in boomed.error
    assert "handle_failed_job raised RuntimeError: hook boom 1" in boomed.error
    assert worker.handle.poll() is None

    evts = events(engine, scope)
    assert_one_at_a_time(evts)
    hooks = [(e["job_id"], e["attempt"]) for e in evts if e["kind"] == "hook"]
    assert sorted(hooks) == sorted([(bad.id, 1), (bad.id, 2), (bad.id, 3), (boom.id, 1)])
    bad_runs = attempts_by_queue(evts)["bad"]
    assert [(e["job_id"], e["attempt"], e["kind"]) for e in bad_runs] == [
        (bad.id, 1, "failed"),
        (bad.id, 2, "failed"),
        (bad.id, 3, "failed"),
        (after_bad.id, 1, "succeeded"),
    ]


# --------------------------------------------------------------------------- timeouts and crashes


def test_timeouts_and_crashes_become_failed_attempts_and_never_overlap(qt, engine, scope, start_worker):
    start_worker(concurrency=2, beat=True)
    soft = qt.create_job("soft", "work", {"sleep": 20}, timeout=1, max_attempts=2)
    after_soft = qt.create_job("soft", "work", {"echo": "after soft"})
    hang = qt.create_job(
        "hang", "work", {"sleep": 60, "hang": True, "heartbeat": True}, timeout=1, max_attempts=1
    )
    after_hang = qt.create_job("hang", "work", {"echo": "after hang"})
    crash = qt.create_job("crash", "work", {"crash_times": 1}, timeout=2)

    # Soft limit: a clean timeout failure, retried.
    timed_out = wait_for(
        lambda: (j := qt.get_job(soft.id)).attempts == 1 and j.state is JobState.RETRYING and j,
        message="the soft timeout of the first attempt",
    )
    assert timed_out.error == f"JobTimeoutError: job {soft.id} timed out after 1 s"

    # A worker killed mid-job: the expired lease is recovered as a failed attempt.
    lost = wait_for(
        lambda: (j := qt.get_job(crash.id)).attempts == 1 and j.state is JobState.RETRYING and j,
        message="the crashed attempt to be recovered",
    )
    assert lost.error.startswith("WorkerLostError")

    wait_for(lambda: done(qt, after_soft, after_hang, crash), timeout=60, message="all queues moved on")
    assert qt.get_job(soft.id).state is JobState.EXHAUSTED
    assert qt.get_job(soft.id).attempts == 2
    hung = qt.get_job(hang.id)
    assert hung.state is JobState.EXHAUSTED
    assert hung.error.startswith("WorkerLostError")
    recovered = qt.get_job(crash.id)
    assert (recovered.attempts, recovered.error) == (2, None)

    evts = events(engine, scope)
    assert_one_at_a_time(evts)
    runs = attempts_by_queue(evts)
    assert [(e["attempt"], e["kind"]) for e in runs["soft"]] == [
        (1, "failed"),
        (2, "failed"),
        (1, "succeeded"),
    ]
    # The hanging attempt was killed (never ended) and its queue waited for it to be dead:
    # the next job started after its last heartbeat.
    hang_run, next_run = runs["hang"]
    # SIGTERM then SIGKILL from the pool: the performer may have seen the SIGTERM ("failed").
    assert hang_run["kind"] in ("started", "failed") and hang_run["ended_at"] is not None
    assert next_run["job_id"] == after_hang.id
    assert next_run["started_at"] > hang_run["ended_at"]
    assert [(e["attempt"], e["kind"]) for e in runs["crash"]] == [(1, "started"), (2, "succeeded")]


# --------------------------------------------------------------------------- kick, hand-off, transactions


def test_without_beat_jobs_are_kicked_handed_off_and_join_the_callers_transaction(
    qt, engine, scope, start_worker
):
    # No beat, so no scan ever runs: every start below is a kick or a hand-off.
    start_worker(concurrency=2, beat=False)
    kicked = qt.create_job("kick", "work", {"echo": "kicked"})
    wait_for(lambda: done(qt, kicked), message="a kicked job")

    first = qt.create_job("busy", "work", {"sleep": 1})
    wait_for(lambda: state(qt, first) is JobState.RUNNING, message="the first busy job")
    # Created while the queue is taken: their kicks find the lease held; only the
    # hand-off at the end of each job (longer than the burst budget) starts them.
    rest = [qt.create_job("busy", "work", {"sleep": 0.3, "echo": i}) for i in range(3)]
    wait_for(lambda: done(qt, first, *rest), message="hand-off through the busy queue")

    # Caller's Connection: committed jobs run, rolled-back ones are never written.
    with engine.connect() as conn:
        with conn.begin():
            via_conn = qt.create_job("tx", "work", {"echo": "connection"}, connection=conn)
            assert qt.get_job(via_conn.id) is None
        # Kicked through the kick task once the transaction committed.
        wait_for(lambda: done(qt, via_conn), message="the job created on the caller's connection")
        with conn.begin() as trans:
            rolled_conn = qt.create_job("tx", "work", {"echo": "rolled back"}, connection=conn)
            trans.rollback()
    with Session(engine) as session:
        rolled_session = qt.create_job("tx", "work", {"echo": "rolled back"}, connection=session)
        session.rollback()
    with Session(engine) as session:
        via_session = qt.create_job("tx", "work", {"echo": "session"}, connection=session)
        assert qt.get_job(via_session.id) is None
        session.commit()
    wait_for(lambda: done(qt, via_session), message="the job created in the caller's session")
    assert qt.get_job(rolled_conn.id) is None and qt.get_job(rolled_session.id) is None

    evts = events(engine, scope)
    assert_one_at_a_time(evts)
    runs = attempts_by_queue(evts)
    assert [e["job_id"] for e in runs["busy"]] == [first.id] + [j.id for j in rest]
    assert [e["job_id"] for e in runs["tx"]] == [via_conn.id, via_session.id]


# --------------------------------------------------------------------------- scopes and nodes


def test_two_scopes_on_one_celery_app_and_database_never_touch_each_others_jobs(
    make_qt, engine, scope, start_worker
):
    other = f"{scope}-b"
    qt_a, qt_b = make_qt(), make_qt(other)
    start_worker(concurrency=2, beat=True, env={"QT_TEST_EXTRA_SCOPE": other})
    # Same queue name in both scopes; scope a's head fails and blocks only scope a's queue.
    a_head = qt_a.create_job("shared", "hooked", {"fail_times": 99, "backoff": 30}, max_attempts=2)
    a_next = qt_a.create_job("shared", "work", {"echo": "a"})
    b_jobs = [qt_b.create_job("shared", "work", {"echo": i}) for i in range(3)]

    wait_for(lambda: done(qt_b, *b_jobs), message="scope b's queue done")
    wait_for(lambda: qt_a.get_job(a_head.id).attempts == 1, message="scope a's head attempted")
    assert state(qt_a, a_next) is JobState.AVAILABLE

    a_ids, b_ids = {a_head.id, a_next.id}, {j.id for j in b_jobs}
    assert {j.id for j in qt_a.list_jobs()} == a_ids
    assert {j.id for j in qt_b.list_jobs(queue="shared")} == b_ids
    assert all(qt_a.get_job(i) is None for i in b_ids)
    assert all(qt_b.get_job(i) is None for i in a_ids)
    assert {e["job_id"] for e in events(engine, scope) if e["kind"] != "hook"} == {a_head.id}
    assert {e["job_id"] for e in events(engine, other)} == b_ids


def test_two_beats_and_several_workers_never_run_one_queue_twice_at_once(
    qt, engine, scope, start_worker, start_beat
):
    env = {"QT_TEST_POLL": "0.2"}
    workers = [start_worker(concurrency=2, env=env, wait=False) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    start_beat(env=env)
    start_beat(env=env)
    jobs = {
        q: [
            qt.create_job(q, "fast_retry", {"sleep": 0.05, "fail_times": i % 2, "echo": i}, max_attempts=5)
            for i in range(6)
        ]
        for q in ("n1", "n2", "n3")
    }
    every = [j for js in jobs.values() for j in js]
    wait_for(lambda: done(qt, *every), timeout=90, message="all jobs done")

    evts = events(engine, scope)
    assert_one_at_a_time(evts)
    runs = attempts_by_queue(evts)
    for q, js in jobs.items():
        expected = []
        for i, j in enumerate(js):
            expected += [(j.id, 1, "failed"), (j.id, 2, "succeeded")] if i % 2 else [(j.id, 1, "succeeded")]
        assert [(e["job_id"], e["attempt"], e["kind"]) for e in runs[q]] == expected


# --------------------------------------------------------------------------- missing performer


def test_a_job_without_performer_blocks_its_queue_until_a_worker_has_the_performer(
    qt, engine, scope, start_worker
):
    bare = start_worker(concurrency=1, beat=True, env={"QT_TEST_NO_PERFORMERS": "1"})
    head = qt.create_job("q", "work", {"echo": "head"})
    tail = qt.create_job("q", "work", {"echo": "tail"})
    failed = wait_for(
        lambda: (j := qt.get_job(head.id)).state is JobState.RETRYING and j,
        message="the first attempt without performer",
    )
    assert failed.error.startswith("NoPerformerError: no performer registered for action 'work'")
    assert state(qt, tail) is JobState.AVAILABLE
    bare.stop()
    assert events(engine, scope) == []

    start_worker(concurrency=1, beat=True)
    wait_for(lambda: done(qt, head, tail), timeout=60, message="the deployed performer to unblock the queue")
    assert qt.get_job(head.id).error is None
    assert [e["job_id"] for e in events(engine, scope)] == [head.id, tail.id]


# --------------------------------------------------------------------------- fencing


def test_perform_messages_with_an_expired_or_used_token_are_dropped(
    qt, engine, scope, celery_queue, start_worker
):
    # No worker yet: the first perform message waits in the broker ...
    job = qt.create_job("f", "work", {"echo": "fenced"})
    old = qt.backend.lease_of("f")["token"]
    # ... longer than its re-send wait: the scan re-sends it under the same token.
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE queuetopia_leases SET expires_at = now() - interval '1 second' WHERE scope = :s"),
            {"s": scope},
        )
    qt.scan()
    lease = qt.backend.lease_of("f")
    assert (lease["token"], lease["resends"]) == (old, 1)

    start_worker(concurrency=1)
    wait_for(lambda: done(qt, job), message="the job, from either copy of its message")
    # The token again, twice, by hand, after the job is done: stale now.
    qt.perform_task.apply_async(args=("f", job.id, old), queue=celery_queue)
    qt.perform_task.apply_async(args=("f", job.id, old), queue=celery_queue)
    # One worker process, FIFO broker queue: the sentinel runs after both were handled.
    sentinel = qt.create_job("f", "work", {"echo": "sentinel"})
    wait_for(lambda: done(qt, sentinel), message="the sentinel job")

    assert qt.get_job(job.id).attempts == 1
    assert [e["job_id"] for e in events(engine, scope)] == [job.id, sentinel.id]
