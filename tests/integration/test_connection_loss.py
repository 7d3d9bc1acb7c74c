"""Write-backs survive a dropped connection: the backend is terminated right before a
statement (nothing committed) or right after it committed (only its reply is lost),
and the worker's start, the outcome write with its hand-on, and ``create_job`` without
a caller connection are retried on a new connection, recognising their own committed
write: exactly one run, one attempt, one job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from queuetopia_celery import DatabaseError, JobState, Queuetopia
from queuetopia_celery.backends import Burst, Outcome
from queuetopia_celery.backends import connection as store_module
from tests.integration.cut_checks import outcome_write_cut_is_written_once_and_hands_on

#: The first lines of the statements a test can cut (see queuetopia_celery/backends/postgres_sql.py).
CREATE = "INSERT INTO queuetopia_queues AS qq"
START = "UPDATE queuetopia_leases\n    SET started_at = now()"
FINISH = "WITH lease AS ("


class Cutter:
    """Terminates the backend of the connection running the next statement that
    contains ``marker``: ``before`` it is sent, or ``after`` it ran (committed: it is
    autocommit), so that the client gets a dead connection either way."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.marker: str | None = None
        self.when = "after"
        self.times = 0
        self.cuts = 0
        self.lock = threading.Lock()

    def arm(self, marker: str, when: str, times: int = 1) -> None:
        self.marker, self.when, self.times = marker, when, times

    def _take(self, query: Any) -> bool:
        with self.lock:
            if self.marker is None or self.marker not in str(query):
                return False
            self.times -= 1
            if self.times <= 0:
                self.marker = None
            return True

    def cut(self, conn: psycopg.Connection[Any]) -> None:
        pid = conn.info.backend_pid
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 10
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                assert time.monotonic() < deadline, "the backend did not go away"
                time.sleep(0.01)
        self.cuts += 1

    def cursor_class(self) -> type[psycopg.Cursor[Any]]:
        cutter = self

        class CuttingCursor(psycopg.Cursor[Any]):
            def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
                if not cutter._take(query):
                    return super().execute(query, *args, **kwargs)
                if cutter.when == "before":
                    cutter.cut(self.connection)
                    return super().execute(query, *args, **kwargs)
                super().execute(query, *args, **kwargs)
                cutter.cut(self.connection)
                # The reply is in hand, but the client must see what a lost reply looks
                # like: the connection is dead. Any statement now fails as it would.
                return super().execute("SELECT 1")

        return CuttingCursor


@pytest.fixture
def cut_qt(make_qt: Callable[..., Queuetopia], database_url: str) -> Iterator[tuple[Queuetopia, Cutter]]:
    qt = make_qt()
    admin = sa.engine.make_url(database_url).set(drivername="postgresql")
    cutter = Cutter(admin.render_as_string(hide_password=False))
    factory = cutter.cursor_class()

    @sa.event.listens_for(qt.engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.cursor_factory = factory

    qt.engine.dispose()
    yield qt, cutter


def runs(engine: sa.Engine, scope: str) -> dict[int, int]:
    """How many times each job's performer ran to completion."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT job_id, count(*) FROM qt_test_events WHERE scope = :s AND kind = 'succeeded'"
                " GROUP BY job_id"
            ),
            {"s": scope},
        )
        return {int(job_id): int(count) for job_id, count in rows}


def jobs_in(engine: sa.Engine, scope: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM queuetopia_jobs WHERE scope = :s"), {"s": scope}
            ).scalar()
        )


@pytest.mark.parametrize("when", ["before", "after"])
def test_create_job_cut_mid_insert_creates_the_job_exactly_once(cut_qt, engine, scope, when):
    qt, cutter = cut_qt
    cutter.arm(CREATE, when)
    job = qt.create_job("q", "work", {"echo": 1})
    assert cutter.cuts == 1
    assert jobs_in(engine, scope) == 1
    assert qt.get_job(job.id) == job
    lease = qt.backend.lease_of("q")
    assert lease is not None and lease["job_id"] == job.id  # the queue was woken too


@pytest.mark.parametrize("when", ["before", "after"])
def test_create_jobs_in_bulk_cut_mid_insert_returns_each_job_once_in_order(cut_qt, engine, scope, when):
    qt, cutter = cut_qt
    cutter.arm(CREATE, when)
    items = [{"queue": f"q{i % 3}", "action": "work", "params": {"echo": i}} for i in range(10)]
    jobs = qt.create_jobs(items)
    assert cutter.cuts == 1
    assert jobs_in(engine, scope) == 10
    assert [job.params["echo"] for job in jobs] == list(range(10))
    assert [job.queue for job in jobs] == [item["queue"] for item in items]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_start_cut_mid_statement_begins_the_attempt_once(cut_qt, scope, when):
    qt, cutter = cut_qt
    job = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    cutter.arm(START, when)
    with qt.backend.pinned():
        started = qt.backend.start("q", job.id, token, worker="w/1", lease=30)
    assert cutter.cuts == 1
    assert started is not None and started.id == job.id and started.attempts == 1
    assert qt.get_job(job.id).attempts == 1
    # A duplicate of the message is still dropped.
    assert qt.backend.start("q", job.id, token, worker="w/2", lease=30) is None


BURST = Burst(worker="w/1", start_next=True, time_limit_grace=1, lease_margin=1, deadline_left=None)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("start_next", [True, False], ids=["inline", "handed-on"])
def test_an_outcome_write_cut_mid_statement_is_written_once_and_hands_on(cut_qt, when, start_next):
    qt, cutter = cut_qt
    outcome_write_cut_is_written_once_and_hands_on(qt, cutter, FINISH, when, start_next)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failure_write_cut_mid_statement_is_written_once(cut_qt, when):
    qt, cutter = cut_qt
    first = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    cutter.arm(FINISH, when)
    outcome = Outcome(False, error="boom", backoff=3600)
    written, nxt, started = qt.backend.finish_and_start(job, token, outcome, grace=20, burst=BURST)
    assert cutter.cuts == 1
    assert (written, nxt, started) == (True, None, None)
    failed = qt.get_job(first.id)
    assert (failed.state, failed.error, failed.attempts) == (JobState.RETRYING, "boom", 1)
    assert qt.backend.lease_of("q") is None


def test_a_write_whose_lease_was_lost_is_still_dropped_after_a_cut(cut_qt, engine, scope):
    """The retry recognises only its own write: when the scan recorded the attempt as
    lost meanwhile, the late outcome stays dropped."""
    qt, cutter = cut_qt
    first = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE queuetopia_leases SET expires_at = now() - interval '1 s' WHERE scope = :s"),
            {"s": scope},
        )
    qt.scan()
    cutter.arm(FINISH, "before")
    finished = qt.backend.finish_and_start(job, token, Outcome(True), grace=20, burst=BURST)
    assert finished == (False, None, None)
    assert qt.get_job(first.id).error.startswith("WorkerLostError")


def test_the_runner_runs_each_job_once_when_its_outcome_write_is_cut_after_commit(cut_qt, engine, scope):
    """The worker's whole path (start, performer, outcome write, inline start of the
    next job): the outcome's reply is lost twice, each job still runs exactly once."""
    qt, cutter = cut_qt
    jobs = [qt.create_job("q", "work", {"echo": i}) for i in range(4)]
    token = qt.backend.lease_of("q")["token"]
    armed = iter([1, 2])

    real = qt.backend.finish_and_start

    def arm_then_finish(*args: Any, **kwargs: Any) -> Any:
        if next(armed, None) is not None:
            cutter.arm(FINISH, "after")
        return real(*args, **kwargs)

    qt.backend.finish_and_start = arm_then_finish  # type: ignore[method-assign]
    # The burst's time budget (0.25 s by default) must not end it while the cut
    # connections are replaced on a loaded machine: all four jobs run in this task.
    qt.burst_seconds = 60
    attempted = qt.perform_runner.perform("q", jobs[0].id, token, hostname="test", time_limit=None)
    assert cutter.cuts == 2
    assert attempted == 4
    assert runs(engine, scope) == {job.id: 1 for job in jobs}
    assert all(qt.get_job(job.id).state is JobState.DONE for job in jobs)


def test_an_outcome_write_keeps_trying_while_its_task_may_still_run(cut_qt, monkeypatch):
    """A server down for longer than the fixed retries (here: every try cut, with the
    waits shortened) is waited for as long as the task's time limit allows, since the
    lease outlives it; without a time limit the write gives up after the fixed tries."""
    monkeypatch.setattr(store_module, "RETRY_DELAYS", (0.0, 0.01, 0.01))
    qt, cutter = cut_qt
    first = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    cutter.arm(FINISH, "before", times=4)
    with pytest.raises(DatabaseError) as info:
        qt.backend.finish_and_start(job, token, Outcome(True), grace=20, burst=BURST)
    assert info.value.connection_lost and cutter.cuts == 4
    cutter.arm(FINISH, "before", times=8)
    timed = Burst(worker="w/1", start_next=True, time_limit_grace=1, lease_margin=1, deadline_left=30)
    assert qt.backend.finish_and_start(job, token, Outcome(True), grace=20, burst=timed) == (True, None, None)
    assert cutter.cuts == 12
    assert qt.get_job(first.id).state is JobState.DONE
