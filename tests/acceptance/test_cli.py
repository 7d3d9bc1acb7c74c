"""The operator CLI, run as a real subprocess against PostgreSQL (and SQLite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import Job, JobState, Queuetopia

pytestmark = pytest.mark.acceptance


@pytest.fixture
def oqt(database_url: str, scope: str) -> Iterator[Queuetopia]:
    qt = build(database_url, scope)
    yield qt
    qt.engine.dispose()


def build(url: str, scope: str) -> Queuetopia:
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
    qt = Queuetopia(scope, app=app, database_url=url, disabled=True)

    @qt.performer("charge", backoff=lambda job: 600.0)  # the next retry stays in the future
    def charge(job: Job) -> Any:
        if job.params.get("fail"):
            raise RuntimeError("card declined by the bank")
        return {"charged": True}

    return qt


@pytest.fixture
def cli(database_url: str, scope: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(
        *args: str, url: str | None = None, scope_: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUETOPIA_")}
        command = [sys.executable, "-m", "queuetopia_celery"]
        if url is not False:
            command += ["--database-url", url or database_url]
        if scope_ is not False:
            command += ["--scope", scope_ or scope]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, env=env, check=False
        )

    return run


def blocked_setup(qt: Queuetopia) -> tuple[Job, Job]:
    for i in range(3):
        qt.create_job("account-1", "charge", {"i": i})
    bad = qt.create_job("account-2", "charge", {"fail": True})
    after = qt.create_job("account-2", "charge", {})
    qt.drain("account-2")
    return bad, after


def test_status_lists_blocked_queues_first_with_the_error(oqt, cli):
    bad, _ = blocked_setup(oqt)
    out = cli("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "2 queue(s) with jobs, 1 blocked" in lines[0]
    assert lines[1].split()[:3] == ["QUEUE", "STATUS", "PENDING"]
    assert lines[2].split()[:5] == ["account-2", "BLOCKED", "2", f"#{bad.id}", "charge"]
    assert "1/20" in lines[2] and "in " in lines[2]
    assert lines[3].strip().startswith("! blocked for")
    assert "RuntimeError: card declined by the bank" in lines[3]
    assert lines[4].split()[:3] == ["account-1", "waiting", "3"]


def test_status_json_for_scripts(oqt, cli):
    bad, _ = blocked_setup(oqt)
    out = cli("status", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["queue"] for r in rows] == ["account-2", "account-1"]
    assert rows[0]["blocked"] is True and rows[0]["head"]["id"] == bad.id
    assert rows[0]["head"]["error"] == "RuntimeError: card declined by the bank"
    assert rows[1]["pending"] == 3 and rows[1]["blocked"] is False


def test_jobs_and_show(oqt, cli):
    bad, _ = blocked_setup(oqt)
    out = cli("jobs", "--queue", "account-2", "--state", "retrying")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2 and out.stdout.splitlines()[1].split()[0] == str(bad.id)
    out = cli("jobs", "--limit", "2", "--json")
    assert len(json.loads(out.stdout)) == 2
    out = cli("show", str(bad.id))
    assert out.returncode == 0, out.stderr
    assert "state: retrying" in out.stdout and "Traceback (most recent call last)" in out.stdout
    assert json.loads(cli("show", str(bad.id), "--json").stdout)["params"] == {"fail": True}


def test_a_job_is_described_by_its_state_alone(oqt, cli):
    """One word per meaning: the README's ``state``, never the stored ``status`` too."""
    bad, _ = blocked_setup(oqt)
    shown = cli("show", str(bad.id)).stdout
    assert "           state: retrying" in shown.splitlines()
    assert not [line for line in shown.splitlines() if line.strip().startswith("status:")]
    as_json = json.loads(cli("show", str(bad.id), "--json").stdout)
    assert as_json["state"] == "retrying" and "status" not in as_json
    listed = json.loads(cli("jobs", "--json").stdout)
    assert all("state" in job and "status" not in job for job in listed)


def test_retry_of_an_exhausted_job_whose_queue_moved_on_asks_for_force(oqt, cli):
    bad = oqt.create_job("account-9", "charge", {"fail": True}, max_attempts=1)
    later = oqt.create_job("account-9", "charge", {})
    oqt.drain("account-9")
    assert oqt.get_job(later.id).state is JobState.DONE
    out = cli("retry", str(bad.id))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert f"error: cannot retry job {bad.id}: it is exhausted; its queue has moved on" in out.stderr
    assert "--force" in out.stderr and oqt.get_job(bad.id).state is JobState.EXHAUSTED
    out = cli("retry", str(bad.id), "--force")
    assert out.returncode == 0, out.stderr
    oqt.drain("account-9")  # the extra attempt fails again
    # Attempts beyond the maximum (an operator retried the job) read as such.
    row = cli("jobs", "--queue", "account-9").stdout.splitlines()[2]
    assert "2 (max 1)" in row and "2/1" not in row
    shown = cli("show", str(bad.id)).stdout
    assert "attempts: 2 (beyond max_attempts 1: retried by an operator)" in shown


@pytest.fixture
def unmigrated_url() -> Iterator[str]:
    """An empty database, reached with a password (trust authentication ignores it)."""
    from tests.conftest import PG_ADMIN_URL

    name = f"qt_empty_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name, password="s3cret")
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.parametrize(
    "command", [["status"], ["jobs"], ["show", "1"], ["retry", "1"], ["purge", "--older-than", "1d"]]
)
def test_an_unmigrated_database_says_to_run_migrate(cli, unmigrated_url, command):
    out = cli(*command, url=unmigrated_url)
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "the queuetopia tables are missing or out of date" in out.stderr
    assert "run `queuetopia-celery migrate --database-url postgresql+psycopg://postgres:***@" in out.stderr
    assert "s3cret" not in out.stderr


def test_status_on_a_sqlite_file_that_does_not_exist_does_not_create_it(cli, tmp_path: Path):
    path = tmp_path / "typo.db"
    out = cli("status", url=f"sqlite:///{path}")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert f"error: no SQLite database at {path} (the file does not exist)" in out.stderr
    assert "queuetopia-celery migrate --database-url" in out.stderr
    assert not path.exists()


def test_retry_makes_the_job_due_and_says_the_scan_will_start_it(oqt, cli):
    bad, _ = blocked_setup(oqt)
    out = cli("retry", str(bad.id))
    assert out.returncode == 0, out.stderr
    assert f"job {bad.id} of queue 'account-2' is due now" in out.stdout
    assert "next scan" in out.stdout
    job = oqt.get_job(bad.id)
    assert job.next_attempt_at is not None and job.state is JobState.RETRYING
    assert oqt.drain("account-2").failed == 1  # due now: drain runs it at once


def test_abort_moves_the_queue_on(oqt, cli):
    bad, after = blocked_setup(oqt)
    out = cli("abort", str(bad.id), "--reason", "customer refunded by hand")
    assert out.returncode == 0, out.stderr
    assert "aborted" in out.stdout and "next scan" in out.stdout
    job = oqt.get_job(bad.id)
    assert job.state is JobState.ABORTED and job.abort_reason == "customer refunded by hand"
    assert oqt.drain("account-2").succeeded == 1
    assert oqt.get_job(after.id).state is JobState.DONE


def test_purge(oqt, cli, engine):
    oqt.create_job("q", "charge", {})
    oqt.drain()
    out = cli("purge", "--older-than", "7d")
    assert (out.returncode, out.stdout.strip()) == (0, "deleted 0 done job(s) older than 7d")
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE queuetopia_jobs SET done_at = now() - interval '8 days' WHERE scope = :s"),
            {"s": oqt.scope},
        )
    out = cli("purge", "--older-than", "7d")
    assert out.stdout.strip() == "deleted 1 done job(s) older than 7d"


@pytest.mark.parametrize(
    ("args", "kwargs", "code", "message"),
    [
        (["show", "999999999"], {}, 1, "error: no job 999999999 in scope"),
        (["retry", "999999999"], {}, 1, "error: no job 999999999 in scope"),
        (["abort", "999999999", "--reason", "x"], {}, 1, "error: no job 999999999 in scope"),
        (
            ["status"],
            {"url": "postgresql://postgres:s3cret@127.0.0.1:1/nowhere"},
            1,
            "error: database error:",
        ),
        (
            ["status"],
            {"url": "notaurl"},
            1,
            "error: the database URL cannot be parsed; supported: PostgreSQL",
        ),
        (
            ["status"],
            {"url": "mssql://root:s3cret@127.0.0.1:1433/shop"},
            1,
            "error: unsupported database URL mssql://...; supported: PostgreSQL with psycopg 3",
        ),
        (["migrate"], {"url": "oracle://scott:s3cret@db/orcl", "scope_": False}, 1, "SQLite (sqlite:///"),
        (["status"], {"scope_": False}, 2, "no scope"),
        (["purge", "--older-than", "soon"], {}, 2, "is not a duration"),
        (["abort", "1"], {}, 2, "--reason"),
    ],
)
def test_expected_errors_are_one_line_without_traceback(cli, args, kwargs, code, message):
    out = cli(*args, **kwargs)
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr and "s3cret" not in out.stderr
    if code == 1:
        assert len(out.stderr.strip().splitlines()) == 1


def test_a_job_of_another_scope_is_not_found(oqt, cli, scope):
    job = oqt.create_job("q", "charge", {})
    out = cli("show", str(job.id), scope_=scope + "-other")
    assert out.returncode == 1
    assert f"no job {job.id} in scope '{scope}-other'" in out.stderr


def test_the_cli_works_on_sqlite(cli, tmp_path: Path, scope):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    assert cli("migrate", url=url, scope_=False).returncode == 0
    qt = build(url, scope)
    try:
        bad, _ = blocked_setup(qt)
    finally:
        qt.engine.dispose()
    out = cli("status", url=url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2].split()[:2] == ["account-2", "BLOCKED"]
    assert cli("abort", str(bad.id), "--reason", "test", url=url).returncode == 0


def test_an_unmigrated_sqlite_file_says_to_run_migrate(cli, tmp_path: Path):
    path = tmp_path / "empty.db"
    empty = sa.create_engine(f"sqlite:///{path}")
    empty.connect().close()  # an empty database file
    empty.dispose()
    out = cli("jobs", url=f"sqlite:///{path}")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"run `queuetopia-celery migrate --database-url sqlite:///{path}`" in out.stderr
