"""``queuetopia-celery demo`` runs to its end by itself and says what it verified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

pytestmark = pytest.mark.acceptance


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUETOPIA_", "QT_TEST_"))}
    env["COLUMNS"] = "120"
    return subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", "demo", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=tmp_path,
        check=False,
    )


def check_summary(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert "12/12 jobs run in 14 attempts" in out.stdout  # the failing job took 3 attempts
    for queue in ("account-7", "account-42", "mailbox-ada"):
        assert f"{queue}: one job at a time, in creation order: ok" in out.stdout
    assert "wall time" in out.stdout
    assert "Traceback" not in out.stderr


def test_demo_needs_no_server_and_no_configuration(tmp_path):
    out = run_demo(tmp_path)
    check_summary(out)
    assert "sqlite:///" in out.stdout
    assert list(tmp_path.iterdir()) == []  # its SQLite file lived in a temporary directory


def test_demo_on_postgresql_and_redis_with_worker_processes(tmp_path, database_url):
    out = run_demo(tmp_path, "--database-url", database_url, "--broker", REDIS_URL)
    check_summary(out)
    assert "2 worker processes" in out.stdout


def test_demo_reports_an_unusable_database_in_one_line(tmp_path):
    out = run_demo(tmp_path, "--database-url", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert out.returncode == 1
    assert out.stderr.startswith("error: database error:")
    assert len(out.stderr.strip().splitlines()) == 1
