"""A Celery app whose work is written as ordered tasks (``@qt.task``), for the tests'
worker processes; configured by QT_ORDERED_* environment variables.

``charge`` is written as a Celery task would be, and so are its callers (``checkout``):
only the decorator says that it runs in order per account. Each run is recorded in
``qt_test_events`` (database clock), so tests can check order and overlap.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery, signals

from queuetopia_celery import Job, Queuetopia


def build(
    scope: str, *, database_url: str, broker_url: str, celery_queue: str, backend_url: str | None = None
) -> tuple[Celery, Queuetopia, dict[str, Any]]:
    app = Celery(f"qt-ordered-{scope}", broker=broker_url, backend=backend_url)
    app.conf.update(
        task_default_queue=celery_queue,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        timezone="UTC",
        worker_hijack_root_logger=False,
    )
    qt = Queuetopia(
        scope,
        app=app,
        database_url=database_url,
        poll_interval=0.5,
        celery_queue=celery_queue,
        dispatch_grace=20,
        lease_margin=2,
        time_limit_grace=1,
    )

    def record(job: Job, tag: str) -> None:
        with qt.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO qt_test_events"
                    " (scope, queue, job_id, sequence, attempt, pid, kind, started_at)"
                    " VALUES (:s, :q, :j, :seq, :a, :p, :k, clock_timestamp())"
                ),
                {
                    "s": job.scope,
                    "q": job.queue,
                    "j": job.id,
                    "seq": job.sequence,
                    "a": job.attempts,
                    "p": os.getpid(),
                    "k": tag,
                },
            )

    def finish(job: Job) -> None:
        with qt.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE qt_test_events SET ended_at = clock_timestamp() WHERE job_id = :j"),
                {"j": job.id},
            )

    # Before: @app.task(max_retries=5, time_limit=30)
    @qt.task(queue="account-{account_id}", max_retries=5, time_limit=30, bind=True)
    def charge(job: Job, account_id: int, amount: int, note: str = "") -> dict[str, Any]:
        record(job, f"charge {amount}")
        time.sleep(0.05)  # long enough for an overlap to show
        finish(job)
        return {"account_id": account_id, "charged": amount, "attempt": job.attempts}

    @qt.task(queue=lambda account_id, **_: f"account-{account_id}")
    def refund(account_id: int, amount: int) -> int:
        return -amount

    @qt.task(queue="flaky-{key}", bind=True, backoff=lambda job: 0.2, max_attempts=5)
    def flaky(job: Job, key: str, fail_times: int) -> dict[str, Any]:
        """Fails its first ``fail_times`` attempts; returns what bind=True gave it."""
        record(job, "flaky")
        if job.attempts <= fail_times:
            raise RuntimeError(f"planned failure {job.attempts}")
        return {"attempt": job.attempts, "idempotency_key": job.idempotency_key, "job_id": job.id}

    @qt.task(
        queue="picky-{key}",
        bind=True,
        autoretry_for=(ConnectionError,),
        backoff=lambda job: 0.2,
        max_attempts=5,
    )
    def picky(job: Job, key: str, errors: list[str]) -> str:
        """Raises ``errors[attempt - 1]`` (by name) while there is one: only a
        ConnectionError is retried (autoretry_for)."""
        record(job, "picky")
        name = errors[job.attempts - 1] if job.attempts <= len(errors) else None
        if name == "ConnectionError":
            raise ConnectionError("network down")
        if name == "ValueError":
            raise ValueError("card declined")
        return "ok"

    def checkout(account_id: int, amount: int) -> Job:
        """A caller, unchanged from the Celery version."""
        return charge.delay(account_id=account_id, amount=amount)

    tasks = {
        "charge": charge,
        "refund": refund,
        "flaky": flaky,
        "picky": picky,
        "checkout": checkout,
    }
    return app, qt, tasks


if os.environ.get("QT_ORDERED_SCOPE"):
    app, qt, tasks = build(
        os.environ["QT_ORDERED_SCOPE"],
        database_url=os.environ["QT_ORDERED_DATABASE_URL"],
        broker_url=os.environ["QT_ORDERED_BROKER_URL"],
        celery_queue=os.environ["QT_ORDERED_CELERY_QUEUE"],
        backend_url=os.environ.get("QT_ORDERED_BACKEND_URL"),
    )

    if os.environ.get("QT_ORDERED_DIE_AFTER_CREATE"):
        # Fault knob: the process that created the jobs of a message named "die-..." is
        # killed before Celery acks it, once (a marker file per message id).
        from queuetopia_celery import create_task

        create_once = create_task.create_from_message

        def create_then_die(qt_: Queuetopia, message_id: str, fields: Any) -> Any:
            ids = create_once(qt_, message_id, fields)
            marker = Path(os.environ["QT_ORDERED_DIE_AFTER_CREATE"]) / message_id
            if message_id.startswith("die-") and not marker.exists():
                marker.write_text(str(ids))
                os.kill(os.getpid(), signal.SIGKILL)
            return ids

        create_task.create_from_message = create_then_die

    @signals.worker_ready.connect
    def _ready(**_: Any) -> None:
        Path(os.environ["QT_ORDERED_READY_FILE"]).write_text(str(os.getpid()))
