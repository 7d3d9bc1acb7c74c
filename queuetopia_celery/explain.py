"""Why is this queue stuck? One sentence, then details, from the facts the backend read
(:meth:`~queuetopia_celery.backends.base.Backend.queue_facts`).

Pure logic: nothing here talks to the database or to Celery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

from .jobs import Job, JobState, QueueFacts, first_line, job_to_dict, state_of

#: Why a queue's head is not running now, as a stable code (for scripts and alerts).
REASONS = (
    "unknown_queue",  # no job was ever created in the queue
    "empty",  # no open job
    "paused",  # an operator paused the queue
    "running",  # the head is running on a worker
    "lease_expired",  # the head was running; its lease expired: the next scan records a lost attempt
    "dispatched",  # a perform message was sent; waiting for a worker to start it
    "resend_due",  # the message was not started in time; the next scan re-sends it
    "held",  # the head failed its last attempt and holds the queue (on_exhausted="hold")
    "retry_wait",  # the head failed; its next attempt is at a later time
    "scheduled",  # the head is scheduled for a later time
    "concurrency_limit",  # the head is due but max_concurrent_queues queues are running
    "no_performer",  # the head is due but no performer is registered for its action
    "waiting_for_dispatch",  # the head is due and nothing holds it: the next scan or kick starts it
)


@dataclasses.dataclass(frozen=True)
class QueueExplanation:
    """The answer of :meth:`Queuetopia.explain_queue`: ``summary`` is one sentence,
    ``details`` the lines after it, ``reason`` one of :data:`REASONS`."""

    queue: str
    reason: str
    summary: str
    details: tuple[str, ...]
    head: Job | None
    paused: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "reason": self.reason,
            "summary": self.summary,
            "details": list(self.details),
            "paused": self.paused,
            "head": None if self.head is None else job_to_dict(self.head),
        }


def _at(when: dt.datetime | None) -> str:
    return "-" if when is None else f"{when:%Y-%m-%d %H:%M:%S} UTC"


def _in(when: dt.datetime, now: dt.datetime) -> str:
    seconds = (when - now).total_seconds()
    if seconds <= 0:
        return f"{-seconds:.0f} s ago"
    return f"in {seconds:.0f} s"


def explain(
    facts: QueueFacts,
    *,
    has_performer: Callable[[str], bool] | None = None,
    max_concurrent: int | None = None,
) -> QueueExplanation:
    """Why ``facts.queue``'s head job is (not) running now. ``has_performer(action)``
    says whether a performer is registered (None: cannot tell, said in the details);
    ``max_concurrent`` is the scope's ``max_concurrent_queues``, when known."""
    queue, now, head = facts.queue, facts.now, facts.head
    details: list[str] = []

    def done(reason: str, summary: str) -> QueueExplanation:
        return QueueExplanation(queue, reason, summary, tuple(details), head, facts.paused)

    if not facts.known:
        return done("unknown_queue", f"Queue {queue!r} does not exist: no job was ever created in it.")
    if facts.paused:
        details.append(
            "paused by an operator: no job starts until `queuetopia-celery resume` (or resume_queue)"
        )
    if head is None:
        if facts.paused:
            return done("paused", f"Queue {queue!r} is paused and empty.")
        return done("empty", f"Queue {queue!r} is empty: every job in it is done, exhausted or aborted.")

    state = state_of(head.status, head.attempts, head.scheduled_at, now, held=head.held)
    details.append(
        f"head: job #{head.id} ({head.action}), {state.value}, attempt {head.attempts} of "
        f"{head.max_attempts}, {facts.open_jobs} open job(s) in the queue"
    )
    if head.error:
        details.append(f"last error: {first_line(head.error)}")
    if has_performer is None:
        details.append(
            f"cannot tell whether a performer is registered for {head.action!r} "
            "(no app loaded: give -A module:queuetopia)"
        )
        performer_known = True
    else:
        performer_known = has_performer(head.action)
        if not performer_known:
            details.append(
                f"no performer is registered for action {head.action!r} in the app loaded here: "
                "a worker running this app fails the job (NoPerformerError)"
            )

    why = (
        _active(facts, head, state, details)
        or _not_due(facts, head, state, details)
        or _due(facts, head, performer_known, max_concurrent, details)
    )
    return done(*why)


def _active(facts: QueueFacts, head: Job, state: JobState, details: list[str]) -> tuple[str, str] | None:
    """The head is running, or its perform message is on its way."""
    queue, now = facts.queue, facts.now
    leased = facts.lease_job_id is not None and facts.expires_at is not None
    if state is JobState.RUNNING:
        by = facts.locked_by or "an unknown worker"
        if leased and facts.expires_at is not None and facts.expires_at >= now:
            details.append(f"started {_at(facts.started_at)}; lease until {_at(facts.expires_at)}")
            return (
                "running",
                f"Queue {queue!r} is running job #{head.id} on {by}, "
                f"until {_at(facts.expires_at)} at the latest.",
            )
        details.append(
            f"the lease expired {_at(facts.expires_at)}: its worker died or was killed; "
            "check that beat runs the scan"
        )
        return (
            "lease_expired",
            f"Queue {queue!r} is stuck on job #{head.id}: its worker ({by}) is gone and the next scan "
            "records the lost attempt.",
        )
    if leased and facts.started_at is None and facts.expires_at is not None:
        details.append(
            f"lease taken {_at(facts.locked_at)} for job #{facts.lease_job_id}; message re-sent "
            f"{facts.resends} time(s)"
        )
        if facts.expires_at >= now:
            return (
                "dispatched",
                f"Queue {queue!r} waits for a worker to start job #{head.id}: its message was sent, "
                f"and is re-sent at {_at(facts.expires_at)} if not started.",
            )
        return (
            "resend_due",
            f"Queue {queue!r} waits for job #{head.id}'s message: it was not started in time and the "
            "next scan re-sends it (are workers consuming the Celery queue?).",
        )
    return None


def _not_due(facts: QueueFacts, head: Job, state: JobState, details: list[str]) -> tuple[str, str] | None:
    """The head may not start now: paused, held, or due later."""
    queue, now = facts.queue, facts.now
    if facts.paused:
        return "paused", f"Queue {queue!r} is paused: job #{head.id} waits for `resume`."
    if state is JobState.HELD:
        details.append("held after its last attempt (on_exhausted='hold'): retry it or abort it")
        return (
            "held",
            f"Queue {queue!r} is held by job #{head.id}, which failed its last attempt: "
            "an operator must retry or abort it.",
        )
    if head.due_at <= now:
        return None
    if state is JobState.RETRYING:
        return (
            "retry_wait",
            f"Queue {queue!r} waits for job #{head.id}'s retry at {_at(head.due_at)} "
            f"({_in(head.due_at, now)}).",
        )
    return (
        "scheduled",
        f"Queue {queue!r} waits for job #{head.id}, scheduled for {_at(head.due_at)} "
        f"({_in(head.due_at, now)}).",
    )


def _due(
    facts: QueueFacts, head: Job, performer_known: bool, max_concurrent: int | None, details: list[str]
) -> tuple[str, str]:
    """The head is due and nothing holds the queue."""
    queue = facts.queue
    if max_concurrent is not None and facts.scope_leases >= max_concurrent:
        details.append(
            f"{facts.scope_leases} queue(s) of the scope hold a lease; the limit is {max_concurrent}"
        )
        return (
            "concurrency_limit",
            f"Queue {queue!r} waits for a free slot: job #{head.id} is due but "
            f"max_concurrent_queues ({max_concurrent}) queues are running.",
        )
    if not performer_known:
        return (
            "no_performer",
            f"Queue {queue!r} cannot run job #{head.id}: no performer is registered for "
            f"action {head.action!r}.",
        )
    details.append(f"due since {_at(head.due_at)}; if this lasts, check that beat and workers run")
    return "waiting_for_dispatch", f"Queue {queue!r} is due: job #{head.id} starts at the next scan or kick."
