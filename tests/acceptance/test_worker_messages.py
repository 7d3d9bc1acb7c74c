"""What workers and beat say and send, with real ``celery worker`` and ``beat``
processes: a wake-up lost to a broker outage, an unmigrated database, scans sent
while no worker runs, and routine scans kept out of INFO logs."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa

from queuetopia_celery import JobState, make_engine, migrate
from queuetopia_celery.tasks import MIN_PERIODIC_EXPIRY
from tests.apps import testapp
from tests.conftest import PG_ADMIN_URL, REDIS_URL, wait_for

pytestmark = pytest.mark.acceptance

UTC = dt.timezone.utc


def scan_lines(output: str, scope: str, what: str) -> list[str]:
    """Celery's log lines about this scope's scan tasks: ``received``, ``succeeded``..."""
    pattern = re.compile(rf"queuetopia\.{re.escape(scope)}\.scan\[[^\]]+\] {what}")
    return [line for line in output.splitlines() if pattern.search(line)]


def test_a_job_created_while_the_broker_was_down_runs_at_the_next_scan(
    database_url, scope, celery_queue, start_worker
):
    """The wake-up could not be sent: the producer gives the lease back, so a worker's
    next scan runs the job, instead of the queue waiting for the lease to expire
    (dispatch_grace: 300 s here, longer than the test waits)."""
    _, down = testapp.build(
        scope,
        database_url=database_url,
        broker_url="redis://127.0.0.1:1/0",  # nothing listens there
        celery_queue=celery_queue,
        dispatch_grace=300,
    )
    try:
        job = down.create_job("q", "work", {})
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "queuetopia_celery",
                "--database-url",
                database_url,
                "--scope",
                scope,
                "status",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "dispatched" not in status and "until" not in status, status
        start_worker(beat=True)
        wait_for(lambda: down.get_job(job.id).state is JobState.DONE, timeout=60, message="the job to run")
    finally:
        down.engine.dispose()


@pytest.fixture
def unmigrated_url() -> Iterator[str]:
    """An empty database, reached with a password (trust authentication ignores it)."""
    name = f"qt_empty_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name, password="s3cret")
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_a_worker_on_an_unmigrated_database_says_to_migrate_once(start_worker, unmigrated_url, scope):
    worker = start_worker(
        beat=True, concurrency=2, env={"QT_TEST_DATABASE_URL": unmigrated_url}, loglevel="DEBUG"
    )
    wait_for(
        lambda: len(scan_lines(worker.output(), scope, "succeeded")) >= 6,
        message="six scans on the unmigrated database",
    )
    output = worker.output()
    told = [line for line in output.splitlines() if "the queuetopia tables are missing" in line]
    assert len(told) == 1, told  # once per worker: not once per scan, nor once per child
    assert "run `queuetopia-celery migrate --database-url postgresql+psycopg://postgres:***@" in told[0]
    assert "ERROR" in told[0]
    # Said by the main process before the pool forked: each child inherits that it
    # was said (said by a child, it would be said again by each other child).
    assert "/MainProcess]" in told[0], told[0]
    assert "Traceback" not in output and "s3cret" not in output
    # Routine scans are logged at DEBUG (kept out of INFO, see the test below).
    assert all("DEBUG" in line for line in scan_lines(output, scope, "succeeded"))

    # Once migrated, the same worker runs jobs.
    engine = make_engine(unmigrated_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.text(testapp.EVENTS_DDL))
        _, producer = testapp.build(
            scope, database_url=unmigrated_url, broker_url=REDIS_URL, celery_queue=f"qt-test-{scope}"
        )
        job = producer.create_job("q", "work", {})
        wait_for(lambda: producer.get_job(job.id).state is JobState.DONE, message="the job to run")
        producer.engine.dispose()
    finally:
        engine.dispose()


def test_scans_sent_while_no_worker_runs_expire_instead_of_piling_up(
    start_beat, start_worker, scope, celery_queue
):
    client = redis.Redis.from_url(REDIS_URL)
    try:
        beat = start_beat()
        wait_for(lambda: client.llen(celery_queue) >= 4, message="beat to send four scans")
        beat.stop()
        messages = [json.loads(raw) for raw in client.lrange(celery_queue, 0, -1)]
        assert {m["headers"]["task"] for m in messages} == {f"queuetopia.{scope}.scan"}
        expiries = [dt.datetime.fromisoformat(m["headers"]["expires"]) for m in messages]
        now = dt.datetime.now(UTC)
        # poll_interval is 0.5 s here: each scan expires MIN_PERIODIC_EXPIRY after it was sent.
        assert all(e <= now + dt.timedelta(seconds=MIN_PERIODIC_EXPIRY) for e in expiries)
        wait_for(lambda: dt.datetime.now(UTC) > max(expiries), message="every queued scan to expire")

        worker = start_worker(loglevel="DEBUG")  # no beat: the only scans are the queued ones
        wait_for(
            lambda: (
                client.llen(celery_queue) == 0
                and len(scan_lines(worker.output(), scope, "received")) == len(messages)
            ),
            message="the worker to receive the queued scans",
        )
        wait_for(
            lambda: (
                len(
                    re.findall(
                        rf"Discarding revoked task: queuetopia\.{re.escape(scope)}\.scan", worker.output()
                    )
                )
                == len(messages)
            ),
            message="the worker to discard every expired scan",
        )
        assert scan_lines(worker.output(), scope, "succeeded") == []
    finally:
        client.close()


def test_routine_scans_stay_out_of_info_logs(start_worker, qt, scope):
    worker = start_worker(beat=True)
    due = dt.datetime.now(UTC) + dt.timedelta(seconds=1.5)
    job = qt.create_job("q", "work", {}, scheduled_at=due)  # only a scan can start it
    wait_for(lambda: qt.get_job(job.id).state is JobState.DONE, message="the scheduled job to run")
    # Jobs stay in the info log. Celery logs "succeeded" after the task returned, so after
    # the job is done: wait for it.
    succeeded = rf"queuetopia\.{re.escape(scope)}\.perform\[[^\]]+\] succeeded"
    wait_for(lambda: re.search(succeeded, worker.output()), message="the perform task's success line")
    output = worker.output()
    about_scans = [
        line
        for line in output.splitlines()
        if f"Sending due task queuetopia.{scope}.scan" in line or f"queuetopia.{scope}.scan[" in line
    ]
    assert about_scans == []
