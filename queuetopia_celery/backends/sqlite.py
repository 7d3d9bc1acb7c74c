"""The SQLite backend: one writer at a time (``BEGIN IMMEDIATE`` for every
transaction), so the lease protocol's steps are plain read-then-write loops in
SQLAlchemy Core, each in one transaction, on this process's clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from .. import schema
from ..jobs import STATUS_PENDING, STATUS_RUNNING, UTC, Job, NewJob, utcnow
from .base import Burst, Finished, Lease, Outcome, new_token
from .connection import Executor
from .sql_core import JOB_COLUMNS, JOBS, LEASES, QUEUES, job_row, positions_by_queue
from .sql_operator import SqlOperator


class SqliteBackend(SqlOperator):
    """All reads and writes of one scope on SQLite."""

    # ------------------------------------------------------------------ dialect hooks

    def _now(self) -> sa.ColumnElement[dt.datetime]:
        """This process's clock."""
        return sa.literal(utcnow(), schema.UTCDateTime())

    def _after(self, seconds: float) -> sa.ColumnElement[dt.datetime]:
        return sa.literal(utcnow() + dt.timedelta(seconds=seconds), schema.UTCDateTime())

    def _clock(self, conn: Connection) -> dt.datetime:
        return utcnow()

    def _insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def _locked(self, query: Any, *, skip_locked: bool = False) -> Any:
        # No row locks: the transaction holds the database's one write lock.
        return query

    def _after_each(self, name: str) -> Any:
        return sa.bindparam(name, type_=schema.UTCDateTime())

    def _wait_value(self, wait: dt.timedelta) -> Any:
        return utcnow() + wait

    def _lock_scope(self, conn: Connection) -> None:
        """Nothing to do: the transaction holds the write lock."""

    # ------------------------------------------------------------------ creating jobs

    def _insert_jobs(self, specs: Sequence[NewJob], connection: Executor | None) -> list[Job]:
        """One queue row upsert and one insert per queue."""
        by_queue = positions_by_queue(specs)
        created: list[Job | None] = [None] * len(specs)
        with self._transaction(connection) as conn:
            now = utcnow()
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
                    rows.append(job_row(self.scope, spec, last - len(indexes) + 1 + offset, locked_at))
                result = conn.execute(
                    sa.insert(JOBS).returning(*JOB_COLUMNS, sort_by_parameter_order=True), rows
                )
                for i, row in zip(indexes, result.mappings(), strict=True):
                    created[i] = Job.from_row(row)
        return [job for job in created if job is not None]

    def _insert_jobs_taking_leases(
        self, specs: Sequence[NewJob], grace: float
    ) -> tuple[list[Job], list[Lease]]:
        """No lease is taken in the same transaction here: the kick that follows takes them."""
        return self._insert_jobs(specs, None), []

    def _bump_sequence(
        self, conn: Connection, queue: str, count: int, due: dt.datetime
    ) -> tuple[int, dt.datetime]:
        """Upsert the queue's row: take ``count`` sequence numbers and lower ``due_at``.
        Returns the last number taken and the time the row was locked (the default
        ``scheduled_at``, so that (scheduled_at, sequence) follows commit order too).

        The row stays locked until the creating transaction ends, so producers of one
        queue commit in sequence order; producers of other queues do not wait.
        """
        insert = self._insert(QUEUES).values(scope=self.scope, queue=queue, last_sequence=count, due_at=due)
        excluded = insert.excluded
        upsert = insert.on_conflict_do_update(
            index_elements=[QUEUES.c.scope, QUEUES.c.queue],
            set_={
                "last_sequence": QUEUES.c.last_sequence + count,
                "due_at": sa.case(
                    (QUEUES.c.due_at.is_(None), excluded.due_at),
                    (excluded.due_at < QUEUES.c.due_at, excluded.due_at),
                    else_=QUEUES.c.due_at,
                ),
            },
        )
        return int(conn.execute(upsert.returning(QUEUES.c.last_sequence)).scalar_one()), utcnow()

    # ------------------------------------------------------------------ taking leases

    def _take_leases(
        self, conn: Connection, queues: Sequence[str], grace: float, limit: int, locked_by: str | None
    ) -> list[Lease]:
        # One writer at a time, so a plain loop is as safe as PostgreSQL's statement.
        taken: list[Lease] = []
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
                self._insert(LEASES)
                .values(
                    scope=self.scope,
                    queue=queue,
                    token=token,
                    job_id=first.id,
                    locked_at=self._now(),
                    expires_at=self._after(self._first_wait(grace)),
                    locked_by=locked_by,
                )
                .on_conflict_do_nothing(index_elements=[LEASES.c.scope, LEASES.c.queue])
            )
            if inserted.rowcount:
                taken.append(Lease(queue, first.id, token, first.timeout))
        return taken

    # ------------------------------------------------------------------ running jobs

    def start(self, queue: str, job_id: int, token: str, *, worker: str, lease: float) -> Job | None:
        """Begin an attempt if ``token`` still holds the queue's lease for ``job_id``
        and no attempt was begun under it. Counts the attempt now, so a job that kills
        its worker still runs out of attempts. Returns the job, or None (stale message:
        drop it)."""
        with self._transaction() as conn:
            started = conn.execute(
                sa.update(LEASES)
                .where(
                    LEASES.c.scope == self.scope,
                    LEASES.c.queue == queue,
                    LEASES.c.token == token,
                    LEASES.c.job_id == job_id,
                    LEASES.c.started_at.is_(None),
                    ~self._paused_clause(queue),
                )
                .values(started_at=self._now(), expires_at=self._after(lease), locked_by=worker)
            )
            if started.rowcount != 1:
                return None
            row = (
                conn.execute(
                    sa.update(JOBS)
                    .where(JOBS.c.id == job_id, JOBS.c.status == STATUS_PENDING)
                    .values(
                        status=STATUS_RUNNING,
                        attempts=JOBS.c.attempts + 1,
                        attempted_at=self._now(),
                        attempted_by=worker,
                    )
                    .returning(*JOB_COLUMNS)
                )
                .mappings()
                .first()
            )
            if row is None:
                # The lease points at a job that is no longer open: release the queue.
                self._release(conn, queue, token)
                return None
        return Job.from_row(row)

    def finish_and_start(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, burst: Burst
    ) -> Finished:
        """See :meth:`SqlCore.finish_and_start`: :meth:`finish`, then :meth:`start`."""
        written, nxt = self.finish(job, token, outcome, grace=grace)
        if not written or nxt is None or not burst.start_next:
            return Finished(written, nxt)
        left = burst.deadline_left
        if left is not None and nxt.timeout + burst.time_limit_grace > left:
            return Finished(written, nxt)
        lease = max(nxt.timeout + burst.time_limit_grace, left or 0.0) + burst.lease_margin
        started = self.start(job.queue, nxt.job_id, nxt.token, worker=burst.worker, lease=lease)
        if started is None:
            # Taken over meanwhile (or no longer open: start released the queue).
            return Finished(True)
        return Finished(True, nxt, started)


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
