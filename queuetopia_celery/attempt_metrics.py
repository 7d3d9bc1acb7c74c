"""The workers' Prometheus counters of attempts (optional: the ``metrics`` extra installs
``prometheus_client``; without it :func:`record` does nothing).

* ``queuetopia_attempts_total{scope, action, outcome}``: attempts that ended, by outcome:
  ``succeeded``; ``failed`` (will be retried); ``exhausted`` (failed its last attempt,
  or raised ``DoNotRetry``: the queue moves on, or the job is held with
  ``on_exhausted="hold"``); ``lost`` (its worker died or was killed; counted by the
  process whose scan found it).
* ``queuetopia_attempt_duration_seconds{scope, action}``: how long the performer ran
  (not for lost attempts).
* ``queuetopia_attempt_wait_seconds{scope, action}``: from when the job was due (its
  ``scheduled_at``, or its retry time) to when its attempt started, on the database
  clock.

They count in the process that runs the attempt: a Celery prefork worker's children.
For one scrape to see every child's counts, run the workers and the exporter with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client's multiprocess mode; see
docs/operations.md, "Metrics and tracing"). The metric objects are registered once per
process, in prometheus_client's default registry (a Prometheus metric is a process-wide
thing: every Queuetopia of the process shares them, told apart by ``scope``).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

try:
    import prometheus_client
except ImportError:  # pragma: no cover - without the metrics extra
    prometheus_client = None  # type: ignore[assignment]

#: Buckets of the duration histogram (seconds): jobs take milliseconds to an hour.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: Buckets of the wait histogram (seconds): a hot queue starts its next job in
#: milliseconds, the scan finds a due one within its poll interval, a blocked queue's
#: jobs wait hours.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400)


@dataclasses.dataclass(frozen=True)
class _Metrics:
    attempts: Any
    duration: Any
    wait: Any


_metrics: _Metrics | None = None
_lock = threading.Lock()
#: The labelled series of each (scope, action, outcome), looked up once (few: the
#: labels are bounded by the code).
_series: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}


def enabled() -> bool:
    """Whether ``prometheus_client`` is installed."""
    return prometheus_client is not None


def _instruments() -> _Metrics | None:
    global _metrics
    if _metrics is None and prometheus_client is not None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics(
                    attempts=prometheus_client.Counter(
                        "queuetopia_attempts",
                        "Attempts of queuetopia jobs that ended, by outcome "
                        "(succeeded, failed, exhausted, lost)",
                        ["scope", "action", "outcome"],
                    ),
                    duration=prometheus_client.Histogram(
                        "queuetopia_attempt_duration_seconds",
                        "How long the performer of an attempt ran",
                        ["scope", "action"],
                        buckets=DURATION_BUCKETS,
                    ),
                    wait=prometheus_client.Histogram(
                        "queuetopia_attempt_wait_seconds",
                        "From when a job was due to when its attempt started",
                        ["scope", "action"],
                        buckets=WAIT_BUCKETS,
                    ),
                )
    return _metrics


def record(
    scope: str, action: str, outcome: str, *, duration: float | None = None, wait: float | None = None
) -> None:
    """Count one attempt that ended with ``outcome``; observe its duration and wait."""
    series = _series.get((scope, action, outcome))
    if series is None:
        metrics = _instruments()
        if metrics is None:  # pragma: no cover - without the metrics extra
            return
        series = _series[(scope, action, outcome)] = (
            metrics.attempts.labels(scope, action, outcome),
            metrics.duration.labels(scope, action),
            metrics.wait.labels(scope, action),
        )
    attempts, durations, waits = series
    attempts.inc()
    if duration is not None:
        durations.observe(duration)
    if wait is not None:
        waits.observe(wait)
