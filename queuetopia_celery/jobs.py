"""Jobs as values: the :class:`Job` dataclass, its states, and input validation.

Pure logic only: nothing here talks to the database or to Celery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Mapping
from typing import Any

from .errors import InvalidJobError

UTC = dt.timezone.utc

#: Queuetopia's defaults: 60 s timeout, 24 h maximum backoff, 20 attempts.
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BACKOFF = 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 20

#: Longest accepted name (scope, queue, action).
MAX_NAME_LENGTH = 255
#: Longest accepted duration: one year, in seconds.
MAX_DURATION = 366 * 24 * 3600.0
#: Largest accepted ``max_attempts`` (a 32-bit column).
MAX_ATTEMPTS_LIMIT = 2**31 - 1
#: Longest accepted ``unique_key``.
MAX_UNIQUE_KEY_LENGTH = 255
#: Largest accepted params document, serialized, in bytes.
MAX_PARAMS_BYTES = 8 * 1024 * 1024


class JobState(str, enum.Enum):
    """Where a job stands. Derived from the stored row, never stored as such."""

    SCHEDULED = "scheduled"  #: waiting for ``scheduled_at``; never attempted
    AVAILABLE = "available"  #: due, never attempted, waiting for its turn
    RUNNING = "running"  #: an attempt has started and not ended
    RETRYING = "retrying"  #: failed at least once; will be retried
    DONE = "done"  #: succeeded
    EXHAUSTED = "exhausted"  #: failed ``max_attempts`` times; no longer blocks its queue
    HELD = "held"  #: failed ``max_attempts`` times with ``on_exhausted="hold"``: blocks its queue
    ABORTED = "aborted"  #: taken out of its queue by an operator (``abort_job``); kept, never run

    def __str__(self) -> str:
        return self.value


# What the database stores in ``queuetopia_jobs.status``.
STATUS_PENDING = "pending"
STATUS_RUNNING = "running"
STATUS_DONE = "done"
STATUS_EXHAUSTED = "exhausted"
STATUS_ABORTED = "aborted"
#: Statuses of jobs that still hold a place in their queue.
OPEN_STATUSES = (STATUS_PENDING, STATUS_RUNNING)

#: What happens when a job fails its last attempt: the queue moves on (Queuetopia's
#: behaviour), or the job stays at the head, blocking its queue, until an operator
#: retries or aborts it.
ON_EXHAUSTED_SKIP = "skip"
ON_EXHAUSTED_HOLD = "hold"
ON_EXHAUSTED_CHOICES = (ON_EXHAUSTED_SKIP, ON_EXHAUSTED_HOLD)
#: ``next_attempt_at`` of a held job: never due until retried. A held job stays
#: ``pending`` so that it keeps its place at the head of its queue.
HELD_UNTIL = dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Job:
    """One job, as stored. Datetimes are timezone-aware UTC; durations are seconds."""

    id: int
    scope: str
    queue: str
    action: str
    params: Any
    result: Any
    sequence: int
    timeout: float
    max_backoff: float
    max_attempts: int
    scheduled_at: dt.datetime
    attempts: int
    attempted_at: dt.datetime | None
    attempted_by: str | None
    next_attempt_at: dt.datetime | None
    done_at: dt.datetime | None
    error: str | None
    inserted_at: dt.datetime
    status: str
    on_exhausted: str = ON_EXHAUSTED_SKIP
    abort_reason: str | None = None
    aborted_at: dt.datetime | None = None
    #: The job's unique key (``create_job(unique_key=...)``), or None.
    unique_key: str | None = None
    #: The trace context of the code that created the job (OpenTelemetry propagation
    #: fields such as ``traceparent``), or None: see :mod:`queuetopia_celery.tracing`.
    trace_context: dict[str, str] | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | Any) -> Job:
        """Build a job from a ``queuetopia_jobs`` row mapping."""
        return cls(**{field.name: row[field.name] for field in _FIELDS})

    @property
    def state(self) -> JobState:
        """The job's state, judged against the current time."""
        return state_of(self.status, self.attempts, self.scheduled_at, utcnow(), held=self.held)

    @property
    def held(self) -> bool:
        """Whether the job failed its last attempt and holds its queue (``on_exhausted="hold"``)."""
        return self.next_attempt_at is not None and self.next_attempt_at >= HELD_UNTIL

    @property
    def due_at(self) -> dt.datetime:
        """When the job may next be attempted."""
        return self.next_attempt_at or self.scheduled_at

    @property
    def idempotency_key(self) -> str:
        """A key stable across the attempts of this job, unique across jobs and scopes,
        to pass to systems outside the database that deduplicate side effects."""
        return f"queuetopia:{self.scope}:{self.id}"


_FIELDS = dataclasses.fields(Job)


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of :meth:`Queuetopia.paginate_jobs`."""

    items: list[Job]
    total: int
    page_number: int
    page_size: int

    @property
    def total_pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


_STATE_OF_STATUS = {
    STATUS_DONE: JobState.DONE,
    STATUS_EXHAUSTED: JobState.EXHAUSTED,
    STATUS_ABORTED: JobState.ABORTED,
    STATUS_RUNNING: JobState.RUNNING,
}


def state_of(
    status: str,
    attempts: int,
    scheduled_at: dt.datetime,
    now: dt.datetime,
    *,
    held: bool = False,
) -> JobState:
    fixed = _STATE_OF_STATUS.get(status)
    if fixed is not None:
        return fixed
    if held:
        return JobState.HELD
    if attempts > 0:
        return JobState.RETRYING
    if scheduled_at > now:
        return JobState.SCHEDULED
    return JobState.AVAILABLE


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def default_backoff(attempts: int, max_backoff: float) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones.

    2 s after the first failure, then 3, 5, 9, 17, ... (``2**(n-1) + 1``), capped at
    ``max_backoff``.
    """
    exponent = max(attempts - 1, 0)
    if exponent >= 64:
        return float(max_backoff)
    return float(min(2**exponent + 1, max_backoff))


# --------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class NewJob:
    """A validated request to create a job (see :func:`new_job`)."""

    queue: str
    action: str
    params: Any
    scheduled_at: dt.datetime | None
    timeout: float
    max_backoff: float
    max_attempts: int
    on_exhausted: str = ON_EXHAUSTED_SKIP
    unique_key: str | None = None
    #: Set by :func:`queuetopia_celery.tracing.stamp`, not by the caller.
    trace_context: dict[str, str] | None = None


def validate_on_exhausted(value: object) -> str:
    if value not in ON_EXHAUSTED_CHOICES:
        raise InvalidJobError("on_exhausted", f"must be 'skip' or 'hold', got {value!r}")
    return str(value)


def validate_name(field: str, value: object) -> str:
    """Check a scope, queue or action name: a string of at most 255 characters, not
    empty nor only whitespace (Queuetopia refuses blank names), that the database can
    store."""
    if not isinstance(value, str):
        raise InvalidJobError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidJobError(field, "must not be empty")
    if not value.strip():
        raise InvalidJobError(field, "must not be blank (only whitespace)")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidJobError(field, f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    _check_text(field, value)
    return value


def _check_text(field: str, value: str, where: str = "") -> None:
    if "\x00" in value:
        raise InvalidJobError(field, f"{where}must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJobError(field, f"{where}must be valid Unicode (no lone surrogates)") from exc


def validate_unique_key(value: object) -> str | None:
    """A unique job's key: None, or a string of at most 255 characters, not blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidJobError("unique_key", f"must be a string or None, got {type(value).__name__}")
    if not value.strip():
        raise InvalidJobError("unique_key", "must not be empty or blank (only whitespace)")
    if len(value) > MAX_UNIQUE_KEY_LENGTH:
        raise InvalidJobError(
            "unique_key", f"must be at most {MAX_UNIQUE_KEY_LENGTH} characters, got {len(value)}"
        )
    _check_text("unique_key", value)
    return value


def validate_duration(field: str, value: object, *, allow_zero: bool) -> float:
    """Seconds as an int, a float or a timedelta; finite, not negative, at most a year."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJobError(
            field, f"must be a number of seconds or a timedelta, got {type(value).__name__}"
        )
    else:
        seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidJobError(field, "must be a finite number of seconds")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidJobError(field, f"must be {'>= 0' if allow_zero else '> 0'} seconds, got {seconds:g}")
    if seconds > MAX_DURATION:
        raise InvalidJobError(field, f"must be at most {MAX_DURATION:g} seconds (a year)")
    return seconds


def validate_max_attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobError("max_attempts", f"must be an int, got {type(value).__name__}")
    if value < 1:
        raise InvalidJobError("max_attempts", f"must be >= 1, got {value}")
    if value > MAX_ATTEMPTS_LIMIT:
        raise InvalidJobError("max_attempts", f"must be at most {MAX_ATTEMPTS_LIMIT}")
    return value


def validate_scheduled_at(value: object) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise InvalidJobError("scheduled_at", f"must be a datetime or None, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidJobError(
            "scheduled_at", "must be timezone-aware (for example datetime.now(timezone.utc))"
        )
    return value.astimezone(UTC)


def validate_json(field: str, value: object) -> Any:
    """Accept only values that survive a JSON round trip unchanged.

    dicts with string keys, lists, strings, ints, finite floats, booleans and None.
    Tuples, sets, bytes, NaN and other objects are refused rather than silently changed.
    """
    size = _check_json(field, value, field, 0)
    if size > MAX_PARAMS_BYTES:
        raise InvalidJobError(field, f"must be at most {MAX_PARAMS_BYTES} bytes as JSON")
    return value


def _check_json(field: str, value: object, path: str, depth: int) -> int:
    """Validate recursively; return an estimate of the serialized size."""
    if depth > 200:
        raise InvalidJobError(field, f"is nested too deeply at {path}")
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        if abs(value) >= 2**63:
            raise InvalidJobError(field, f"integer at {path} does not fit in 64 bits")
        return 20
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise InvalidJobError(field, f"{value!r} at {path} is not valid JSON")
        return 24
    if isinstance(value, str):
        _check_text(field, value, f"string at {path} ")
        return len(value) + 2
    if isinstance(value, list):
        return 2 + sum(_check_json(field, item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
    if isinstance(value, dict):
        total = 2
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidJobError(field, f"key {key!r} at {path} is not a string")
            _check_text(field, key, f"key at {path} ")
            total += len(key) + 3 + _check_json(field, item, f"{path}[{key!r}]", depth + 1)
        return total
    raise InvalidJobError(
        field, f"{type(value).__name__} at {path} is not JSON (use dict, list, str, int, float, bool, None)"
    )


def new_job(
    queue: object,
    action: object,
    params: object,
    *,
    scheduled_at: object = None,
    timeout: object = DEFAULT_TIMEOUT,
    max_backoff: object = DEFAULT_MAX_BACKOFF,
    max_attempts: object = DEFAULT_MAX_ATTEMPTS,
    on_exhausted: object = ON_EXHAUSTED_SKIP,
    unique_key: object = None,
) -> NewJob:
    """Validate the arguments of ``create_job``; raise :class:`InvalidJobError` on bad input."""
    return NewJob(
        queue=validate_name("queue", queue),
        action=validate_name("action", action),
        params=validate_json("params", params),
        scheduled_at=validate_scheduled_at(scheduled_at),
        timeout=validate_duration("timeout", timeout, allow_zero=False),
        max_backoff=validate_duration("max_backoff", max_backoff, allow_zero=True),
        max_attempts=validate_max_attempts(max_attempts),
        on_exhausted=validate_on_exhausted(on_exhausted),
        unique_key=validate_unique_key(unique_key),
    )


#: The arguments of ``create_job`` an item of ``create_jobs`` may give as a dict.
JOB_ARGUMENTS = frozenset(
    {
        "queue",
        "action",
        "params",
        "scheduled_at",
        "timeout",
        "max_backoff",
        "max_attempts",
        "on_exhausted",
        "unique_key",
    }
)


def job_arguments(item: object) -> dict[str, Any]:
    """``item`` if it is a dict of ``create_job``'s arguments (``queue`` and ``action``
    at least, nothing unknown); else :class:`InvalidJobError`."""
    if not isinstance(item, dict):
        raise InvalidJobError("jobs", f"each job must be a dict or NewJob, got {type(item).__name__}")
    unknown = set(item) - JOB_ARGUMENTS
    if unknown:
        raise InvalidJobError("jobs", f"unknown keys {sorted(unknown)}")
    missing = {"queue", "action"} - set(item)
    if missing:
        raise InvalidJobError("jobs", f"missing keys {sorted(missing)}")
    return item


# --------------------------------------------------------------------------- operator views


@dataclasses.dataclass(frozen=True)
class QueueStatus:
    """One queue as an operator sees it (:meth:`Queuetopia.queue_statuses`)."""

    queue: str
    #: Jobs still in the queue (pending, running or held).
    pending: int
    #: The first open job, in queue order: the one that runs next or is running.
    head: Job | None
    #: The head failed at least once and has not succeeded yet (retrying or held).
    blocked: bool
    #: Since when the head has been holding the queue (estimate: when it became head).
    blocked_since: dt.datetime | None
    #: Who holds the queue's lease (``host/pid``), when it was started and until when.
    locked_by: str | None
    locked_at: dt.datetime | None
    locked_until: dt.datetime | None
    #: When the oldest job still in the queue was created.
    oldest_pending_at: dt.datetime | None
    #: An operator paused the queue (:meth:`Queuetopia.pause_queue`): nothing starts.
    paused: bool = False

    @property
    def error(self) -> str | None:
        """The head job's last error, first line only."""
        return first_line(self.head.error) if self.head is not None and self.head.error else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (datetimes as ISO 8601 strings)."""
        head = self.head
        return {
            "queue": self.queue,
            "pending": self.pending,
            "blocked": self.blocked,
            "blocked_since": _iso(self.blocked_since),
            "head": None
            if head is None
            else {
                "id": head.id,
                "action": head.action,
                "state": head.state.value,
                "attempts": head.attempts,
                "max_attempts": head.max_attempts,
                "error": self.error,
                "next_attempt_at": _iso(head.due_at) if not head.held else None,
            },
            "locked_by": self.locked_by,
            "locked_at": _iso(self.locked_at),
            "locked_until": _iso(self.locked_until),
            "oldest_pending_at": _iso(self.oldest_pending_at),
            "paused": self.paused,
        }


@dataclasses.dataclass(frozen=True)
class BulkResult:
    """What a bulk operator action (:meth:`Queuetopia.retry_jobs`,
    :meth:`Queuetopia.abort_jobs`) did, or would do with ``dry_run=True``."""

    #: Jobs retried or aborted (with ``dry_run``: that would be).
    count: int
    #: Jobs that matched the filter but were left alone, by reason (``running``: a
    #: running job cannot be aborted; ``moved_on``: an exhausted job whose queue has
    #: run later jobs, retried only with ``force``; ``unique_key``: an exhausted job
    #: whose key another open job holds now).
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    dry_run: bool = False
    #: The queues of the jobs retried or aborted.
    queues: tuple[str, ...] = ()

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


@dataclasses.dataclass(frozen=True)
class QueueFacts:
    """What the database says about one queue, for :func:`queuetopia_celery.explain.explain`."""

    queue: str
    #: The queue has a row (a job was created in it once).
    known: bool
    paused: bool
    #: Open jobs (pending or running) in the queue.
    open_jobs: int
    head: Job | None
    #: The queue's lease: who holds it (``host/pid``), when taken, started, until when,
    #: how many times its message was re-sent, and for which job.
    lease_job_id: int | None
    locked_by: str | None
    locked_at: dt.datetime | None
    started_at: dt.datetime | None
    expires_at: dt.datetime | None
    resends: int
    #: Leases held in the whole scope (for a concurrency limit).
    scope_leases: int
    #: The database clock when the facts were read.
    now: dt.datetime


@dataclasses.dataclass(frozen=True)
class DrainResult:
    """What :meth:`Queuetopia.drain` ran: attempts that succeeded, failed attempts that
    will be retried, and jobs that failed their last attempt (exhausted or held)."""

    succeeded: int = 0
    failed: int = 0
    exhausted: int = 0

    @property
    def attempted(self) -> int:
        return self.succeeded + self.failed + self.exhausted


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def job_to_dict(job: Job) -> dict[str, Any]:
    """A JSON-ready view of a job: its fields, with its ``state`` in place of the stored
    ``status`` column (one word per meaning, as the README lists them)."""
    out: dict[str, Any] = {}
    for field in _FIELDS:
        if field.name == "status":
            out["state"] = job.state.value
            continue
        value = getattr(job, field.name)
        out[field.name] = _iso(value) if isinstance(value, dt.datetime) else value
    if job.held:
        out["next_attempt_at"] = None
    return out


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
