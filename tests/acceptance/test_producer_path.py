"""The producer's path: ``create_job`` commits the job with its queue's lease, then
publishes the perform message. A producer process killed between the two (after the
commit, before the message went out) still gets its job run by a real worker: the
lease its insert took is unstarted, and the scan re-sends it after ``resend_after``.
Jobs created by ``create_jobs(returning="ids")`` (COPY) are woken and run too."""

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
    # The publish never returns: the process is killed after the commit, before any
    # message went out.
    def stuck(leases):
        print(leases[0].job_id, flush=True)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()
        threading.Event().wait()

    qt.send = stuck
    qt.create_job("killed", "work", {"echo": "after the producer died"})
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


def test_jobs_created_one_by_one_and_in_bulk_are_woken_and_run(qt, start_worker):
    start_worker(concurrency=1)
    jobs = [qt.create_job(f"bg-{i % 3}", "work", {"echo": i}) for i in range(9)]
    ids = qt.create_jobs(
        [{"queue": f"bulk-{i}", "action": "work", "params": {"echo": i}} for i in range(5)], returning="ids"
    )
    wait_for(
        lambda: all(qt.get_job(j).state is JobState.DONE for j in [job.id for job in jobs] + ids),
        timeout=60,
        message="every job woken",
    )
