"""The operator's tools: read jobs and queues, retry, abort, pause, resume, explain,
purge. :class:`~queuetopia_celery.Queuetopia` builds one :class:`Operator` and its
public methods of the same names delegate to it.

Every check of the operator's input (job ids, states, the target of a bulk action, an
abort's reason) is here, so that the facade, the CLI and any other door refuse the same
things with the same words. A change that may let a queue move on (a retry, an abort, a
resume) wakes that queue at once through the host's :meth:`OperatorHost.wake_after_commit`:
the operator never waits for the next scan.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from .backends.base import Backend
from .errors import InvalidJobError
from .explain import QueueExplanation, explain
from .jobs import BulkResult, Job, JobState, Page, QueueStatus, validate_duration, validate_name
from .performer import Registry

# The name this logger always had (log configurations name it).
logger = logging.getLogger("queuetopia_celery.app")

#: What a bulk retry takes by default: every failed job that is not done.
BULK_RETRY_STATES = (JobState.EXHAUSTED, JobState.HELD, JobState.RETRYING)


class OperatorHost(Protocol):
    """What the operator needs of the Queuetopia it works for (the facade is one). Read
    at each call, not copied: a subclass may replace ``registry`` after building."""

    scope: str
    backend: Backend
    registry: Registry
    max_concurrent_queues: int | None
    job_retention: float

    def wake_after_commit(self, queues: Iterable[str], committed: bool = True) -> None: ...


class Operator:
    """The operator's reads and writes on one scope (see the module's docstring)."""

    def __init__(self, host: OperatorHost) -> None:
        self.host = host

    # ------------------------------------------------------------------ reading

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidJobError("limit", "must be None or an int >= 0")
        return self.host.backend.list_jobs(queue=queue, action=action, state=parse_state(state), limit=limit)

    def paginate_jobs(
        self,
        page_size: int,
        page_number: int,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | None = None,
    ) -> Page:
        for name, value in (("page_size", page_size), ("page_number", page_number)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidJobError(name, "must be an int >= 1")
        backend = self.host.backend
        st = parse_state(state)
        items = backend.list_jobs(
            queue=queue, action=action, state=st, limit=page_size, offset=(page_number - 1) * page_size
        )
        total = backend.count_jobs(queue=queue, action=action, state=st)
        return Page(items=items, total=total, page_number=page_number, page_size=page_size)

    def queue_statuses(self, *, queue: str | None = None, blocked_only: bool = False) -> list[QueueStatus]:
        return self.host.backend.queue_statuses(queue=queue, blocked_only=blocked_only)

    def explain_queue(self, queue: str) -> QueueExplanation:
        """Explained with this process's registry: whether a performer exists for the
        head's action is only known where the performers are registered."""
        facts = self.host.backend.queue_facts(validate_name("queue", queue))
        registry = self.host.registry
        return explain(
            facts,
            has_performer=lambda action: registry.default is not None or action in registry.actions,
            max_concurrent=self.host.max_concurrent_queues,
        )

    # ------------------------------------------------------------------ one job, one queue

    def retry_job(self, job_id: int, *, force: bool = False) -> Job:
        job = self.host.backend.retry(parse_job_id(job_id), force=force)
        self.host.wake_after_commit([job.queue])
        return job

    def abort_job(self, job_id: int, reason: str) -> Job:
        reason = abort_reason(reason)
        job = self.host.backend.abort(parse_job_id(job_id), reason)
        self.host.wake_after_commit([job.queue])
        return job

    def pause_queue(self, queue: str) -> bool:
        return self.host.backend.pause(validate_name("queue", queue))

    def resume_queue(self, queue: str) -> bool:
        changed = self.host.backend.resume(validate_name("queue", queue))
        if changed:
            self.host.wake_after_commit([queue])
        return changed

    # ------------------------------------------------------------------ in bulk

    def retry_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | Sequence[JobState | str] | None = None,
        force: bool = False,
        everything: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        queue, action = bulk_target(queue, action, everything)
        states = bulk_states(state)
        result = self.host.backend.retry_many(
            queue=queue, action=action, states=states, force=force, dry_run=dry_run
        )
        if result.count and not dry_run:
            self.host.wake_after_commit(result.queues)
        return result

    def abort_jobs(
        self,
        *,
        reason: str,
        queue: str | None = None,
        action: str | None = None,
        everything: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        reason = abort_reason(reason)
        queue, action = bulk_target(queue, action, everything)
        result = self.host.backend.abort_many(queue=queue, action=action, reason=reason, dry_run=dry_run)
        if result.count and not dry_run:
            self.host.wake_after_commit(result.queues)
        return result

    def purge_jobs(self, *, older_than: float | dt.timedelta | None = None) -> int:
        seconds = (
            self.host.job_retention
            if older_than is None
            else validate_duration("older_than", older_than, allow_zero=True)
        )
        deleted = self.host.backend.purge(seconds)
        if deleted:
            logger.info("purged %s done jobs", deleted, extra={"scope": self.host.scope})
        return deleted


# ---------------------------------------------------------------------- input checks


def parse_job_id(job_id: object) -> int:
    """``job_id`` if it is a positive int, else :class:`InvalidJobError`."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
        raise InvalidJobError("job_id", f"must be a positive int, got {job_id!r}")
    return job_id


def parse_state(state: JobState | str | None) -> JobState | None:
    """``state`` as a :class:`JobState` (None stays None), else :class:`InvalidJobError`
    listing the states."""
    if state is None:
        return None
    try:
        return JobState(state)
    except ValueError:
        choices = ", ".join(s.value for s in JobState)
        raise InvalidJobError("state", f"{state!r} is not one of {choices}") from None


def abort_reason(reason: object) -> str:
    """An abort's reason, stripped; an empty or missing one is refused."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidJobError("reason", "must be a non-empty string")
    return reason.strip()


def bulk_target(queue: str | None, action: str | None, everything: bool) -> tuple[str | None, str | None]:
    """The queue and action a bulk action is limited to: at least one of them, unless
    ``everything`` (``all=True``, ``--all``) says the whole scope is meant."""
    if queue is not None:
        validate_name("queue", queue)
    if action is not None:
        validate_name("action", action)
    if queue is None and action is None and not everything:
        raise InvalidJobError(
            "queue", "give a queue or an action (or all=True / --all for every job of the scope)"
        )
    return queue, action


def bulk_states(state: JobState | str | Sequence[JobState | str] | None) -> list[JobState]:
    """The states a bulk retry takes: ``state`` (one or several of
    :data:`BULK_RETRY_STATES`), all of them by default."""
    if state is None:
        return list(BULK_RETRY_STATES)
    given = [state] if isinstance(state, (str, JobState)) else list(state)
    states = [st for st in (parse_state(item) for item in given) if st is not None]
    wrong = [s.value for s in states if s not in BULK_RETRY_STATES]
    if wrong or not states:
        raise InvalidJobError(
            "state",
            f"a bulk retry takes {', '.join(s.value for s in BULK_RETRY_STATES)}; got {wrong or 'none'}",
        )
    return states
