"""``queuetopia-celery demo`` runs to its end by itself and says what it verified."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import REDIS_URL

pytestmark = pytest.mark.acceptance


def run_demo(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUETOPIA_", "QT_TEST_"))}
    run_env["COLUMNS"] = "120"
    run_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", "demo", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=run_env,
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


def test_demo_on_postgresql_and_redis_with_worker_processes(tmp_path, database_url, engine):
    out = run_demo(tmp_path, "--database-url", database_url, "--broker", REDIS_URL)
    check_summary(out)
    assert "2 worker processes" in out.stdout
    # It cleaned up after itself: its scope's rows, its Celery queue and bindings.
    scope = re.search(r"\(scope (demo-\w+)\)", out.stdout)
    assert scope, out.stdout
    assert f"cleaned up: the jobs of scope '{scope.group(1)}'" in " ".join(out.stdout.split())
    with engine.connect() as conn:
        for table in ("queuetopia_jobs", "queuetopia_queues", "queuetopia_leases"):
            count = conn.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE scope = :s"), {"s": scope.group(1)}
            ).scalar()
            assert count == 0, table
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert list(client.scan_iter(match=f"*{scope.group(1)}*")) == []
    finally:
        client.close()


def test_demo_reports_an_unreachable_broker_in_one_line(tmp_path, database_url):
    out = run_demo(tmp_path, "--database-url", database_url, "--broker", "amqp://guest:secret@127.0.0.1:1//")
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot use the broker amqp://guest:**@127.0.0.1:1//: ")
    assert "Connection refused" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "secret" not in out.stdout + out.stderr


def test_demo_reports_a_worker_that_dies_in_one_line_with_its_cause(tmp_path, database_url):
    # The workers (only they have the demo's scope in their environment) cannot import
    # `packaging`, which kombu's Redis transport needs: the missing dependency.
    inject = tmp_path.parent / f"{tmp_path.name}-inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('QUEUETOPIA_DEMO_SCOPE'):\n    sys.modules['packaging'] = None\n"
    )
    out = run_demo(
        tmp_path, "--database-url", database_url, "--broker", REDIS_URL, env={"PYTHONPATH": str(inject)}
    )
    assert out.returncode == 1, out.stdout
    assert re.match(r"error: demo worker demo\d-demo-\w+ exited with status \d+: ", out.stderr), out.stderr
    assert "ModuleNotFoundError" in out.stderr and "packaging" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_demo_reports_an_unusable_database_in_one_line(tmp_path):
    out = run_demo(tmp_path, "--database-url", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert out.returncode == 1
    assert out.stderr.startswith("error: database error:")
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_live_table_shows_head_jobs_by_id_and_sequence(tmp_path):
    """ "#N" is a job id everywhere (as in the CLI's status); the place in the queue is "seq N"."""
    from rich.console import Console

    from queuetopia_celery import demo

    _, qt = demo.build("demo-table", database_url=f"sqlite:///{tmp_path}/demo.db", broker="memory://")
    try:
        qt.migrate()
        qt.create_job("mailbox-ada", "step", {"step": "skipped"})
        qt.create_jobs([{"queue": q, "action": "step", "params": p} for q, ps in demo.PLAN for p in ps])
        console = Console(record=True, width=200)
        console.print(demo._render(qt))
        table = console.export_text()
        assert "#2 (seq 1) open" in table  # account-7's first job is job 2
        assert "#1 (seq 1) skipped" in table
    finally:
        qt.engine.dispose()
