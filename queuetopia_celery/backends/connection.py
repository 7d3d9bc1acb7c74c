"""Connection handling shared by the backends: the engine made safe across forks,
transactions joined or owned, autocommit connections pinned for the hot path, driver
errors translated to ours (with the password hidden), writes retried on a new
connection when theirs died, and commit hooks on the caller's Session or Connection."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from ..errors import DatabaseError, SchemaMissingError
from .pgbouncer import prepared_statement_hint

logger = logging.getLogger("queuetopia_celery.store")

#: What ``connection=`` may be: a Connection or a Session whose transaction we join.
Executor = Connection | Session

T = TypeVar("T")

#: Waits before each new try of a write whose connection was found dead (about 8 s in
#: all: a terminated backend is replaced at once, a restarting server is waited for).
#: An outcome write goes on trying every last wait while its task's time limit allows.
RETRY_DELAYS = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every secret (a database password) in ``text`` with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class CommitHook:
    """Hands the items collected under ``key`` on a Session or Connection to
    ``callback(items, committed)`` when its transaction commits; drops them on rollback."""

    def __init__(self, key: str, callback: Callable[..., None]) -> None:
        self.key = key
        self.callback = callback

    def committed(self, target: Any, *_: Any) -> None:
        items = target.info.pop(self.key, None)
        if items:
            self.callback(items, isinstance(target, Session))

    def rolled_back(self, target: Any, *_: Any) -> None:
        target.info.pop(self.key, None)


class Connections:
    """The connections of one engine, and what to do when they fail."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pid = os.getpid()
        self._secrets = [engine.url.password if isinstance(engine.url.password, str) else None]
        self._commit_hooks: dict[str, CommitHook] = {}
        self._local = threading.local()

    @property
    def engine(self) -> Engine:
        """The engine, made safe to use after a fork (Celery's prefork pool)."""
        pid = os.getpid()
        if pid != self._pid:
            # Connections inherited from the parent process must not be reused here.
            self._engine.dispose(close=False)
            self._pid = pid
        return self._engine

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    @contextlib.contextmanager
    def _transaction(self, connection: Executor | None = None) -> Iterator[Connection]:
        """A connection in a transaction: the caller's (joined, not committed here)
        or our own (committed on success)."""
        driver: Any = None
        try:
            if connection is None:
                with self.engine.begin() as conn:
                    driver = conn.connection.driver_connection
                    yield conn
            elif isinstance(connection, Session):
                yield connection.connection()
            else:
                yield connection
        except (SQLAlchemyError, psycopg.Error) as exc:
            # Our own connection found dead, or not opened: the transaction did not commit.
            lost = connection is None and (
                connection_lost(exc, driver) or (driver is None and operational(exc))
            )
            raise self._error(exc, connection_lost=lost) from exc

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """A no-op here: see :class:`AutocommitConnections`."""
        yield

    def _error(self, exc: BaseException, *, connection_lost: bool = False) -> DatabaseError:
        """Our exception for a driver error: :class:`SchemaMissingError` when the
        tables (or their newest columns) are missing, else :class:`DatabaseError`."""
        if schema_missing(exc):
            return SchemaMissingError(self._engine.url.render_as_string(hide_password=True))
        hint = prepared_statement_hint(exc)
        return DatabaseError(self.redact(f"database error: {exc}{hint}"), connection_lost=connection_lost)

    def _retried(
        self, what: str, attempt: Callable[[bool], T], extra: dict[str, Any], *, seconds: float | None = None
    ) -> T:
        """``attempt(False)``; when its connection is found dead (or cannot be opened),
        ``attempt(True)`` on a new connection after each of :data:`RETRY_DELAYS`, then
        after the last of them again as long as ``seconds`` (from now) allow. The retry
        must recognise a write of the lost try that committed."""
        end = None if seconds is None else time.monotonic() + seconds
        retry = False
        tries = 0
        while True:
            try:
                return attempt(retry)
            except DatabaseError as exc:
                if not exc.connection_lost:
                    raise
                delay = RETRY_DELAYS[min(tries, len(RETRY_DELAYS) - 1)]
                if tries >= len(RETRY_DELAYS) and (end is None or time.monotonic() + delay > end):
                    raise
                logger.warning(
                    "lost the database connection during %s; retrying on a new one", what, extra=extra
                )
                time.sleep(delay)
                retry = True
                tries += 1

    def _commit_hook(self, connection: Executor, key: str, callback: Callable[..., None]) -> None:
        """Call ``callback(items, committed)`` with the items collected under ``key``
        on ``connection.info`` when its transaction commits (see :class:`CommitHook`)."""
        # Listeners are registered once per Session or Connection, not per transaction:
        # ``once=True`` listeners stay in the event list after firing, so a long-lived
        # session would pile up one per committed transaction.
        hook = self._commit_hooks.setdefault(key, CommitHook(key, callback))
        names = (
            ("after_commit", "after_rollback") if isinstance(connection, Session) else ("commit", "rollback")
        )
        if not event.contains(connection, names[0], hook.committed):
            event.listen(connection, names[0], hook.committed)
            event.listen(connection, names[1], hook.rolled_back)


class AutocommitConnections(Connections):
    """:class:`Connections` with autocommit connections, one of them pinned to a
    thread for the hot path (PostgreSQL)."""

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep one autocommit connection for this thread while the block runs: the hot
        path (:meth:`start`, :meth:`finish_and_start`) then costs one round trip per
        statement, without a pool checkout (and its ping) or BEGIN/COMMIT each time."""
        local = self._local
        if getattr(local, "conn", None) is not None:
            yield
            return
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise self._error(exc) from exc
        local.conn = conn
        try:
            yield
        finally:
            local.conn = None
            with contextlib.suppress(SQLAlchemyError):
                conn.close()

    @contextlib.contextmanager
    def _autocommit(self) -> Iterator[Connection]:
        """An autocommit connection (PostgreSQL): each statement is its own transaction.
        The pinned one when inside :meth:`pinned`."""
        pinned = getattr(self._local, "conn", None)
        # The driver's connection, kept to tell afterwards whether it died (the
        # SQLAlchemy connection is closed by then).
        driver: Any = None if pinned is None else pinned.connection.driver_connection
        try:
            if pinned is not None:
                yield pinned
            else:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    driver = conn.connection.driver_connection
                    yield conn
        except (SQLAlchemyError, psycopg.Error) as exc:
            # No connection yet (the server is down or restarting): nothing was sent.
            lost = connection_lost(exc, driver) or (driver is None and operational(exc))
            if pinned is not None:
                # A broken connection must not be reused by the rest of the burst.
                self._local.conn = None
                with contextlib.suppress(SQLAlchemyError):
                    pinned.invalidate()
            raise self._error(exc, connection_lost=lost) from exc


#: MySQL's error codes for a missing table (1146) and an unknown column (1054).
MYSQL_SCHEMA_MISSING = (1146, 1054)


def schema_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says a table or column of ours does not exist (not migrated)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
        return True
    args = getattr(orig, "args", ())
    if type(orig).__module__.startswith("pymysql") and args and args[0] in MYSQL_SCHEMA_MISSING:
        return True
    text = str(orig)
    return isinstance(exc, sa.exc.OperationalError) and (
        "no such table: queuetopia_" in text or "no such column" in text
    )


def connection_lost(exc: BaseException, driver: Any) -> bool:
    """Whether ``exc`` came from a dead connection (``driver``, the psycopg connection
    that ran the statement) rather than from the statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (psycopg.OperationalError, sa.exc.OperationalError)) or driver is None:
        return False
    with contextlib.suppress(Exception):
        return bool(driver.broken or driver.closed)
    return False


def operational(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure to reach the server (refused, shutting down)."""
    return isinstance(exc, (sa.exc.OperationalError, psycopg.OperationalError))


def ping_when_idle(engine: Engine, idle: float) -> None:
    """Check a pooled connection with a ping before it is handed out when it has been
    idle for more than ``idle`` seconds; a dead one is replaced (the pool retries the
    checkout with a new connection). ``pool_pre_ping`` without its round trip on every
    checkout of a connection in steady use, as connection pools such as HikariCP do."""
    key = "queuetopia_idle_since"

    @event.listens_for(engine, "connect")
    def _connect(_dbapi_connection: Any, record: Any) -> None:
        record.info[key] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[key] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(key)
        if since is not None and time.monotonic() - since <= idle:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"pooled connection is gone: {exc}") from exc
