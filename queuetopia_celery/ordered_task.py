"""Ordered tasks: ``@qt.task(queue="account-{account_id}")``, a Celery task moved to an
ordered queue by changing its decorator.

The decorated function becomes the performer of an action (its ``__name__`` unless
``name=`` says otherwise) and an :class:`OrderedTask` that keeps Celery's calling API:
``charge(...)`` calls the function here and now, ``charge.delay(...)`` and
``charge.apply_async(args, kwargs, ...)`` create a job in the queue named by the
``queue=`` template (or callable) over the call's arguments, and return the
:class:`~queuetopia_celery.Job`. The job's params are the call's arguments by name
(JSON, checked at the call); the worker calls the function with them and stores what
it returns as ``job.result``.

Everything here goes through the public :class:`~queuetopia_celery.Queuetopia` API
(``performer``, ``create_job``, ``get_job``): it is a layer over the engine, not part of it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import string
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from .errors import (
    ConfigurationError,
    DoNotRetry,
    InvalidJobError,
    JobNotFoundError,
    UnsupportedOptionError,
    WaitTimeoutError,
)
from .jobs import Job, JobState, validate_duration
from .performer import BackoffFn, FailureFn
from .task_options import UNSUPPORTED, JobOptions, TaskOptions, refuse, scheduled_at_of

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

    from .app import Queuetopia
    from .backends import Executor

P = ParamSpec("P")
R = TypeVar("R")

#: A queue key: a ``str.format`` template over the task's arguments
#: (``"account-{account_id}"``), or a callable given them as keyword arguments.
QueueKey = str | Callable[..., str]

_TERMINAL = frozenset({JobState.DONE, JobState.EXHAUSTED, JobState.ABORTED, JobState.HELD})


class _QueueKeyOf:
    """The queue key of one call: a template over its arguments, or a callable."""

    def __init__(self, key: QueueKey, signature: inspect.Signature, task: str) -> None:
        self.key = key
        self.task = task
        self.fields: list[str] = []
        if isinstance(key, str):
            for _, field, _, _ in string.Formatter().parse(key):
                if field is None:
                    continue
                root = field.split(".", 1)[0].split("[", 1)[0]
                if not root or root.isdigit():
                    raise ConfigurationError(
                        f"queue template {key!r} of task {task!r}: name the argument ({{account_id}}), "
                        "not a position"
                    )
                if root not in signature.parameters:
                    raise ConfigurationError(
                        f"queue template {key!r} of task {task!r} names {root!r}, which is not one of its "
                        f"parameters ({', '.join(signature.parameters) or 'none'})"
                    )
                self.fields.append(root)
        elif not callable(key):
            raise ConfigurationError(f"queue= of task {task!r} must be a template string or a callable")

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        if not isinstance(self.key, str):
            value = self.key(**arguments)
            if not isinstance(value, str):
                raise InvalidJobError(
                    "queue", f"the queue callable of task {self.task!r} returned {value!r}, not a string"
                )
            return value
        for field in self.fields:
            if arguments.get(field) is None:
                raise InvalidJobError(
                    "queue",
                    f"template {self.key!r} of task {self.task!r} needs argument {field!r}, "
                    "which is missing or None",
                )
        try:
            return self.key.format(**arguments)
        except (LookupError, AttributeError, ValueError, TypeError) as exc:
            raise InvalidJobError(
                "queue", f"template {self.key!r} of task {self.task!r} cannot be filled: {exc!r}"
            ) from None


@dataclasses.dataclass(frozen=True)
class JobCall:
    """The job one call of an ordered task creates: its queue and its params."""

    queue: str
    params: dict[str, Any]


class _OrderedTaskBase(Generic[P, R]):
    """What :class:`OrderedTask` and :class:`BoundOrderedTask` share: Celery's calling
    API, creating jobs; and the performer the worker runs."""

    def __init__(
        self,
        qt: Queuetopia,
        fn: Callable[..., R],
        *,
        name: str,
        queue: QueueKey,
        bind: bool,
        options: JobOptions,
        autoretry_for: tuple[type[BaseException], ...] | None,
    ) -> None:
        self.qt = qt
        self.fn = fn
        self.name = name
        self.bind = bind
        self.options = options
        self.autoretry_for = autoretry_for
        signature = inspect.signature(fn)
        if bind:
            params = list(signature.parameters.values())
            if not params or params[0].kind not in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                raise ConfigurationError(f"task {name!r} has bind=True: its first parameter receives the Job")
            signature = signature.replace(parameters=params[1:])
        self.call_signature = signature
        self.queue_key = _QueueKeyOf(queue, signature, name)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<ordered task {self.name!r} of scope {self.qt.scope!r}>"

    # ------------------------------------------------------------------ calling

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Create a job for this call at the end of its queue; returns the Job
        (``qt.wait(job)`` waits for its outcome)."""
        return self._create(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        queue: str | None = None,
        connection: Executor | None = None,
        timeout: float | dt.timedelta | None = None,
        time_limit: float | dt.timedelta | None = None,
        soft_time_limit: float | dt.timedelta | None = None,
        max_attempts: int | None = None,
        max_retries: int | Literal["unset"] | None = "unset",
        max_backoff: float | dt.timedelta | None = None,
        on_exhausted: str | None = None,
        **celery_options: Any,
    ) -> Job:
        """Create a job, with options: ``countdown``/``eta`` (the job's ``scheduled_at``),
        ``queue`` (this queue instead of the task's key), ``connection`` (join the
        caller's transaction), the job options of the decorator. A Celery option that
        has no meaning here (``link``, ``priority``, ``expires``, ...) raises
        :class:`~queuetopia_celery.UnsupportedOptionError`; nothing is written."""
        refuse(celery_options)
        if args is not None and (isinstance(args, (str, bytes)) or not isinstance(args, Sequence)):
            raise TypeError(f"args must be a list or tuple, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
        options = JobOptions.from_words(
            timeout=timeout,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            max_attempts=max_attempts,
            max_retries=max_retries,
            max_backoff=max_backoff,
            on_exhausted=on_exhausted,
        )
        return self._create(
            tuple(args or ()),
            dict(kwargs or {}),
            scheduled_at=scheduled_at_of(countdown, eta),
            queue=queue,
            connection=connection,
            options=options,
        )

    def s(self, *args: Any, **kwargs: Any) -> Any:
        """Not offered: an ordered job is created with ``delay`` or ``apply_async``."""
        raise UnsupportedOptionError(
            "signature",
            "is not offered: ordered tasks have no Celery signatures (canvas, chains, groups); call delay()",
        )

    signature = si = s

    def _create(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        scheduled_at: dt.datetime | None = None,
        queue: str | None = None,
        connection: Executor | None = None,
        options: JobOptions | None = None,
    ) -> Job:
        call = self.job_call(args, kwargs, queue=queue)
        job_options = (options or JobOptions()).over(self.options)
        return self.qt.create_job(
            call.queue,
            self.name,
            call.params,
            scheduled_at=scheduled_at,
            connection=connection,
            **job_options.create_kwargs(),
        )

    def job_call(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, queue: str | None = None
    ) -> JobCall:
        """The queue and the params of the job for a call with these arguments
        (``queue``, when given, instead of the task's key). Raises :class:`TypeError`
        when the arguments do not fit the function, as calling it would."""
        try:
            call = self.call_signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        params = {
            name: list(value)
            if self.call_signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL
            else value
            for name, value in call.arguments.items()
        }
        if queue is None:
            call.apply_defaults()
            queue = self.queue_key(call.arguments)
        return JobCall(queue=queue, params=params)

    # ------------------------------------------------------------------ performing

    def perform(self, job: Job) -> Any:
        """Run ``job``: the function called with the job's params as its arguments
        (and the Job first with ``bind=True``)."""
        params = job.params
        if not isinstance(params, dict):
            raise TypeError(f"job {job.id} of task {self.name!r}: params {params!r} are not named arguments")
        unknown = sorted(set(params) - set(self.call_signature.parameters))
        if unknown:
            raise TypeError(
                f"job {job.id} passes {', '.join(unknown)} to task {self.name!r}, which no longer takes them"
            )
        arguments = {
            name: tuple(value)
            if self.call_signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL
            else value
            for name, value in params.items()
        }
        call = inspect.BoundArguments(self.call_signature, arguments)
        try:
            if self.bind:
                return self.fn(job, *call.args, **call.kwargs)
            return self.fn(*call.args, **call.kwargs)
        except Exception as exc:
            if self.autoretry_for is None or isinstance(exc, (DoNotRetry, *self.autoretry_for)):
                raise
            raise DoNotRetry(f"{type(exc).__name__}: {exc} (not in autoretry_for: no retry)") from exc


class OrderedTask(_OrderedTaskBase[P, R]):
    """A function registered by ``@qt.task(...)``: call it to run it here, ``delay`` or
    ``apply_async`` to queue it."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)


class BoundOrderedTask(_OrderedTaskBase[P, R]):
    """An ordered task with ``bind=True``: its function takes the Job first; ``delay``
    and ``apply_async`` take the other arguments."""

    def __call__(self, job: Job, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(job, *args, **kwargs)


class TaskDecorator:
    """``qt.task``: ``@qt.task(queue="account-{account_id}", ...)`` registers the
    decorated function as an ordered task of ``qt`` (see :class:`OrderedTask`).

    Options: ``queue`` (required: a ``str.format`` template over the function's
    arguments, or a callable taking them by keyword, returning the queue name),
    ``name`` (the action; the function's ``__name__`` by default), ``bind`` (pass the
    Job first), ``timeout`` (or Celery's ``time_limit`` / ``soft_time_limit``),
    ``max_attempts`` (or Celery's ``max_retries``: attempts - 1), ``max_backoff``,
    ``on_exhausted``, ``backoff(job)`` and ``on_failure(job)`` hooks, and
    ``autoretry_for`` (exception classes: only these are retried; any other exception
    ends the job for good at once). Other Celery options raise
    :class:`~queuetopia_celery.UnsupportedOptionError`.
    """

    def __init__(self, qt: Queuetopia) -> None:
        self.qt = qt

    @overload
    def __call__(
        self, *, queue: QueueKey, bind: Literal[False] = False, **options: Unpack[TaskOptions]
    ) -> Callable[[Callable[P, R]], OrderedTask[P, R]]: ...

    @overload
    def __call__(
        self, *, queue: QueueKey, bind: Literal[True], **options: Unpack[TaskOptions]
    ) -> Callable[[Callable[Concatenate[Job, P], R]], BoundOrderedTask[P, R]]: ...

    def __call__(
        self,
        *,
        queue: QueueKey,
        name: str | None = None,
        bind: bool = False,
        timeout: float | dt.timedelta | None = None,
        time_limit: float | dt.timedelta | None = None,
        soft_time_limit: float | dt.timedelta | None = None,
        max_attempts: int | None = None,
        max_retries: int | Literal["unset"] | None = "unset",
        max_backoff: float | dt.timedelta | None = None,
        on_exhausted: str | None = None,
        backoff: BackoffFn | None = None,
        on_failure: FailureFn | None = None,
        autoretry_for: Sequence[type[BaseException]] | None = None,
        **celery_options: Any,
    ) -> Callable[[Callable[..., Any]], Any]:
        qt = self.qt
        refuse(celery_options)
        try:
            options = JobOptions.from_words(
                timeout=timeout,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
                max_attempts=max_attempts,
                max_retries=max_retries,
                max_backoff=max_backoff,
                on_exhausted=on_exhausted,
            )
        except InvalidJobError as exc:
            raise ConfigurationError(str(exc)) from None
        retry_on = None
        if autoretry_for is not None:
            retry_on = tuple(autoretry_for)
            if not all(isinstance(cls, type) and issubclass(cls, BaseException) for cls in retry_on):
                raise ConfigurationError("autoretry_for= must be a sequence of exception classes")

        def decorate(fn: Callable[..., Any]) -> Any:
            if not callable(fn):
                raise ConfigurationError("@qt.task(...) decorates a function")
            action = name if name is not None else getattr(fn, "__name__", None)
            if not isinstance(action, str):
                raise ConfigurationError("give the task a name= (the function has no __name__)")
            cls = BoundOrderedTask if bind else OrderedTask
            task: _OrderedTaskBase[Any, Any] = cls(
                qt, fn, name=action, queue=queue, bind=bind, options=options, autoretry_for=retry_on
            )
            qt.performer(action, backoff=backoff, on_failure=on_failure)(task.perform)
            return task

        return decorate


def wait_for_job(qt: Queuetopia, job: Job | int, *, timeout: float = 60.0) -> Job:
    """Poll ``job`` until it is done, exhausted, aborted or held (an outcome that needs
    nobody but an operator), and return it as it then is: ``job.state``,
    ``job.result`` and ``job.error`` say how it went. Raises
    :class:`~queuetopia_celery.WaitTimeoutError` after ``timeout`` seconds, and
    :class:`~queuetopia_celery.JobNotFoundError` if the job does not exist (its
    transaction was rolled back, or it was purged). For tests and scripts: a
    production caller reads the job later rather than blocking on it."""
    job_id = job.id if isinstance(job, Job) else job
    seconds = validate_duration("timeout", timeout, allow_zero=True)
    deadline = time.monotonic() + seconds
    interval = 0.02
    while True:
        current = qt.get_job(job_id)
        if current is None:
            raise JobNotFoundError(qt.scope, job_id)
        if current.state in _TERMINAL:
            return current
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeoutError(current.id, current.state.value, seconds)
        time.sleep(min(interval, left))
        interval = min(interval * 1.5, 0.5)


__all__ = [
    "UNSUPPORTED",
    "BoundOrderedTask",
    "JobCall",
    "JobOptions",
    "OrderedTask",
    "QueueKey",
    "TaskDecorator",
    "TaskOptions",
    "wait_for_job",
]
