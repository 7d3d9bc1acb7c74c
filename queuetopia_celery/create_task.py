"""Enqueueing by message: the ``queuetopia.<scope>.create`` Celery task.

A producer that cannot import this library or reach the database (another service,
Celery's protocol spoken from another language) creates jobs by sending a Celery
message; a worker of the scope creates them::

    celery_app.send_task(
        "queuetopia.mail.create",
        kwargs={"queue": "account-42", "action": "charge", "params": {"amount": 10}},
        queue="<the Queuetopia's celery_queue, if it has one>",
    )
    # or several jobs, created in one transaction, in this order:
    kwargs={"jobs": [{"queue": ..., "action": ..., "params": ...}, ...]}

Fields: ``queue``, ``action``, ``params`` and ``create_job``'s options ``timeout``,
``max_backoff``, ``max_attempts``, ``on_exhausted``, ``scheduled_at`` (an ISO 8601
string with its offset). The task returns the job's id (a list of ids for ``jobs=``).

**Exactly one creation per message.** The message's Celery task id is recorded in
``queuetopia_messages`` in the transaction that creates its jobs: a redelivered or
duplicated message (``acks_late`` redelivery, a publisher retry with the same id)
finds it and creates nothing, returning the same ids. The task acks late and is
rejected (requeued) when its worker dies, and retries with backoff while the database
is unreachable (same task id: still one creation). Bad fields fail the message for
good (logged, nothing written).

**Order.** Jobs are ordered in their queue by the commit of their creating
transaction, not by when their messages were sent: two messages sent in order A, B
can be taken by two workers (or two processes of one) and B commit first, and a
create retried after a database error or redelivered after a worker died commits
later still. For a strict order, either put the jobs whose order matters in one
message (``jobs=[...]``, created in list order in one transaction), or have at most
one message per queue in flight: send the next once the previous one's result came
back (``send_task(...).get()``, with a result backend). A producer-side sequence
number that workers would wait on is not offered: a message arriving early would
have to be parked (Celery ETA retries, which this library avoids), and a lost
message (a Redis restart) would block its queue for good with no job to show an
operator.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import tracing
from .errors import DatabaseError, InvalidJobError
from .jobs import validate_name

if TYPE_CHECKING:
    from .app import Queuetopia

logger = logging.getLogger(__name__)

#: The fields a message may give for one job.
JOB_FIELDS = frozenset(
    {"queue", "action", "params", "scheduled_at", "timeout", "max_backoff", "max_attempts", "on_exhausted"}
)
#: Longest wait between retries while the database is unreachable, in seconds.
MAX_RETRY_BACKOFF = 60


def job_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """One job's fields from a message, as ``create_jobs`` takes them (``scheduled_at``
    parsed from ISO 8601). Raises :class:`InvalidJobError` on unknown fields."""
    if not isinstance(fields, Mapping):
        raise InvalidJobError("jobs", f"each job must be a dict of fields, got {type(fields).__name__}")
    unknown = set(fields) - JOB_FIELDS
    if unknown:
        raise InvalidJobError("message", f"unknown fields {sorted(unknown)}; known: {sorted(JOB_FIELDS)}")
    out = dict(fields)
    when = out.get("scheduled_at")
    if when is not None:
        if not isinstance(when, str):
            raise InvalidJobError("scheduled_at", "must be an ISO 8601 string in a message")
        try:
            out["scheduled_at"] = dt.datetime.fromisoformat(when)
        except ValueError:
            raise InvalidJobError("scheduled_at", f"{when!r} is not an ISO 8601 date and time") from None
    return out


def create_from_message(qt: Queuetopia, message_id: str, fields: Mapping[str, Any]) -> int | list[int]:
    """Create the jobs of one message, once per ``message_id``; return their ids (one
    id for a single-job message). A message seen before creates nothing and returns the
    ids its first delivery created."""
    validate_name("message_id", message_id)
    many = "jobs" in fields
    if many:
        if set(fields) != {"jobs"}:
            raise InvalidJobError("message", "give jobs=[...] alone, or one job's fields")
        items = fields["jobs"]
        if not isinstance(items, list) or not items:
            raise InvalidJobError("jobs", "must be a non-empty list of jobs")
        specs = [job_fields(item) for item in items]
    else:
        specs = [job_fields(fields)]
    # Validated before anything is written: a bad message does not take its id.
    jobs = tracing.stamp(qt.build_specs(specs))  # the span current here, continued by the jobs
    made = qt.backend.create_jobs_once(message_id, jobs)
    if made.created:
        # Committed: wake the queues from here (as after create_jobs without connection=).
        qt.wake_after_commit({job.queue for job in jobs})
    else:
        logger.info(
            "message %s was delivered again: its jobs %s exist, nothing created",
            message_id,
            made.job_ids,
            extra={"scope": qt.scope},
        )
    return made.job_ids if many else made.job_ids[0]


def register_create_task(qt: Queuetopia) -> Any:
    """Register ``queuetopia.<scope>.create`` on ``qt``'s Celery app."""

    @qt.app.task(  # type: ignore[untyped-decorator]
        name=f"queuetopia.{qt.scope}.create",
        bind=True,
        typing=False,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(DatabaseError,),
        retry_backoff=True,
        retry_backoff_max=MAX_RETRY_BACKOFF,
        max_retries=None,
    )
    def create(self: Any, **fields: Any) -> int | list[int]:
        try:
            return create_from_message(qt, self.request.id, fields)
        except InvalidJobError:
            logger.exception(
                "message %s cannot create a job; dropped", self.request.id, extra={"scope": qt.scope}
            )
            raise

    return create
