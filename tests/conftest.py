"""Fixtures: a fresh PostgreSQL database per test session, a scope and a Celery queue
per test, and real ``celery worker`` / ``beat`` processes.

The services must be running (``scripts/test.sh`` starts them when they are not). A
missing service is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from queuetopia_celery import Queuetopia, make_engine
from tests.apps import testapp

ROOT = Path(__file__).resolve().parent.parent
# pytest-django has set Django up (tests/djangoproject, from pyproject's
# DJANGO_SETTINGS_MODULE) before this file is imported. The variable must not reach the
# celery workers other tests start from os.environ: Celery would load its Django fixup
# there. The Django tests pass it to their own processes.
os.environ.pop("DJANGO_SETTINGS_MODULE", None)
PG_ADMIN_URL = os.environ.get("QT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QT_TEST_REDIS_URL", "redis://127.0.0.1:6379/3")
MARIADB_ADMIN_URL = os.environ.get("QT_TEST_MARIADB_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30, interval: float = 0.05, message: str = ""
) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message or condition}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"qt_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    from queuetopia_celery import migrate

    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(testapp.EVENTS_DDL))
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _postgresql_url(database_url: str, tmp_path: Path) -> str:
    return database_url


def _sqlite_url(database_url: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


#: The session's MariaDB database, made (and migrated) by the first test that asks.
_MARIADB: dict[str, str] = {}


def create_mariadb_database(prefix: str = "qt_test") -> str:
    """A new, migrated MariaDB database; its URL (drop it with :func:`drop_mariadb_database`)."""
    from queuetopia_celery import migrate

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(MARIADB_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    admin.dispose()
    url = sa.engine.make_url(MARIADB_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(testapp.EVENTS_DDL_MYSQL))
    engine.dispose()
    return url


def drop_mariadb_database(url: str) -> None:
    name = sa.engine.make_url(url).database
    admin = sa.create_engine(MARIADB_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()


def _mariadb_url(database_url: str = "", tmp_path: Path | None = None) -> str:
    """The session's MariaDB database (made on first use, dropped at the end)."""
    if "url" not in _MARIADB:
        _MARIADB["url"] = create_mariadb_database()
    return _MARIADB["url"]


@pytest.fixture(scope="session", autouse=True)
def _drop_the_mariadb_database() -> Iterator[None]:
    yield
    url = _MARIADB.pop("url", None)
    if url is not None:
        drop_mariadb_database(url)


#: Every backend the lease protocol's and the operator's integration tests run on, with
#: how to make a fresh database URL for one test (from the session's PostgreSQL database
#: and the test's tmp_path). A new backend is tested by adding it here.
BACKENDS: list[tuple[str, Callable[[str, Path], str]]] = [
    ("postgresql", _postgresql_url),
    ("sqlite", _sqlite_url),
    ("mariadb", _mariadb_url),
]


@pytest.fixture(params=[url for _, url in BACKENDS], ids=[name for name, _ in BACKENDS])
def backend_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    """A database URL of each backend in :data:`BACKENDS` in turn (migrate it first:
    the SQLite file is new)."""
    make_url: Callable[[str, Path], str] = request.param
    return make_url(database_url, tmp_path)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def scope(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def celery_queue(scope: str) -> Iterator[str]:
    name = f"qt-test-{scope}"
    yield name
    # Messages nobody consumed (kicks and perform messages of tests without a worker).
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def make_qt(database_url: str, celery_queue: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    """Build producer-side Queuetopias of this test's scope (or another)."""
    built: list[Queuetopia] = []

    def make(scope_: str | None = None, queue_: str | None = None, **options: Any) -> Queuetopia:
        _, qt = testapp.build(
            scope_ or scope,
            database_url=database_url,
            broker_url=REDIS_URL,
            celery_queue=queue_ or celery_queue,
            **options,
        )
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


@pytest.fixture
def qt(make_qt: Callable[..., Queuetopia]) -> Queuetopia:
    return make_qt()


class Proc:
    """A celery worker or beat subprocess, in its own process group."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, ready: Path) -> None:
        self.args = args
        self.log = log
        self.ready = ready
        with log.open("wb") as out:
            self.handle = subprocess.Popen(
                args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.handle.pid

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.handle.poll() is not None:
                pytest.fail(
                    f"{self.args[3:5]} exited with {self.handle.returncode}:\n{self.output()[-3000:]}"
                )
            return self.ready.exists()

        wait_for(ready, timeout=timeout, message=f"{' '.join(self.args[3:5])} to be ready")

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.pid)], check=False, capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        if self.handle.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.handle.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.handle.wait(10)


@pytest.fixture
def start_worker(
    database_url: str, scope: str, celery_queue: str, tmp_path: Path
) -> Iterator[Callable[..., Proc]]:
    """Start ``celery worker`` processes (prefork) for this test's scope."""
    procs: list[Proc] = []

    def start(
        *,
        concurrency: int = 2,
        beat: bool = False,
        pool: str = "prefork",
        scope_: str | None = None,
        queue_: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        loglevel: str = "INFO",
    ) -> Proc:
        n = len(procs)
        ready = tmp_path / f"ready-{n}"
        run_env = {
            **os.environ,
            "QT_TEST_SCOPE": scope_ or scope,
            "QT_TEST_DATABASE_URL": database_url,
            "QT_TEST_BROKER_URL": REDIS_URL,
            "QT_TEST_CELERY_QUEUE": queue_ or celery_queue,
            "QT_TEST_READY_FILE": str(ready),
            "QT_TEST_BEAT_READY_FILE": str(tmp_path / f"beat-ready-{n}"),
            **(env or {}),
        }
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.testapp",
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            queue_ or celery_queue,
            "-n",
            f"w{n}-{uuid.uuid4().hex[:6]}@%h",
            "--loglevel",
            loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
        if beat:
            args += ["-B", "-s", str(tmp_path / f"beat-schedule-{n}")]
        proc = Proc(args, run_env, tmp_path / f"worker-{n}.log", ready)
        procs.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def start_beat(
    database_url: str, scope: str, celery_queue: str, tmp_path: Path
) -> Iterator[Callable[..., Proc]]:
    """Start standalone ``celery beat`` processes for this test's scope."""
    procs: list[Proc] = []

    def start(*, env: dict[str, str] | None = None) -> Proc:
        n = len(procs)
        ready = tmp_path / f"standalone-beat-ready-{n}"
        run_env = {
            **os.environ,
            "QT_TEST_SCOPE": scope,
            "QT_TEST_DATABASE_URL": database_url,
            "QT_TEST_BROKER_URL": REDIS_URL,
            "QT_TEST_CELERY_QUEUE": celery_queue,
            "QT_TEST_BEAT_READY_FILE": str(ready),
            **(env or {}),
        }
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.testapp",
            "beat",
            "-s",
            str(tmp_path / f"standalone-beat-{n}"),
            "--loglevel",
            "INFO",
        ]
        proc = Proc(args, run_env, tmp_path / f"beat-{n}.log", ready)
        procs.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in procs:
        proc.stop()


def events(engine: sa.Engine, scope: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM qt_test_events WHERE scope = :s ORDER BY started_at, id"), {"s": scope}
        ).mappings()
        return [dict(row) for row in rows]


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """pytest-django's test database (tests/djangoproject); the pools of the
    DjangoQueuetopias built on it are closed before it is dropped."""
    yield
    from queuetopia_celery.contrib.django.queuetopia import registry

    for built in list(registry.values()):
        built.engine.dispose()
