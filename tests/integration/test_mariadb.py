"""What is particular to MariaDB: the migrations build the declared tables (with the two
generated columns that stand in for PostgreSQL's partial indexes), names compare
exactly, bad input and an unreachable or unmigrated server give the same clear errors
as on PostgreSQL without the password, and the hot path's writes survive a connection
killed on the server (``KILL CONNECTION``) before a statement, or around the commit:
one job, one attempt, one outcome. The shared suites (``backend_url``) run on MariaDB
too; this file holds only what they cannot say."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from queuetopia_celery import (
    DatabaseError,
    InvalidJobError,
    Queuetopia,
    SchemaMissingError,
    make_engine,
    migrate,
)
from queuetopia_celery.backends import Burst, Outcome
from queuetopia_celery.jobs import new_job
from queuetopia_celery.schema import VERSION_TABLE, metadata
from tests.apps import testapp
from tests.conftest import REDIS_URL, _mariadb_url, create_mariadb_database, drop_mariadb_database
from tests.integration.cut_checks import outcome_write_cut_is_written_once_and_hands_on

#: The first words of the statements a test can cut (see backends/mysql_sql.py).
CREATE = "INSERT INTO queuetopia_queues"
START = "UPDATE queuetopia_leases, queuetopia_jobs"
FINISH = "FROM queuetopia_leases LEFT OUTER JOIN queuetopia_jobs AS h"

#: The differences from the metadata that MariaDB's tables are meant to have.
MYSQL_ONLY = {
    ("remove_column", "is_open"),
    ("remove_column", "open_unique_key"),
    ("remove_index", "ix_queuetopia_jobs_open"),
    ("add_index", "ix_queuetopia_jobs_open"),
    ("remove_index", "uq_queuetopia_jobs_open_unique_key"),
    ("add_index", "uq_queuetopia_jobs_open_unique_key"),
}


@pytest.fixture
def empty_mariadb() -> Iterator[str]:
    url = create_mariadb_database("qt_migrate")
    engine = make_engine(url)
    migrate.downgrade(engine, "base")
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
    engine.dispose()
    yield url
    drop_mariadb_database(url)


def _differences(engine: sa.Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        found = set()
        for diff in compare_metadata(context, metadata):
            if diff[0] == "remove_table" and diff[1].name in (VERSION_TABLE, "qt_test_events"):
                continue
            found.add((diff[0], diff[3].name if diff[0] == "remove_column" else diff[1].name))
        return found


def test_migrations_on_mariadb_build_the_declared_schema_and_go_down_and_up(empty_mariadb: str) -> None:
    engine = make_engine(empty_mariadb)
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert _differences(engine) == MYSQL_ONLY
    with engine.connect() as conn:
        jobs = conn.execute(sa.text("SHOW CREATE TABLE queuetopia_jobs")).one()[1]
    assert "datetime(6)" in jobs and "`timeout` double" in jobs and "utf8mb4_nopad_bin" in jobs
    migrate.downgrade(engine, "base")
    assert not {"queuetopia_jobs", "queuetopia_queues", "queuetopia_leases"} & set(
        sa.inspect(engine).get_table_names()
    )
    migrate.upgrade(engine)
    assert _differences(engine) == MYSQL_ONLY
    engine.dispose()


@pytest.fixture
def qt(scope: str, celery_queue: str) -> Iterator[Queuetopia]:
    _, qt = testapp.build(scope, database_url=_mariadb_url(), broker_url=REDIS_URL, celery_queue=celery_queue)
    yield qt
    qt.engine.dispose()


def test_names_differing_in_case_or_trailing_space_are_different_queues(qt: Queuetopia) -> None:
    jobs = [qt.create_job(name, "work", {}) for name in ("q", "Q", "q ", "é", "e")]
    assert [job.sequence for job in jobs] == [1, 1, 1, 1, 1]
    assert {status.queue for status in qt.queue_statuses()} == {"q", "Q", "q ", "é", "e"}
    (longest,) = qt.backend.create_jobs([new_job("x" * 255, "y" * 255, {"text": "ü" * 10_000})])
    assert qt.get_job(longest.id) == longest


@pytest.mark.parametrize(
    ("create", "field"),
    [
        (lambda qt: qt.create_job("q", "work", {"when": object()}), "params"),
        (lambda qt: qt.create_job("q", "work", {"x": float("nan")}), "params"),
        (lambda qt: qt.create_job("q" * 256, "work", {}), "queue"),
        (lambda qt: qt.create_job("q", "a" * 256, {}), "action"),
        (lambda qt: qt.create_job("q", "work", {}, unique_key="k" * 256), "unique_key"),
    ],
)
def test_bad_input_is_refused_clearly_and_writes_nothing(
    qt: Queuetopia, create: Callable[[Queuetopia], Any], field: str
) -> None:
    with pytest.raises(InvalidJobError) as info:
        create(qt)
    assert info.value.field == field
    assert qt.backend.count_jobs() == 0


def test_a_refused_connection_is_a_database_error_without_the_password(celery_queue: str) -> None:
    _, qt = testapp.build(
        "refused",
        database_url="mysql+pymysql://root:s3cr3t-pw@127.0.0.1:1/test",
        broker_url=REDIS_URL,
        celery_queue=celery_queue,
    )
    with pytest.raises(DatabaseError) as info:
        qt.create_job("q", "work", {})
    assert "s3cr3t-pw" not in str(info.value)
    assert "Can't connect" in str(info.value)
    qt.engine.dispose()
    engine = make_engine("mysql+pymysql://root:s3cr3t-pw@127.0.0.1:1/test")
    with pytest.raises(DatabaseError) as info:
        migrate.upgrade(engine)
    engine.dispose()
    assert "s3cr3t-pw" not in str(info.value)


def test_tables_not_migrated_say_so(celery_queue: str, empty_mariadb: str) -> None:
    _, qt = testapp.build("bare", database_url=empty_mariadb, broker_url=REDIS_URL, celery_queue=celery_queue)
    with pytest.raises(SchemaMissingError):
        qt.create_job("q", "work", {})
    qt.engine.dispose()


# --------------------------------------------------------------------------- cut connections


class Killer:
    """Kills, on the server, the connection that runs the next statement containing
    ``marker``: ``before`` it is sent, ``after`` it ran (the start's autocommit
    statement), or at the commit of its transaction: ``commit`` just before the commit
    is sent (nothing is written), ``committed`` just after it succeeded (only its reply
    is lost: the client is told the connection was lost)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.marker: str | None = None
        self.when = "before"
        self.cuts = 0
        self.lock = threading.Lock()
        self.armed_commit: Any = None
        url = engine.url
        self.admin = {
            "host": url.host,
            "port": url.port or 3306,
            "user": url.username,
            "database": url.database,
        }
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)
        sa.event.listen(engine, "connect", self._connect)

    def arm(self, marker: str, when: str) -> None:
        self.marker, self.when = marker, when

    def _take(self, statement: str, when: tuple[str, ...]) -> bool:
        with self.lock:
            if self.marker is None or self.marker not in statement or self.when not in when:
                return False
            self.marker = None
            return True

    def kill(self, dbapi_connection: Any) -> None:
        thread = dbapi_connection.thread_id()
        admin = pymysql.connect(**self.admin, autocommit=True)
        try:
            with admin.cursor() as cur:
                cur.execute(f"KILL CONNECTION {int(thread)}")
                deadline = time.monotonic() + 10
                while cur.execute("SELECT 1 FROM information_schema.processlist WHERE id = %s", (thread,)):
                    assert time.monotonic() < deadline, "the connection did not go away"
                    time.sleep(0.01)
        finally:
            admin.close()
        self.cuts += 1

    def _before(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if self._take(statement, ("before",)):
            self.kill(cursor.connection)
        elif self._take(statement, ("commit", "committed")):
            self.armed_commit = cursor.connection

    def _after(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if self._take(statement, ("after",)):
            self.kill(cursor.connection)

    def _connect(self, dbapi_connection: Any, _record: Any) -> None:
        real = dbapi_connection.commit
        killer = self

        def commit() -> None:
            if killer.armed_commit is not dbapi_connection:
                real()
                return
            killer.armed_commit = None
            if killer.when == "committed":
                real()
                killer.kill(dbapi_connection)
                raise pymysql.err.OperationalError(2013, "Lost connection to server during query")
            killer.kill(dbapi_connection)
            real()

        dbapi_connection.commit = commit


@pytest.fixture
def cut_qt(qt: Queuetopia) -> tuple[Queuetopia, Killer]:
    killer = Killer(qt.engine)
    qt.engine.dispose()
    return qt, killer


BURST = Burst(worker="w/1", start_next=True, time_limit_grace=1, lease_margin=1, deadline_left=None)


@pytest.mark.parametrize("when", ["before", "commit", "committed"])
def test_create_jobs_cut_around_their_commit_are_created_once(cut_qt: Any, when: str) -> None:
    qt, killer = cut_qt
    killer.arm(CREATE, when)
    jobs = qt.create_jobs([{"queue": f"q{i % 3}", "action": "work", "params": {"echo": i}} for i in range(7)])
    assert killer.cuts == 1
    assert qt.backend.count_jobs() == 7
    assert [job.params["echo"] for job in jobs] == list(range(7))
    assert {lease.queue for lease in qt.queue_statuses()} == {"q0", "q1", "q2"}


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_start_cut_begins_the_attempt_once(cut_qt: Any, when: str) -> None:
    qt, killer = cut_qt
    job = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    killer.arm(START, when)
    with qt.backend.pinned():
        started = qt.backend.start("q", job.id, token, worker="w/1", lease=30)
    assert killer.cuts == 1
    assert started is not None and started.id == job.id and started.attempts == 1
    assert qt.get_job(job.id).attempts == 1
    assert qt.backend.start("q", job.id, token, worker="w/2", lease=30) is None


@pytest.mark.parametrize("when", ["before", "commit", "committed"])
@pytest.mark.parametrize("start_next", [True, False], ids=["inline", "handed-on"])
def test_an_outcome_write_cut_is_written_once_and_hands_on(cut_qt: Any, when: str, start_next: bool) -> None:
    qt, killer = cut_qt
    outcome_write_cut_is_written_once_and_hands_on(qt, killer, FINISH, when, start_next)


def test_a_late_outcome_whose_lease_was_recovered_stays_dropped_after_a_cut(cut_qt: Any) -> None:
    qt, killer = cut_qt
    first = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
    with qt.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE queuetopia_leases SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND"
                " WHERE scope = :s"
            ),
            {"s": qt.scope},
        )
    qt.scan()
    killer.arm(FINISH, "before")
    assert qt.backend.finish_and_start(job, token, Outcome(True), grace=20, burst=BURST) == (
        False,
        None,
        None,
    )
    assert qt.get_job(first.id).error.startswith("WorkerLostError")


def test_mysql_urls_mean_pymysql_at_read_committed_and_a_mysql_server_is_refused() -> None:
    for url in ("mysql://root@127.0.0.1/test", "mariadb://root@127.0.0.1/test"):
        engine = make_engine(url)
        assert engine.url.drivername.endswith("+pymysql")
        with engine.connect() as conn:
            level = conn.execute(sa.text("SELECT @@tx_isolation")).scalar_one()
        assert level == "READ-COMMITTED"
        engine.dispose()
    engine = make_engine("mysql+pymysql://root@127.0.0.1/test")
    with engine.connect():
        pass
    engine.dispose()
    engine.dialect.is_mariadb = False  # what a MySQL server's greeting makes the dialect say
    with pytest.raises(DatabaseError, match=r"needs MariaDB 10\.6 or newer .* found MySQL"):
        engine.connect()
    engine.dispose()


def test_a_deadlock_victim_is_retried_like_a_lost_connection(qt: Queuetopia) -> None:
    """InnoDB rolled the victim's whole transaction back: the write is tried again."""
    victim = sa.exc.OperationalError("UPDATE ...", {}, pymysql.err.OperationalError(1213, "Deadlock found"))
    other = sa.exc.OperationalError("UPDATE ...", {}, pymysql.err.OperationalError(1205, "Lock wait timeout"))
    assert qt.backend._error(victim).connection_lost  # type: ignore[attr-defined]
    assert not qt.backend._error(other).connection_lost  # type: ignore[attr-defined]
