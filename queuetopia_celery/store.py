"""The one door to the database: every SQL statement of queuetopia-celery is built here.

Each public method is one transaction (or joins the caller's, where it takes
``connection=``). Nothing here imports Celery.

Lease protocol, in short:

* ``dispatch`` takes a queue's lease (``INSERT .. ON CONFLICT DO NOTHING``) for its
  head job when that job is due, with a fresh token and a short expiry: the time its
  perform message may wait in the broker before it is re-sent (``resend_after``).
* ``start`` checks the token, marks the lease started, extends it past the job's hard
  time limit and counts the attempt: one transaction.
* ``finish`` checks the token, writes the outcome and hands the lease on to the next
  due job (new token) or releases it: one transaction. A released queue is re-checked
  by the caller (``dispatch``) so that a job committed meanwhile is never missed.
* ``recover`` (the scan) records a failed attempt for every started lease that has
  expired (the worker died) and re-sends the message of every unstarted lease whose
  wait is over, under the same token, waiting twice as long before the next re-send
  (at most the dispatch grace).

A write whose connection dies (``start``, ``finish_and_start``, ``create_jobs``
without a caller connection) is retried on a new connection, and the retry recognises
its own write when the first one committed and only its reply was lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import event, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from . import schema
from .errors import DatabaseError, JobNotFoundError, JobStateError, QueueNotFoundError, SchemaMissingError
from .jobs import (
    HELD_UNTIL,
    ON_EXHAUSTED_HOLD,
    OPEN_STATUSES,
    STATUS_ABORTED,
    STATUS_DONE,
    STATUS_EXHAUSTED,
    STATUS_PENDING,
    STATUS_RUNNING,
    UTC,
    BulkResult,
    Job,
    JobState,
    NewJob,
    QueueFacts,
    QueueStatus,
    utcnow,
)

logger = logging.getLogger(__name__)

J = schema.jobs
Q = schema.queues
L = schema.leases

#: What ``connection=`` may be: a Connection or a Session whose transaction we join.
Executor = Connection | Session

_JOB_COLUMNS = [J.c[name] for name in (f.name for f in dataclasses.fields(Job))]

T = TypeVar("T")

#: Waits before each new try of a write whose connection was found dead (about 8 s in
#: all: a terminated backend is replaced at once, a restarting server is waited for).
#: An outcome write goes on trying every last wait while its task's time limit allows.
RETRY_DELAYS = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
#: The re-send wait doubles at each re-send of one lease, up to 2 ** this many times.
_MAX_DOUBLINGS = 30


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """A lease just taken or handed on: send a perform message for it."""

    queue: str
    job_id: int
    token: str
    timeout: float


@dataclasses.dataclass(frozen=True)
class Burst:
    """What :meth:`Store.finish_and_start` needs to begin the next job in the same
    Celery task: who runs it, whether the burst budget allows another job, and the
    time limits its running lease must outlive."""

    worker: str
    start_next: bool
    time_limit_grace: float
    lease_margin: float
    #: Seconds left before the task's hard time limit (None: no limit on the message).
    deadline_left: float | None


@dataclasses.dataclass(frozen=True)
class LostAttempt:
    """A started job whose lease expired: its worker died or was killed."""

    job: Job
    token: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as written by :meth:`Store.finish`."""

    succeeded: bool
    result: Any = None
    error: str | None = None
    backoff: float = 0.0
    #: The performer raised DoNotRetry: no further attempt, whatever ``max_attempts``.
    final: bool = False


def _failure_plan(job: Job, outcome: Outcome) -> tuple[str, float | None, dt.datetime | None]:
    """``(status, backoff, until)`` of a job whose attempt failed: retried after
    ``backoff`` seconds; past ``max_attempts``, exhausted (the queue moves on) or held
    until ``until`` (it stays at the head, never due, until an operator retries or
    aborts it)."""
    if job.attempts < job.max_attempts and not outcome.final:
        return STATUS_PENDING, outcome.backoff, None
    if job.on_exhausted == ON_EXHAUSTED_HOLD:
        return STATUS_PENDING, None, HELD_UNTIL
    return STATUS_EXHAUSTED, None, None


def new_token() -> str:
    return uuid.uuid4().hex


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every secret (a database password) in ``text`` with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class _CommitHook:
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


class Store:
    """All reads and writes of one scope."""

    def __init__(self, engine: Engine, scope: str, *, resend_after: float = 5.0) -> None:
        self._engine = engine
        self._pid = os.getpid()
        self.scope = scope
        #: Seconds an unstarted lease's message may wait before its first re-send.
        self.resend_after = resend_after
        self.dialect = engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self._secrets = [engine.url.password if isinstance(engine.url.password, str) else None]
        self._commit_hooks: dict[str, _CommitHook] = {}
        self._local = threading.local()

    # ------------------------------------------------------------------ plumbing

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
    def _tx(self, connection: Executor | None = None) -> Iterator[Connection]:
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
                _connection_lost(exc, driver) or (driver is None and _operational(exc))
            )
            raise self._error(exc, connection_lost=lost) from exc

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep one autocommit connection for this thread while the block runs: the hot
        path (:meth:`start`, :meth:`finish_and_start`) then costs one round trip per
        statement, without a pool checkout (and its ping) or BEGIN/COMMIT each time."""
        local = self._local
        if getattr(local, "conn", None) is not None or not self.is_postgres:
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
    def _auto(self) -> Iterator[Connection]:
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
            lost = _connection_lost(exc, driver) or (driver is None and _operational(exc))
            if pinned is not None:
                # A broken connection must not be reused by the rest of the burst.
                self._local.conn = None
                with contextlib.suppress(SQLAlchemyError):
                    pinned.invalidate()
            raise self._error(exc, connection_lost=lost) from exc

    def _error(self, exc: BaseException, *, connection_lost: bool = False) -> DatabaseError:
        """Our exception for a driver error: :class:`SchemaMissingError` when the
        tables (or their newest columns) are missing, else :class:`DatabaseError`."""
        if _schema_missing(exc):
            return SchemaMissingError(self._engine.url.render_as_string(hide_password=True))
        return DatabaseError(self.redact(f"database error: {exc}"), connection_lost=connection_lost)

    def _first_wait(self, grace: float) -> float:
        """How long a new unstarted lease waits for its start before its message is
        re-sent: ``resend_after``, at most ``grace``."""
        return min(self.resend_after, grace)

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

    def _now(self) -> sa.ColumnElement[dt.datetime]:
        """The database clock (PostgreSQL), or this process's clock (SQLite)."""
        if self.is_postgres:
            return func.now()
        return sa.literal(utcnow(), schema.UTCDateTime())

    def _after(self, seconds: float) -> sa.ColumnElement[dt.datetime]:
        """``now + seconds`` on the database clock."""
        if self.is_postgres:
            return func.now() + sa.literal(dt.timedelta(seconds=seconds), sa.Interval())
        return sa.literal(utcnow() + dt.timedelta(seconds=seconds), schema.UTCDateTime())

    def _insert(self, table: sa.Table) -> Any:
        if self.is_postgres:
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _open_head(self, queue: sa.ColumnElement[str] | str, *, exclude_id: Any = None) -> sa.Select[Any]:
        """The head of a queue: its first open job by (scheduled_at, sequence)."""
        query = (
            sa.select(J.c.id, J.c.status, J.c.timeout, J.c.scheduled_at, J.c.next_attempt_at)
            .where(J.c.scope == self.scope, J.c.queue == queue, J.c.status.in_(OPEN_STATUSES))
            .order_by(J.c.scheduled_at, J.c.sequence)
            .limit(1)
        )
        if exclude_id is not None:
            query = query.where(J.c.id != exclude_id)
        return query

    def on_commit(
        self,
        connection: Executor,
        key: str,
        items: Iterable[str],
        callback: Callable[[set[str]], None] | Callable[[set[str], bool], None],
    ) -> None:
        """Collect ``items`` under ``key`` on the caller's connection and call
        ``callback(items, committed)`` once when its transaction commits.

        With a Session the callback runs after the commit (``committed=True``). A
        Connection has no after-commit event: the callback runs just before the commit
        (``committed=False``), and a shared advisory lock per item, held until the
        transaction ends, lets a kick (:meth:`dispatch` with ``wait_for_producers``)
        wait for the commit. A rollback discards the items.
        """
        info = connection.info
        pending: set[str] = info.setdefault(key, set())
        new = set(items) - pending
        pending.update(new)
        is_session = isinstance(connection, Session)
        if new and not is_session and self.is_postgres:
            with self._tx(connection) as conn:
                for queue in sorted(new):
                    conn.execute(sa.select(func.pg_advisory_xact_lock_shared(self._queue_key(queue))))
        # Listeners are registered once per Session or Connection, not per transaction:
        # ``once=True`` listeners stay in the event list after firing, so a long-lived
        # session would pile up one per committed transaction.
        hook = self._commit_hooks.setdefault(key, _CommitHook(key, callback))
        names = ("after_commit", "after_rollback") if is_session else ("commit", "rollback")
        if not event.contains(connection, names[0], hook.committed):
            event.listen(connection, names[0], hook.committed)
            event.listen(connection, names[1], hook.rolled_back)

    def _queue_key(self, queue: str) -> sa.ColumnElement[int]:
        return func.hashtextextended(sa.literal(f"queuetopia\x1f{self.scope}\x1f{queue}"), 0)

    def _paused_clause(self, queue: str) -> sa.ColumnElement[bool]:
        """Whether an operator paused the queue (see :meth:`pause`)."""
        return sa.select(Q.c.queue).where(Q.c.scope == self.scope, Q.c.queue == queue, Q.c.paused).exists()

    def _is_paused(self, conn: Connection, queue: str) -> bool:
        return bool(conn.execute(sa.select(self._paused_clause(queue))).scalar())

    def _paused_among(self, conn: Connection, queues: Sequence[str]) -> set[str]:
        query = sa.select(Q.c.queue).where(
            Q.c.scope == self.scope, Q.c.queue.in_(sorted(set(queues))), Q.c.paused
        )
        return set(conn.execute(query).scalars())

    # ------------------------------------------------------------------ creating jobs

    def create_jobs(self, specs: Sequence[NewJob], *, connection: Executor | None = None) -> list[Job]:
        """Insert jobs, numbering them per queue in commit order. Returns them in the
        order given."""
        if not specs:
            return []
        kept, position = _unique_specs(specs)
        if len(kept) < len(specs):
            # Items repeating an earlier item's unique_key get that item's job.
            made = self.create_jobs(kept, connection=connection)
            return [made[p] for p in position]
        by_queue = _by_queue(specs)
        created: list[Job | None] = [None] * len(specs)
        if self.is_postgres:
            if connection is None:
                # One statement is its own transaction: no BEGIN/COMMIT round trips.
                return self._create_jobs_own(specs, by_queue, None)[0]
            with self._tx(connection) as conn:
                return self._create_jobs_pg(conn, specs, by_queue, None, None)[0]
        with self._tx(connection) as conn:
            now = conn.execute(sa.select(self._now())).scalar_one() if self.is_postgres else utcnow()
            now = now.astimezone(UTC)
            # Unique jobs: one writer at a time on SQLite, so looking first is race-free
            # (the unique index still stands behind it). Found ones take no sequence.
            existing = self._open_by_key(conn, [s.unique_key for s in specs if s.unique_key is not None])
            for i, spec in enumerate(specs):
                if spec.unique_key is not None and spec.unique_key in existing:
                    created[i] = existing[spec.unique_key]
            # Lock queue rows in a stable order so concurrent bulk producers cannot deadlock.
            for queue in sorted(by_queue):
                indexes = [i for i in by_queue[queue] if created[i] is None]
                if not indexes:
                    continue
                first_due = min(specs[i].scheduled_at or now for i in indexes)
                last, locked_at = self._bump_sequence(conn, queue, len(indexes), first_due)
                rows = []
                for offset, i in enumerate(indexes):
                    spec = specs[i]
                    rows.append(
                        {
                            "scope": self.scope,
                            "queue": queue,
                            "action": spec.action,
                            "params": spec.params,
                            "sequence": last - len(indexes) + 1 + offset,
                            "timeout": spec.timeout,
                            "max_backoff": spec.max_backoff,
                            "max_attempts": spec.max_attempts,
                            "on_exhausted": spec.on_exhausted,
                            # Not ``now`` (our transaction's start): a producer that
                            # started earlier but got the queue row later must not sort
                            # before jobs committed ahead of it.
                            "scheduled_at": spec.scheduled_at or locked_at,
                            "status": STATUS_PENDING,
                            "attempts": 0,
                            "inserted_at": locked_at,
                            "unique_key": spec.unique_key,
                        }
                    )
                result = conn.execute(
                    sa.insert(J).returning(*_JOB_COLUMNS, sort_by_parameter_order=True), rows
                )
                for i, row in zip(indexes, result.mappings(), strict=True):
                    created[i] = Job.from_row(row)
        return [job for job in created if job is not None]

    def create_jobs_and_dispatch(
        self, specs: Sequence[NewJob], *, grace: float | None
    ) -> tuple[list[Job], list[Dispatch]]:
        """:meth:`create_jobs` in its own transaction, taking in the same statement the
        lease of each queue whose head is then pending and due and which nobody holds:
        the kick of a new or idle queue without a second statement (PostgreSQL; with a
        ``grace`` of None no lease is taken).

        Returns the jobs (in the order given) and the leases taken: send them. Queues
        without a lease taken here (held, not due, or not decidable in this statement)
        still need :meth:`dispatch` once this returns, as after :meth:`create_jobs`.
        """
        if not specs:
            return [], []
        kept, position = _unique_specs(specs)
        if len(kept) < len(specs):
            made, taken = self.create_jobs_and_dispatch(kept, grace=grace)
            return [made[p] for p in position], taken
        if not self.is_postgres:
            return self.create_jobs(specs), []
        return self._create_jobs_own(specs, _by_queue(specs), grace)

    def _create_jobs_own(
        self, specs: Sequence[NewJob], by_queue: dict[str, list[int]], grace: float | None
    ) -> tuple[list[Job], list[Dispatch]]:
        """:meth:`_create_jobs_pg` in its own autocommit statement, retried on a new
        connection when the connection dies. The jobs carry a key of this call: a retry
        first looks for them, so an insert that committed but whose reply was lost is
        returned, not made twice."""
        key = new_token()

        def attempt(retry: bool) -> tuple[list[Job], list[Dispatch]]:
            if not retry:
                with self._auto() as conn:
                    return self._create_jobs_pg(conn, specs, by_queue, grace, key)
            with self._tx() as conn:
                self._wait_for_creators(conn, sorted(by_queue))
                found = self._created_by(conn, specs, by_queue, key)
                if found is not None:
                    return found
                return self._create_jobs_pg(conn, specs, by_queue, grace, key)

        return self._retried("create_jobs", attempt, {"scope": self.scope})

    def _wait_for_creators(self, conn: Connection, queues: Sequence[str]) -> None:
        """Lock the rows of these queues (creating missing ones) until this transaction
        ends: a lost insert that the server may still be running (the connection cut by
        the network, not by the server) holds them, so it has ended, committed or not,
        before this transaction looks for its jobs."""
        insert = postgresql.insert(Q).values(
            [{"scope": self.scope, "queue": queue, "last_sequence": 0, "due_at": None} for queue in queues]
        )
        conn.execute(insert.on_conflict_do_nothing(index_elements=[Q.c.scope, Q.c.queue]))
        conn.execute(
            sa.select(Q.c.queue)
            .where(Q.c.scope == self.scope, Q.c.queue.in_(list(queues)))
            .order_by(Q.c.queue)
            .with_for_update()
        )

    def _created_by(
        self, conn: Connection, specs: Sequence[NewJob], by_queue: dict[str, list[int]], key: str
    ) -> tuple[list[Job], list[Dispatch]] | None:
        """The jobs inserted by the create call ``key`` (in the order given), with the
        unstarted leases that call took (to send again: a duplicate message is
        harmless), or None when that call wrote nothing."""
        rows = conn.execute(
            sa.select(*_JOB_COLUMNS).where(J.c.create_key == key).order_by(J.c.queue, J.c.sequence)
        ).mappings()
        found: dict[str, list[Job]] = {}
        for row in rows:
            job = Job.from_row(row)
            found.setdefault(job.queue, []).append(job)
        if not found:
            return None
        created: list[Job | None] = [None] * len(specs)
        for queue, indexes in by_queue.items():
            # In sequence order; an item whose unique_key was taken inserted nothing.
            mine = iter(found.get(queue, []))
            following = next(mine, None)
            for i in indexes:
                wanted = specs[i].unique_key
                if following is not None and (wanted is None or following.unique_key == wanted):
                    created[i] = following
                    following = next(mine, None)
        if any(job is None for job in created):
            self._fill_existing(conn, specs, created)
        by_id = {job.id: job for jobs in found.values() for job in jobs}
        leases = conn.execute(
            sa.select(L.c.queue, L.c.job_id, L.c.token)
            .where(L.c.scope == self.scope, L.c.queue.in_(sorted(found)), L.c.started_at.is_(None))
            .order_by(L.c.queue)
        )
        taken = [
            Dispatch(row.queue, row.job_id, row.token, by_id[row.job_id].timeout)
            for row in leases
            if row.job_id in by_id
        ]
        return [job for job in created if job is not None], taken

    def _create_jobs_pg(
        self,
        conn: Connection,
        specs: Sequence[NewJob],
        by_queue: dict[str, list[int]],
        grace: float | None,
        key: str | None,
    ) -> tuple[list[Job], list[Dispatch]]:
        """:meth:`create_jobs` on PostgreSQL: one statement for any number of jobs and
        queues (queue rows upserted in queue order, so concurrent bulk producers cannot
        deadlock; then the jobs inserted, numbered from each queue's counter). With a
        ``grace``, the statement also takes the leases it can (see
        :meth:`create_jobs_and_dispatch`)."""
        queues = sorted(by_queue)
        dues: list[dt.datetime | None] = []
        nows: list[bool] = []
        for queue in queues:
            explicit = [specs[i].scheduled_at for i in by_queue[queue]]
            given = [d for d in explicit if d is not None]
            dues.append(min(given) if given else None)
            nows.append(len(given) < len(explicit))
        offsets = [0] * len(specs)
        counts = [0] * len(specs)
        for indexes in by_queue.values():
            for offset, i in enumerate(indexes):
                offsets[i] = offset + 1
                counts[i] = len(indexes)
        params = {
            "s": self.scope,
            "queues": queues,
            "counts": [len(by_queue[q]) for q in queues],
            "dues": dues,
            "nows": nows,
            "r_queue": [spec.queue for spec in specs],
            "r_action": [spec.action for spec in specs],
            "r_params": [json.dumps(spec.params) for spec in specs],
            "r_k": offsets,
            "r_n": counts,
            "r_timeout": [float(spec.timeout) for spec in specs],
            "r_backoff": [float(spec.max_backoff) for spec in specs],
            "r_attempts": [spec.max_attempts for spec in specs],
            "r_exhausted": [spec.on_exhausted for spec in specs],
            "r_scheduled": [spec.scheduled_at for spec in specs],
            "r_unique": [spec.unique_key for spec in specs],
            "take": grace is not None,
            "grace": 0.0 if grace is None else self._first_wait(grace),
            "key": key,
        }
        created: list[Job | None] = [None] * len(specs)
        taken: dict[str, Dispatch] = {}
        index_of = {(specs[i].queue, offsets[i]): i for i in range(len(specs))}
        for row in _raw_all(conn, _CREATE_SQL, params):
            offset = row["back"] + len(by_queue[row["queue"]])
            created[index_of[(row["queue"], offset)]] = Job.from_row(row)
            if row["lease_token"] is not None:
                taken[row["queue"]] = Dispatch(
                    row["queue"], int(row["lease_job_id"]), row["lease_token"], float(row["lease_timeout"])
                )
        if any(job is None for job in created):
            # Unique jobs whose key an open job holds: that job instead.
            self._fill_existing(conn, specs, created)
        return [job for job in created if job is not None], [taken[q] for q in sorted(taken)]

    def _open_by_key(self, conn: Connection, keys: Sequence[str]) -> dict[str, Job]:
        """The open job holding each of these unique keys, where one does."""
        if not keys:
            return {}
        rows = conn.execute(
            sa.select(*_JOB_COLUMNS).where(
                J.c.scope == self.scope,
                J.c.unique_key.in_(sorted(set(keys))),
                J.c.unique_key.is_not(None),
                J.c.status.in_(OPEN_STATUSES),
            )
        ).mappings()
        return {row["unique_key"]: Job.from_row(row) for row in rows}

    def _fill_existing(self, conn: Connection, specs: Sequence[NewJob], created: list[Job | None]) -> None:
        """Fill the places of items not inserted because an open job held their
        unique_key with that job. This runs in a statement after the insert, which
        sees the holder even when it was committed by another producer while the
        insert waited; if the holder has ended since, the newest job with the key is
        the one that held it."""
        missing = [i for i, job in enumerate(created) if job is None]
        keys = [specs[i].unique_key for i in missing]
        if any(key is None for key in keys):
            raise DatabaseError("a job without unique_key was not inserted")
        found = self._open_by_key(conn, [key for key in keys if key is not None])
        gone = sorted({key for key in keys if key is not None and key not in found})
        if gone:
            rows = conn.execute(
                sa.select(*_JOB_COLUMNS)
                .where(J.c.scope == self.scope, J.c.unique_key.in_(gone))
                .order_by(J.c.id)
            ).mappings()
            found.update({row["unique_key"]: Job.from_row(row) for row in rows})
        for i in missing:
            key = specs[i].unique_key
            if key not in found:
                raise DatabaseError(f"the job holding unique_key {key!r} vanished; create the job again")
            created[i] = found[key]

    def _bump_sequence(
        self, conn: Connection, queue: str, count: int, due: dt.datetime
    ) -> tuple[int, dt.datetime]:
        """Upsert the queue's row: take ``count`` sequence numbers and lower ``due_at``.
        Returns the last number taken and the time the row was locked (the default
        ``scheduled_at``, so that (scheduled_at, sequence) follows commit order too).

        The row stays locked until the creating transaction ends, so producers of one
        queue commit in sequence order; producers of other queues do not wait.
        """
        insert = self._insert(Q).values(scope=self.scope, queue=queue, last_sequence=count, due_at=due)
        excluded = insert.excluded
        upsert = insert.on_conflict_do_update(
            index_elements=[Q.c.scope, Q.c.queue],
            set_={
                "last_sequence": Q.c.last_sequence + count,
                "due_at": sa.case(
                    (Q.c.due_at.is_(None), excluded.due_at),
                    (excluded.due_at < Q.c.due_at, excluded.due_at),
                    else_=Q.c.due_at,
                ),
            },
        )
        if not self.is_postgres:
            return int(conn.execute(upsert.returning(Q.c.last_sequence)).scalar_one()), utcnow()
        last, locked_at = conn.execute(upsert.returning(Q.c.last_sequence, func.clock_timestamp())).one()
        return int(last), locked_at.astimezone(UTC)

    # ------------------------------------------------------------------ reading jobs

    def get_job(self, job_id: int, *, connection: Executor | None = None) -> Job | None:
        with self._tx(connection) as conn:
            row = (
                conn.execute(sa.select(*_JOB_COLUMNS).where(J.c.scope == self.scope, J.c.id == job_id))
                .mappings()
                .first()
            )
        return Job.from_row(row) if row else None

    def _filtered(self, query: Any, queue: str | None, action: str | None, state: JobState | None) -> Any:
        query = query.where(J.c.scope == self.scope)
        if queue is not None:
            query = query.where(J.c.queue == queue)
        if action is not None:
            query = query.where(J.c.action == action)
        if state is not None:
            query = query.where(self._state_clause(state))
        return query

    def _state_clause(self, state: JobState) -> sa.ColumnElement[bool]:
        pending = J.c.status == STATUS_PENDING
        by_status = {
            JobState.DONE: STATUS_DONE,
            JobState.EXHAUSTED: STATUS_EXHAUSTED,
            JobState.ABORTED: STATUS_ABORTED,
            JobState.RUNNING: STATUS_RUNNING,
        }
        if state in by_status:
            return J.c.status == by_status[state]
        if state is JobState.HELD:
            return sa.and_(pending, J.c.next_attempt_at >= HELD_UNTIL)
        if state is JobState.RETRYING:
            not_held = sa.or_(J.c.next_attempt_at.is_(None), J.c.next_attempt_at < HELD_UNTIL)
            return sa.and_(pending, J.c.attempts > 0, not_held)
        if state is JobState.SCHEDULED:
            return sa.and_(pending, J.c.attempts == 0, J.c.scheduled_at > self._now())
        return sa.and_(pending, J.c.attempts == 0, J.c.scheduled_at <= self._now())

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Job]:
        query = self._filtered(sa.select(*_JOB_COLUMNS), queue, action, state)
        # Newest created first across queues (Queuetopia's order), by sequence within
        # a queue (jobs created together share their inserted_at).
        query = query.order_by(J.c.inserted_at.desc(), J.c.sequence.desc(), J.c.id.desc()).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self._tx() as conn:
            return [Job.from_row(row) for row in conn.execute(query).mappings()]

    def count_jobs(
        self, *, queue: str | None = None, action: str | None = None, state: JobState | None = None
    ) -> int:
        query = self._filtered(sa.select(func.count()).select_from(J), queue, action, state)
        with self._tx() as conn:
            return int(conn.execute(query).scalar_one())

    # ------------------------------------------------------------------ dispatching

    def dispatch(
        self,
        queues: Sequence[str] | None = None,
        *,
        grace: float,
        limit: int = 1000,
        max_concurrent: int | None = None,
        wait_for_producers: bool = False,
        locked_by: str | None = None,
    ) -> list[Dispatch]:
        """Take the lease of each given queue (or of due queues, found through
        ``queuetopia_queues.due_at``, when ``queues`` is None) whose head job is due
        and which nobody holds. Returns the leases taken: send a message for each."""
        if queues is not None and max_concurrent is None:
            # Every queue named is wanted (a bulk kick may name more than ``limit``).
            limit = max(limit, len(queues))
            if self.is_postgres and not wait_for_producers:
                # The plain kick: one autocommit statement per 500 queues.
                kicked: list[Dispatch] = []
                with self._auto() as conn:
                    # Leases are always inserted in queue order: two multi-row inserts
                    # (a bulk kick and a scan) waiting on each other's uncommitted
                    # lease rows in opposite orders would deadlock.
                    for chunk in _chunks(sorted(set(queues)), 500):
                        kicked.extend(self._take_leases(conn, chunk, grace, limit - len(kicked), locked_by))
                return kicked
        if queues is None and max_concurrent is None and self.is_postgres:
            return self._scan_pg(grace, limit, locked_by)
        with self._tx() as conn:
            if wait_for_producers and queues and self.is_postgres:
                for queue in sorted(set(queues)):
                    conn.execute(sa.select(func.pg_advisory_xact_lock(self._queue_key(queue))))
            if max_concurrent is not None:
                if self.is_postgres:
                    key = func.hashtextextended(sa.literal(f"queuetopia-scope\x1f{self.scope}"), 0)
                    conn.execute(sa.select(func.pg_advisory_xact_lock(key)))
                held = conn.execute(
                    sa.select(func.count()).select_from(L).where(L.c.scope == self.scope)
                ).scalar_one()
                limit = min(limit, max(max_concurrent - int(held), 0))
                if limit == 0:
                    return []
                if queues is None:
                    return self._fill_slots(conn, grace, limit, locked_by)
            candidates = sorted(set(self._due_queues(conn, limit) if queues is None else queues))
            if not candidates:
                return []
            taken: list[Dispatch] = []
            for chunk in _chunks(candidates, 500):
                if len(taken) >= limit:
                    break
                taken.extend(self._take_leases(conn, chunk, grace, limit - len(taken), locked_by))
            if queues is None:
                stale = sorted(set(candidates) - {d.queue for d in taken})
                if stale:
                    self._refresh_due(conn, stale)
        return taken

    def _scan_pg(self, grace: float, limit: int, locked_by: str | None) -> list[Dispatch]:
        """:meth:`dispatch` of the due queues (PostgreSQL, no concurrency limit): one
        autocommit statement finds them, looks up their heads and takes the leases;
        then the ``due_at`` of the queues found not due is raised."""
        params = {"s": self.scope, "limit": limit, "grace": self._first_wait(grace), "by": locked_by}
        taken: list[Dispatch] = []
        stale: list[str] = []
        with self._auto() as conn:
            for row in conn.execute(_SCAN_SQL, params):
                if row.token is None:
                    stale.append(row.queue)
                else:
                    taken.append(Dispatch(row.queue, row.job_id, row.token, row.timeout))
        if stale:
            with self._tx() as conn:
                self._refresh_due(conn, sorted(stale))
        return taken

    def _fill_slots(
        self, conn: Connection, grace: float, slots: int, locked_by: str | None
    ) -> list[Dispatch]:
        """:meth:`dispatch` of the due queues under a concurrency limit: up to ``slots``
        leases, taken in ``due_at`` order. A queue found not due (its ``due_at`` left
        behind when it emptied) is passed over for the next one and its ``due_at``
        raised, so that it never keeps a free slot from a waiting queue."""
        candidates = self._due_queues(conn, max(slots, 1000))
        taken: list[Dispatch] = []
        stale: list[str] = []
        tried = 0
        while len(taken) < slots and tried < len(candidates):
            chunk = candidates[tried : tried + slots - len(taken)]
            tried += len(chunk)
            got = self._take_leases(conn, sorted(chunk), grace, len(chunk), locked_by)
            taken.extend(got)
            leased = {d.queue for d in got}
            stale.extend(queue for queue in chunk if queue not in leased)
        if stale:
            self._refresh_due(conn, sorted(stale))
        return taken

    def _due_queues(self, conn: Connection, limit: int) -> list[str]:
        held = sa.select(L.c.queue).where(L.c.scope == Q.c.scope, L.c.queue == Q.c.queue)
        query = (
            sa.select(Q.c.queue)
            .where(Q.c.scope == self.scope, Q.c.due_at <= self._now(), ~held.exists(), ~Q.c.paused)
            .order_by(Q.c.due_at)
            .limit(limit)
        )
        return list(conn.execute(query).scalars())

    def _take_leases(
        self, conn: Connection, queues: Sequence[str], grace: float, limit: int, locked_by: str | None
    ) -> list[Dispatch]:
        if self.is_postgres:
            params = {"s": self.scope, "queues": list(queues), "limit": limit, "by": locked_by}
            params["grace"] = self._first_wait(grace)
            return [
                Dispatch(row.queue, row.job_id, row.token, row.timeout)
                for row in conn.execute(_TAKE_SQL, params)
            ]
        # SQLite: one writer at a time, so a plain loop is as safe as the statement above.
        taken: list[Dispatch] = []
        now = utcnow()
        for queue in queues:
            if len(taken) >= limit:
                break
            first = conn.execute(self._open_head(queue)).first()
            if first is None or first.status != STATUS_PENDING:
                continue
            if (first.next_attempt_at or first.scheduled_at) > now or self._is_paused(conn, queue):
                continue
            token = new_token()
            inserted = conn.execute(
                self._insert(L)
                .values(
                    scope=self.scope,
                    queue=queue,
                    token=token,
                    job_id=first.id,
                    locked_at=self._now(),
                    expires_at=self._after(self._first_wait(grace)),
                    locked_by=locked_by,
                )
                .on_conflict_do_nothing(index_elements=[L.c.scope, L.c.queue])
            )
            if inserted.rowcount:
                taken.append(Dispatch(queue, first.id, token, first.timeout))
        return taken

    def _refresh_due(self, conn: Connection, queues: Sequence[str]) -> None:
        """Raise ``due_at`` of queues found not due to their head's real due time
        (NULL when empty). Rows a producer holds are skipped: that producer lowers
        ``due_at`` itself."""
        lock = sa.select(Q.c.queue).where(Q.c.scope == self.scope, Q.c.queue.in_(queues))
        if self.is_postgres:
            lock = lock.with_for_update(skip_locked=True)
        locked = list(conn.execute(lock).scalars())
        if not locked:
            return
        head = (
            sa.select(sa.func.coalesce(J.c.next_attempt_at, J.c.scheduled_at))
            .where(J.c.scope == Q.c.scope, J.c.queue == Q.c.queue, J.c.status.in_(OPEN_STATUSES))
            .order_by(J.c.scheduled_at, J.c.sequence)
            .limit(1)
            .scalar_subquery()
        )
        conn.execute(sa.update(Q).where(Q.c.scope == self.scope, Q.c.queue.in_(locked)).values(due_at=head))

    # ------------------------------------------------------------------ running jobs

    def start(self, queue: str, job_id: int, token: str, *, worker: str, lease: float) -> Job | None:
        """Begin an attempt if ``token`` still holds the queue's lease for ``job_id``
        and no attempt was begun under it. Counts the attempt now, so a job that kills
        its worker still runs out of attempts. Returns the job, or None (stale message:
        drop it)."""
        if self.is_postgres:
            return self._start_pg(queue, job_id, token, worker=worker, lease=lease)
        with self._tx() as conn:
            started = conn.execute(
                sa.update(L)
                .where(
                    L.c.scope == self.scope,
                    L.c.queue == queue,
                    L.c.token == token,
                    L.c.job_id == job_id,
                    L.c.started_at.is_(None),
                    ~self._paused_clause(queue),
                )
                .values(started_at=self._now(), expires_at=self._after(lease), locked_by=worker)
            )
            if started.rowcount != 1:
                return None
            row = (
                conn.execute(
                    sa.update(J)
                    .where(J.c.id == job_id, J.c.status == STATUS_PENDING)
                    .values(
                        status=STATUS_RUNNING,
                        attempts=J.c.attempts + 1,
                        attempted_at=self._now(),
                        attempted_by=worker,
                    )
                    .returning(*_JOB_COLUMNS)
                )
                .mappings()
                .first()
            )
            if row is None:
                # The lease points at a job that is no longer open: release the queue.
                self._release(conn, queue, token)
                return None
        return Job.from_row(row)

    def _start_pg(self, queue: str, job_id: int, token: str, *, worker: str, lease: float) -> Job | None:
        """:meth:`start` in one statement (one round trip, autocommit). A connection
        found dead (a pooled connection in use less than a second ago is not pinged
        first, the server restarted) is replaced and the start tried again; if the lost
        statement did commit, the retry finds the lease started by this worker under
        this token and the job running for it, and begins the attempt (a duplicate
        message, which finds the lease started by another, is still dropped)."""
        params = {"s": self.scope, "q": queue, "tok": token, "jid": job_id, "w": worker, "lease": lease}
        return self._retried(
            f"the start of job {job_id}",
            lambda retry: self._start_once(queue, token, params, retry),
            {"scope": self.scope, "queue": queue, "job_id": job_id},
        )

    def _start_once(self, queue: str, token: str, params: dict[str, Any], retry: bool) -> Job | None:
        with self._auto() as conn:
            row = _raw_one(conn, _START_SQL, params)
            if row["id"] is not None:
                return Job.from_row(row)
            if row["leased"]:
                # The lease points at a job that is no longer open: release the queue.
                self._release(conn, queue, token)
            elif retry:
                mine = _raw_all(conn, _STARTED_BY_SQL, params)
                if mine:
                    return Job.from_row(mine[0])
        return None

    def finish_and_start(
        self,
        job: Job,
        token: str,
        outcome: Outcome,
        *,
        grace: float,
        burst: Burst,
    ) -> tuple[bool, Dispatch | None, Job | None]:
        """:meth:`finish`, then, when ``burst.start_next`` and the queue's next job is due
        and fits in ``burst.deadline_left`` seconds (with ``time_limit_grace``),
        :meth:`start` it under the new token, running lease ``max(timeout +
        time_limit_grace, deadline_left) + lease_margin``.

        Returns ``(written, next, started)``. ``written`` and a ``next`` of None (the
        queue released: re-check it) are as for :meth:`finish`. ``started`` is the next
        job, begun here: run it under ``next.token``. A ``next`` without ``started`` is
        a lease handed on: send it through the broker.

        On PostgreSQL this is one statement (one round trip), for a success as for a
        failure: the lease check, the outcome, the next-head lookup, the hand-on and
        the next start together.
        """
        if self.is_postgres:
            return self._finish_and_start_pg(job, token, outcome, grace=grace, burst=burst)
        written, nxt = self.finish(job, token, outcome, grace=grace)
        if not written or nxt is None or not burst.start_next:
            return written, nxt, None
        left = burst.deadline_left
        if left is not None and nxt.timeout + burst.time_limit_grace > left:
            return written, nxt, None
        lease = max(nxt.timeout + burst.time_limit_grace, left or 0.0) + burst.lease_margin
        started = self.start(job.queue, nxt.job_id, nxt.token, worker=burst.worker, lease=lease)
        if started is None:
            # Taken over meanwhile (or no longer open: start released the queue).
            return True, None, None
        return True, nxt, started

    def _finish_and_start_pg(
        self,
        job: Job,
        token: str,
        outcome: Outcome,
        *,
        grace: float,
        burst: Burst,
    ) -> tuple[bool, Dispatch | None, Job | None]:
        fresh = new_token()
        if outcome.succeeded:
            status, backoff, until = STATUS_DONE, None, None
        else:
            status, backoff, until = _failure_plan(job, outcome)
        params = {
            "s": self.scope,
            "q": job.queue,
            "tok": token,
            "jid": job.id,
            "status": status,
            "error": outcome.error,
            "backoff": backoff,
            "until": until,
            "result": None if outcome.result is None else json.dumps(outcome.result),
            "new": fresh,
            "grace": self._first_wait(grace),
            "start": burst.start_next,
            "w": burst.worker,
            "tlg": burst.time_limit_grace,
            "margin": burst.lease_margin,
            "left": burst.deadline_left,
        }
        # Its lease is valid until after the task's hard time limit: while the task
        # may run, a server down for a while is waited for rather than the job run again.
        left = burst.deadline_left
        return self._retried(
            f"the outcome write of job {job.id}",
            lambda retry: self._finish_once(job, params, burst, retry),
            {"scope": self.scope, "queue": job.queue, "job_id": job.id, "attempt": job.attempts},
            seconds=None if left is None else left - 1.0,
        )

    def _finish_once(
        self, job: Job, params: dict[str, Any], burst: Burst, retry: bool
    ) -> tuple[bool, Dispatch | None, Job | None]:
        fresh = params["new"]
        with self._auto() as conn:
            row = _raw_one(conn, _FINISH_SQL, params)
            if not row["written"]:
                if retry:
                    return self._finished_by(conn, job, params, burst)
                return False, None, None
            if row["next_id"] is None:
                return True, None, None
            nxt = Dispatch(job.queue, int(row["next_id"]), fresh, float(row["next_timeout"]))
            if not row["inline"]:
                return True, nxt, None
            if row["id"] is None:
                # The next job was no longer pending (aborted meanwhile): let go of the
                # queue; the caller re-checks it.
                self._release(conn, job.queue, fresh)
                return True, None, None
            return True, nxt, Job.from_row(row)

    def _finished_by(
        self, conn: Connection, job: Job, params: dict[str, Any], burst: Burst
    ) -> tuple[bool, Dispatch | None, Job | None]:
        """After a retried outcome write found its token gone: was it this write that
        committed (its reply lost)? The job then holds exactly this outcome for this
        attempt (a lost attempt recorded by the scan has another error), and the lease
        is released, handed on under the new token chosen for this write (the message
        is to be sent), or started at once for this worker (the burst runs it)."""
        mine = conn.execute(sa.select(J.c.status, J.c.error, J.c.attempts).where(J.c.id == job.id)).first()
        if mine is None or (mine.status, mine.error, mine.attempts) != (
            params["status"],
            params["error"],
            job.attempts,
        ):
            return False, None, None
        lease = conn.execute(
            sa.select(L.c.job_id, L.c.started_at, L.c.locked_at, L.c.locked_by).where(
                L.c.scope == self.scope, L.c.queue == job.queue, L.c.token == params["new"]
            )
        ).first()
        if lease is None:
            return True, None, None
        nxt = conn.execute(sa.select(*_JOB_COLUMNS).where(J.c.id == lease.job_id)).mappings().first()
        if nxt is None:
            return True, None, None
        following = Job.from_row(nxt)
        handed = Dispatch(job.queue, following.id, params["new"], following.timeout)
        if lease.started_at is None:
            return True, handed, None
        inline = lease.started_at == lease.locked_at and lease.locked_by == burst.worker
        if inline and following.status == STATUS_RUNNING and following.attempted_by == burst.worker:
            return True, handed, following
        return True, None, None

    def finish(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, hand_off: bool = True
    ) -> tuple[bool, Dispatch | None]:
        """Write an attempt's outcome under ``token`` and pass the lease on.

        Returns ``(written, next)``: ``written`` is False when the token was no longer
        valid (the lease expired and was recovered; the outcome is dropped). ``next``
        is the lease handed to the queue's next due job (send it), or None when the
        queue was released (the caller then re-checks it with :meth:`dispatch`).
        """
        with self._tx() as conn:
            lease = sa.select(L.c.job_id).where(
                L.c.scope == self.scope, L.c.queue == job.queue, L.c.token == token
            )
            if self.is_postgres:
                lease = lease.with_for_update()
            held = conn.execute(lease).first()
            if held is None or held.job_id != job.id:
                return False, None
            values: dict[str, Any]
            if outcome.succeeded:
                values = {
                    "status": STATUS_DONE,
                    "done_at": self._now(),
                    "result": outcome.result,
                    "error": None,
                    "next_attempt_at": None,
                }
            else:
                values = {"error": outcome.error, **self._failed_values(job, outcome)}
            written = conn.execute(
                # By id alone (the lease ties the job to this scope): see _START_SQL.
                sa.update(J).where(J.c.id == job.id, J.c.status == STATUS_RUNNING).values(**values)
            )
            if written.rowcount != 1:
                self._release(conn, job.queue, token)
                return False, None
            nxt = self._pass_on(conn, job.queue, token, grace) if hand_off else None
            if nxt is None:
                self._release(conn, job.queue, token)
            return True, nxt

    def _pass_on(self, conn: Connection, queue: str, token: str, grace: float) -> Dispatch | None:
        head = conn.execute(self._open_head(queue)).first()
        if head is None or head.status != STATUS_PENDING or self._is_paused(conn, queue):
            return None
        due = head.next_attempt_at or head.scheduled_at
        now = conn.execute(sa.select(self._now())).scalar_one() if self.is_postgres else utcnow()
        if due > now:
            return None
        fresh = new_token()
        moved = conn.execute(
            sa.update(L)
            .where(L.c.scope == self.scope, L.c.queue == queue, L.c.token == token)
            .values(
                token=fresh,
                job_id=head.id,
                started_at=None,
                locked_at=self._now(),
                expires_at=self._after(self._first_wait(grace)),
                resends=0,
            )
        )
        if moved.rowcount != 1:
            return None
        return Dispatch(queue, head.id, fresh, head.timeout)

    def recover(
        self, *, limit: int = 1000, claim: float = 60.0, grace: float = 120.0
    ) -> tuple[list[LostAttempt], list[Dispatch]]:
        """Find expired leases. Un-started ones (a message lost, or still waiting in a
        busy broker) are re-sent under the same token, so that a message that was only
        late still starts its job: each waits twice as long as the one before for its
        start (``resend_after``, then twice that, ..., at most ``grace``) and is
        returned: send it. Started ones (a worker died mid-job) are claimed (a new
        token, held ``claim`` more seconds) and returned: record each with
        :meth:`record_lost`. The claim keeps a concurrent scan from handling the same
        attempt (and calling the failure hook twice) and fences off the dead worker's
        late outcome; if this scan dies before recording, the claim expires and a
        later scan takes over. Returns (lost attempts, leases to re-send)."""
        with self._tx() as conn:
            query = (
                sa.select(L.c.queue, L.c.token, L.c.job_id, L.c.started_at, L.c.resends)
                .where(L.c.scope == self.scope, L.c.expires_at < self._now())
                .limit(limit)
            )
            if self.is_postgres:
                query = query.with_for_update(skip_locked=True)
            expired = conn.execute(query).all()
            unstarted = [row for row in expired if row.started_at is None]
            if unstarted:
                # A paused queue's unstarted lease is let go (its start would refuse).
                paused = self._paused_among(conn, [row.queue for row in unstarted])
                for row in unstarted:
                    if row.queue in paused:
                        self._release(conn, row.queue, row.token)
                unstarted = [row for row in unstarted if row.queue not in paused]
            resent = self._resend(conn, unstarted, grace)
            started: dict[int, str] = {}
            for row in expired:
                if row.started_at is None:
                    continue
                started[row.job_id] = claimed = new_token()
                conn.execute(
                    sa.update(L)
                    .where(L.c.scope == self.scope, L.c.queue == row.queue, L.c.token == row.token)
                    .values(token=claimed, expires_at=self._after(claim))
                )
            lost = []
            if started:
                rows = conn.execute(sa.select(*_JOB_COLUMNS).where(J.c.id.in_(list(started)))).mappings()
                lost = [LostAttempt(Job.from_row(row), started[row["id"]]) for row in rows]
        return lost, resent

    def _resend(self, conn: Connection, unstarted: Sequence[Any], grace: float) -> list[Dispatch]:
        """Count a re-send of each of these unstarted leases (locked) and set when the
        next is due: ``resend_after * 2 ** resends``, at most ``grace``, from now."""
        if not unstarted:
            return []
        first = self._first_wait(grace)
        timeouts = dict(
            conn.execute(
                sa.select(J.c.id, J.c.timeout).where(J.c.id.in_(sorted({row.job_id for row in unstarted})))
            ).all()
        )
        now = None if self.is_postgres else utcnow()
        updates = []
        for row in unstarted:
            wait = dt.timedelta(seconds=min(first * 2 ** min(row.resends + 1, _MAX_DOUBLINGS), grace))
            updates.append(
                {
                    "b_queue": row.queue,
                    "b_token": row.token,
                    "b_resends": row.resends + 1,
                    "b_wait": wait if now is None else now + wait,
                }
            )
        until: Any = (
            func.now() + sa.bindparam("b_wait", type_=sa.Interval())
            if self.is_postgres
            else sa.bindparam("b_wait", type_=schema.UTCDateTime())
        )
        conn.execute(
            sa.update(L)
            .where(L.c.scope == self.scope, L.c.queue == sa.bindparam("b_queue"))
            .where(L.c.token == sa.bindparam("b_token"))
            .values(resends=sa.bindparam("b_resends"), expires_at=until),
            updates,
        )
        # A job gone from the table (deleted by hand): the message's start releases the lease.
        return [
            Dispatch(row.queue, row.job_id, row.token, float(timeouts.get(row.job_id, 60.0)))
            for row in sorted(unstarted, key=lambda r: r.queue)
        ]

    def record_lost(self, lost: LostAttempt, outcome: Outcome) -> bool:
        """Record the failed attempt of a job whose worker died, and drop its lease,
        if the lease is still held by the claim :meth:`recover` took."""
        job = lost.job
        with self._tx() as conn:
            lease = sa.select(L.c.token).where(
                L.c.scope == self.scope,
                L.c.queue == job.queue,
                L.c.token == lost.token,
            )
            if self.is_postgres:
                lease = lease.with_for_update(skip_locked=True)
            if conn.execute(lease).first() is None:
                return False
            conn.execute(
                sa.update(J)
                .where(J.c.id == job.id, J.c.status == STATUS_RUNNING)
                .values(error=outcome.error, **self._failed_values(job, outcome))
            )
            self._release(conn, job.queue, lost.token)
        return True

    def replace_error(self, job_id: int, recorded: str, error: str) -> bool:
        """Replace a job's stored error with ``error`` if it is still ``recorded`` (no
        other attempt has ended since): how the scan adds what a failure hook raised to
        a lost attempt it has already recorded."""
        with self._tx() as conn:
            moved = conn.execute(
                sa.update(J)
                .where(J.c.scope == self.scope, J.c.id == job_id, J.c.error == recorded)
                .values(error=error)
            )
        return moved.rowcount == 1

    def _release(self, conn: Connection, queue: str, token: str) -> None:
        """Drop the queue's lease if ``token`` still holds it."""
        conn.execute(sa.delete(L).where(L.c.scope == self.scope, L.c.queue == queue, L.c.token == token))

    def release_unsent(self, dispatches: Sequence[Dispatch]) -> int:
        """Give back leases whose perform message could not be sent (the broker is
        down): each is dropped if its token still holds it unstarted, and its queue is
        made due, so that the next scan takes it again instead of waiting for the
        lease to expire. Returns how many were dropped."""
        if not dispatches:
            return 0
        with self._tx() as conn:
            dropped = 0
            for d in dispatches:
                dropped += int(
                    conn.execute(
                        sa.delete(L).where(
                            L.c.scope == self.scope,
                            L.c.queue == d.queue,
                            L.c.token == d.token,
                            L.c.started_at.is_(None),
                        )
                    ).rowcount
                    or 0
                )
            self._lower_due(conn, sorted({d.queue for d in dispatches}))
        return dropped

    def extend_lease(self, queue: str, token: str, seconds: float) -> bool:
        """Make a started lease last ``seconds`` from now (database clock), if
        ``token`` still holds it."""
        with self._tx() as conn:
            moved = conn.execute(
                sa.update(L)
                .where(L.c.scope == self.scope, L.c.queue == queue, L.c.token == token)
                .values(expires_at=self._after(seconds))
            )
        return moved.rowcount == 1

    def lease_of(self, queue: str) -> dict[str, Any] | None:
        """The lease row of a queue, for inspection (tests, status)."""
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(L).where(L.c.scope == self.scope, L.c.queue == queue))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    # ------------------------------------------------------------------ operator
    # Everything below serves operators and tests (status, retry, abort, purge, drain);
    # none of it is on the workers' hot path, except _failed_values.

    def _failed_values(self, job: Job, outcome: Outcome) -> dict[str, Any]:
        """Status and next attempt of a job whose attempt failed (see _failure_plan)."""
        status, backoff, until = _failure_plan(job, outcome)
        return {"status": status, "next_attempt_at": until if backoff is None else self._after(backoff)}

    def _get_for_update(self, conn: Connection, job_id: int) -> Job:
        query = sa.select(*_JOB_COLUMNS).where(J.c.scope == self.scope, J.c.id == job_id)
        if self.is_postgres:
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            raise JobNotFoundError(self.scope, job_id)
        return Job.from_row(row)

    def _lower_due(self, conn: Connection, queues: Sequence[str] | None) -> None:
        """Make queues due for the next scan (``due_at`` is only a lower bound)."""
        now = self._now()
        query = sa.update(Q).where(Q.c.scope == self.scope, sa.or_(Q.c.due_at.is_(None), Q.c.due_at > now))
        if queues is not None:
            query = query.where(Q.c.queue.in_(list(queues)))
        conn.execute(query.values(due_at=now))

    def retry(self, job_id: int, *, force: bool = False) -> Job:
        """Make a job that waits for a retry, is held or exhausted, or is scheduled,
        due now. An exhausted job comes back to its place in its queue for one more
        attempt (failing it exhausts or holds it again); if a later job of its queue
        has already run, it would run after that job: refused unless ``force``. Raises
        :class:`JobNotFoundError` or :class:`JobStateError`."""
        with self._tx() as conn:
            job = self._get_for_update(conn, job_id)
            if job.status not in (STATUS_PENDING, STATUS_EXHAUSTED):
                hint = "its attempt is in progress" if job.status == STATUS_RUNNING else ""
                raise JobStateError(job_id, job.state.value, "retry", hint)
            if job.status == STATUS_EXHAUSTED and not force:
                later = conn.execute(
                    sa.select(J.c.id)
                    .where(
                        J.c.scope == self.scope,
                        J.c.queue == job.queue,
                        J.c.attempts > 0,
                        sa.or_(
                            J.c.scheduled_at > job.scheduled_at,
                            sa.and_(J.c.scheduled_at == job.scheduled_at, J.c.sequence > job.sequence),
                        ),
                    )
                    .limit(1)
                ).scalar()
                if later is not None:
                    raise JobStateError(
                        job_id,
                        job.state.value,
                        "retry",
                        f"its queue has moved on (job {later}, after it in the queue, has already run), "
                        "so it would now run out of order; retry with force (CLI: --force) if that is fine",
                    )
            if job.status == STATUS_EXHAUSTED and job.unique_key is not None:
                holder = self._open_by_key(conn, [job.unique_key]).get(job.unique_key)
                if holder is not None:
                    raise JobStateError(
                        job_id, job.state.value, "retry", f"job {holder.id} holds its unique_key now"
                    )
            row = (
                conn.execute(
                    sa.update(J)
                    .where(J.c.id == job_id, J.c.scope == self.scope)
                    .values(status=STATUS_PENDING, next_attempt_at=self._now())
                    .returning(*_JOB_COLUMNS)
                )
                .mappings()
                .one()
            )
            self._lower_due(conn, [job.queue])
        return Job.from_row(row)

    def abort(self, job_id: int, reason: str) -> Job:
        """Take a job that is not running out of its queue, for good: status
        ``aborted``, with the reason and time recorded; the row is kept. A dispatched
        but unstarted lease on it is released so that the queue moves on. Raises
        :class:`JobNotFoundError` or :class:`JobStateError`."""
        with self._tx() as conn:
            found = conn.execute(
                sa.select(J.c.queue).where(J.c.scope == self.scope, J.c.id == job_id)
            ).first()
            if found is None:
                raise JobNotFoundError(self.scope, job_id)
            # Lock in the workers' order (lease, then job) so that we never deadlock with them.
            lease = sa.select(L.c.token).where(L.c.scope == self.scope, L.c.queue == found.queue)
            if self.is_postgres:
                conn.execute(lease.with_for_update())
            job = self._get_for_update(conn, job_id)
            if job.status != STATUS_PENDING:
                hint = (
                    "its attempt is in progress; abort it once the attempt has ended"
                    if job.status == STATUS_RUNNING
                    else "it is no longer in its queue"
                )
                raise JobStateError(job_id, job.state.value, "abort", hint)
            row = (
                conn.execute(
                    sa.update(J)
                    .where(J.c.id == job_id, J.c.scope == self.scope, J.c.status == STATUS_PENDING)
                    .values(
                        status=STATUS_ABORTED,
                        abort_reason=reason,
                        aborted_at=self._now(),
                        next_attempt_at=None,
                    )
                    .returning(*_JOB_COLUMNS)
                )
                .mappings()
                .one()
            )
            conn.execute(
                sa.delete(L).where(
                    L.c.scope == self.scope,
                    L.c.queue == job.queue,
                    L.c.job_id == job_id,
                    L.c.started_at.is_(None),
                )
            )
            self._lower_due(conn, [job.queue])
        return Job.from_row(row)

    def purge(self, older_than: float, *, batch: int = 5000) -> int:
        """Delete done jobs of this scope that finished more than ``older_than``
        seconds ago, in batches (one transaction each). Exhausted and aborted jobs are
        kept. Returns how many were deleted."""
        total = 0
        while True:
            with self._tx() as conn:
                old = (
                    sa.select(J.c.id)
                    .where(
                        J.c.scope == self.scope,
                        J.c.status == STATUS_DONE,
                        J.c.done_at < self._after(-older_than),
                    )
                    .limit(batch)
                )
                ids = list(conn.execute(old).scalars())
                if ids:
                    conn.execute(sa.delete(J).where(J.c.id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total

    def _heads(self, conn: Connection, queues: Sequence[str] | None) -> dict[str, Job]:
        """The head (first open job) of each queue of the scope."""
        rank = (
            sa.func.row_number()
            .over(partition_by=J.c.queue, order_by=(J.c.scheduled_at, J.c.sequence))
            .label("rank")
        )
        ranked = sa.select(*_JOB_COLUMNS, rank).where(J.c.scope == self.scope, J.c.status.in_(OPEN_STATUSES))
        if queues is not None:
            ranked = ranked.where(J.c.queue.in_(list(queues)))
        sub = ranked.subquery()
        rows = conn.execute(
            sa.select(*[sub.c[c.name] for c in _JOB_COLUMNS]).where(sub.c.rank == 1)
        ).mappings()
        return {row["queue"]: Job.from_row(row) for row in rows}

    def _blocked_since(self, conn: Connection, head: Job) -> dt.datetime:
        """When ``head`` became its queue's head: when the job before it ended, or
        when it was scheduled, whichever is later."""
        ended = sa.func.coalesce(J.c.done_at, J.c.aborted_at, J.c.attempted_at)
        previous = conn.execute(
            sa.select(ended)
            .where(
                J.c.scope == self.scope,
                J.c.queue == head.queue,
                J.c.sequence < head.sequence,
                J.c.status.not_in(OPEN_STATUSES),
            )
            .order_by(J.c.sequence.desc())
            .limit(1)
        ).scalar()
        if isinstance(previous, str):  # SQLite loses the type through coalesce()
            previous = dt.datetime.fromisoformat(previous)
        if previous is not None and previous.tzinfo is None:
            previous = previous.replace(tzinfo=UTC)
        return max(head.scheduled_at, previous) if previous is not None else head.scheduled_at

    def queue_statuses(self, *, queue: str | None = None, blocked_only: bool = False) -> list[QueueStatus]:
        """One row per queue that has open jobs or a lease: blocked queues first
        (longest blocked first), then by queue name."""
        with self._tx() as conn:
            names: list[str] | None = None if queue is None else [queue]
            if blocked_only:
                # Only queues with a failing open job can be blocked: look at those alone.
                failing = (
                    sa.select(J.c.queue)
                    .distinct()
                    .where(J.c.scope == self.scope, J.c.status.in_(OPEN_STATUSES), J.c.error.is_not(None))
                )
                if queue is not None:
                    failing = failing.where(J.c.queue == queue)
                names = list(conn.execute(failing).scalars())
                if not names:
                    return []
            counts = sa.select(J.c.queue, func.count(), func.min(J.c.inserted_at)).where(
                J.c.scope == self.scope, J.c.status.in_(OPEN_STATUSES)
            )
            if names is not None:
                counts = counts.where(J.c.queue.in_(names))
            pending = {row[0]: (int(row[1]), row[2]) for row in conn.execute(counts.group_by(J.c.queue))}
            heads = self._heads(conn, names)
            lease_q = sa.select(L).where(L.c.scope == self.scope)
            if names is not None:
                lease_q = lease_q.where(L.c.queue.in_(names))
            held = {row["queue"]: row for row in conn.execute(lease_q).mappings()}
            paused_q = sa.select(Q.c.queue).where(Q.c.scope == self.scope, Q.c.paused)
            if names is not None:
                paused_q = paused_q.where(Q.c.queue.in_(names))
            paused = set(conn.execute(paused_q).scalars())
            out = []
            for name in sorted(set(pending) | set(held) | (set() if blocked_only else paused)):
                head = heads.get(name)
                blocked = head is not None and head.error is not None
                if blocked_only and not blocked:
                    continue
                count, oldest = pending.get(name, (0, None))
                lease = held.get(name)
                if isinstance(oldest, str):
                    oldest = dt.datetime.fromisoformat(oldest)
                if oldest is not None and oldest.tzinfo is None:
                    oldest = oldest.replace(tzinfo=UTC)
                out.append(
                    QueueStatus(
                        queue=name,
                        pending=count,
                        head=head,
                        blocked=blocked,
                        blocked_since=self._blocked_since(conn, head)
                        if blocked and head is not None
                        else None,
                        locked_by=lease["locked_by"] if lease else None,
                        locked_at=lease["locked_at"] if lease else None,
                        locked_until=lease["expires_at"] if lease else None,
                        oldest_pending_at=oldest,
                        paused=name in paused,
                    )
                )
        far = dt.datetime.max.replace(tzinfo=UTC)
        out.sort(key=lambda s: (not s.blocked, s.blocked_since or far, s.queue))
        return out

    def release_unstarted(self, queue: str | None = None) -> int:
        """Drop the dispatched-but-unstarted leases of the scope (their messages are
        only wake-ups and will be dropped as stale). Used by ``drain``."""
        with self._tx() as conn:
            query = sa.delete(L).where(L.c.scope == self.scope, L.c.started_at.is_(None))
            if queue is not None:
                query = query.where(L.c.queue == queue)
            return int(conn.execute(query).rowcount or 0)

    def advance(self, queue: str | None = None) -> bool:
        """Move time forward for the open jobs of the scope (or of one queue), for a
        test's ``drain(with_scheduled=True)``: if no queue head is due, shift every
        pending job's ``scheduled_at`` and retry time back by the same amount so that
        the earliest head becomes due now. Order within each queue is kept. Held
        jobs stay held. Returns False when there is nothing to advance to."""
        with self._tx() as conn:
            now = conn.execute(sa.select(self._now())).scalar_one() if self.is_postgres else utcnow()
            leased = set(conn.execute(sa.select(L.c.queue).where(L.c.scope == self.scope)).scalars())
            due_times = [
                head.due_at
                for head in self._heads(conn, None if queue is None else [queue]).values()
                if head.status == STATUS_PENDING and not head.held and head.queue not in leased
            ]
            if not due_times:
                return False
            earliest = min(due_times)
            if earliest > now:
                delta = earliest - now
                select = sa.select(J.c.id, J.c.scheduled_at, J.c.next_attempt_at).where(
                    J.c.scope == self.scope, J.c.status == STATUS_PENDING
                )
                if queue is not None:
                    select = select.where(J.c.queue == queue)
                rows = [
                    {
                        "b_id": row.id,
                        "b_scheduled_at": row.scheduled_at - delta,
                        "b_next": row.next_attempt_at
                        if row.next_attempt_at is None or row.next_attempt_at >= HELD_UNTIL
                        else row.next_attempt_at - delta,
                    }
                    for row in conn.execute(select)
                ]
                if rows:
                    conn.execute(
                        sa.update(J)
                        .where(J.c.id == sa.bindparam("b_id"))
                        .values(
                            scheduled_at=sa.bindparam("b_scheduled_at", type_=schema.UTCDateTime()),
                            next_attempt_at=sa.bindparam("b_next", type_=schema.UTCDateTime()),
                        ),
                        rows,
                    )
            self._lower_due(conn, [queue] if queue is not None else None)
        return True

    # ------------------------------------------------------------------ pause, bulk, explain
    # Issue 12's operator features: paused queues, bulk retry and abort by filter, and
    # the facts behind ``explain``.

    def _queue_row(self, conn: Connection, queue: str) -> Any:
        query = sa.select(Q.c.paused).where(Q.c.scope == self.scope, Q.c.queue == queue)
        if self.is_postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise QueueNotFoundError(self.scope, queue)
        return row

    def pause(self, queue: str) -> bool:
        """Pause a queue: no job of it starts until :meth:`resume` (the scan, the kick,
        the hand-on and the start all check the flag); a running job finishes. The
        queue's dispatched but unstarted lease is let go (its message is dropped as
        stale). Returns False when the queue was already paused (nothing changed).
        Raises :class:`QueueNotFoundError` for a queue with no row."""
        with self._tx() as conn:
            if self._queue_row(conn, queue).paused:
                return False
            conn.execute(sa.update(Q).where(Q.c.scope == self.scope, Q.c.queue == queue).values(paused=True))
            conn.execute(
                sa.delete(L).where(L.c.scope == self.scope, L.c.queue == queue, L.c.started_at.is_(None))
            )
        return True

    def resume(self, queue: str) -> bool:
        """Resume a paused queue and make it due for the next scan (the caller wakes it
        at once with :meth:`dispatch`). Returns False when it was not paused.
        Raises :class:`QueueNotFoundError` for a queue with no row."""
        with self._tx() as conn:
            if not self._queue_row(conn, queue).paused:
                return False
            conn.execute(sa.update(Q).where(Q.c.scope == self.scope, Q.c.queue == queue).values(paused=False))
            self._lower_due(conn, [queue])
        return True

    def _bulk_filter(self, query: Any, queue: str | None, action: str | None) -> Any:
        query = query.where(J.c.scope == self.scope)
        if queue is not None:
            query = query.where(J.c.queue == queue)
        if action is not None:
            query = query.where(J.c.action == action)
        return query

    def retry_many(
        self,
        *,
        queue: str | None,
        action: str | None,
        states: Sequence[JobState],
        force: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        """:meth:`retry` of every job of the scope in one of ``states`` (exhausted,
        held, retrying), of ``queue`` and/or ``action``: found with one statement and
        made due now with one statement per 10,000 jobs, in one transaction. The rules
        of the single retry hold: an exhausted job whose queue has run a later job is
        skipped unless ``force``; so is an exhausted job whose unique key another open
        job holds (of several exhausted jobs with one key, the newest is retried)."""
        state_clause = sa.or_(*(self._state_clause(state) for state in states))
        candidates = self._bulk_filter(
            sa.select(J.c.id, J.c.queue, J.c.status, J.c.scheduled_at, J.c.sequence, J.c.unique_key),
            queue,
            action,
        ).where(state_clause)
        if self.is_postgres:
            candidates = candidates.with_for_update()
        skipped: dict[str, int] = {}
        with self._tx() as conn:
            rows = conn.execute(candidates.order_by(J.c.id)).all()
            exhausted = [row for row in rows if row.status == STATUS_EXHAUSTED]
            drop: set[int] = set()
            if exhausted and not force:
                last = self._last_attempted(conn, sorted({row.queue for row in exhausted}))
                moved = {
                    row.id
                    for row in exhausted
                    if row.queue in last and last[row.queue] > (row.scheduled_at, row.sequence)
                }
                if moved:
                    skipped["moved_on"] = len(moved)
                    drop |= moved
            keyed = [row for row in exhausted if row.unique_key is not None and row.id not in drop]
            if keyed:
                held = set(self._open_by_key(conn, [row.unique_key for row in keyed]))
                newest: dict[str, int] = {}
                for row in keyed:
                    newest[row.unique_key] = max(row.id, newest.get(row.unique_key, 0))
                taken = {
                    row.id for row in keyed if row.unique_key in held or newest[row.unique_key] != row.id
                }
                if taken:
                    skipped["unique_key"] = len(taken)
                    drop |= taken
            chosen = [row for row in rows if row.id not in drop]
            queues = tuple(sorted({row.queue for row in chosen}))
            if not dry_run and chosen:
                ids = [row.id for row in chosen]
                for start in range(0, len(ids), 10_000):
                    conn.execute(
                        sa.update(J)
                        .where(J.c.scope == self.scope, J.c.id.in_(ids[start : start + 10_000]))
                        .values(status=STATUS_PENDING, next_attempt_at=self._now())
                    )
                self._lower_due(conn, queues)
        return BulkResult(count=len(chosen), skipped=skipped, dry_run=dry_run, queues=queues)

    def _last_attempted(self, conn: Connection, queues: Sequence[str]) -> dict[str, tuple[dt.datetime, int]]:
        """The queue position ``(scheduled_at, sequence)`` of each queue's last
        attempted job."""
        rank = (
            sa.func.row_number()
            .over(partition_by=J.c.queue, order_by=(J.c.scheduled_at.desc(), J.c.sequence.desc()))
            .label("rank")
        )
        sub = (
            sa.select(J.c.queue, J.c.scheduled_at, J.c.sequence, rank)
            .where(J.c.scope == self.scope, J.c.queue.in_(list(queues)), J.c.attempts > 0)
            .subquery()
        )
        rows = conn.execute(sa.select(sub.c.queue, sub.c.scheduled_at, sub.c.sequence).where(sub.c.rank == 1))
        return {row.queue: (row.scheduled_at, row.sequence) for row in rows}

    def abort_many(
        self, *, queue: str | None, action: str | None, reason: str, dry_run: bool = False
    ) -> BulkResult:
        """:meth:`abort` of every pending job (waiting, scheduled, retrying or held) of
        ``queue`` and/or ``action`` in one statement; running jobs are skipped (counted
        as ``running``). Unstarted leases on the aborted jobs are let go."""
        skipped: dict[str, int] = {}
        with self._tx() as conn:
            counts = conn.execute(
                self._bulk_filter(sa.select(J.c.status, J.c.queue, func.count()), queue, action)
                .where(J.c.status.in_(OPEN_STATUSES))
                .group_by(J.c.status, J.c.queue)
            ).all()
            running = sum(int(n) for status, _, n in counts if status == STATUS_RUNNING)
            if running:
                skipped["running"] = running
            queues = tuple(sorted({name for status, name, _ in counts if status == STATUS_PENDING}))
            count = sum(int(n) for status, _, n in counts if status == STATUS_PENDING)
            if dry_run or not count:
                return BulkResult(count=count, skipped=skipped, dry_run=dry_run, queues=queues)
            if self.is_postgres:
                # Lock in the workers' order (leases, then jobs), as abort does.
                conn.execute(
                    sa.select(L.c.queue)
                    .where(L.c.scope == self.scope, L.c.queue.in_(list(queues)))
                    .order_by(L.c.queue)
                    .with_for_update()
                )
            done = conn.execute(
                self._bulk_filter(sa.update(J), queue, action)
                .where(J.c.status == STATUS_PENDING)
                .values(
                    status=STATUS_ABORTED, abort_reason=reason, aborted_at=self._now(), next_attempt_at=None
                )
            )
            count = int(done.rowcount or 0)
            aborted = sa.select(J.c.id).where(J.c.id == L.c.job_id, J.c.status == STATUS_ABORTED).exists()
            conn.execute(
                sa.delete(L).where(
                    L.c.scope == self.scope, L.c.queue.in_(list(queues)), L.c.started_at.is_(None), aborted
                )
            )
            self._lower_due(conn, queues)
        return BulkResult(count=count, skipped=skipped, dry_run=False, queues=queues)

    def queue_facts(self, queue: str) -> QueueFacts:
        """What :func:`queuetopia_celery.explain.explain` needs about one queue, read
        in one transaction."""
        with self._tx() as conn:
            now = conn.execute(sa.select(self._now())).scalar_one() if self.is_postgres else utcnow()
            row = conn.execute(
                sa.select(Q.c.paused).where(Q.c.scope == self.scope, Q.c.queue == queue)
            ).first()
            open_jobs = conn.execute(
                sa.select(func.count()).where(
                    J.c.scope == self.scope, J.c.queue == queue, J.c.status.in_(OPEN_STATUSES)
                )
            ).scalar_one()
            head = self._heads(conn, [queue]).get(queue)
            lease = (
                conn.execute(sa.select(L).where(L.c.scope == self.scope, L.c.queue == queue))
                .mappings()
                .first()
            )
            scope_leases = conn.execute(
                sa.select(func.count()).select_from(L).where(L.c.scope == self.scope)
            ).scalar_one()
        return QueueFacts(
            queue=queue,
            known=row is not None,
            paused=bool(row.paused) if row is not None else False,
            open_jobs=int(open_jobs),
            head=head,
            lease_job_id=lease["job_id"] if lease else None,
            locked_by=lease["locked_by"] if lease else None,
            locked_at=lease["locked_at"] if lease else None,
            started_at=lease["started_at"] if lease else None,
            expires_at=lease["expires_at"] if lease else None,
            resends=int(lease["resends"]) if lease else 0,
            scope_leases=int(scope_leases),
            now=now.astimezone(UTC),
        )


def _driver_sql(sql: str) -> str:
    """``:name`` placeholders to psycopg's ``%(name)s``."""
    return re.sub(r"(?<![:\w]):([a-z_]+)", r"%(\1)s", sql)


def _schema_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says a table or column of ours does not exist (not migrated)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
        return True
    text = str(orig)
    return isinstance(exc, sa.exc.OperationalError) and (
        "no such table: queuetopia_" in text or "no such column" in text
    )


def _connection_lost(exc: BaseException, driver: Any) -> bool:
    """Whether ``exc`` came from a dead connection (``driver``, the psycopg connection
    that ran the statement) rather than from the statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (psycopg.OperationalError, sa.exc.OperationalError)) or driver is None:
        return False
    with contextlib.suppress(Exception):
        return bool(driver.broken or driver.closed)
    return False


def _operational(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure to reach the server (refused, shutting down)."""
    return isinstance(exc, (sa.exc.OperationalError, psycopg.OperationalError))


def _raw_all(conn: Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a hot-path statement on the psycopg connection itself (in the connection's
    transaction, if any) and return its rows, timestamps in UTC. SQLAlchemy's result
    machinery (rebuilt for every textual statement) cost about as much client CPU as
    the rest of a job."""
    # The DBAPI connection, not the driver's: the same psycopg connection on a sync
    # engine, and SQLAlchemy's sync facade over it under an AsyncConnection's run_sync.
    driver: Any = conn.connection.dbapi_connection
    assert driver is not None
    cur = driver.cursor()
    try:
        cur.execute(sql, params)
        names = [column.name for column in cur.description or ()]
        rows = [dict(zip(names, values, strict=True)) for values in cur.fetchall()]
    finally:
        cur.close()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dt.datetime):
                row[key] = value.astimezone(UTC)
    return rows


def _raw_one(conn: Connection, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """:func:`_raw_all` of a statement returning one row."""
    (row,) = _raw_all(conn, sql, params)
    return row


_JOB_FIELDS = ", ".join(f"j.{f.name}" for f in dataclasses.fields(Job))

#: Create jobs (PostgreSQL) in one statement. Each queue row is upserted (in queue
#: order) and stays locked until the creating transaction ends, so producers of one
#: queue commit in sequence order; ``clock_timestamp()`` once the row is ours is the
#: default ``scheduled_at``, so (scheduled_at, sequence) follows commit order too.
#: ``due_at`` is lowered to the earliest due time of the new jobs.
#:
#: With ``:take`` (autocommit only: the lease and the jobs commit together), the
#: statement also takes the lease of each queue whose head is pending and due: the head
#: among the queue's open jobs and the new ones. This statement's snapshot may miss jobs
#: of the queue that another producer committed while this one waited for the queue row;
#: so a queue is only decided here when the jobs it sees end exactly where the counter
#: stood before this statement (``last_sequence - n``). Any other queue, and one whose
#: lease is held, is left to a dispatch after the commit, as without ``:take``.
#:
#: A unique job whose key an open job of the scope holds is not inserted (``ON CONFLICT
#: .. DO NOTHING`` on the partial unique index, which waits for a producer inserting the
#: same key to end): its sequence number is left unused, a gap that keeps the order, and
#: its queue is then left to the dispatch after the commit (the check above fails).
_CREATE_SQL = _driver_sql(
    f"""
WITH q AS (
    INSERT INTO queuetopia_queues AS qq (scope, queue, last_sequence, due_at)
    SELECT :s, u.queue, u.n, least(u.due, CASE WHEN u.has_now THEN now() END)
    FROM unnest(CAST(:queues AS text[]), CAST(:counts AS int[]), CAST(:dues AS timestamptz[]),
                CAST(:nows AS boolean[])) AS u(queue, n, due, has_now)
    ORDER BY u.queue
    ON CONFLICT (scope, queue) DO UPDATE SET
        last_sequence = qq.last_sequence + excluded.last_sequence,
        due_at = CASE WHEN qq.due_at IS NULL OR excluded.due_at < qq.due_at
                      THEN excluded.due_at ELSE qq.due_at END
    RETURNING qq.queue, qq.last_sequence, clock_timestamp() AS locked_at, qq.paused
), r AS (
    SELECT * FROM unnest(
        CAST(:r_queue AS text[]), CAST(:r_action AS text[]), CAST(:r_params AS text[]),
        CAST(:r_k AS int[]), CAST(:r_n AS int[]), CAST(:r_timeout AS float8[]),
        CAST(:r_backoff AS float8[]), CAST(:r_attempts AS int[]), CAST(:r_exhausted AS text[]),
        CAST(:r_scheduled AS timestamptz[]), CAST(:r_unique AS text[])
    ) AS r(queue, action, params, k, n, timeout, max_backoff, max_attempts, on_exhausted, scheduled_at,
           unique_key)
), j AS (
    INSERT INTO queuetopia_jobs AS j (scope, queue, action, params, sequence, timeout, max_backoff,
        max_attempts, on_exhausted, scheduled_at, status, attempts, inserted_at, create_key, unique_key)
    SELECT :s, r.queue, r.action, CAST(r.params AS json), q.last_sequence - r.n + r.k, r.timeout,
        r.max_backoff, r.max_attempts, r.on_exhausted, coalesce(r.scheduled_at, q.locked_at),
        'pending', 0, q.locked_at, CAST(:key AS text), r.unique_key
    FROM r JOIN q ON q.queue = r.queue
    ON CONFLICT (scope, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'running')
    DO NOTHING
    RETURNING {", ".join(f"j.{f.name}" for f in dataclasses.fields(Job))}
), old AS (
    SELECT q.queue, h.id, h.status, h.timeout, h.scheduled_at, h.sequence, h.due
    FROM q
    JOIN unnest(CAST(:queues AS text[]), CAST(:counts AS int[])) AS u(queue, n) ON u.queue = q.queue
    LEFT JOIN LATERAL (
        SELECT x.id, x.status, x.timeout, x.scheduled_at, x.sequence,
            coalesce(x.next_attempt_at, x.scheduled_at) AS due
        FROM queuetopia_jobs AS x
        WHERE x.scope = :s AND x.queue = q.queue AND x.status IN ('pending', 'running')
        ORDER BY x.scheduled_at, x.sequence
        LIMIT 1
    ) AS h ON true
    WHERE CAST(:take AS boolean)
        AND q.last_sequence - u.n = coalesce((
            SELECT max(x.sequence) FROM queuetopia_jobs AS x WHERE x.scope = :s AND x.queue = q.queue
        ), 0)
), head AS (
    SELECT DISTINCT ON (c.queue) c.queue, c.id, c.status, c.timeout, c.due
    FROM (
        SELECT queue, id, status, timeout, scheduled_at, sequence, due FROM old WHERE id IS NOT NULL
        UNION ALL
        SELECT j.queue, j.id, j.status, j.timeout, j.scheduled_at, j.sequence, j.scheduled_at
        FROM j WHERE j.queue IN (SELECT queue FROM old)
    ) AS c
    ORDER BY c.queue, c.scheduled_at, c.sequence
), taken AS (
    INSERT INTO queuetopia_leases (scope, queue, token, job_id, locked_at, expires_at)
    SELECT :s, head.queue, CAST(gen_random_uuid() AS text), head.id, now(),
        now() + make_interval(secs => CAST(:grace AS float8))
    FROM head
    WHERE CAST(:take AS boolean) AND head.status = 'pending' AND head.due <= clock_timestamp()
        AND NOT EXISTS (SELECT 1 FROM q WHERE q.queue = head.queue AND q.paused)
    ORDER BY head.queue
    ON CONFLICT (scope, queue) DO NOTHING
    RETURNING queue, job_id, token
)
SELECT j.*, CAST(j.sequence - q.last_sequence AS int) AS back,
    t.job_id AS lease_job_id, t.token AS lease_token, head.timeout AS lease_timeout
FROM j JOIN q ON q.queue = j.queue
LEFT JOIN taken AS t ON t.queue = j.queue
LEFT JOIN head ON head.queue = t.queue
"""
)


def _lease_heads(source: str, tail: str = "") -> str:
    """The CTEs ``head`` (each queue of ``source`` with its head job, if that head is
    pending and due; the head is found first, by (scheduled_at, sequence), and only
    then checked, so a not-yet-due head blocks) and ``taken`` (their leases, inserted
    in queue order with a fresh token, where nobody holds one)."""
    return f"""head AS (
    SELECT w.queue, h.id, h.timeout
    FROM {source}
    CROSS JOIN LATERAL (
        SELECT id, status, timeout, scheduled_at, next_attempt_at
        FROM queuetopia_jobs AS j
        WHERE j.scope = :s AND j.queue = w.queue AND j.status IN ('pending', 'running')
        ORDER BY j.scheduled_at, j.sequence
        LIMIT 1
    ) AS h
    WHERE h.status = 'pending' AND coalesce(h.next_attempt_at, h.scheduled_at) <= now()
        AND NOT EXISTS (SELECT 1 FROM queuetopia_queues AS p
                        WHERE p.scope = :s AND p.queue = w.queue AND p.paused)
    {tail}
), taken AS (
    INSERT INTO queuetopia_leases (scope, queue, token, job_id, locked_at, expires_at, locked_by)
    SELECT :s, head.queue, CAST(gen_random_uuid() AS text), head.id, now(),
        now() + make_interval(secs => CAST(:grace AS float8)), CAST(:by AS text)
    FROM head
    ORDER BY head.queue
    ON CONFLICT (scope, queue) DO NOTHING
    RETURNING queue, job_id, token
)"""


#: Take the leases of the given queues whose head is pending and due (PostgreSQL), with
#: the heads' timeouts, in one statement. The head is found first (lateral, by
#: (scheduled_at, sequence)) and only then checked, so a not-yet-due head blocks.
_TAKE_SQL = sa.text(
    f"""
WITH {_lease_heads("unnest(CAST(:queues AS text[])) AS w(queue)", "ORDER BY w.queue LIMIT :limit")}
SELECT taken.queue, taken.job_id, taken.token, head.timeout
FROM taken JOIN head ON head.queue = taken.queue
"""
)

#: The scan (PostgreSQL): up to ``:limit`` queues whose ``due_at`` has passed and which
#: nobody holds, their heads, and their leases taken, in one statement (leases inserted
#: in queue order, as in _TAKE_SQL). A queue found with no lease taken (its head not
#: due, not pending, or gone) comes back with a NULL token: raise its ``due_at``.
_SCAN_SQL = sa.text(
    f"""
WITH due AS (
    SELECT qq.queue
    FROM queuetopia_queues AS qq
    WHERE qq.scope = :s AND qq.due_at <= now() AND NOT qq.paused
        AND NOT EXISTS (SELECT 1 FROM queuetopia_leases AS l WHERE l.scope = :s AND l.queue = qq.queue)
    ORDER BY qq.due_at
    LIMIT :limit
), {_lease_heads("due AS w")}
SELECT due.queue, taken.job_id, taken.token, head.timeout
FROM due
LEFT JOIN taken ON taken.queue = due.queue
LEFT JOIN head ON head.queue = taken.queue
"""
)

#: The hot statements address jobs by id alone (the lease ties them to their scope) and
#: leases by their primary key, so that their plans do not depend on the tables'
#: statistics: with statistics taken while the tables were nearly empty, PostgreSQL
#: chose the open-jobs index for ``scope = ...`` and visited every open job of the scope
#: for each job it finished (7 ms instead of 0.4 with 5,000 open jobs).
#:
#: Start an attempt (PostgreSQL): lease check and mark, attempt count, in one statement.
_START_SQL = _driver_sql(
    f"""
WITH l AS (
    UPDATE queuetopia_leases
    SET started_at = now(), expires_at = now() + make_interval(secs => :lease), locked_by = :w
    WHERE scope = :s AND queue = :q AND token = :tok AND job_id = :jid AND started_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM queuetopia_queues WHERE scope = :s AND queue = :q AND paused)
    RETURNING job_id
), j AS (
    UPDATE queuetopia_jobs AS j
    SET status = 'running', attempts = j.attempts + 1, attempted_at = now(), attempted_by = :w
    WHERE j.id = :jid AND j.status = 'pending' AND EXISTS (SELECT 1 FROM l)
    RETURNING {_JOB_FIELDS}
)
SELECT (SELECT count(*) FROM l) AS leased, j.*
FROM (SELECT 1) AS one LEFT JOIN j ON true
"""
)

#: An attempt's end (PostgreSQL), in one statement: lock the lease under the token,
#: write the outcome (done; or failed: retried after ``:backoff``, held until
#: ``:until`` or exhausted), find the queue's next head (this statement cannot see its
#: own write, so the finished job is excluded by id), hand the lease to it with a new
#: token when it is pending and due, and begin its attempt at once when asked and it
#: fits; otherwise release the lease. A job to be retried or held stays the head (its
#: status stays 'pending'), so the lease is released. The head is taken first and only
#: then checked (due, pending), so a not-yet-due head still blocks the jobs behind it.
#: After a retried start found nothing to start: the job this worker began under this
#: token, if the lost try did begin it (its reply lost).
_STARTED_BY_SQL = _driver_sql(
    f"""
SELECT {_JOB_FIELDS}
FROM queuetopia_leases AS l JOIN queuetopia_jobs AS j ON j.id = l.job_id
WHERE l.scope = :s AND l.queue = :q AND l.token = :tok AND l.job_id = :jid
    AND l.started_at IS NOT NULL AND l.locked_by = :w
    AND j.status = 'running' AND j.attempted_by = :w
"""
)

_FINISH_SQL = _driver_sql(
    f"""
WITH lease AS (
    SELECT job_id FROM queuetopia_leases
    WHERE scope = :s AND queue = :q AND token = :tok
    FOR UPDATE
), done AS (
    UPDATE queuetopia_jobs
    SET status = CAST(:status AS text), error = CAST(:error AS text),
        done_at = CASE WHEN CAST(:status AS text) = 'done' THEN now() ELSE done_at END,
        result = CASE WHEN CAST(:status AS text) = 'done' THEN CAST(:result AS json) ELSE result END,
        next_attempt_at = coalesce(now() + make_interval(secs => CAST(:backoff AS float8)),
                                   CAST(:until AS timestamptz))
    WHERE id = :jid AND id = (SELECT job_id FROM lease) AND status = 'running'
    RETURNING id
), head AS (
    SELECT id, status, timeout, coalesce(next_attempt_at, scheduled_at) AS due
    FROM queuetopia_jobs
    WHERE scope = :s AND queue = :q AND status IN ('pending', 'running') AND id <> :jid
    ORDER BY scheduled_at, sequence
    LIMIT 1
), nxt AS (
    SELECT id, timeout,
        (CAST(:start AS boolean)
         AND (CAST(:left AS float8) IS NULL OR timeout + :tlg <= CAST(:left AS float8))) AS inline
    FROM head
    WHERE status = 'pending' AND due <= now() AND EXISTS (SELECT 1 FROM done)
        AND CAST(:status AS text) <> 'pending'
        AND NOT EXISTS (SELECT 1 FROM queuetopia_queues WHERE scope = :s AND queue = :q AND paused)
), moved AS (
    UPDATE queuetopia_leases AS l
    SET token = :new, job_id = nxt.id, locked_at = now(), resends = 0,
        started_at = CASE WHEN nxt.inline THEN now() END,
        expires_at = now() + make_interval(secs => CASE WHEN nxt.inline
            THEN greatest(nxt.timeout + :tlg, coalesce(CAST(:left AS float8), 0)) + :margin
            ELSE CAST(:grace AS float8) END),
        locked_by = CASE WHEN nxt.inline THEN :w ELSE l.locked_by END
    FROM nxt
    WHERE l.scope = :s AND l.queue = :q AND l.token = :tok
    RETURNING nxt.id, nxt.timeout, nxt.inline
), started AS (
    UPDATE queuetopia_jobs AS j
    SET status = 'running', attempts = j.attempts + 1, attempted_at = now(), attempted_by = :w
    WHERE j.id = (SELECT id FROM moved WHERE moved.inline) AND j.status = 'pending'
    RETURNING {_JOB_FIELDS}
), released AS (
    DELETE FROM queuetopia_leases
    WHERE scope = :s AND queue = :q AND token = :tok AND NOT EXISTS (SELECT 1 FROM nxt)
    RETURNING 1
)
SELECT (SELECT count(*) FROM done) AS written, moved.id AS next_id, moved.timeout AS next_timeout,
    moved.inline, started.*
FROM (SELECT 1) AS one LEFT JOIN moved ON true LEFT JOIN started ON true
"""
)


def _unique_specs(specs: Sequence[NewJob]) -> tuple[list[NewJob], list[int]]:
    """The specs without those repeating an earlier spec's unique_key, and for each
    spec given the position of its kept spec."""
    kept: list[NewJob] = []
    position: list[int] = []
    first: dict[str, int] = {}
    for spec in specs:
        key = spec.unique_key
        if key is not None and key in first:
            position.append(first[key])
            continue
        if key is not None:
            first[key] = len(kept)
        position.append(len(kept))
        kept.append(spec)
    return kept, position


def _by_queue(specs: Sequence[NewJob]) -> dict[str, list[int]]:
    """The positions of the specs of each queue, in the order given."""
    by_queue: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        by_queue.setdefault(spec.queue, []).append(index)
    return by_queue


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


def configure_sqlite(engine: Engine, *, busy_timeout: float = 30.0) -> None:
    """Make a SQLite engine safe for several threads and processes of one machine:
    write-ahead log, a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction, so
    that a read-then-write transaction (dispatch, finish) takes the write lock first
    instead of failing with "database is locked" halfway. Transactions are serialized:
    SQLite has one writer at a time."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
