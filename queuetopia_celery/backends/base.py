"""The backend interface: the lease protocol's operations and the operator's, and the
small values they exchange. Each database implements :class:`Backend` in its own
module; the engine above (dispatch policy, worker, Celery glue, facade) only ever
talks to this interface and never asks which database it runs on.

Lease protocol, in short:

* ``kick``/``scan`` take a queue's lease (``INSERT .. ON CONFLICT DO NOTHING``) for
  its head job when that job is due, with a fresh token and a short expiry: the time
  its perform message may wait in the broker before it is re-sent (``resend_after``).
* ``start`` checks the token, marks the lease started, extends it past the job's hard
  time limit and counts the attempt: one transaction.
* ``finish_and_start`` checks the token, writes the outcome and hands the lease on to
  the next due job (new token), starting it at once when the burst allows, or
  releases it: one transaction. A released queue is re-checked by the caller (a kick)
  so that a job committed meanwhile is never missed.
* ``recover`` (the scan) records a failed attempt for every started lease that has
  expired (the worker died) and re-sends the message of every unstarted lease whose
  wait is over, under the same token, waiting twice as long before the next re-send
  (at most the dispatch grace).

The head of a queue is its first open job by (scheduled_at, sequence), and only then
checked for due: a not-yet-due head blocks the jobs behind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from ..jobs import (
    HELD_UNTIL,
    ON_EXHAUSTED_HOLD,
    STATUS_EXHAUSTED,
    STATUS_PENDING,
    BulkResult,
    Job,
    JobState,
    NewJob,
    QueueFacts,
    QueueStatus,
)


@dataclasses.dataclass(frozen=True)
class Lease:
    """A queue's lease just taken or handed on: send a perform message for it."""

    queue: str
    job_id: int
    token: str
    #: The job's timeout (seconds): the perform message's time limits follow from it.
    timeout: float


@dataclasses.dataclass(frozen=True)
class Inserted:
    """What :meth:`Backend.insert_jobs` wrote, without reading the jobs back."""

    #: The new jobs' ids, in the order given (an item whose unique_key an open job
    #: held: that job's id).
    ids: list[int]
    #: The leases taken with the insert (own transaction only): send them.
    leases: list[Lease]


@dataclasses.dataclass(frozen=True)
class MessageJobs:
    """What :meth:`Backend.create_jobs_once` did for one message."""

    #: The ids of the message's jobs, in the message's order.
    job_ids: list[int]
    #: False when the message was seen before: nothing was created now.
    created: bool


@dataclasses.dataclass(frozen=True)
class Burst:
    """What :meth:`Backend.finish_and_start` needs to begin the next job in the same
    Celery task: who runs it, whether the burst budget allows another job, and the
    time limits its running lease must outlive."""

    worker: str
    start_next: bool
    time_limit_grace: float
    lease_margin: float
    #: Seconds left before the task's hard time limit (None: no limit on the message).
    deadline_left: float | None


class Finished(NamedTuple):
    """What :meth:`Backend.finish_and_start` did."""

    #: False when the token no longer held the lease (the outcome was dropped).
    written: bool
    #: The lease handed to the queue's next due job; None when the queue was released
    #: (the caller then re-checks it with a kick).
    next_lease: Lease | None = None
    #: The next job, begun here: run it under ``next_lease.token``. A ``next_lease``
    #: without ``started`` is to be sent through the broker.
    started: Job | None = None


@dataclasses.dataclass(frozen=True)
class LostAttempt:
    """A started job whose lease expired: its worker died or was killed."""

    job: Job
    token: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as written by :meth:`Backend.finish_and_start`."""

    succeeded: bool
    result: Any = None
    error: str | None = None
    backoff: float = 0.0
    #: The performer raised DoNotRetry: no further attempt, whatever ``max_attempts``.
    final: bool = False


@dataclasses.dataclass(frozen=True)
class FailurePlan:
    """What becomes of a job whose attempt failed."""

    status: str
    #: Retried after this many seconds (None: not retried by itself).
    backoff: float | None
    #: Held until then (the far future: until an operator acts), or None.
    until: Any


def failure_plan(job: Job, outcome: Outcome) -> FailurePlan:
    """Retried after ``backoff`` seconds; past ``max_attempts``, exhausted (the queue
    moves on) or held until :data:`HELD_UNTIL` (it stays at the head, never due, until
    an operator retries or aborts it)."""
    if job.attempts < job.max_attempts and not outcome.final:
        return FailurePlan(STATUS_PENDING, outcome.backoff, None)
    if job.on_exhausted == ON_EXHAUSTED_HOLD:
        return FailurePlan(STATUS_PENDING, None, HELD_UNTIL)
    return FailurePlan(STATUS_EXHAUSTED, None, None)


@dataclasses.dataclass(frozen=True)
class ScopeGauges:
    """What the database says about one scope at one moment, for the Prometheus
    gauges (:mod:`queuetopia_celery.metrics`). Ages are seconds on the database clock."""

    scope: str
    #: Open jobs by state: ``available``, ``scheduled``, ``running``, ``retrying``, ``held``.
    open_jobs: dict[str, int]
    #: Queues with at least one open job.
    queues_open: int
    #: Queues whose head job has failed and not yet succeeded (retrying or held).
    queues_blocked: int
    #: Queues an operator paused.
    queues_paused: int
    #: How long the pending job that has been due longest has waited since it became due.
    oldest_due_age: float
    #: How long the longest blocked queue has been blocked.
    longest_blocked: float
    #: With ``top_queues``: the queues with the most open jobs, most first.
    top_open: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    #: With ``top_queues``: the longest blocked queues and for how long, longest first.
    top_blocked: list[tuple[str, float]] = dataclasses.field(default_factory=list)


def new_token() -> str:
    """A fresh lease token (or create key): 32 random hex digits. ``secrets.token_hex``
    rather than ``uuid.uuid4().hex``, the same randomness at a third of the CPU (one is
    drawn per job on the hot path)."""
    return secrets.token_hex(16)


class Backend(Protocol):
    """All reads and writes of one scope on one database."""

    scope: str
    #: Seconds an unstarted lease's message may wait before its first re-send.
    resend_after: float

    # -- plumbing

    def redact(self, text: str) -> str:
        """``text`` with the database password replaced by ``***``."""

    def pinned(self) -> contextlib.AbstractContextManager[None]:
        """Keep one connection for this thread while the block runs (the hot path)."""

    def on_commit(
        self,
        connection: Any,
        key: str,
        items: Iterable[str],
        callback: Callable[[set[str]], None] | Callable[[set[str], bool], None],
    ) -> None:
        """Call ``callback(items, committed)`` once the caller's transaction commits."""

    # -- the lease protocol

    def create_jobs(self, specs: Sequence[NewJob], *, connection: Any = None) -> list[Job]:
        """Insert jobs, numbering them per queue in commit order."""

    def create_jobs_taking_leases(
        self, specs: Sequence[NewJob], *, grace: float
    ) -> tuple[list[Job], list[Lease]]:
        """Insert jobs in their own transaction and take, where the backend can in the
        same statement, the leases of their queues: send those."""

    def insert_jobs(
        self, specs: Sequence[NewJob], *, connection: Any = None, grace: float | None = None
    ) -> Inserted:
        """:meth:`create_jobs` for bulk producers: the ids only, not the rows read back
        (PostgreSQL: COPY). Without ``connection`` and with a ``grace``, the leases of
        new and idle queues are taken in the same transaction, as by
        :meth:`create_jobs_taking_leases`."""

    def create_jobs_once(self, message_id: str, specs: Sequence[NewJob]) -> MessageJobs:
        """:meth:`create_jobs` in its own transaction, once per ``message_id`` of the
        scope (a ``create`` message's Celery task id), recorded in that transaction."""

    def kick(
        self, queues: Sequence[str], *, grace: float, limit: int = 1000, locked_by: str | None = None
    ) -> list[Lease]:
        """Take the lease of each given queue whose head is due and which nobody holds."""

    def kick_after_producers(self, queues: Sequence[str], *, grace: float, limit: int = 1000) -> list[Lease]:
        """:meth:`kick`, after waiting for producers whose commit hook named these queues."""

    def scan(self, *, grace: float, limit: int = 1000, locked_by: str | None = None) -> list[Lease]:
        """Take the leases of due queues (``due_at`` passed), ``due_at`` order."""

    def fill_slots(
        self,
        queues: Sequence[str] | None,
        *,
        grace: float,
        max_concurrent: int,
        limit: int = 1000,
        locked_by: str | None = None,
        wait_for_producers: bool = False,
    ) -> list[Lease]:
        """:meth:`kick` (or :meth:`scan` when ``queues`` is None) under a limit on the
        scope's leases held at once."""

    def start(self, queue: str, job_id: int, token: str, *, worker: str, lease: float) -> Job | None:
        """Begin an attempt under ``token``; None for a stale message."""

    def finish_and_start(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, burst: Burst
    ) -> Finished:
        """Write an attempt's outcome, hand the lease on, maybe start the next job."""

    def recover(
        self, *, limit: int = 1000, claim: float = 60.0, grace: float = 120.0
    ) -> tuple[list[LostAttempt], list[Lease]]:
        """Expired leases: lost attempts to record, unstarted leases to re-send."""

    def record_lost(self, lost: LostAttempt, outcome: Outcome) -> bool:
        """Record the failed attempt of a job whose worker died."""

    def replace_error(self, job_id: int, recorded: str, error: str) -> bool:
        """Replace a job's stored error if it is still ``recorded``."""

    def extend_lease(self, queue: str, token: str, seconds: float) -> bool:
        """Make a started lease last ``seconds`` from now."""

    def release_unsent(self, leases: Sequence[Lease]) -> int:
        """Give back leases whose perform message could not be sent."""

    def release_unstarted(self, queue: str | None = None) -> int:
        """Drop the scope's dispatched but unstarted leases (``drain``)."""

    def advance(self, queue: str | None = None) -> bool:
        """Move the clock forward for the scope's open jobs (``drain``)."""

    def lease_of(self, queue: str) -> dict[str, Any] | None:
        """The lease row of a queue, for inspection."""

    # -- the operator's

    def get_job(self, job_id: int, *, connection: Any = None) -> Job | None: ...

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Job]: ...

    def count_jobs(
        self, *, queue: str | None = None, action: str | None = None, state: JobState | None = None
    ) -> int: ...

    def queue_statuses(
        self, *, queue: str | None = None, blocked_only: bool = False
    ) -> list[QueueStatus]: ...

    def retry(self, job_id: int, *, force: bool = False) -> Job: ...

    def abort(self, job_id: int, reason: str) -> Job: ...

    def purge(self, older_than: float, *, batch: int = 5000) -> int: ...

    def pause(self, queue: str) -> bool: ...

    def resume(self, queue: str) -> bool: ...

    def retry_many(
        self,
        *,
        queue: str | None,
        action: str | None,
        states: Sequence[JobState],
        force: bool = False,
        dry_run: bool = False,
    ) -> BulkResult: ...

    def abort_many(
        self, *, queue: str | None, action: str | None, reason: str, dry_run: bool = False
    ) -> BulkResult: ...

    def queue_facts(self, queue: str) -> QueueFacts: ...

    def scope_gauges(self, *, top_queues: int = 0) -> ScopeGauges:
        """The scope's gauges (open jobs by state, blocked, paused, ages), read at
        once; with ``top_queues``, also that many busiest and longest blocked queues."""


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
