"""What the worker tells the outside about each attempt: the Prometheus counters of
:mod:`queuetopia_celery.attempt_metrics` and the spans of
:mod:`queuetopia_celery.tracing`, each only when its library is installed.

An instrument can never fail a job: whatever one raises (a metrics directory that is
gone, a broken exporter) is logged once per process and otherwise ignored, so the
attempt's outcome is still written.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from . import attempt_metrics, tracing
from .backends.base import Outcome
from .jobs import Job

logger = logging.getLogger(__name__)

_told: set[str] = set()


def _complain(what: str) -> None:
    if what not in _told:
        _told.add(what)
        logger.warning("queuetopia %s failed; going on without it", what, exc_info=True)


def outcome_name(job: Job, outcome: Outcome) -> str:
    """``succeeded``, ``failed`` (will be retried) or ``exhausted`` (no attempt follows
    by itself: past ``max_attempts`` or ``DoNotRetry``; the job is exhausted or held)."""
    if outcome.succeeded:
        return "succeeded"
    if outcome.final or job.attempts >= job.max_attempts:
        return "exhausted"
    return "failed"


def waited(job: Job) -> float | None:
    """Seconds from when ``job`` was due to when its attempt started (database clock)."""
    if job.attempted_at is None:
        return None
    return max((job.attempted_at - job.due_at).total_seconds(), 0.0)


class Attempt:
    """``with Attempt(scope, job) as attempt: attempt.ended(run(job))``: the attempt's
    span is current inside the block and ends with it. Its counters are recorded by
    :meth:`counted`, once the worker has written the outcome: an attempt whose lease
    expired while it ran has its outcome dropped, and the scan counts it as lost."""

    def __init__(self, scope: str, job: Job) -> None:
        self.scope = scope
        self.job = job
        self.outcome: Outcome | None = None
        self.span = tracing.AttemptSpan()
        self.began = 0.0
        self.duration = 0.0

    def __enter__(self) -> Attempt:
        try:
            self.span = tracing.start_attempt(self.scope, self.job)
        except Exception:
            _complain("tracing")
        self.began = time.monotonic()
        return self

    def ended(self, outcome: Outcome) -> Outcome:
        self.outcome = outcome
        return outcome

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.duration = time.monotonic() - self.began
        outcome = self.outcome
        try:
            self.span.end(
                None if outcome is None else outcome_name(self.job, outcome),
                None if outcome is None else outcome.error,
                exc,
            )
        except Exception:
            _complain("tracing")

    def counted(self) -> None:
        """Record the attempt's counters and histograms (its outcome is written)."""
        if self.outcome is None:
            return  # stopped mid-attempt: the scan records it as lost
        try:
            attempt_metrics.record(
                self.scope,
                self.job.action,
                outcome_name(self.job, self.outcome),
                duration=self.duration,
                wait=waited(self.job),
            )
        except Exception:
            _complain("metrics")


def lost(scope: str, job: Job) -> None:
    """An attempt whose worker died, just recorded by the scan."""
    try:
        tracing.lost_attempt(scope, job)
    except Exception:
        _complain("tracing")
    try:
        attempt_metrics.record(scope, job.action, "lost", wait=waited(job))
    except Exception:
        _complain("metrics")
