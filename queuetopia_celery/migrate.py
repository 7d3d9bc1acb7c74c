"""Schema migrations: Alembic, with our own version table, shipped in the package
(the top-level ``migrations/`` folder, mapped into the wheel as
:mod:`queuetopia_celery.migrations`).

``upgrade(engine)`` brings the tables to the newest version; it is idempotent and
serialized across processes with an advisory lock on PostgreSQL. ``upgrade_sql(url)``
returns the SQL instead of running it (``queuetopia-celery migrate --dry-run``).
A host application with its own Alembic history can call our steps from its own
revisions instead: see :mod:`queuetopia_celery.migrations.steps`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import migrations
from .errors import DatabaseError, NewerSchemaError
from .schema import VERSION_TABLE

#: Alembic's script directory: the package's folder (installed from a wheel) or the
#: project's top-level ``migrations/`` (a source checkout, an editable install).
MIGRATIONS = Path(next(iter(migrations.__path__)))
_LOCK_KEY = 0x51554555  # "QUEU"


def config(connection: sa.Connection | None = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    head = ScriptDirectory.from_config(config()).get_current_head()
    assert head is not None
    return head


def current(engine: Engine) -> str | None:
    """The version the database is at, or None before the first migration."""
    try:
        with engine.connect() as conn:
            return _version(conn)
    except SQLAlchemyError as exc:
        raise DatabaseError(_safe(engine, exc)) from exc


def known(version: str | None) -> bool:
    """Whether this version of the package knows the tables' ``version`` (None: no
    tables yet). A database migrated by a newer queuetopia-celery is at a version
    this one has never heard of."""
    if version is None:
        return True
    try:
        ScriptDirectory.from_config(config()).get_revision(version)
    except CommandError:  # "Can't locate revision identified by ..."
        return False
    return True


def _check_known(version: str | None) -> None:
    if not known(version):
        raise NewerSchemaError(str(version), head())


def _version(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
            _check_known(_version(conn))
            command.upgrade(config(conn), revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(_safe(engine, exc)) from exc


def downgrade(engine: Engine, revision: str = "base") -> None:
    try:
        with engine.begin() as conn:
            _check_known(_version(conn))
            command.downgrade(config(conn), revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(_safe(engine, exc)) from exc


def upgrade_sql(url: str, revision: str = "head", *, since: str | None = None) -> str:
    """The SQL that ``upgrade`` would run on a database of ``url``'s kind that is at
    version ``since`` (None: an empty database)."""
    out = io.StringIO()
    cfg = config(url=url)
    cfg.output_buffer = out
    with contextlib.redirect_stdout(out):
        command.upgrade(cfg, revision if since is None else f"{since}:{revision}", sql=True)
    return out.getvalue()


def pending_sql(engine: Engine) -> tuple[str | None, str]:
    """``(current version, SQL)``: what ``upgrade(engine)`` would run on this database
    now. The SQL is empty when the tables are at the newest version. Reads the version
    only; writes nothing."""
    version = current(engine)
    _check_known(version)
    if version == head():
        return version, ""
    url = engine.url.render_as_string(hide_password=False)
    return version, upgrade_sql(url, since=version)


def _safe(engine: Engine, exc: Exception) -> str:
    text = f"database error: {exc}"
    password = engine.url.password
    if isinstance(password, str) and password:
        text = text.replace(password, "***")
    return text
