"""The Prometheus gauges read from the database, on every backend: what each one says
about a scope with jobs in every state, the per-queue series, and their exposition
(collector, real HTTP scrapes of :func:`metrics.serve` and of the ASGI app mounted in
FastAPI under uvicorn)."""

from __future__ import annotations

import datetime as dt
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from queuetopia_celery import Job, Queuetopia, metrics
from queuetopia_celery.backends import open_backend
from tests.conftest import wait_for

UTC = dt.timezone.utc


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def make_qt(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(scope_: str | None = None) -> Queuetopia:
        qt = Queuetopia(scope_ or scope, app=Celery(f"t-{uuid.uuid4().hex[:6]}"), database_url=backend_url,
                        disabled=True)  # fmt: skip
        qt.migrate()

        @qt.performer("fail")
        def fail(job: Job) -> None:
            raise RuntimeError("card declined")

        @qt.performer("ok")
        def ok(job: Job) -> None:
            return None

        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def seeded(qt: Queuetopia) -> None:
    """Queues: ``retrying`` (head failed once, one job behind it), ``held`` (head
    failed its only attempt, held), ``busy`` (3 available jobs, paused), ``later``
    (scheduled tomorrow), ``running`` (head started, one behind it)."""
    qt.create_job("retrying", "fail", max_attempts=5)
    qt.create_job("held", "fail", max_attempts=1, on_exhausted="hold")
    assert qt.drain().attempted == 2
    qt.create_job("retrying", "ok")
    qt.create_jobs([{"queue": "busy", "action": "ok"}] * 3)
    qt.pause_queue("busy")
    qt.create_job("later", "ok", scheduled_at=dt.datetime.now(UTC) + dt.timedelta(days=1))
    first = qt.create_job("running", "ok")
    qt.create_job("running", "ok")
    (lease,) = qt.backend.kick(["running"], grace=30)
    assert qt.backend.start("running", first.id, lease.token, worker="test/1", lease=30) is not None


def test_the_gauges_say_how_many_jobs_are_in_each_state_and_which_queues_are_stuck(make_qt):
    qt = make_qt()
    other = make_qt(f"other-{uuid.uuid4().hex[:6]}")
    other.create_job("elsewhere", "ok")  # another scope: not counted
    empty = qt.backend.scope_gauges()
    assert empty.open_jobs == dict.fromkeys(["available", "scheduled", "running", "retrying", "held"], 0)
    assert (empty.queues_open, empty.queues_blocked, empty.oldest_due_age, empty.longest_blocked) == (
        0,
        0,
        0,
        0,
    )
    began = dt.datetime.now(UTC)
    seeded(qt)
    gauges = qt.backend.scope_gauges()
    elapsed = (dt.datetime.now(UTC) - began).total_seconds()
    assert gauges.open_jobs == {"available": 5, "scheduled": 1, "running": 1, "retrying": 1, "held": 1}
    assert gauges.queues_open == 5
    assert gauges.queues_blocked == 2  # retrying and held; not the paused one
    assert gauges.queues_paused == 1
    # The job behind the failing head (and the paused queue's) have been due since created.
    assert 0 < gauges.oldest_due_age <= elapsed + 1
    # Both failing heads block since they were created (no job before them).
    assert 0 < gauges.longest_blocked <= elapsed + 1
    assert gauges.top_open == [] and gauges.top_blocked == []


def test_per_queue_series_only_for_the_top_queues_asked_for(make_qt):
    qt = make_qt()
    seeded(qt)
    gauges = qt.backend.scope_gauges(top_queues=2)
    assert gauges.top_open == [("busy", 3), ("retrying", 2)]  # then running (2) by name
    assert [queue for queue, _ in gauges.top_blocked] in (["retrying", "held"], ["held", "retrying"])
    assert gauges.top_blocked[0][1] == gauges.longest_blocked
    text = generate_latest(metrics.make_registry(qt, top_queues=2)).decode()
    found = samples(text)
    assert value(found, "queuetopia_queue_open_jobs", scope=qt.scope, queue="busy") == 3
    assert {labels for name, labels in found if name == "queuetopia_queue_open_jobs"} == {
        (("queue", "busy"), ("scope", qt.scope)),
        (("queue", "retrying"), ("scope", qt.scope)),
    }
    # Without top_queues: no per-queue series at all.
    plain = samples(generate_latest(metrics.make_registry(qt)).decode())
    assert not [key for key in plain if key[0].startswith("queuetopia_queue_")]


def test_a_real_http_scrape_serves_every_gauge_of_every_scope(make_qt):
    qt, other = make_qt(), make_qt(f"other-{uuid.uuid4().hex[:6]}")
    seeded(qt)
    other.create_job("q", "ok")
    server, _ = metrics.serve([qt, other], port=0, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            found = samples(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    for state, count in {"available": 5, "scheduled": 1, "running": 1, "retrying": 1, "held": 1}.items():
        assert value(found, "queuetopia_open_jobs", scope=qt.scope, state=state) == count
    assert value(found, "queuetopia_open_jobs", scope=other.scope, state="available") == 1
    assert value(found, "queuetopia_queues_open", scope=qt.scope) == 5
    assert value(found, "queuetopia_queues_blocked", scope=qt.scope) == 2
    assert value(found, "queuetopia_queues_paused", scope=qt.scope) == 1
    assert value(found, "queuetopia_oldest_due_job_age_seconds", scope=qt.scope) > 0
    assert value(found, "queuetopia_longest_blocked_seconds", scope=qt.scope) > 0
    assert value(found, "queuetopia_database_up", scope=qt.scope) == 1


def test_a_scope_whose_database_cannot_be_read_reports_database_up_0(make_qt, tmp_path):
    qt = make_qt()
    missing = Queuetopia("nowhere", app=Celery("t"), database_url=f"sqlite:///{tmp_path / 'none.db'}")
    collector = metrics.QueuetopiaCollector([qt, missing.backend])
    found = samples(generate_latest(metrics.registry_of(collector)).decode())
    assert value(found, "queuetopia_database_up", scope="nowhere") == 0
    assert value(found, "queuetopia_database_up", scope=qt.scope) == 1
    assert ("queuetopia_queues_open", (("scope", "nowhere"),)) not in found
    assert "migrate" in (collector.errors["nowhere"] or "")  # the tables are missing
    missing.engine.dispose()


def test_the_metrics_mount_in_an_asgi_app_served_by_uvicorn(make_qt):
    import threading

    import uvicorn
    from fastapi import FastAPI

    qt = make_qt()
    seeded(qt)
    app = FastAPI()
    app.mount("/metrics", metrics.make_asgi_app(qt, top_queues=1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=20, message="uvicorn to start")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/", timeout=10) as response:
            assert response.status == 200
            found = samples(response.read().decode())
    finally:
        server.should_exit = True
        thread.join(10)
    assert value(found, "queuetopia_open_jobs", scope=qt.scope, state="held") == 1
    assert value(found, "queuetopia_queue_open_jobs", scope=qt.scope, queue="busy") == 3


def test_bad_options_are_refused(make_qt):
    qt = make_qt()
    with pytest.raises(ValueError, match="top_queues"):
        metrics.make_registry(qt, top_queues=-1)
    with pytest.raises(TypeError, match="Queuetopia"):
        metrics.QueuetopiaCollector(["not a queuetopia"])
    assert open_backend(qt.engine, qt.scope).scope_gauges().queues_open == 0
