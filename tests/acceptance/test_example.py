"""The README's quick start, run for real: examples/mailapp.py with a worker and beat."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from queuetopia_celery import JobState
from tests.conftest import REDIS_URL, ROOT, Proc, wait_for

pytestmark = pytest.mark.acceptance


def test_example_app_runs_each_customers_mails_in_order(
    database_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": REDIS_URL}
    worker = Proc(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "examples.mailapp",
            "worker",
            "-B",
            "-c",
            "2",
            "-s",
            str(tmp_path / "schedule"),
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ],
        env,
        tmp_path / "worker.log",
        tmp_path / "never",
    )
    try:
        wait_for(lambda: "ready." in worker.output(), timeout=60, message="example worker ready")
        produced = subprocess.run(
            [sys.executable, "-m", "examples.mailapp", "produce", "12"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert produced.returncode == 0, produced.stderr
        assert "created 12 jobs in 3 queues" in produced.stdout

        from celery import Celery

        from queuetopia_celery import Queuetopia

        mail = Queuetopia("mail", app=Celery("reader"), engine=engine, disabled=True)

        def done() -> bool:
            return len(mail.list_jobs(state=JobState.DONE)) == 12

        wait_for(done, timeout=60, message="12 example jobs done")
        for customer in ("customer-0", "customer-1", "customer-2"):
            jobs = sorted(mail.list_jobs(queue=customer), key=lambda job: job.sequence)
            assert len(jobs) == 4
            done_times = [job.done_at for job in jobs]
            assert done_times == sorted(done_times), customer
            assert all(job.result == {"status": "sent"} for job in jobs)
        # "#N" is a job id everywhere (as in the CLI); the queue's sequence is "seq N".
        first = min(mail.list_jobs(queue="customer-0"), key=lambda job: job.sequence)
        assert f"sending job #{first.id} (seq 1 of customer-0) to customer-0@example.com" in worker.output()
    finally:
        worker.stop()
