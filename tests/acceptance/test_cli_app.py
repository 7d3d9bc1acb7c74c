"""The CLI with the user's own Queuetopia (``-A module:attribute``, ``QUEUETOPIA_APP``):
``retry``, ``abort`` and ``resume`` go through the Queuetopia's methods and wake the
queue at once through the app's broker. The workers here run without beat and with
``poll_interval`` 60 s, so that only a wake-up can start a job within the waits."""

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

import pytest
from celery import Celery

from queuetopia_celery import Job, JobState, Queuetopia
from tests.conftest import REDIS_URL, ROOT, wait_for

pytestmark = pytest.mark.acceptance

Run = Callable[..., subprocess.CompletedProcess[str]]
APP = "tests.apps.testapp:qt"
#: No beat runs, and the app's scan interval is a minute: a job that starts within a
#: wait below was started by a wake-up.
NO_SCAN = {"QT_TEST_POLL": "60"}


@pytest.fixture
def cli(database_url: str, scope: str, celery_queue: str) -> Run:
    """The CLI as a subprocess from the project root, with the test app's environment
    (the same scope, database, broker and Celery queue as the test's workers)."""

    def run(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUETOPIA_", "QT_TEST_"))}
        environ.update(
            QT_TEST_SCOPE=scope,
            QT_TEST_DATABASE_URL=database_url,
            QT_TEST_BROKER_URL=REDIS_URL,
            QT_TEST_CELERY_QUEUE=celery_queue,
            **NO_SCAN,
            **env,
        )
        return subprocess.run(
            [sys.executable, "-m", "queuetopia_celery", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=environ,
            check=False,
            cwd=cwd,
        )

    return run


def state(qt: Queuetopia, job: Job) -> JobState:
    found = qt.get_job(job.id)
    assert found is not None
    return found.state


def held_job(qt: Queuetopia, queue: str, action: str = "work") -> Job:
    """A job that fails its one attempt and holds its queue (the retry succeeds)."""
    job = qt.create_job(queue, action, {"fail_times": 1}, max_attempts=1, on_exhausted="hold")
    wait_for(lambda: state(qt, job) is JobState.HELD, timeout=30, message=f"job {job.id} to be held")
    return job


def done(qt: Queuetopia, *jobs: Job, why: str) -> None:
    wait_for(
        lambda: all(state(qt, job) is JobState.DONE for job in jobs),
        timeout=30,
        message=f"{why}: only a wake-up can start it (no beat, poll_interval 60 s)",
    )


def test_retry_with_the_app_wakes_the_queue_at_once(qt, start_worker, cli, database_url, scope):
    start_worker(env=NO_SCAN)
    job = held_job(qt, "q")
    out = cli("-A", APP, "retry", str(job.id))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"job {job.id} of queue 'q' is due now (1 attempts so far); "
        "woke its queue at once through the app's broker"
    )
    assert out.stderr == ""
    done(qt, job, why="the retried job to run")

    # Without the app the same write wakes nothing, and says so; the app's explain
    # (it knows the performers) then finds the job due and waiting for a wake-up.
    again = held_job(qt, "r")
    out = cli("--database-url", database_url, "--scope", scope, "retry", str(again.id))
    assert out.returncode == 0, out.stderr
    assert "no worker was woken from here: the next scan (every poll_interval) starts it" in out.stdout
    explained = json.loads(cli("-A", APP, "explain", "r", "--json").stdout)
    assert (explained["reason"], explained["head"]["id"]) == ("waiting_for_dispatch", again.id)
    # The bulk form through QUEUETOPIA_APP: the job is retrying, due now; retried
    # again, its queue is woken.
    out = cli("retry", "--queue", "r", QUEUETOPIA_APP=APP)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "retried 1 job(s) of queue 'r' (exhausted, held, retrying)",
        "woke their 1 queue(s) at once through the app's broker",
    ]
    done(qt, again, why="the bulk-retried job to run")

    first, second = held_job(qt, "h1"), held_job(qt, "h2")
    out = cli("-A", APP, "retry", "--action", "work", "--state", "held")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "woke their 2 queue(s) at once through the app's broker"
    done(qt, first, second, why="both held jobs, retried in bulk")


def test_abort_and_resume_with_the_app_wake_the_queue_at_once(qt, start_worker, cli):
    start_worker(env=NO_SCAN)
    blocking = held_job(qt, "a")
    behind = qt.create_job("a", "work")
    out = cli("-A", APP, "abort", str(blocking.id), "--reason", "refunded by hand")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"job {blocking.id} of queue 'a' aborted (refunded by hand); the queue moves on to its "
        "next job; woke its queue at once through the app's broker"
    )
    done(qt, behind, why="the job behind the aborted one")

    stuck = held_job(qt, "b", action="fast_retry")
    after = qt.create_job("b", "work")
    out = cli("-A", APP, "abort", "--action", "fast_retry", "--reason", "bad deploy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "aborted 1 job(s) of action 'fast_retry' (pending: waiting, scheduled, retrying, held)",
        "woke their 1 queue(s) at once through the app's broker",
    ]
    assert state(qt, stuck) is JobState.ABORTED
    done(qt, after, why="the job behind the bulk-aborted one")

    first = qt.create_job("p", "work")
    done(qt, first, why="the paused queue's first job")
    out = cli("-A", APP, "pause", "p")
    assert out.returncode == 0 and "queue 'p' paused" in out.stdout, out.stderr
    waiting = qt.create_job("p", "work")
    assert json.loads(cli("-A", APP, "explain", "p", "--json").stdout)["reason"] == "paused"
    out = cli("-A", APP, "resume", "p")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "queue 'p' resumed; woke it at once through the app's broker"
    done(qt, waiting, why="the resumed queue's job")


def write_module(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return name


@pytest.mark.parametrize(
    ("spec", "env", "message"),
    [
        ("no_such_module_qt:qt", {}, "error: -A no_such_module_qt:qt: cannot import 'no_such_module_qt': "),
        (":qt", {}, "error: -A ':qt' is not module:attribute or module"),
        ("tests.apps.testapp:", {}, "error: -A 'tests.apps.testapp:' is not module:attribute or module"),
        ("tests.apps.testapp:nothing", {}, "tests.apps.testapp.nothing is missing, not a Queuetopia"),
        ("tests.apps.testapp:EVENTS_DDL", {}, "tests.apps.testapp.EVENTS_DDL is a str, not a Queuetopia"),
        ("tests.apps", {}, "module 'tests.apps' holds no Queuetopia: give module:attribute"),
        (
            "tests.apps.testapp",
            {"QT_TEST_EXTRA_SCOPE": "extra"},
            "module 'tests.apps.testapp' holds 2 Queuetopias (extra_qt, qt): give module:attribute",
        ),
        ("badapp:qt", {}, "importing 'badapp' failed: ConfigurationError: unsupported database URL mssql"),
        ("raisingapp", {}, "importing 'raisingapp' failed: RuntimeError: the app's own error"),
    ],
)
def test_an_app_that_cannot_be_loaded_is_one_line(cli, tmp_path, spec, env, message):
    write_module(
        tmp_path,
        "badapp",
        """
        from celery import Celery
        from queuetopia_celery import Queuetopia

        qt = Queuetopia("x", app=Celery("bad"), database_url="mssql://root:s3cret@127.0.0.1/shop")
        """,
    )
    write_module(tmp_path, "raisingapp", 'raise RuntimeError("the app\'s own error")\n')
    env = {**env, "PYTHONPATH": str(ROOT)}
    for args in (["-A", spec, "status"], ["retry", "1"]):
        out = cli(*args, cwd=tmp_path, **(env if args[0] == "-A" else {**env, "QUEUETOPIA_APP": spec}))
        assert out.returncode == 2, out.stderr
        assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr
        assert "Traceback" not in out.stderr and "s3cret" not in out.stderr


def test_the_app_must_agree_with_scope_and_database_given(cli, database_url, scope):
    out = cli("-A", APP, "--scope", "other", "status")
    assert (out.returncode, out.stderr.strip()) == (
        2,
        f"error: -A {APP} is scope {scope!r}, not --scope 'other'",
    )
    out = cli("-A", APP, "--database-url", "sqlite:////nowhere/jobs.db", "status")
    assert out.returncode == 2 and "not --database-url's" in out.stderr, out.stderr
    # The same database and scope given again (QUEUETOPIA_* set for other commands) is fine.
    out = cli("-A", APP, "status", QUEUETOPIA_DATABASE_URL=database_url, QUEUETOPIA_SCOPE=scope)
    assert out.returncode == 0 and out.stdout.startswith(f"scope {scope!r}: 0 queue(s)"), out.stderr
    # A module holding exactly one Queuetopia needs no attribute.
    out = cli("-A", "tests.apps.testapp", "status")
    assert out.returncode == 0 and out.stdout.startswith(f"scope {scope!r}"), out.stderr


def test_a_broker_that_is_down_is_one_warning_and_the_write_stays(cli, database_url, scope, tmp_path):
    """The write is committed before the wake-up is sent: a broker that is down costs
    the wake-up only, said in one line without a traceback or the broker's password."""
    name = write_module(
        tmp_path,
        "downapp",
        f"""
        from celery import Celery
        from queuetopia_celery import Queuetopia

        qt = Queuetopia({scope!r}, app=Celery("down", broker="redis://:s3cret@127.0.0.1:1/0"),
                        database_url={database_url!r})
        """,
    )
    offline = Queuetopia(
        scope, app=Celery(f"t-{uuid.uuid4().hex[:6]}"), database_url=database_url, disabled=True
    )
    try:
        later = offline.create_job(
            "q", "work", scheduled_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        )
        out = cli("-A", f"{name}:qt", "retry", str(later.id), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith(
            "waking its queue through the app's broker failed (see above): the next scan starts it"
        )
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("error: could not wake queues ['q']; the next scan will (")
        assert "Traceback" not in out.stderr and "s3cret" not in out.stderr + out.stdout
        retried = offline.get_job(later.id)
        assert retried is not None and retried.due_at <= dt.datetime.now(dt.timezone.utc)
    finally:
        offline.engine.dispose()


def test_migrate_status_and_explain_on_the_apps_own_database(cli, tmp_path, scope):
    """``-A`` alone names the database: ``migrate`` creates the app's SQLite file, and
    ``explain`` knows the app's performers (none here for 'refund')."""
    db = tmp_path / "jobs.db"
    name = write_module(
        tmp_path,
        "sqliteapp",
        f"""
        from celery import Celery
        from queuetopia_celery import Queuetopia

        mail = Queuetopia({scope!r}, app=Celery("lite", broker="memory://"),
                          database_url={f"sqlite:///{db}"!r})

        @mail.performer("send_mail")
        def send_mail(job):
            return None
        """,
    )
    out = cli("-A", name, "status", cwd=tmp_path)
    assert out.returncode == 1 and "no SQLite database at" in out.stderr and not db.exists()
    out = cli("-A", name, "migrate", cwd=tmp_path)
    assert out.returncode == 0 and "migrated from nothing to" in out.stdout, out.stderr
    offline = Queuetopia(
        scope, app=Celery(f"t-{uuid.uuid4().hex[:6]}"), database_url=f"sqlite:///{db}", disabled=True
    )
    try:
        job = offline.create_job("q", "refund")
    finally:
        offline.engine.dispose()
    out = cli("-A", f"{name}:mail", "explain", "q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        f"Queue 'q' cannot run job #{job.id}: no performer is registered for action 'refund'."
    ), out.stdout
    both = cli("-A", f"{name}:mail", "explain", "q", "--app", "other:qt", cwd=tmp_path)
    assert both.returncode == 2 and "give the app once" in both.stderr
