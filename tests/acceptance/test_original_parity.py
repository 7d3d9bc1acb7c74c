"""Where Queuetopia (the Elixir original) was ahead (issue 12), on real PostgreSQL,
Redis, ``celery worker`` and ``celery beat`` processes: ``sys.exit()`` in user code, the
cleanup when beat starts, a freed concurrency slot, and the CLI's job order.

Performers of tests/apps/testapp.py write one event per attempt (database clock, pid),
so what ran, and in which process, is checked from what really happened.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import pytest
import sqlalchemy as sa

from queuetopia_celery import Job, JobState, Queuetopia
from tests.conftest import events, wait_for

pytestmark = pytest.mark.acceptance

UTC = dt.timezone.utc
ATTEMPT_KINDS = ("started", "succeeded", "failed")


def finished(qt: Queuetopia, *jobs: Job) -> bool:
    return all(
        qt.get_job(job.id).state in (JobState.DONE, JobState.EXHAUSTED) for job in jobs  # type: ignore[union-attr]
    )


def attempt_pids(engine: sa.Engine, scope: str) -> set[int]:
    return {e["pid"] for e in events(engine, scope) if e["kind"] in ATTEMPT_KINDS}


# --------------------------------------------------------------------------- 1. SystemExit


def test_sys_exit_in_a_performer_or_a_hook_is_a_failed_attempt_and_the_worker_child_lives_on(
    qt, start_worker, start_beat, engine, scope
):
    worker = start_worker(concurrency=1)
    start_beat()  # retries are started by the scan
    (child,) = worker.children()
    exits = qt.create_job("exit", "work", {"exit_times": 1}, max_attempts=1)
    after_exit = qt.create_job("exit", "work", {"echo": "after exit"})
    retried = qt.create_job("retry", "fast_retry", {"exit_times": 1}, max_attempts=3)
    hook_exits = qt.create_job(
        "hook", "hooked", {"fail_times": 1, "hook_exits": True, "backoff": 0.2}, max_attempts=1
    )
    after_hook = qt.create_job("hook", "work", {"echo": "after hook"})
    backoff_exits = qt.create_job(
        "backoff", "hooked", {"fail_times": 2, "backoff_exits": True, "backoff": 0}, max_attempts=2
    )
    wait_for(
        lambda: finished(qt, exits, after_exit, retried, hook_exits, after_hook, backoff_exits),
        timeout=60,
        message="every queue to move on",
    )

    stored = qt.get_job(exits.id)
    assert stored.state is JobState.EXHAUSTED
    assert stored.error.startswith("SystemExit: 1")
    assert qt.get_job(after_exit.id).state is JobState.DONE
    again = qt.get_job(retried.id)
    assert (again.state, again.attempts) == (JobState.DONE, 2)

    stored = qt.get_job(hook_exits.id)
    assert stored.state is JobState.EXHAUSTED
    assert stored.error.startswith("RuntimeError: planned failure 1")
    assert "handle_failed_job raised SystemExit: 3" in stored.error
    assert qt.get_job(after_hook.id).state is JobState.DONE

    stored = qt.get_job(backoff_exits.id)
    assert (stored.state, stored.attempts) == (JobState.EXHAUSTED, 2)
    assert "backoff hook raised SystemExit: 4; used the default backoff" in stored.error

    # One child ran everything: no sys.exit() reached it.
    assert attempt_pids(engine, scope) == {child}
    assert worker.children() == [child]

    # Celery's own warm shutdown still stops the worker.
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.handle.wait(30) == 0


def test_a_lost_attempt_is_recorded_though_its_failure_hook_calls_sys_exit(qt, start_worker, engine, scope):
    start_worker(concurrency=1, beat=True)
    lost = qt.create_job(
        "crash", "hooked", {"crash_times": 1, "hook_exits": True, "backoff": 0.2}, timeout=1, max_attempts=1
    )
    after = qt.create_job("crash", "work", {"echo": "after the lost attempt"})
    wait_for(lambda: finished(qt, lost, after), timeout=60, message="the lost attempt to be recorded")

    stored = qt.get_job(lost.id)
    assert (stored.state, stored.attempts) == (JobState.EXHAUSTED, 1)
    assert stored.error.startswith("WorkerLostError: attempt 1 of job")
    assert "handle_failed_job raised SystemExit: 3" in stored.error
    assert qt.get_job(after.id).state is JobState.DONE
    # The hook ran once, from the scan that recorded the attempt.
    hooks = [e for e in events(engine, scope) if e["kind"] == "hook"]
    assert [(e["job_id"], e["attempt"]) for e in hooks] == [(lost.id, 1)]


def test_a_cold_shutdown_during_a_job_stops_the_worker_and_is_not_taken_for_a_sys_exit(
    qt, start_worker, engine, scope
):
    """Celery's cold shutdown terminates the prefork child, whose SIGTERM handler raises
    ``SystemExit`` inside the performer: a stop, not a failed attempt of the job."""
    worker = start_worker(concurrency=1)
    job = qt.create_job("cold", "work", {"sleep": 30}, timeout=60)
    wait_for(lambda: any(e["kind"] == "started" for e in events(engine, scope)), message="the job to start")
    os.kill(worker.pid, signal.SIGQUIT)
    worker.handle.wait(30)
    left = qt.get_job(job.id)
    # No outcome written by the dying child: the scan records the attempt as lost once
    # its lease expires.
    assert (left.state, left.attempts, left.error) == (JobState.RUNNING, 1, None)
    assert [e["kind"] for e in events(engine, scope)] == ["failed"]  # the performer saw it end


# --------------------------------------------------------------------------- 4. cleanup at start


def test_beat_cleans_as_it_starts_not_one_cleanup_interval_later(qt, engine, start_worker, start_beat):
    far = dt.datetime.now(UTC) + dt.timedelta(days=30)
    old = qt.create_job("c", "work", scheduled_at=far)
    recent = qt.create_job("c", "work", scheduled_at=far)
    with engine.begin() as conn:
        for job, age in ((old, "8 days"), (recent, "1 day")):
            conn.execute(
                sa.text(
                    "UPDATE queuetopia_jobs SET status = 'done', done_at = now() - CAST(:age AS interval)"
                    " WHERE id = :id"
                ),
                {"id": job.id, "age": age},
            )
    hourly = {"QT_TEST_CLEANUP_INTERVAL": "3600"}
    # Two beats (one embedded in the worker, one standalone): each cleans once at start.
    # Routine task lines (received, succeeded) are logged at DEBUG.
    worker = start_worker(concurrency=1, beat=True, env=hourly, loglevel="DEBUG")
    start_beat(env=hourly)
    wait_for(lambda: qt.get_job(old.id) is None, timeout=30, message="the cleanup at beat start")
    wait_for(
        lambda: worker.output().count(f"queuetopia.{qt.scope}.cleanup[") >= 4,  # received + succeeded, twice
        timeout=30,
        message="both beats' cleanups to run",
    )
    assert qt.get_job(recent.id) is not None  # younger than job_retention (7 days)
    assert "Traceback" not in worker.output()


# --------------------------------------------------------------------------- 5. freed slot


def test_a_freed_concurrency_slot_starts_a_waiting_queue_at_once_not_at_the_next_scan(
    make_qt, start_worker, engine, scope
):
    limit = {"QT_TEST_MAX_CONCURRENT": "1", "QT_TEST_POLL": "60"}
    qt = make_qt(max_concurrent_queues=1, poll_interval=60)
    start_worker(concurrency=2, beat=True, env=limit)  # the first scan comes 60 s after start
    a1 = qt.create_job("A", "work", {"sleep": 1.5})
    b1 = qt.create_job("B", "work", {"echo": "waiting for a slot"})
    assert qt.backend.lease_of("B") is None  # the limit held it back
    wait_for(lambda: finished(qt, a1, b1), timeout=30, message="B to start when A frees its slot")

    runs = {e["queue"]: e for e in events(engine, scope) if e["kind"] in ATTEMPT_KINDS}
    assert runs["B"]["started_at"] >= runs["A"]["ended_at"]  # still one queue at a time


# --------------------------------------------------------------------------- 3. the CLI's order


def test_the_cli_lists_jobs_newest_created_first_across_queues(qt, database_url, scope):
    far = dt.datetime.now(UTC) + dt.timedelta(days=1)
    a1 = qt.create_job("A", "work", scheduled_at=far)
    a2 = qt.create_job("A", "work", scheduled_at=far)
    b1 = qt.create_job("B", "work", scheduled_at=far)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUETOPIA_")}
    command = [sys.executable, "-m", "queuetopia_celery", "--database-url", database_url, "--scope", scope]
    out = subprocess.run(
        [*command, "jobs", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert [job["id"] for job in json.loads(out.stdout)] == [b1.id, a2.id, a1.id]
