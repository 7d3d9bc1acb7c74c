"""A SQLAlchemy Connection over Django's own database connection.

The store speaks SQLAlchemy; a Django view's ``transaction.atomic()`` lives on Django's
psycopg connection. :func:`sqlalchemy_connection` wraps the psycopg connection that
Django holds for an alias (this thread's) in a SQLAlchemy Connection whose dialect never
begins, commits, rolls back or closes it: the store's statements then run inside
whatever Django has open (an atomic block, a savepoint) and end with it; outside an
atomic block Django's connection is in autocommit and each statement commits at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import sqlalchemy as sa
from django.db import connections
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.pool import NullPool

from queuetopia_celery.errors import ConfigurationError

_DIALECT = "postgresql.queuetopia_django"


class DjangoPsycopgDialect(PGDialect_psycopg):
    """psycopg 3 dialect on a connection that Django owns: transaction control and
    closing stay with Django."""

    supports_statement_cache = True

    def do_begin(self, dbapi_connection: Any) -> None:
        pass

    def do_commit(self, dbapi_connection: Any) -> None:
        pass

    def do_rollback(self, dbapi_connection: Any) -> None:
        pass

    def do_close(self, dbapi_connection: Any) -> None:
        pass

    def on_connect(self) -> None:
        # No notice handler or isolation level set on Django's connection.
        return None


sa.dialects.registry.register(_DIALECT, __name__, "DjangoPsycopgDialect")

_engines: dict[str, sa.Engine] = {}


def _check_backend(alias: str) -> None:
    connection = connections[alias]
    if connection.vendor != "postgresql":
        raise ConfigurationError(
            f"queuetopia_celery.contrib.django needs PostgreSQL; database {alias!r} is {connection.vendor}"
        )
    if connection.Database is not psycopg:
        raise ConfigurationError(
            f"queuetopia_celery.contrib.django needs Django's psycopg 3 backend; database {alias!r} "
            "uses psycopg2 (pip install 'psycopg[binary]' and Django picks psycopg 3)"
        )


def engine_for(alias: str = "default") -> sa.Engine:
    """The (cached) Engine whose connections are Django's connection of ``alias`` in
    the calling thread. Closing them leaves Django's connection open."""
    engine = _engines.get(alias)
    if engine is None:
        _check_backend(alias)

        def creator() -> Any:
            django_connection = connections[alias]
            django_connection.ensure_connection()
            return django_connection.connection

        engine = sa.create_engine(
            "postgresql+queuetopia_django://", creator=creator, poolclass=NullPool, pool_reset_on_return=None
        )
        _engines[alias] = engine
    return engine


@contextlib.contextmanager
def sqlalchemy_connection(alias: str = "default") -> Iterator[sa.Connection]:
    """A SQLAlchemy Connection running on Django's connection of ``alias``, in Django's
    current transaction (if any). Nothing is committed, rolled back or closed here.

    If a statement fails inside an atomic block, the block is marked for rollback, as
    Django does for its own queries (the PostgreSQL transaction cannot go on anyway).
    """
    django_connection = connections[alias]
    try:
        with engine_for(alias).connect() as conn:
            yield conn
    except Exception:
        raw = django_connection.connection
        if (
            django_connection.in_atomic_block
            and raw is not None
            and raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        ):
            django_connection.set_rollback(True)
        raise
