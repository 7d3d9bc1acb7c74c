"""The worker algorithm, without Celery: how a perform message runs its job (start
under the token, attempt with the soft time limit, outcome, the next job of the burst
or the queue handed on), how a failure is planned (backoff, exhausted or held, the
failure hook), and how the scan records lost attempts and re-sends unstarted leases.
The Celery tasks that call it are registered by :mod:`queuetopia_celery.tasks`.

Messages are only wake-ups: every decision is taken in the database under a token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from . import observe
from .backends.base import Backend, Burst, Lease, LostAttempt, Outcome
from .errors import DoNotRetry, JobTimeoutError, ResultNotJSONError, SchemaMissingError
from .jobs import HELD_UNTIL, ON_EXHAUSTED_HOLD, STATUS_EXHAUSTED, STATUS_PENDING, Job, validate_json
from .performer import PerformerProtocol, Registry, is_stop_signal, safe_backoff
from .wakeup import WakeUp

# The name this logger always had (log configurations name it).
logger = logging.getLogger("queuetopia_celery.tasks")

#: Longest error text stored on a job.
MAX_ERROR_LENGTH = 8000


def worker_name(hostname: str | None = None) -> str:
    """Who is attempting: ``host/pid``."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}"


def format_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if exc.__traceback__ is not None and not isinstance(exc, JobTimeoutError):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        text = f"{text}\n\n{tb}"
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 20] + "\n... (truncated)"
    return text


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL characters and lone surrogates (possible
    in any exception message) escaped, so the outcome write never fails on them."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


class _SoftLimit:
    """The job's soft time limit: SIGALRM raises :class:`JobTimeoutError` inside the
    performer. Only possible in the main thread (prefork children and the solo pool);
    elsewhere the hard limit (Celery's ``time_limit``) and the lease are all there is."""

    def __init__(self) -> None:
        self.job: Job | None = None

    def _fire(self, signum: int, frame: Any) -> None:
        job = self.job
        if job is not None:
            self.job = None
            raise JobTimeoutError(job.id, job.timeout)

    @contextlib.contextmanager
    def running(self, job: Job) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGALRM, self._fire)
        self.job = job
        signal.setitimer(signal.ITIMER_REAL, job.timeout)
        try:
            yield
        finally:
            self.job = None
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


class WorkerHost(Protocol):
    """What the worker needs of the Queuetopia it runs jobs for (the facade is one)."""

    scope: str
    backend: Backend
    registry: Registry
    wakeup: WakeUp
    dispatch_grace: float
    scan_limit: int
    burst_jobs: int
    burst_seconds: float
    time_limit_grace: float
    lease_margin: float

    def send(self, leases: Sequence[Lease]) -> None: ...


@dataclasses.dataclass
class Runner:
    """Runs the perform, scan and kick tasks of one Queuetopia."""

    qt: WorkerHost
    soft_limit: _SoftLimit = dataclasses.field(default_factory=_SoftLimit)
    #: Whether "the tables are missing" was logged (once per process, see unless_schema_missing).
    told_schema_missing: bool = False

    # ------------------------------------------------------------------ perform

    def perform(
        self, queue: str, job_id: int, token: str, *, hostname: str | None, time_limit: float | None
    ) -> int:
        """Run a dispatched job and, within the burst budget, the queue's next due jobs.
        Returns how many jobs were attempted."""
        qt = self.qt
        store = qt.backend
        began = time.monotonic()
        deadline = began + time_limit if time_limit else None
        worker = worker_name(hostname)
        # One connection for the whole burst: one round trip per job on PostgreSQL.
        with store.pinned():
            job = store.start(queue, job_id, token, worker=worker, lease=self._lease(None, deadline))
            if job is None:
                logger.info(
                    "dropped a stale perform message",
                    extra={"scope": qt.scope, "queue": queue, "job_id": job_id},
                )
                return 0
            if deadline is None:
                # A message without a time limit (sent by hand): the lease must at least
                # cover the job's own timeout.
                store.extend_lease(queue, token, self._lease(job.timeout, None))
            attempted = 0
            while True:
                outcome, attempt = self._attempt(job)
                attempted += 1
                now = time.monotonic()
                # Finish this job and, within the burst budget, begin the next one in
                # the same statement (each still with its own token, attempt count,
                # outcome write and time limit).
                written, nxt, started = store.finish_and_start(
                    job,
                    token,
                    outcome,
                    grace=qt.dispatch_grace,
                    burst=Burst(
                        worker=worker,
                        start_next=attempted < qt.burst_jobs and now - began < qt.burst_seconds,
                        time_limit_grace=qt.time_limit_grace,
                        lease_margin=qt.lease_margin,
                        deadline_left=None if deadline is None else deadline - now,
                    ),
                )
                if written:
                    attempt.counted()
                else:
                    logger.warning(
                        "lost the lease of queue %r before job %s ended; its outcome was dropped",
                        queue,
                        job.id,
                        extra={"scope": qt.scope, "queue": queue, "job_id": job.id, "attempt": job.attempts},
                    )
                    return attempted
                if nxt is None:
                    # Released: a job committed meanwhile may have missed us. Look again;
                    # under a concurrency limit, give the freed slot to the due queues
                    # (this one included) now rather than at the next scan.
                    qt.wakeup.released(queue)
                    return attempted
                if started is not None:
                    job, token = started, nxt.token
                    continue
                # Budget spent: hand the queue back through the broker (fairness).
                qt.send([nxt])
                return attempted

    def _lease(self, timeout: float | None, deadline: float | None) -> float:
        """Seconds the running lease must last: past the job's own limit and past the
        task's hard time limit (when Celery kills the child), plus a margin."""
        qt = self.qt
        needed = (timeout or 0.0) + qt.time_limit_grace
        if deadline is not None:
            needed = max(needed, deadline - time.monotonic())
        return needed + qt.lease_margin

    def _attempt(self, job: Job) -> tuple[Outcome, observe.Attempt]:
        """Run ``job``'s performer inside the attempt's span. Its counters are the
        caller's to record (``counted()``) once the outcome is written (observe.py)."""
        with observe.Attempt(self.qt.scope, job) as attempt:
            outcome = attempt.ended(self._run(job))
        return outcome, attempt

    def _run(self, job: Job) -> Outcome:
        qt = self.qt
        performer: PerformerProtocol | None = None
        try:
            performer = qt.registry.resolve(job.action)
            with self.soft_limit.running(job):
                result = performer.perform(job)
            try:
                validate_json("result", result)
            except ValueError as exc:
                raise ResultNotJSONError(f"performer returned a value that is not JSON: {exc}") from None
            return Outcome(True, result=result)
        except BaseException as exc:
            # sys.exit() in a performer is a failed attempt too; only a request to stop
            # the process goes through (the scan records the attempt later).
            if is_stop_signal(exc):
                raise
            return self._failure(job, performer, exc)

    def _failure(self, job: Job, performer: PerformerProtocol | None, exc: BaseException) -> Outcome:
        final = isinstance(exc, DoNotRetry)  # no further attempt, whatever max_attempts
        error, backoff = self._failed_attempt(job, performer, exc, final=final)
        hook_error = self._failure_hook(job, performer, error, final=final)
        if hook_error:
            error = f"{error}\n{hook_error}"
        return Outcome(False, error=self._storable(error), backoff=backoff, final=final)

    def _storable(self, error: str) -> str:
        return storable_text(self.qt.backend.redact(error))

    def _failed_attempt(
        self, job: Job, performer: PerformerProtocol | None, exc: BaseException, *, final: bool = False
    ) -> tuple[str, float]:
        """The error text and the backoff of a failed attempt (the backoff hook is
        guarded: what it raises is added to the error); logs the failure."""
        qt = self.qt
        error = format_error(exc)
        backoff, problem = safe_backoff(performer, job)
        if problem:
            error = f"{error}\n{problem}"
        exhausted = final or job.attempts >= job.max_attempts
        held = exhausted and job.on_exhausted == ON_EXHAUSTED_HOLD
        logger.warning(
            "job %s of queue %r failed attempt %s/%s%s: %s",
            job.id,
            job.queue,
            job.attempts,
            job.max_attempts,
            ("; held: its queue waits for an operator" if held else "; exhausted: its queue moves on")
            if exhausted
            else "",
            f"{type(exc).__name__}: {exc}",
            extra={"scope": qt.scope, "queue": job.queue, "job_id": job.id, "attempt": job.attempts},
        )
        return error, backoff

    def _failure_hook(
        self, job: Job, performer: PerformerProtocol | None, error: str, *, final: bool = False
    ) -> str | None:
        """Call ``handle_failed_job`` with the job as it will be stored. Returns what
        it raised (``SystemExit`` included), as text to add to the job's error."""
        if performer is None:
            return None
        exhausted = final or job.attempts >= job.max_attempts
        held = exhausted and job.on_exhausted == ON_EXHAUSTED_HOLD  # the hook sees job.state HELD
        failed = dataclasses.replace(
            job,
            error=error,
            status=STATUS_EXHAUSTED if exhausted and not held else STATUS_PENDING,
            next_attempt_at=HELD_UNTIL if held else job.next_attempt_at,
        )
        try:
            performer.handle_failed_job(failed)
        except BaseException as hook_exc:
            if is_stop_signal(hook_exc):
                raise
            return f"handle_failed_job raised {format_error(hook_exc)}"
        return None

    # ------------------------------------------------------------------ scan and kick

    def scan(self) -> int:
        """Recover expired leases and dispatch due queues. Returns leases taken."""
        qt = self.qt
        store = qt.backend
        lost, resent = store.recover(limit=qt.scan_limit, grace=qt.dispatch_grace)
        for item in lost:
            self._record_lost(item)
        if resent:
            # Lost, or still waiting in a busy broker: the same token, so either copy starts it.
            logger.info(
                "re-sent %s perform messages not started in time", len(resent), extra={"scope": qt.scope}
            )
            qt.send(resent)
        return len(resent) + qt.wakeup.scan()

    def _record_lost(self, lost: LostAttempt) -> None:
        qt = self.qt
        job = lost.job
        lost_error = WorkerLostError(
            f"attempt {job.attempts} of job {job.id} did not finish: "
            f"{job.attempted_by or 'its worker'} died or was killed (its lease expired)"
        )
        try:
            performer: PerformerProtocol | None = qt.registry.resolve(job.action)
        except LookupError:
            performer = None
        error, backoff = self._failed_attempt(job, performer, lost_error)
        outcome = Outcome(False, error=self._storable(error), backoff=backoff)
        # Recorded before handle_failed_job runs: a hook that raises, exits or kills
        # this process can neither leave the attempt unrecorded nor block its queue.
        if not qt.backend.record_lost(lost, outcome):
            return
        observe.lost(qt.scope, job)
        logger.warning(
            "WorkerLostError: %s",
            lost_error,
            extra={"scope": qt.scope, "queue": job.queue, "job_id": job.id, "attempt": job.attempts},
        )
        hook_error = self._failure_hook(job, performer, error)
        if hook_error and outcome.error is not None:
            qt.backend.replace_error(job.id, outcome.error, self._storable(f"{error}\n{hook_error}"))

    def unless_schema_missing(self, fn: Callable[[], int]) -> int:
        """Run a periodic task's body; if the tables are missing (not migrated), log
        that once per process, clearly, instead of a traceback every poll_interval."""
        try:
            result = fn()
        except SchemaMissingError as exc:
            if not self.told_schema_missing:
                self.told_schema_missing = True
                logger.error("%s", exc, extra={"scope": self.qt.scope})
            return 0
        self.told_schema_missing = False
        return result

    def check_schema(self) -> int:
        """Read one job by id: raises :class:`SchemaMissingError` when the tables are
        missing or out of date."""
        self.qt.backend.get_job(0)
        return 0

    def kick(self, queues: Sequence[str]) -> int:
        return self.qt.wakeup.kick_after_producers(list(queues))


class WorkerLostError(Exception):
    """Stands for a worker that died mid-job (never raised: no traceback to show).
    Its name starts the error text stored on the job."""
