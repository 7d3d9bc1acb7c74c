"""Performers: the code that runs a job, looked up by action in a registry.

A Queuetopia runs a job by finding its action in the registry the application built
at import time (function performers, registered with ``@qt.performer("action")``),
falling back to the class performer given as ``performer=``. Nothing is ever imported
from a name read from the database or from a message.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from billiard import common as billiard_common
from celery.exceptions import WorkerShutdown, WorkerTerminate

from .errors import ConfigurationError, DuplicatePerformerError, NoPerformerError
from .jobs import Job, default_backoff, validate_name

PerformFn = Callable[[Job], Any]
BackoffFn = Callable[[Job], float]
FailureFn = Callable[[Job], None]


@runtime_checkable
class PerformerProtocol(Protocol):
    """What a worker needs from a performer."""

    def perform(self, job: Job) -> Any: ...

    def backoff(self, job: Job) -> float: ...

    def handle_failed_job(self, job: Job) -> None: ...


class Performer:
    """Base class of class-based performers (``Queuetopia(..., performer=MyPerformer())``).

    Override :meth:`perform`; :meth:`backoff` and :meth:`handle_failed_job` are optional.
    """

    def perform(self, job: Job) -> Any:
        """Run the job. Return a JSON value (stored as ``job.result``) on success;
        raise to fail the attempt (the job is retried with backoff)."""
        raise NotImplementedError(f"{type(self).__name__}.perform is not implemented")

    def backoff(self, job: Job) -> float:
        """Seconds to wait before retrying ``job`` after its ``job.attempts``-th failed
        attempt. Default: 2, 3, 5, 9, 17, ... capped at ``job.max_backoff``."""
        return default_backoff(job.attempts, job.max_backoff)

    def handle_failed_job(self, job: Job) -> None:
        """Called after each failed attempt with the job as it will be stored
        (``job.error`` set). An exception raised here (``SystemExit`` included) is
        appended to the job's error. For an attempt whose worker died, the scan records
        the attempt first and calls this afterwards."""
        return None


@dataclasses.dataclass(frozen=True)
class FunctionPerformer(Performer):
    """A performer made of a function and optional hooks."""

    fn: PerformFn
    backoff_fn: BackoffFn | None = None
    on_failure_fn: FailureFn | None = None

    def perform(self, job: Job) -> Any:
        return self.fn(job)

    def backoff(self, job: Job) -> float:
        if self.backoff_fn is None:
            return default_backoff(job.attempts, job.max_backoff)
        return self.backoff_fn(job)

    def handle_failed_job(self, job: Job) -> None:
        if self.on_failure_fn is not None:
            self.on_failure_fn(job)


class Registry:
    """Performers of one scope, by action."""

    def __init__(self, scope: str, default: PerformerProtocol | None = None) -> None:
        if default is not None and not isinstance(default, PerformerProtocol):
            raise ConfigurationError(
                "performer= must have perform(job), backoff(job) and handle_failed_job(job) "
                "methods (subclass queuetopia_celery.Performer)"
            )
        self.scope = scope
        self.default = default
        self._by_action: dict[str, PerformerProtocol] = {}

    def register(
        self,
        action: str,
        fn: PerformFn,
        *,
        backoff: BackoffFn | None = None,
        on_failure: FailureFn | None = None,
    ) -> None:
        validate_name("action", action)
        if not callable(fn):
            raise ConfigurationError(f"performer for {action!r} is not callable")
        if action in self._by_action:
            raise DuplicatePerformerError(self.scope, action)
        self._by_action[action] = FunctionPerformer(fn, backoff, on_failure)

    def resolve(self, action: str) -> PerformerProtocol:
        performer = self._by_action.get(action, self.default)
        if performer is None:
            raise NoPerformerError(self.scope, action)
        return performer

    @property
    def actions(self) -> list[str]:
        return sorted(self._by_action)


def safe_backoff(performer: PerformerProtocol | None, job: Job) -> tuple[float, str | None]:
    """The performer's backoff for ``job``, checked and capped at ``job.max_backoff``.

    Returns (seconds, problem): a hook that raises or returns nonsense falls back to
    the default backoff and the problem is reported in the job's error.
    """
    fallback = default_backoff(job.attempts, job.max_backoff)
    if performer is None:
        return fallback, None
    try:
        value = performer.backoff(job)
    except BaseException as exc:
        if is_stop_signal(exc):
            raise
        return fallback, f"backoff hook raised {type(exc).__name__}: {exc}; used the default backoff"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        return fallback, f"backoff hook returned {value!r}, not seconds >= 0; used the default backoff"
    return float(min(value, job.max_backoff)), None


def is_stop_signal(exc: BaseException) -> bool:
    """Whether ``exc`` asks the process to stop rather than reports an error of user
    code: Ctrl-C (``KeyboardInterrupt``), Celery's warm or cold shutdown
    (``WorkerShutdown``, ``WorkerTerminate``), a killed greenlet (``GreenletExit``), and
    whatever is raised once a prefork child's SIGTERM handler has run (the hard time
    limit, a cold shutdown): that handler raises ``SystemExit`` in the running code, and
    what the code's own cleanup raises meanwhile (a database call cut in half) replaces
    it. Billiard itself treats every exception after that point as the process leaving.

    Anything else raised by a performer or a hook, ``Exception`` or not (a
    ``sys.exit()`` in user code raises ``SystemExit``), is a failed attempt: the worker
    records it and carries on. A stop signal is raised on: the attempt stays begun, and
    the scan records it once its lease expires.
    """
    if isinstance(exc, (KeyboardInterrupt, WorkerShutdown, WorkerTerminate)):
        return True
    if _terminate_handler_fired():
        return True
    greenlet = sys.modules.get("greenlet")
    greenlet_exit = getattr(greenlet, "GreenletExit", None)
    return isinstance(greenlet_exit, type) and isinstance(exc, greenlet_exit)


def _terminate_handler_fired() -> bool:
    """Whether billiard's terminate-signal handler has run in this process: it raises
    ``SystemExit`` in whatever code runs, and the process is on its way out."""
    fired = getattr(billiard_common, "terminate_handler_fired", None)
    if callable(fired):
        return bool(fired())
    flag = getattr(billiard_common, "_should_have_exited", None)  # billiard < 4.3
    return bool(flag and flag[0])
