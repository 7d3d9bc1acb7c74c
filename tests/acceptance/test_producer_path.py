"""The producer's path sends its wake-ups from a background thread once the insert has
committed (``AfterCommit``): a producer process killed right after ``create_job``
returned, before that thread sent anything, still gets its job run by a real worker,
from the lease its insert took (re-sent by the scan after ``resend_after``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from queuetopia_celery import JobState
from tests.conftest import REDIS_URL, ROOT, wait_for

PRODUCER = textwrap.dedent(
    """
    import os, signal, sys, threading
    from tests.apps.testapp import build

    scope, database_url, broker_url, celery_queue = sys.argv[1:5]
    _, qt = build(scope, database_url=database_url, broker_url=broker_url, celery_queue=celery_queue)
    # The background sender never gets to send: as if the process died first.
    qt.after_commit.wake = lambda queues, leases: threading.Event().wait()
    job = qt.create_job("killed", "work", {"echo": "after the producer died"})
    print(job.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_producer_killed_right_after_the_commit_still_gets_its_job_run(
    qt, database_url, scope, celery_queue, start_worker
):
    producer = subprocess.run(
        [sys.executable, "-c", PRODUCER, scope, database_url, REDIS_URL, celery_queue],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert producer.returncode == -9, producer.stderr
    job_id = int(producer.stdout.split()[0])
    # Committed, with the queue's lease taken by the insert, and no message sent.
    assert qt.get_job(job_id).state is JobState.AVAILABLE
    lease = qt.backend.lease_of("killed")
    assert lease is not None and lease["job_id"] == job_id and lease["started_at"] is None

    start_worker(concurrency=1, beat=True)
    # The scan re-sends the unstarted lease once resend_after (5 s) has passed.
    wait_for(
        lambda: qt.get_job(job_id).state is JobState.DONE,
        timeout=60,
        message="the job of the killed producer",
    )
    assert qt.get_job(job_id).attempts == 1


def test_create_job_returns_before_its_wake_up_is_sent_and_the_job_runs(qt, start_worker):
    start_worker(concurrency=1)
    jobs = [qt.create_job(f"bg-{i % 3}", "work", {"echo": i}) for i in range(9)]
    ids = qt.create_jobs(
        [{"queue": f"bulk-{i}", "action": "work", "params": {"echo": i}} for i in range(5)], returning="ids"
    )
    wait_for(
        lambda: all(qt.get_job(j).state is JobState.DONE for j in [job.id for job in jobs] + ids),
        timeout=60,
        message="every job woken from the background sender",
    )
