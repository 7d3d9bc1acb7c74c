"""``queuetopia-celery metrics`` as a real subprocess: ``--once``, and its errors in one
line (no database, a port taken, bad options), never showing a password."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from queuetopia_celery import Queuetopia

pytestmark = pytest.mark.acceptance


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUETOPIA_", "PROMETHEUS_"))}
    return subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_once_prints_the_gauges_of_the_scope(database_url: str, scope: str) -> None:
    qt = Queuetopia(scope, app=Celery(f"t-{uuid.uuid4().hex[:6]}"), database_url=database_url, disabled=True)
    qt.create_jobs([{"queue": f"q{i % 3}", "action": "a"} for i in range(7)])
    qt.engine.dispose()
    done = run("--database-url", database_url, "--scope", scope, "metrics", "--once", "--top-queues", "2")
    assert done.returncode == 0, done.stderr
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(done.stdout)
        for s in family.samples
    }
    assert found[("queuetopia_open_jobs", (("scope", scope), ("state", "available")))] == 7
    assert found[("queuetopia_queues_open", (("scope", scope),))] == 3
    assert found[("queuetopia_queue_open_jobs", (("queue", "q0"), ("scope", scope)))] == 3
    assert len([key for key in found if key[0] == "queuetopia_queue_open_jobs"]) == 2


def test_errors_are_one_line_and_hide_the_password(database_url: str, scope: str, tmp_path: Path) -> None:
    missing = run("--database-url", f"sqlite:///{tmp_path / 'none.db'}", "--scope", "s", "metrics", "--once")
    assert missing.returncode == 1 and missing.stderr.startswith("error: no SQLite database at")
    unmigrated = f"sqlite:///{tmp_path / 'empty.db'}"
    sa.create_engine(unmigrated).connect().close()
    empty = run("--database-url", unmigrated, "--scope", "s", "metrics", "--once")
    assert empty.returncode == 1 and "migrate" in empty.stderr and len(empty.stderr.splitlines()) == 1
    url = sa.engine.make_url(database_url).set(password="s3cret-pw", database="qt_no_such_db")
    secret = run("--database-url", url.render_as_string(hide_password=False), "--scope", "s", "metrics")
    assert secret.returncode == 1 and secret.stderr.startswith("error: ")
    assert "s3cret-pw" not in secret.stderr + secret.stdout
    bad = run("--database-url", database_url, "--scope", scope, "metrics", "--top-queues", "-1")
    assert bad.returncode == 2 and "--top-queues" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run("--database-url", database_url, "--scope", scope, "metrics", "--host", "127.0.0.1",
                   "--port", str(port))  # fmt: skip
    assert busy.returncode == 1 and busy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
