"""OpenTelemetry tracing of jobs, across the database hop (optional: the ``tracing``
extra installs ``opentelemetry-api``; without it every function here does nothing).

* ``create_jobs`` runs in a ``queuetopia.create`` span (kind PRODUCER), and the trace
  context current inside it (that span, child of the caller's) is stored with each job
  (``trace_context``, the propagation fields the configured propagator writes: W3C
  ``traceparent``, ``tracestate``, baggage).
* Each attempt runs in a ``queuetopia.attempt`` span (kind CONSUMER) whose parent is
  that stored context, whoever dispatched the job and however late (a kick after the
  commit, the scan minutes later, a retry after a backoff): the job's attempts belong to
  the trace of the code that created it. A ``queuetopia.wait`` span before it covers the
  time from when the job was due to when its attempt started. When a span is current in
  the worker (``opentelemetry-instrumentation-celery``'s span of the perform task), the
  attempt span links to it, so that the Celery trace and the job's trace lead to each
  other.
* A lost attempt (its worker died) is recorded by the scan as a ``queuetopia.attempt``
  span from its start to its discovery, with outcome ``lost``.

Attributes: ``queuetopia.scope``, ``queuetopia.queue``, ``queuetopia.action``,
``queuetopia.job_id``, ``queuetopia.attempt``, ``queuetopia.outcome`` (``succeeded``,
``failed``, ``exhausted``, ``lost``), and the messaging conventions' ``messaging.system``
(``queuetopia``) and ``messaging.destination.name`` (the queue).

The library only uses the OpenTelemetry API: spans are recorded once the application
configures an SDK (a ``TracerProvider``), in the producer and in the worker processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from .jobs import Job, NewJob

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - without the tracing extra
    otel_context = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

#: The instrumentation scope's name (the tracer's).
TRACER_NAME = "queuetopia_celery"
#: The outcome of an attempt, as the ``queuetopia.outcome`` attribute and the
#: ``outcome`` label of ``queuetopia_attempts_total`` say it.
OUTCOMES = ("succeeded", "failed", "exhausted", "lost")

P = ParamSpec("P")


class _Scoped(Protocol):
    scope: str


S = TypeVar("S", bound=_Scoped)
R = TypeVar("R")


def enabled() -> bool:
    """Whether ``opentelemetry-api`` is installed."""
    return trace is not None


_TRACER: Any = None


def _tracer() -> Any:
    """Our tracer (a proxy until the application sets its provider, then the real one)."""
    global _TRACER
    if _TRACER is None:
        _TRACER = trace.get_tracer(TRACER_NAME)
    return _TRACER


def _configured() -> bool:
    """Whether the application has set a tracer provider (an SDK): without one no span
    is ever recorded, and an attempt skips the work of making them."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _ns(when: dt.datetime) -> int:
    return int(when.timestamp() * 1e9)


def _attributes(scope: str, job: Job) -> dict[str, Any]:
    return {
        "messaging.system": "queuetopia",
        "messaging.destination.name": job.queue,
        "queuetopia.scope": scope,
        "queuetopia.queue": job.queue,
        "queuetopia.action": job.action,
        "queuetopia.job_id": job.id,
        "queuetopia.attempt": job.attempts,
    }


# --------------------------------------------------------------------------- creating jobs


def traced_create(
    create: Callable[Concatenate[S, P], R],
) -> Callable[Concatenate[S, P], R]:
    """Run ``Queuetopia.create_jobs`` in a ``queuetopia.create`` span."""
    if trace is None:  # pragma: no cover - without the tracing extra
        return create

    def traced(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if not _configured():
            return create(self, *args, **kwargs)
        with _tracer().start_as_current_span(
            "queuetopia.create",
            kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "queuetopia", "queuetopia.scope": self.scope},
        ) as span:
            created = create(self, *args, **kwargs)
            if span.is_recording() and isinstance(created, list) and created:
                span.set_attribute("queuetopia.jobs", len(created))
            # With create_jobs(returning="ids" | None) there are no jobs to describe.
            if span.is_recording() and isinstance(created, list) and created and isinstance(created[0], Job):
                span.set_attribute("queuetopia.jobs", len(created))
                queues = {job.queue for job in created}
                actions = {job.action for job in created}
                span.set_attribute("queuetopia.queues", len(queues))
                if len(queues) == 1:
                    span.set_attribute("queuetopia.queue", created[0].queue)
                    span.set_attribute("messaging.destination.name", created[0].queue)
                if len(actions) == 1:
                    span.set_attribute("queuetopia.action", created[0].action)
                if len(created) == 1:
                    span.set_attribute("queuetopia.job_id", created[0].id)
            return created

    functools.update_wrapper(traced, create)
    return traced


def current_context() -> dict[str, str] | None:
    """The propagation fields of the span current here, or None when there is none."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def stamp(specs: Sequence[NewJob]) -> list[NewJob]:
    """``specs`` carrying the trace context current here (see :func:`current_context`);
    a spec given its own context keeps it."""
    carrier = current_context()
    if carrier is None:
        return list(specs)
    return [
        spec if spec.trace_context else dataclasses.replace(spec, trace_context=carrier) for spec in specs
    ]


# --------------------------------------------------------------------------- attempts


@dataclasses.dataclass
class AttemptSpan:
    """The span of one attempt, current while the performer runs (its own spans are
    its children)."""

    span: Any = None
    token: Any = None

    def end(self, outcome: str | None, error: str | None = None, exc: BaseException | None = None) -> None:
        span = self.span
        if span is None:
            return
        try:
            if outcome is not None:
                span.set_attribute("queuetopia.outcome", outcome)
                if outcome != "succeeded":
                    span.set_status(trace.Status(trace.StatusCode.ERROR, _first_line(error)))
            elif exc is not None:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            span.end()
        finally:
            if self.token is not None:
                otel_context.detach(self.token)
                self.token = None


def _parent(job: Job) -> Any:
    """The context stored with the job (None: the current one)."""
    return propagate.extract(job.trace_context) if job.trace_context else None


def start_attempt(scope: str, job: Job) -> AttemptSpan:
    """Start the span of ``job``'s attempt (just begun) and make it current; record the
    wait before it. Call :meth:`AttemptSpan.end` when the attempt ends."""
    if trace is None or not _configured():
        return AttemptSpan()
    tracer = _tracer()
    parent = _parent(job)
    attributes = _attributes(scope, job)
    links = []
    if parent is not None:
        here = trace.get_current_span().get_span_context()
        if here.is_valid:
            links.append(trace.Link(here, {"queuetopia.link": "worker task"}))
    started = job.attempted_at
    if started is not None and started > job.due_at:
        wait = tracer.start_span(
            "queuetopia.wait", context=parent, kind=trace.SpanKind.INTERNAL, attributes=attributes,
            start_time=_ns(job.due_at),
        )  # fmt: skip
        wait.end(end_time=_ns(started))
    span = tracer.start_span(
        "queuetopia.attempt", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes, links=links
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    return AttemptSpan(span, token)


def lost_attempt(scope: str, job: Job) -> None:
    """Record the span of an attempt whose worker died, from its start until now."""
    if trace is None or not _configured():
        return
    start = job.attempted_at
    span = _tracer().start_span(
        "queuetopia.attempt",
        context=_parent(job),
        kind=trace.SpanKind.CONSUMER,
        attributes={**_attributes(scope, job), "queuetopia.outcome": "lost"},
        start_time=None if start is None else _ns(start),
    )
    span.set_status(trace.Status(trace.StatusCode.ERROR, "the worker died or was killed (its lease expired)"))
    span.end()


def _first_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else None
