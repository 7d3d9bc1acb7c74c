"""The database side of queuetopia-celery: one backend per database behind one
interface (:class:`~queuetopia_celery.backends.base.Backend`). Nothing here imports
Celery. See docs/architecture.md."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from .base import Backend, Burst, Finished, Inserted, Lease, LostAttempt, Outcome
from .connection import Executor, ping_when_idle
from .mysql import MysqlBackend, configure_mysql
from .postgres import PostgresBackend
from .sqlite import SqliteBackend, configure_sqlite

#: The backend class of each SQLAlchemy dialect name. A new database is one module
#: implementing :class:`Backend` and one entry here (see docs/architecture.md).
BACKENDS: dict[str, type[PostgresBackend] | type[SqliteBackend] | type[MysqlBackend]] = {
    "postgresql": PostgresBackend,
    "sqlite": SqliteBackend,
    "mysql": MysqlBackend,
    "mariadb": MysqlBackend,
}


def open_backend(engine: Engine, scope: str, *, resend_after: float = 5.0) -> Backend:
    """The backend of ``engine``'s database for ``scope``."""
    try:
        backend = BACKENDS[engine.dialect.name]
    except KeyError:
        raise ValueError(f"no queuetopia backend for the {engine.dialect.name!r} database") from None
    return backend(engine, scope, resend_after=resend_after)


__all__ = [
    "BACKENDS",
    "Backend",
    "Burst",
    "Executor",
    "Finished",
    "Inserted",
    "Lease",
    "LostAttempt",
    "MysqlBackend",
    "Outcome",
    "PostgresBackend",
    "SqliteBackend",
    "configure_mysql",
    "configure_sqlite",
    "open_backend",
    "ping_when_idle",
]
