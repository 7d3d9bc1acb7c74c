"""The options of ordered tasks (``@qt.task(...)``, ``apply_async(...)``) in Celery's
words, mapped onto a job's: ``time_limit`` or ``soft_time_limit`` is ``timeout``,
``max_retries=N`` is ``max_attempts=N + 1``, ``countdown``/``eta`` is ``scheduled_at``;
and the Celery options that have no meaning for an ordered job, each refused with what
to do instead."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from .errors import InvalidJobError, UnsupportedOptionError
from .jobs import (
    utcnow,
    validate_duration,
    validate_max_attempts,
    validate_on_exhausted,
    validate_scheduled_at,
)
from .performer import BackoffFn, FailureFn


class TaskOptions(TypedDict, total=False):
    """The keyword options of ``@qt.task(queue=..., bind=..., **options)`` besides
    ``queue`` and ``bind`` (see :class:`~queuetopia_celery.ordered_task.TaskDecorator`)."""

    name: str | None
    timeout: float | dt.timedelta | None
    time_limit: float | dt.timedelta | None
    soft_time_limit: float | dt.timedelta | None
    max_attempts: int | None
    max_retries: int | Literal["unset"] | None
    max_backoff: float | dt.timedelta | None
    on_exhausted: str | None
    backoff: BackoffFn | None
    on_failure: FailureFn | None
    autoretry_for: Sequence[type[BaseException]] | None


#: Celery options that ordered tasks do not take, with what to do instead. Any other
#: unknown option is refused too: none is ever silently ignored.
UNSUPPORTED: dict[str, str] = {
    "link": "create the next job from the performer (in the same queue, it runs after this one)",
    "link_error": "use on_failure=, called after each failed attempt",
    "chain": "create the next job from the performer",
    "priority": "a queue runs in creation order; use another queue for urgent work",
    "expires": "an ordered job is never dropped unrun; abort it with abort_job",
    "retry": "enqueueing is one database write: there is no publish to retry",
    "retry_policy": "enqueueing is one database write: there is no publish to retry",
    "task_id": "the job's id is given by the database (job.id)",
    "ignore_result": "the performer's return value is always stored as job.result",
    "rate_limit": "max_concurrent_queues= on the Queuetopia limits queues running at once",
    "acks_late": "jobs are rows, not messages: an attempt is counted when it starts",
    "serializer": "params and results are always JSON",
    "routing_key": "the Queuetopia's celery_queue= routes its messages",
    "exchange": "the Queuetopia's celery_queue= routes its messages",
    "retry_backoff": "give backoff=(a function of the job) or keep the default exponential backoff",
    "retry_backoff_max": "use max_backoff=",
    "retry_jitter": "give backoff=(a function of the job)",
    "default_retry_delay": "give backoff=lambda job: seconds",
    "dont_autoretry_for": "list the exceptions to retry on in autoretry_for=",
    "retry_kwargs": "use max_attempts= (or max_retries=) and backoff=",
    "base": "ordered tasks are not Celery Task classes",
}


def refuse(options: Mapping[str, Any]) -> None:
    """Raise :class:`UnsupportedOptionError` for the first option given."""
    for name in options:
        hint = UNSUPPORTED.get(name)
        raise UnsupportedOptionError(
            name,
            f"is not supported by ordered tasks; {hint}"
            if hint
            else "is not an option of ordered tasks (see queuetopia_celery.ordered_task)",
        )


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """Options of the jobs an ordered task creates, in the job's words. ``None``: not
    given here (the Queuetopia's or ``create_job``'s default applies)."""

    timeout: float | None = None
    max_attempts: int | None = None
    max_backoff: float | None = None
    on_exhausted: str | None = None

    @classmethod
    def from_words(
        cls,
        *,
        timeout: float | dt.timedelta | None = None,
        time_limit: float | dt.timedelta | None = None,
        soft_time_limit: float | dt.timedelta | None = None,
        max_attempts: int | None = None,
        max_retries: int | Literal["unset"] | None = "unset",
        max_backoff: float | dt.timedelta | None = None,
        on_exhausted: str | None = None,
    ) -> JobOptions:
        """Map Celery's words onto the job's: ``time_limit`` or ``soft_time_limit`` is
        ``timeout`` (a job has one limit: :class:`JobTimeoutError` is raised inside the
        performer at ``timeout``, like Celery's soft limit, and the process is killed
        ``time_limit_grace`` later, like its hard limit: give one of the three);
        ``max_retries=N`` is ``max_attempts=N + 1``."""
        limits = {
            name: value
            for name, value in (
                ("timeout", timeout),
                ("time_limit", time_limit),
                ("soft_time_limit", soft_time_limit),
            )
            if value is not None
        }
        if len(limits) > 1:
            raise InvalidJobError(
                "timeout",
                f"give one of timeout, time_limit, soft_time_limit, not {' and '.join(limits)}: a job has "
                "one limit (JobTimeoutError raised in the performer, the process killed "
                "time_limit_grace later)",
            )
        seconds = None
        for name, value in limits.items():
            seconds = validate_duration(name, value, allow_zero=False)
        if max_retries != "unset":
            if max_attempts is not None:
                raise InvalidJobError("max_retries", "give max_attempts or max_retries, not both")
            if max_retries is None:
                raise InvalidJobError(
                    "max_retries", "must be a number: a job is retried at most max_attempts - 1 times"
                )
            if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
                raise InvalidJobError("max_retries", f"must be an int >= 0, got {max_retries!r}")
            max_attempts = max_retries + 1
        return cls(
            timeout=seconds,
            max_attempts=None if max_attempts is None else validate_max_attempts(max_attempts),
            max_backoff=None
            if max_backoff is None
            else validate_duration("max_backoff", max_backoff, allow_zero=True),
            on_exhausted=None if on_exhausted is None else validate_on_exhausted(on_exhausted),
        )

    def over(self, defaults: JobOptions) -> JobOptions:
        """These options, falling back to ``defaults`` where not given."""
        return JobOptions(
            *(
                getattr(defaults, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                for f in dataclasses.fields(self)
            )
        )

    def create_kwargs(self) -> dict[str, Any]:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in given.items() if value is not None}


def scheduled_at_of(countdown: float | dt.timedelta | None, eta: dt.datetime | None) -> dt.datetime | None:
    """Celery's ``countdown`` (seconds from now, by this process's clock) or ``eta`` (an
    aware datetime) as the job's ``scheduled_at``."""
    if countdown is not None and eta is not None:
        raise InvalidJobError("countdown", "give countdown or eta, not both")
    if countdown is not None:
        return utcnow() + dt.timedelta(seconds=validate_duration("countdown", countdown, allow_zero=True))
    try:
        return validate_scheduled_at(eta)
    except InvalidJobError as exc:
        raise InvalidJobError("eta", exc.reason) from None
