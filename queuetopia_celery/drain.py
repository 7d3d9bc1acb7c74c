"""``drain``: run jobs now, in this process, without Celery workers (for tests).

It goes through the very steps a worker takes (lease, token-checked start, the
worker's attempt, the outcome written by ``finish_and_start``, the statement workers
run), so queue order, blocking and retries behave as in production.
"""

from __future__ import annotations

import os

from .backends.base import Burst, Lease
from .jobs import DrainResult, validate_name
from .worker import Runner, WorkerHost


def drain(host: WorkerHost, queue: str | None = None, *, with_scheduled: bool = False) -> DrainResult:
    """Run the due jobs of every queue of ``host`` (or of ``queue``) until none is due;
    with ``with_scheduled``, move the clock forward for later ones too (see
    :meth:`Queuetopia.drain <queuetopia_celery.Queuetopia.drain>`)."""
    if queue is not None:
        validate_name("queue", queue)
    runner = Runner(host)
    backend = host.backend
    worker = f"drain/{os.getpid()}"
    # Never start the next job inside finish_and_start: each job is started here, one
    # at a time, so that a drain's count is per job.
    no_burst = Burst(worker, False, host.time_limit_grace, host.lease_margin, None)
    succeeded = failed = exhausted = 0
    backend.release_unstarted(queue)
    while True:
        if queue is not None:
            taken = backend.kick([queue], grace=host.dispatch_grace, limit=host.scan_limit)
        else:
            taken = backend.scan(grace=host.dispatch_grace, limit=host.scan_limit)
        if not taken:
            if with_scheduled and backend.advance(queue):
                continue
            return DrainResult(succeeded=succeeded, failed=failed, exhausted=exhausted)
        for lease in taken:
            nxt: Lease | None = lease
            while nxt is not None:
                job = backend.start(
                    nxt.queue, nxt.job_id, nxt.token, worker=worker, lease=nxt.timeout + host.lease_margin
                )
                if job is None:
                    break
                outcome, attempt = runner._attempt(job)
                if outcome.succeeded:
                    succeeded += 1
                elif outcome.final or job.attempts >= job.max_attempts:
                    exhausted += 1
                else:
                    failed += 1
                # The statement workers run, without starting the next job here.
                finished = backend.finish_and_start(
                    job, nxt.token, outcome, grace=host.dispatch_grace, burst=no_burst
                )
                if finished.written:
                    attempt.counted()
                nxt = finished.next_lease
