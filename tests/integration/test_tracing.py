"""Tracing in one process (the drain runs the worker's steps here), with the
OpenTelemetry SDK's in-memory exporter: the caller's trace is stored with each job and
continued by its attempts; spans for create, each attempt (outcome attributes) and the
wait; a lost attempt; and the attempt counters in prometheus_client's registry."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from queuetopia_celery import Job, Queuetopia, schema
from queuetopia_celery.backends.base import LostAttempt


class Capture(InMemorySpanExporter):
    """Keeps spans only while a test asks for them (the provider outlives the tests that
    set it: spans of later tests are dropped, not piled up in memory)."""

    capturing = False

    def export(self, spans: Any) -> Any:
        if not self.capturing:
            return super().export([])
        return super().export(spans)


_EXPORTER = Capture()


def install_exporter(exporter: Any) -> None:
    """Send this process's spans to ``exporter`` (the global provider is set once per
    process; later callers add their processor to it). Once per exporter: a module that
    imports this one's fixtures defines them a second time, and a second processor
    would export every span twice."""
    if getattr(exporter, "installed", False):
        return
    exporter.installed = True
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))


@pytest.fixture(scope="session")
def spans_exporter() -> Capture:
    install_exporter(_EXPORTER)
    return _EXPORTER


@pytest.fixture
def spans(spans_exporter: Capture) -> Iterator[Capture]:
    spans_exporter.clear()
    spans_exporter.capturing = True
    yield spans_exporter
    spans_exporter.capturing = False
    spans_exporter.clear()


@pytest.fixture
def qt(backend_url: str, scope: str) -> Iterator[Queuetopia]:
    qt = Queuetopia(scope, app=Celery(f"t-{uuid.uuid4().hex[:6]}"), database_url=backend_url, disabled=True)
    qt.migrate()
    calls: dict[int, int] = {}

    @qt.performer("flaky", backoff=lambda job: 0.0)
    def flaky(job: Job) -> dict[str, str]:
        """Fails its first attempt; inside, a span of the user's own."""
        with trace.get_tracer("user").start_as_current_span("user work"):
            calls[job.id] = calls.get(job.id, 0) + 1
            if calls[job.id] == 1:
                raise RuntimeError("first try fails")
        return {"ok": "yes"}

    @qt.performer("doomed")
    def doomed(job: Job) -> None:
        raise RuntimeError("never works")

    yield qt
    qt.engine.dispose()


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


def attempts_counted(scope: str, action: str, outcome: str) -> float:
    found = REGISTRY.get_sample_value(
        "queuetopia_attempts_total", {"scope": scope, "action": action, "outcome": outcome}
    )
    return found or 0.0


def test_a_job_given_its_own_trace_context_keeps_it_inside_another_trace(qt, spans):
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    with trace.get_tracer("test").start_as_current_span("somewhere else"):
        spec = dataclasses.replace(qt.job_spec("order-2", "flaky", {}), trace_context=carrier)
        (job,) = qt.create_jobs([spec])
        other = qt.create_job("order-3", "flaky", {})
    assert qt.get_job(job.id).trace_context == carrier
    assert qt.get_job(other.id).trace_context not in (None, carrier)


def test_attempts_continue_the_trace_of_the_code_that_created_the_job(qt, spans):
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("checkout") as root:
        job = qt.create_job("order-1", "flaky", {"n": 1})
    stored = qt.get_job(job.id)
    assert stored is not None and stored.trace_context is not None
    assert f"{root.get_span_context().trace_id:032x}" in stored.trace_context["traceparent"]
    (create,) = named(spans, "queuetopia.create")
    assert create.parent is not None and create.parent.span_id == root.get_span_context().span_id
    assert create.kind is trace.SpanKind.PRODUCER
    assert (
        create.attributes["queuetopia.queue"] == "order-1"
        and create.attributes["queuetopia.job_id"] == job.id
    )

    # Outside of any span now: the worker's steps run later, elsewhere.
    assert qt.drain(with_scheduled=True).attempted == 2
    attempts = sorted(named(spans, "queuetopia.attempt"), key=lambda s: s.attributes["queuetopia.attempt"])
    assert [(s.attributes["queuetopia.attempt"], s.attributes["queuetopia.outcome"]) for s in attempts] == [
        (1, "failed"),
        (2, "succeeded"),
    ]
    for span in attempts:
        assert span.context.trace_id == root.get_span_context().trace_id
        assert span.parent is not None and span.parent.span_id == create.context.span_id
        assert span.kind is trace.SpanKind.CONSUMER
        assert span.attributes["queuetopia.scope"] == qt.scope
        assert span.attributes["queuetopia.action"] == "flaky"
        assert span.attributes["queuetopia.job_id"] == job.id
    assert attempts[0].status.status_code is trace.StatusCode.ERROR
    assert "first try fails" in (attempts[0].status.description or "")
    # The performer's own spans are children of its attempt's span.
    user = named(spans, "user work")
    assert {s.parent.span_id for s in user if s.parent} == {s.context.span_id for s in attempts}


def test_the_wait_from_due_to_start_is_a_span_of_its_own(qt, spans):
    with trace.get_tracer("test").start_as_current_span("producer"):
        job = qt.create_job(
            "q", "flaky", scheduled_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
        )
    qt.drain(with_scheduled=True)
    waits = named(spans, "queuetopia.wait")
    first = [w for w in waits if w.attributes["queuetopia.attempt"] == 1]
    assert len(first) == 1
    stored = qt.get_job(job.id)
    assert stored is not None
    seconds = (first[0].end_time - first[0].start_time) / 1e9
    assert seconds >= 5  # due 5 s before it was even created


def test_a_job_created_outside_any_trace_starts_one_at_its_create_span(qt, spans):
    job = qt.create_job("q", "doomed", max_attempts=1)
    (create,) = named(spans, "queuetopia.create")
    assert create.parent is None
    stored = qt.get_job(job.id)
    assert stored is not None and stored.trace_context is not None
    qt.drain()
    (attempt,) = named(spans, "queuetopia.attempt")
    assert attempt.attributes["queuetopia.outcome"] == "exhausted"
    assert attempt.context.trace_id == create.context.trace_id


def test_without_a_recording_tracer_nothing_is_stored(qt, spans, monkeypatch):
    from queuetopia_celery import tracing

    monkeypatch.setattr(tracing, "_tracer", trace.NoOpTracer)
    job = qt.create_job("q", "doomed", max_attempts=1)
    stored = qt.get_job(job.id)
    assert stored is not None and stored.trace_context is None


def test_the_counters_count_each_attempt_by_outcome(qt, spans):
    before = {o: attempts_counted(qt.scope, a, o) for a, o in (("flaky", "failed"), ("flaky", "succeeded"))}
    qt.create_job("a", "flaky")
    qt.create_job("b", "doomed", max_attempts=2)
    qt.drain(with_scheduled=True)
    assert attempts_counted(qt.scope, "flaky", "failed") == before["failed"] + 1
    assert attempts_counted(qt.scope, "flaky", "succeeded") == before["succeeded"] + 1
    assert attempts_counted(qt.scope, "doomed", "failed") == 1
    assert attempts_counted(qt.scope, "doomed", "exhausted") == 1
    labels = {"scope": qt.scope, "action": "flaky"}
    assert REGISTRY.get_sample_value("queuetopia_attempt_duration_seconds_count", labels) == 2
    assert REGISTRY.get_sample_value("queuetopia_attempt_wait_seconds_count", labels) == 2


def test_a_lost_attempt_is_a_span_and_a_count(qt, spans):
    with trace.get_tracer("test").start_as_current_span("producer") as root:
        job = qt.create_job("q", "flaky")
    (lease,) = qt.backend.kick(["q"], grace=30)
    started = qt.backend.start("q", job.id, lease.token, worker="dead/1", lease=30)
    assert started is not None
    qt.perform_runner._record_lost(LostAttempt(started, lease.token))
    (lost,) = named(spans, "queuetopia.attempt")
    assert lost.attributes["queuetopia.outcome"] == "lost"
    assert lost.context.trace_id == root.get_span_context().trace_id
    assert attempts_counted(qt.scope, "flaky", "lost") == 1


def test_an_attempt_that_outlived_its_lease_is_counted_once_as_lost(qt, spans, backend_url):
    """The lease runs out while the performer runs and another process's scan records
    the attempt as lost; the worker's late outcome is dropped, and not counted too."""
    other = Queuetopia(
        qt.scope, app=Celery(f"t-{uuid.uuid4().hex[:6]}"), database_url=backend_url, disabled=True
    )

    @qt.performer("overran")
    def overran(job: Job) -> None:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        with other.engine.begin() as conn:
            conn.execute(
                sa.update(schema.leases).where(schema.leases.c.scope == qt.scope).values(expires_at=past)
            )
        other.perform_runner.scan()  # records the attempt as lost

    job = qt.create_job("q", "overran")
    (lease,) = qt.backend.kick(["q"], grace=30)
    try:
        assert qt.perform_runner.perform("q", job.id, lease.token, hostname="slow", time_limit=None) == 1
    finally:
        other.engine.dispose()
    assert qt.get_job(job.id).attempts == 1
    assert "did not finish" in (qt.get_job(job.id).error or "")  # the scan's record stands
    assert attempts_counted(qt.scope, "overran", "lost") == 1
    assert attempts_counted(qt.scope, "overran", "succeeded") == 0


def test_jobs_created_from_a_create_message_carry_the_trace_current_in_the_worker(qt, spans):
    from queuetopia_celery.create_task import create_from_message

    with trace.get_tracer("test").start_as_current_span("celery task run") as run:
        (job_id,) = [create_from_message(qt, f"m-{uuid.uuid4().hex[:6]}", {"queue": "q", "action": "flaky"})]
    stored = qt.get_job(int(job_id))  # type: ignore[arg-type]
    assert stored is not None and stored.trace_context is not None
    assert f"{run.get_span_context().trace_id:032x}" in stored.trace_context["traceparent"]
