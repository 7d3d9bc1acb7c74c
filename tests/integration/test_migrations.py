"""The migrations build exactly the declared tables, run idempotently, and ship in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from queuetopia_celery import ConfigurationError, DatabaseError, NewerSchemaError, make_engine, migrate
from queuetopia_celery.schema import VERSION_TABLE, metadata
from tests.conftest import PG_ADMIN_URL, ROOT


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"qt_migrate_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return [
            diff
            for diff in compare_metadata(context, metadata)
            if not (diff[0] == "remove_table" and diff[1].name == VERSION_TABLE)
        ]


def test_migrations_build_the_declared_schema(empty_database: str) -> None:
    engine = make_engine(empty_database)
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert _differences(engine) == []
    engine.dispose()


def test_migrate_is_idempotent_and_reversible(empty_database: str) -> None:
    engine = make_engine(empty_database)
    migrate.upgrade(engine)
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    assert not {"queuetopia_jobs", "queuetopia_queues", "queuetopia_leases"} & set(
        sa.inspect(engine).get_table_names()
    )
    migrate.upgrade(engine)
    assert _differences(engine) == []
    engine.dispose()


def test_migrations_on_sqlite_build_the_declared_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'qt.db'}")
    migrate.upgrade(engine)
    assert _differences(engine) == []
    engine.dispose()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd or ROOT,
        timeout=120,
    )


def test_cli_migrate_creates_then_reports_up_to_date(empty_database: str, tmp_path: Path) -> None:
    first = _cli("migrate", "--database-url", empty_database, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "migrated from nothing to" in first.stdout
    second = _cli("migrate", "--database-url", empty_database, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already at version" in second.stdout


def test_migrate_on_tables_from_a_newer_version_says_so_and_changes_nothing(empty_database: str) -> None:
    engine = make_engine(empty_database)
    migrate.upgrade(engine)
    with engine.begin() as conn:  # as a newer queuetopia-celery would leave it
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '0999_from_the_future'"))
    with pytest.raises(NewerSchemaError) as info:
        migrate.upgrade(engine)
    assert info.value.version == "0999_from_the_future" and info.value.newest == migrate.head()
    with pytest.raises(NewerSchemaError):
        migrate.pending_sql(engine)
    assert migrate.current(engine) == "0999_from_the_future"
    for args in (("migrate",), ("migrate", "--dry-run")):
        out = _cli(*args, "--database-url", empty_database)
        assert out.returncode == 1, out
        assert out.stderr.startswith("error: the queuetopia tables in this database are at version 0999")
        assert "upgrade queuetopia-celery" in out.stderr and "Traceback" not in out.stderr
    assert migrate.current(engine) == "0999_from_the_future"
    engine.dispose()


def test_cli_migrate_dry_run_prints_sql_and_writes_nothing(empty_database: str) -> None:
    out = _cli("migrate", "--database-url", empty_database, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "CREATE TABLE queuetopia_jobs" in out.stdout
    engine = make_engine(empty_database)
    assert migrate.current(engine) is None
    engine.dispose()


def test_cli_migrate_dry_run_prints_only_what_would_run(empty_database: str) -> None:
    engine = make_engine(empty_database)
    migrate.upgrade(engine, "0002")
    out = _cli("migrate", "--database-url", empty_database, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        f"-- queuetopia tables at version 0002; the SQL that brings them to {migrate.head()}:"
    )
    assert "CREATE INDEX" in out.stdout  # 0003's step
    assert "CREATE TABLE queuetopia_jobs" not in out.stdout  # 0001's step
    assert "abort_reason" not in out.stdout  # 0002's
    assert migrate.current(engine) == "0002"
    migrate.upgrade(engine)
    out = _cli("migrate", "--database-url", empty_database, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip()
        == f"-- queuetopia tables already at version {migrate.head()}, the newest: nothing to run"
    )
    engine.dispose()


def test_cli_migrate_dry_run_on_a_new_sqlite_file_prints_everything_and_creates_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.db"
    out = _cli("migrate", "--database-url", f"sqlite:///{path}", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "no tables yet" in out.stdout and "CREATE TABLE queuetopia_jobs" in out.stdout
    assert not path.exists()


@pytest.mark.parametrize(
    "url",
    [
        "mssql://root:s3cr3t-pw@127.0.0.1:1433/shop",
        "mysql+mysqldb://root:s3cr3t-pw@127.0.0.1/shop",
        "oracle://scott:s3cr3t-pw@db/orcl",
        "postgresql+psycopg2://u:s3cr3t-pw@127.0.0.1/db",
        "postgresql+asyncpg://u:s3cr3t-pw@127.0.0.1/db",
        "sqlite+aiosqlite:///jobs.db",
        "postgresql://u:s3cr3t-pw@127.0.0.1:port/db",
        "not a url s3cr3t-pw",
    ],
)
def test_an_unsupported_database_url_names_the_supported_ones(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_engine(url)
    assert "supported: PostgreSQL with psycopg 3 (postgresql+psycopg://" in str(info.value)
    assert "SQLite (sqlite:///" in str(info.value) and "s3cr3t-pw" not in str(info.value)
    out = _cli("migrate", "--database-url", url)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: ") and "supported: PostgreSQL" in out.stderr
    assert "Traceback" not in out.stderr and "s3cr3t-pw" not in out.stderr


def test_cli_migrate_unreachable_database_is_one_line_without_password() -> None:
    out = _cli("migrate", "--database-url", "postgresql://someone:s3cr3t-pw@127.0.0.1:1/nowhere")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ")
    assert "s3cr3t-pw" not in out.stderr + out.stdout


def test_cli_migrate_without_url_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", "migrate"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 2
    assert "QUEUETOPIA_DATABASE_URL" in out.stderr


def test_database_errors_never_show_the_password() -> None:
    engine = make_engine("postgresql://someone:s3cr3t-pw@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseError) as info:
        migrate.upgrade(engine)
    engine.dispose()
    assert "s3cr3t-pw" not in str(info.value)


def test_wheel_ships_the_migrations(tmp_path: Path) -> None:
    """The top-level ``migrations/`` goes into the wheel as ``queuetopia_celery.migrations``;
    installed from the wheel (unpacked first on the path, ahead of this checkout), the
    package, ``steps`` and ``queuetopia-celery migrate`` come from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("queuetopia_celery-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = [
        f"queuetopia_celery/migrations/versions/{p.name}" for p in ROOT.glob("migrations/versions/*.py")
    ]
    for path in (
        "queuetopia_celery/migrations/__init__.py",
        "queuetopia_celery/migrations/env.py",
        "queuetopia_celery/migrations/steps.py",
        "queuetopia_celery/migrations/script.py.mako",
        "queuetopia_celery/py.typed",
        *versions,
    ):
        assert path in names
    assert "queuetopia_celery/migrations.py" not in names, "the checkout's stand-in is not shipped"
    assert not [name for name in names if name.startswith("migrations/") or "__pycache__" in name]

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import queuetopia_celery.migrations as m, queuetopia_celery.migrate as g;"
        "from queuetopia_celery.migrations import steps;"
        "print(m.__file__, steps.__file__, g.MIGRATIONS, g.head(), sep='\\n')"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    package, steps_file, folder, head = out.stdout.split()
    assert package == str(site / "queuetopia_celery/migrations/__init__.py")
    assert steps_file == str(site / "queuetopia_celery/migrations/steps.py")
    assert (folder, head) == (str(site / "queuetopia_celery/migrations"), migrate.head())
    db = tmp_path / "jobs.db"
    migrated = subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", "migrate", "--database-url", f"sqlite:///{db}"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert f"migrated from nothing to {migrate.head()}" in migrated.stdout


def test_the_checkout_keeps_the_migrations_top_level() -> None:
    """In this checkout (an editable install) ``queuetopia_celery.migrations`` is the
    project's top-level ``migrations/`` folder, as the wheel's is the packaged copy."""
    from queuetopia_celery import migrations
    from queuetopia_celery.migrations import steps

    assert not (ROOT / "queuetopia_celery/migrations/__init__.py").exists()
    assert list(migrations.__path__) == [str(ROOT / "migrations")]
    assert Path(steps.__file__ or "") == ROOT / "migrations/steps.py"
    assert migrate.MIGRATIONS == ROOT / "migrations"
    revisions = sorted(p.name[:4] for p in (ROOT / "migrations/versions").glob("0*.py"))
    assert revisions[-1] == migrate.head() and revisions[0] == "0001"
