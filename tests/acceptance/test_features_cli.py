"""Issue 12's features from the CLI (a real subprocess) and with real ``celery worker``
processes: pause and resume, bulk retry and abort, explain, unique jobs."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import Job, JobState, Queuetopia
from tests.conftest import events, wait_for

pytestmark = pytest.mark.acceptance

UTC = dt.timezone.utc
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(database_url: str, scope: str) -> Run:
    def run(*args: str, url: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUETOPIA_")}
        command = [sys.executable, "-m", "queuetopia_celery", "--database-url", url or database_url]
        return subprocess.run(
            [*command, "--scope", scope, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
            cwd=cwd,
        )

    return run


def state(qt: Queuetopia, job: Job) -> JobState:
    found = qt.get_job(job.id)
    assert found is not None
    return found.state


def test_a_queue_paused_while_its_job_runs_finishes_that_job_and_starts_no_other(
    qt, engine, scope, start_worker, cli
):
    start_worker(concurrency=2, beat=True)
    running = qt.create_job("q", "work", {"sleep": 3})
    following = qt.create_job("q", "work")
    wait_for(
        lambda: any(e["job_id"] == running.id for e in events(engine, scope)),
        timeout=30,
        message="the first job to start",
    )
    out = cli("pause", "q")
    assert out.returncode == 0, out.stderr
    assert "queue 'q' paused: its running job (if any) finishes" in out.stdout
    again = cli("pause", "q")
    assert again.returncode == 0 and "already paused: nothing changed" in again.stdout
    wait_for(lambda: state(qt, running) is JobState.DONE, timeout=30, message="the running job to finish")
    # A job that only a scan can start (scheduled after the first job ended) runs in
    # another queue: by then the hand-on and at least one scan have passed over 'q'.
    probe = qt.create_job("probe", "work", scheduled_at=dt.datetime.now(UTC) + dt.timedelta(seconds=1.5))
    wait_for(lambda: state(qt, probe) is JobState.DONE, timeout=30, message="the probe to run")
    assert state(qt, following) is JobState.AVAILABLE
    assert not any(e["job_id"] == following.id for e in events(engine, scope))
    status = cli("status", "--queue", "q")
    assert "PAUSED" in status.stdout, status.stdout
    explained = cli("explain", "q")
    assert explained.stdout.startswith(f"Queue 'q' is paused: job #{following.id} waits for `resume`."), (
        explained.stdout
    )
    assert qt.resume_queue("q") is True  # wakes the queue at once
    wait_for(lambda: state(qt, following) is JobState.DONE, timeout=30, message="the next job after resume")


def test_unique_jobs_with_a_real_worker_run_once_per_open_key(qt, start_worker):
    start_worker(concurrency=2)
    first = qt.create_job("q", "work", {"sleep": 1}, unique_key="report-2026-11")
    assert qt.create_job("q", "work", unique_key="report-2026-11").id == first.id
    wait_for(lambda: state(qt, first) is JobState.DONE, timeout=30, message="the unique job to run")
    second = qt.create_job("q", "work", unique_key="report-2026-11")
    assert second.id != first.id
    wait_for(lambda: state(qt, second) is JobState.DONE, timeout=30, message="the second unique job to run")


def _oqt(url: str, scope: str) -> Queuetopia:
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
    return Queuetopia(scope, app=app, database_url=url, disabled=True)


def _set(qt: Queuetopia, sql: str) -> None:
    with qt.engine.begin() as conn:
        conn.execute(sa.text(sql), {"s": qt.scope})


def test_cli_pause_resume_bulk_retry_and_abort(backend_url, scope, cli):
    url = backend_url
    oqt = _oqt(url, scope)
    oqt.migrate()
    try:
        out = cli("pause", "nowhere", url=url)
        assert out.returncode == 1
        assert (
            out.stderr.strip()
            == f"error: no queue 'nowhere' in scope '{scope}' (no job was ever created in it)"
        )
        jobs = oqt.create_jobs([{"queue": "q", "action": "charge", "max_attempts": 1} for _ in range(3)])
        oqt.create_job("other", "charge")
        assert cli("pause", "q", url=url).returncode == 0
        resumed = cli("resume", "q", url=url)
        assert resumed.returncode == 0 and "queue 'q' resumed" in resumed.stdout
        assert "was not paused: nothing changed" in cli("resume", "q", url=url).stdout

        _set(
            oqt,
            "UPDATE queuetopia_jobs SET status = 'exhausted', attempts = 1 WHERE scope = :s AND queue = 'q'",
        )
        refused = cli("retry", url=url)
        assert refused.returncode == 2 and "--all for the whole scope" in refused.stderr
        both = cli("retry", str(jobs[0].id), "--queue", "q", url=url)
        assert both.returncode == 2 and "not both" in both.stderr
        dry = cli("retry", "--queue", "q", "--dry-run", url=url)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines()[:2] == [
            "would retry 1 job(s) of queue 'q' (exhausted, held, retrying) (dry run: nothing changed)",
            "skipped 2: exhausted jobs whose queue has run later jobs (they would run out of order; "
            "--force retries them)",
        ]
        assert state(oqt, jobs[2]) is JobState.EXHAUSTED
        forced = cli("retry", "--queue", "q", "--state", "exhausted", "--force", url=url)
        assert forced.stdout.startswith("retried 3 job(s) of queue 'q' (exhausted)"), forced.stdout
        assert all(state(oqt, job) is JobState.RETRYING for job in jobs)

        aborted = cli("abort", "--queue", "q", "--reason", "bad batch", url=url)
        assert aborted.stdout.startswith("aborted 3 job(s) of queue 'q'"), aborted.stdout
        assert all(state(oqt, job) is JobState.ABORTED for job in jobs)
        refused = cli("abort", "--reason", "x", url=url)
        assert refused.returncode == 2
        everything = cli("abort", "--all", "--reason", "shutting down", "--dry-run", url=url)
        assert everything.stdout.startswith("would abort 1 job(s) of the whole scope"), everything.stdout
        # The single-job forms still work.
        single = oqt.create_job("single", "charge")
        assert cli("abort", str(single.id), "--reason", "no", url=url).returncode == 0
        assert state(oqt, single) is JobState.ABORTED
    finally:
        oqt.engine.dispose()


def test_cli_explain_with_and_without_the_app(database_url, scope, cli, tmp_path):
    oqt = _oqt(database_url, scope)
    try:
        unknown = cli("explain", "nowhere")
        assert unknown.returncode == 0
        assert unknown.stdout.startswith("Queue 'nowhere' does not exist")
        job = oqt.create_job("q", "charge")
        out = cli("explain", "q")
        lines = out.stdout.splitlines()
        assert lines[0] == f"Queue 'q' is due: job #{job.id} starts at the next scan or kick.", out.stdout
        assert "  - cannot tell whether a performer is registered for 'charge'" in out.stdout
        (tmp_path / "opsapp.py").write_text(
            textwrap.dedent(
                f"""
                from celery import Celery
                from queuetopia_celery import Queuetopia

                qt = Queuetopia({scope!r}, app=Celery("ops", broker="memory://"),
                                database_url={database_url!r}, disabled=True)

                @qt.performer("refund")
                def refund(job):
                    return None
                """
            )
        )
        out = cli("explain", "q", "--app", "opsapp:qt", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(
            f"Queue 'q' cannot run job #{job.id}: no performer is registered for action 'charge'."
        ), out.stdout
        data: dict[str, Any] = json.loads(cli("explain", "q", "--json").stdout)
        assert data["reason"] == "waiting_for_dispatch" and data["head"]["id"] == job.id
        bad = cli("explain", "q", "--app", "opsapp:nothing", cwd=tmp_path)
        assert bad.returncode == 2 and "not a Queuetopia" in bad.stderr
    finally:
        oqt.engine.dispose()
