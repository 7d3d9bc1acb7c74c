"""Metrics and tracing with real processes: a ``celery worker --pool prefork -c 2`` (with
beat) runs the jobs, ``queuetopia-celery metrics`` serves them over HTTP.

* The attempt counters of both prefork children add up (prometheus_client's multiprocess
  mode): the scrape counts exactly the attempts the database recorded.
* A job's attempts continue the trace of the code that created it, also when the scan
  dispatches it seconds later (scheduled, retried), beside
  opentelemetry-instrumentation-celery's own spans (linked to them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from prometheus_client.parser import text_string_to_metric_families

from queuetopia_celery import Queuetopia
from tests.acceptance.test_first_hour import readme_command, substitute
from tests.conftest import REDIS_URL, Proc, wait_for
from tests.integration.test_tracing import spans, spans_exporter  # noqa: F401 (fixtures)

pytestmark = pytest.mark.acceptance

DONE = ("done", "exhausted")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def finished(qt: Queuetopia, ids: list[int]) -> bool:
    return all((job := qt.get_job(i)) is not None and job.status in DONE for i in ids)


@pytest.fixture
def serve_metrics(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start ``queuetopia-celery ... metrics`` (the README's line); returns its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str]) -> str:
        log = tmp_path / f"metrics-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "queuetopia_celery", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)

        def url() -> str | None:
            assert proc.poll() is None, log.read_text()
            found = re.search(r"on (http://\S+/metrics)", log.read_text())
            return found.group(1) if found else None

        return str(wait_for(url, timeout=30, message="the metrics server to listen"))

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def test_prefork_children_counts_add_up_to_the_attempts_the_database_recorded(
    make_qt, start_worker, scope, tmp_path, serve_metrics
):
    export = readme_command("export PROMETHEUS_MULTIPROC_DIR=/var/run/queuetopia-metrics")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    name, _, _ = (
        substitute(export, {"/var/run/queuetopia-metrics": str(multiproc)})
        .removeprefix("export ")
        .partition("=")
    )
    env = {name: str(multiproc)}
    start_worker(concurrency=2, beat=True, env=env)
    qt = make_qt()
    # 12 healthy jobs on 6 queues, 3 jobs failing twice then succeeding, 1 exhausting.
    jobs = qt.create_jobs(
        [{"queue": f"ok-{i % 6}", "action": "work", "params": {"sleep": 0.1}} for i in range(12)]
        + [{"queue": f"flaky-{i}", "action": "fast_retry", "params": {"fail_times": 2}} for i in range(3)]
        + [{"queue": "doomed", "action": "fast_retry", "params": {"fail_times": 9}, "max_attempts": 2}]
    )
    ids = [job.id for job in jobs]
    wait_for(lambda: finished(qt, ids), timeout=90, message="every job to end")
    stored = [qt.get_job(i) for i in ids]
    attempts_in_db = sum(job.attempts for job in stored if job is not None)
    assert attempts_in_db == 12 + 3 * 3 + 2
    # Both prefork children ran attempts (each counted into its own file).
    from tests.conftest import events

    pids = {row["pid"] for row in events(qt.engine, scope)}
    assert len(pids) == 2, f"expected both children to run jobs, got {pids}"

    command = readme_command("queuetopia-celery -A myapp:mail metrics --port 9808 --top-queues 10")
    line = substitute(command, {"myapp:mail": "tests.apps.testapp:qt", "9808": str(free_port())})
    run_env = {
        **os.environ,
        **env,
        "QT_TEST_SCOPE": scope,
        "QT_TEST_DATABASE_URL": str(qt.engine.url.render_as_string(hide_password=False)),
        "QT_TEST_BROKER_URL": REDIS_URL,
        "QT_TEST_CELERY_QUEUE": qt.celery_queue or "",
    }
    url = serve_metrics(line.split()[1:], run_env)
    found = scrape(url)

    def count(action: str, outcome: str) -> float:
        return found.get(
            ("queuetopia_attempts_total", (("action", action), ("outcome", outcome), ("scope", scope))), 0.0
        )

    assert count("work", "succeeded") == 12
    assert count("fast_retry", "succeeded") == 3
    assert count("fast_retry", "failed") == 3 * 2 + 1
    assert count("fast_retry", "exhausted") == 1
    total = sum(v for (name, labels), v in found.items() if name == "queuetopia_attempts_total"
                and ("scope", scope) in labels)  # fmt: skip
    assert total == attempts_in_db
    for histogram in ("queuetopia_attempt_duration_seconds_count", "queuetopia_attempt_wait_seconds_count"):
        counted = sum(
            v for (name, labels), v in found.items() if name == histogram and ("scope", scope) in labels
        )
        assert counted == attempts_in_db
    # And the database's gauges: nothing left open.
    assert found[("queuetopia_queues_open", (("scope", scope),))] == 0
    assert found[("queuetopia_database_up", (("scope", scope),))] == 1


def _spans_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_traced_worker(
    tmp_path: Path, scope: str, database_url: str, celery_queue: str, env: dict[str, str]
) -> Proc:
    ready = tmp_path / "traced-ready"
    args = [
        sys.executable, "-m", "celery", "-A", "tests.apps.tracedapp", "worker", "-P", "prefork", "-c", "2",
        "-Q", celery_queue, "-n", f"traced-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
        "--without-mingle", "--without-gossip", "-B", "-s", str(tmp_path / "traced-beat"),
    ]  # fmt: skip
    run_env = {
        **os.environ,
        "QT_TEST_SCOPE": scope,
        "QT_TEST_DATABASE_URL": database_url,
        "QT_TEST_BROKER_URL": REDIS_URL,
        "QT_TEST_CELERY_QUEUE": celery_queue,
        "QT_TEST_READY_FILE": str(ready),
        "QT_TEST_BEAT_READY_FILE": str(tmp_path / "traced-beat-ready"),
        **env,
    }
    proc = Proc(args, run_env, tmp_path / "traced-worker.log", ready)
    proc.wait_ready()
    return proc


@pytest.mark.parametrize("celery_instrumented", [False, True], ids=["alone", "with-celery-instrumentation"])
def test_attempts_continue_the_creators_trace_even_when_the_scan_dispatches_them(  # noqa: PLR0917
    make_qt,
    scope,
    database_url,
    celery_queue,
    tmp_path,
    spans,  # noqa: F811 (the fixture imported above)
    celery_instrumented,
):
    span_file = tmp_path / "worker-spans.jsonl"
    env = {
        "QT_TEST_SPAN_FILE": str(span_file),
        "QT_TEST_CELERY_INSTRUMENT": "1" if celery_instrumented else "0",
    }
    worker = start_traced_worker(tmp_path, scope, database_url, celery_queue, env)
    try:
        qt = make_qt()
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
        with trace.get_tracer("test").start_as_current_span("checkout") as root:
            now_job = qt.create_job("now", "work")
            scheduled = qt.create_job("later", "work", scheduled_at=later)  # dispatched by the scan
            retried = qt.create_job("retried", "fast_retry", {"fail_times": 1})  # its retry: the scan's
        ids = [now_job.id, scheduled.id, retried.id]
        wait_for(lambda: finished(qt, ids), timeout=60, message="the three jobs to end")

        def attempts() -> list[dict[str, Any]]:
            got = [s for s in _spans_of(span_file) if s["name"] == "queuetopia.attempt"]
            return got if len(got) >= 4 else []

        worker_spans = wait_for(attempts, timeout=20, message="the worker's attempt spans")
    finally:
        worker.stop()
    trace_id = f"{root.get_span_context().trace_id:032x}"
    creates = {
        s.attributes["queuetopia.job_id"]: f"{s.context.span_id:016x}"
        for s in spans.get_finished_spans()
        if s.name == "queuetopia.create"
    }
    by_job: dict[int, list[dict[str, Any]]] = {}
    for span in worker_spans:
        by_job.setdefault(span["attributes"]["queuetopia.job_id"], []).append(span)
    assert sorted(len(by_job[i]) for i in ids) == [1, 1, 2]
    for job_id, job_spans in by_job.items():
        for span in job_spans:
            assert span["trace_id"] == trace_id, "the attempt left the creator's trace"
            assert span["parent_id"] == creates[job_id]
            assert span["kind"] == "CONSUMER"
    outcomes = sorted(s["attributes"]["queuetopia.outcome"] for s in by_job[retried.id])
    assert outcomes == ["failed", "succeeded"]
    # The scheduled job waited for its due time, then for the scan: its wait span says so.
    waits = [s for s in _spans_of(span_file) if s["name"] == "queuetopia.wait"]
    assert [
        s["attributes"]["queuetopia.attempt"]
        for s in waits
        if s["attributes"]["queuetopia.job_id"] == scheduled.id
    ] == [1]
    all_worker = _spans_of(span_file)
    if celery_instrumented:
        runs = {s["span_id"]: s for s in all_worker if s["name"].startswith("run/")}
        assert runs, "opentelemetry-instrumentation-celery recorded no task span"
        for span in worker_spans:
            (link,) = span["links"]
            assert link["span_id"] in runs, "the attempt does not link to the Celery task span"
    else:
        assert all(not s["links"] for s in worker_spans)
        assert not [s for s in all_worker if s["name"].startswith("run/")]
