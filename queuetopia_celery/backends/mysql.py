"""The MySQL/MariaDB backend (MariaDB 10.6 or newer: it needs ``INSERT .. RETURNING``
and ``SKIP LOCKED``). Row locks (``FOR UPDATE``) order concurrent writers, as on
PostgreSQL; the clock is the database's (``UTC_TIMESTAMP(6)``); transactions run at
READ COMMITTED (set by :func:`configure_mysql`). Its own statements are named in
:mod:`.mysql_sql`; the rest of the lease protocol is the shared Core of
:mod:`.sql_core`.

Round trips: creating jobs is two statements (the queue rows' upsert returning the
sequence numbers, the insert returning the jobs) and, for new or idle queues, two
more that take their leases in the same transaction; a start is one multi-table
UPDATE (autocommit) and one read; an attempt's end is a locking read of the lease with
the next head, the outcome, the hand-on (and the next start) and the commit. MySQL
cannot return rows from an UPDATE, which PostgreSQL's single statements rely on."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from .. import schema
from ..errors import DatabaseError
from ..jobs import STATUS_DONE, STATUS_PENDING, STATUS_RUNNING, UTC, Job, NewJob
from . import mysql_sql as sql
from .base import Burst, Finished, Lease, Outcome, new_token
from .connection import AutocommitConnections, Executor
from .sql_core import JOB_COLUMNS, JOBS, LEASES, QUEUES, job_row, positions_by_queue
from .sql_operator import SqlOperator

#: MySQL's error code for a transaction chosen as a deadlock's victim.
MYSQL_DEADLOCK = 1213

#: The sentinel queue row whose lock serializes a scope's concurrency limit (a queue
#: name no job can have: names are never empty).
_SCOPE_LOCK_QUEUE = ""


class MysqlBackend(SqlOperator, AutocommitConnections):
    """All reads and writes of one scope on MySQL/MariaDB."""

    # ------------------------------------------------------------------ dialect hooks

    def _now(self) -> sa.ColumnElement[dt.datetime]:
        """The database clock (UTC)."""
        return sql.utc_now()

    def _after(self, seconds: float) -> sa.ColumnElement[dt.datetime]:
        return sql.utc_after(seconds)

    def _clock(self, conn: Connection) -> dt.datetime:
        now: dt.datetime = conn.execute(sa.select(sql.utc_now())).scalar_one()
        return now.astimezone(UTC)

    def _insert(self, table: sa.Table) -> Any:
        return _Insert(table)

    def _locked(self, query: Any, *, skip_locked: bool = False) -> Any:
        return query.with_for_update(skip_locked=skip_locked)

    def _after_each(self, name: str) -> Any:
        return sql.utc_after(sa.bindparam(name, type_=sa.BigInteger()))

    def _wait_value(self, wait: dt.timedelta) -> Any:
        return round(wait.total_seconds() * 1_000_000)

    def _lock_scope(self, conn: Connection) -> None:
        """Lock the scope's sentinel queue row (created once) until the transaction ends."""
        insert = mysql.insert(QUEUES).values(
            scope=self.scope, queue=_SCOPE_LOCK_QUEUE, last_sequence=0, due_at=None
        )
        conn.execute(insert.on_duplicate_key_update(last_sequence=QUEUES.c.last_sequence))

    def _wait_for_producers(self, conn: Connection, queues: Sequence[str]) -> None:
        """A producer holds its queues' rows locked (the sequence upsert) until its
        transaction ends: lock them too, which waits for it."""
        conn.execute(
            sa.select(QUEUES.c.queue)
            .where(QUEUES.c.scope == self.scope, QUEUES.c.queue.in_(list(queues)))
            .order_by(QUEUES.c.queue)
            .with_for_update()
        )

    def _open_head(self, queue: sa.ColumnElement[str] | str, *, exclude_id: Any = None) -> sa.Select[Any]:
        return sql.open_head(self.scope, queue, exclude_id=exclude_id)

    def _update_returning_job(self, conn: Connection, update: Any, job_id: int) -> Any:
        """No RETURNING on UPDATE: the update, then the row."""
        conn.execute(update)
        return conn.execute(sa.select(*JOB_COLUMNS).where(JOBS.c.id == job_id)).mappings().one()

    def _error(self, exc: BaseException, *, connection_lost: bool = False) -> DatabaseError:
        """As for every backend; and a deadlock's victim (1213: InnoDB rolled its whole
        transaction back, for example a finish that locked a lease and then the next
        job, against a producer holding that job as a unique key's holder and waiting
        for the lease) is retried like a transaction whose connection died: nothing of
        it committed."""
        args: tuple[Any, ...] = getattr(getattr(exc, "orig", None), "args", ())
        deadlock = bool(args) and args[0] == MYSQL_DEADLOCK
        return super()._error(exc, connection_lost=connection_lost or deadlock)

    # ------------------------------------------------------------------ creating jobs

    def _insert_jobs(self, specs: Sequence[NewJob], connection: Executor | None) -> list[Job]:
        if connection is not None:
            with self._transaction(connection) as conn:
                return self._create_in(conn, specs, None, None)[0]
        return self._create_own(specs, None)[0]

    def _insert_jobs_taking_leases(
        self, specs: Sequence[NewJob], grace: float
    ) -> tuple[list[Job], list[Lease]]:
        """The jobs, and in the same transaction the leases of their queues whose head
        is then pending and due: the queue rows are locked, so every job of those
        queues is seen."""
        return self._create_own(specs, grace)

    def _create_own(self, specs: Sequence[NewJob], grace: float | None) -> tuple[list[Job], list[Lease]]:
        """In our own transaction, retried on a new connection when the connection
        dies. The jobs carry a key of this call: a retry first looks for them, so a
        transaction that committed but whose reply was lost is returned, not made twice."""
        key = new_token()

        def attempt(retry: bool) -> tuple[list[Job], list[Lease]]:
            with self._transaction() as conn:
                if retry:
                    found = self._created_by(conn, specs, key)
                    if found is not None:
                        return found
                return self._create_in(conn, specs, grace, key)

        return self._retried("create_jobs", attempt, {"scope": self.scope})

    def _create_in(
        self, conn: Connection, specs: Sequence[NewJob], grace: float | None, key: str | None
    ) -> tuple[list[Job], list[Lease]]:
        by_queue = positions_by_queue(specs)
        counts = {queue: len(indexes) for queue, indexes in by_queue.items()}
        dues: dict[str, Any] = {}
        for queue, indexes in by_queue.items():
            given = [when for when in (specs[i].scheduled_at for i in indexes) if when is not None]
            due: Any = min(given) if given else None
            if len(given) < len(indexes):
                due = (
                    sql.utc_now()
                    if due is None
                    else sa.func.least(sa.literal(due, schema.UTCDateTime()), sql.utc_now())
                )
            dues[queue] = due
        bumped = {row.queue: row for row in conn.execute(sql.bump_sequences(self.scope, counts, dues))}
        rows: list[dict[str, Any]] = []
        place: dict[tuple[str, int], int] = {}
        for queue in sorted(by_queue):
            row = bumped[queue]
            locked_at = row.locked_at
            first = int(row.last_sequence) - counts[queue] + 1
            for offset, i in enumerate(by_queue[queue]):
                spec = specs[i]
                place[(queue, first + offset)] = i
                rows.append(job_row(self.scope, spec, first + offset, locked_at, key))
        unique = any(spec.unique_key is not None for spec in specs)
        created: list[Job | None] = [None] * len(specs)
        holders: dict[str, Job] = {}
        for found in conn.execute(sql.insert_jobs(rows, unique=unique)).mappings():
            job = Job.from_row(found)
            # A holder of a unique key is an older job: never one of the new numbers.
            index = place.get((job.queue, job.sequence))
            if index is not None:
                created[index] = job
            elif job.unique_key is not None:
                holders[job.unique_key] = job
        for i, spec in enumerate(specs):
            if created[i] is None and spec.unique_key in holders:
                created[i] = holders[spec.unique_key]
        if any(job is None for job in created):
            self._fill_existing(conn, specs, created)
        taken: list[Lease] = []
        if grace is not None:
            free = [queue for queue in sorted(by_queue) if not bumped[queue].paused]
            taken = self._take_all(conn, free, grace, len(free), None)
        return [job for job in created if job is not None], taken

    # ------------------------------------------------------------------ taking leases

    def _take_leases(
        self, conn: Connection, queues: Sequence[str], grace: float, limit: int, locked_by: str | None
    ) -> list[Lease]:
        """Two statements: the due heads, then their leases (one multi-row insert)."""
        if limit <= 0 or not queues:
            return []
        heads = conn.execute(sql.due_heads(self.scope, queues, limit)).all()
        if not heads:
            return []
        wanted = {row.queue: (int(row.id), new_token(), float(row.timeout)) for row in heads}
        rows = [(queue, job_id, token) for queue, (job_id, token, _) in sorted(wanted.items())]
        statement = sql.take_leases(self.scope, rows, self._first_wait(grace), locked_by)
        taken = []
        for row in conn.execute(statement):
            job_id, token, timeout = wanted[row.queue]
            if row.token == token:
                taken.append(Lease(row.queue, job_id, token, timeout))
        return taken

    # ------------------------------------------------------------------ running jobs

    def start(self, queue: str, job_id: int, token: str, *, worker: str, lease: float) -> Job | None:
        """Begin an attempt if ``token`` still holds the queue's lease for ``job_id``
        and no attempt was begun under it: one multi-table UPDATE (autocommit), then
        the job read. Counts the attempt now, so a job that kills its worker still runs
        out of attempts. Returns the job, or None (stale message: drop it). Retried on
        a new connection when the connection dies; the retry recognises a start of its
        own that committed (the lease started by this worker, the job running for it)."""
        return self._retried(
            f"the start of job {job_id}",
            lambda retry: self._start_once(queue, job_id, token, worker=worker, lease=lease, retry=retry),
            {"scope": self.scope, "queue": queue, "job_id": job_id},
        )

    def _start_once(
        self, queue: str, job_id: int, token: str, *, worker: str, lease: float, retry: bool
    ) -> Job | None:
        with self._autocommit() as conn:
            params = {
                "b_scope": self.scope,
                "b_queue": queue,
                "b_token": token,
                "b_job_id": job_id,
                "b_worker": worker,
                "lease_micros": round(lease * 1_000_000),
            }
            started = conn.execute(sql.START, params).rowcount
            if not started and retry:
                started = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(LEASES.join(JOBS, JOBS.c.id == LEASES.c.job_id))
                    .where(
                        LEASES.c.scope == self.scope,
                        LEASES.c.queue == queue,
                        LEASES.c.token == token,
                        LEASES.c.job_id == job_id,
                        LEASES.c.started_at.is_not(None),
                        LEASES.c.locked_by == worker,
                        JOBS.c.status == STATUS_RUNNING,
                        JOBS.c.attempted_by == worker,
                    )
                ).scalar_one()
            if not started:
                # The lease may point at a job that is no longer open: release it then.
                leased = conn.execute(
                    sa.select(JOBS.c.status)
                    .select_from(LEASES.outerjoin(JOBS, JOBS.c.id == LEASES.c.job_id))
                    .where(
                        LEASES.c.scope == self.scope,
                        LEASES.c.queue == queue,
                        LEASES.c.token == token,
                        LEASES.c.job_id == job_id,
                        LEASES.c.started_at.is_(None),
                    )
                ).first()
                if leased is not None and leased.status not in (STATUS_PENDING, STATUS_RUNNING):
                    self._release(conn, queue, token)
                return None
            row = conn.execute(sa.select(*JOB_COLUMNS).where(JOBS.c.id == job_id)).mappings().one()
        return Job.from_row(row)

    def finish_and_start(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, burst: Burst
    ) -> Finished:
        """See :meth:`SqlCore.finish_and_start`. One transaction: the lease locked with
        the next head read, the outcome, then the hand-on (with the next job's start
        when the burst allows it) or the release."""
        fresh = new_token()
        left = burst.deadline_left
        return self._retried(
            f"the outcome write of job {job.id}",
            lambda retry: self._finish_once(
                job, token, outcome, fresh=fresh, grace=grace, burst=burst, retry=retry
            ),
            {"scope": self.scope, "queue": job.queue, "job_id": job.id, "attempt": job.attempts},
            seconds=None if left is None else left - 1.0,
        )

    def _finish_once(
        self, job: Job, token: str, outcome: Outcome, *, fresh: str, grace: float, burst: Burst, retry: bool
    ) -> Finished:
        if outcome.succeeded:
            values: dict[str, Any] = {
                "status": STATUS_DONE,
                # Replaced by the time read with the lease below: the next job's start
                # (stamped with it too) must not look earlier than this end.
                "done_at": None,
                "result": outcome.result,
                "error": None,
                "next_attempt_at": None,
            }
        else:
            values = {"error": outcome.error, **self._failed_values(job, outcome)}
        with self._transaction() as conn:
            params = {"scope": self.scope, "queue": job.queue, "token": token, "job_id": job.id}
            lease = conn.execute(sql.FINISHING, params).mappings().first()
            if lease is None or lease["lease_job_id"] != job.id:
                return self._finished_by(conn, job, fresh, values, burst) if retry else Finished(False)
            now = _utc(lease["now"])
            if outcome.succeeded:
                values["done_at"] = now
            written = conn.execute(
                sa.update(JOBS).where(JOBS.c.id == job.id, JOBS.c.status == STATUS_RUNNING).values(**values)
            )
            if written.rowcount != 1:
                self._release(conn, job.queue, token)
                return Finished(False)
            head = lease if lease["id"] is not None else None
            if (
                head is None
                or values["status"] == STATUS_PENDING
                or head["status"] != STATUS_PENDING
                or not head["due"]
                or lease["paused"]
            ):
                self._release(conn, job.queue, token)
                return Finished(True)
            nxt = Lease(job.queue, int(head["id"]), fresh, float(head["timeout"]))
            left = burst.deadline_left
            inline = burst.start_next and (left is None or nxt.timeout + burst.time_limit_grace <= left)
            # The lease passes to the next job under the fresh token: unstarted (its
            # message goes through the broker) or, inline, started by this worker.
            handed: dict[str, Any] = {"token": fresh, "job_id": nxt.job_id, "locked_at": now, "resends": 0}
            if inline:
                running = max(nxt.timeout + burst.time_limit_grace, left or 0.0) + burst.lease_margin
                handed.update(
                    started_at=now, expires_at=now + dt.timedelta(seconds=running), locked_by=burst.worker
                )
            else:
                handed.update(started_at=None, expires_at=now + dt.timedelta(seconds=self._first_wait(grace)))
            conn.execute(
                sa.update(LEASES)
                .where(LEASES.c.scope == self.scope, LEASES.c.queue == job.queue, LEASES.c.token == token)
                .values(**handed)
            )
            if not inline:
                return Finished(True, nxt)
            begun = conn.execute(
                sa.update(JOBS)
                .where(JOBS.c.id == nxt.job_id, JOBS.c.status == STATUS_PENDING)
                .values(
                    status=STATUS_RUNNING,
                    attempts=JOBS.c.attempts + 1,
                    attempted_at=now,
                    attempted_by=burst.worker,
                )
            )
            if begun.rowcount != 1:
                # The next job was no longer pending (aborted meanwhile): let go.
                self._release(conn, job.queue, fresh)
                return Finished(True)
            fields = {c.name: head[c.name] for c in JOB_COLUMNS}
            following = dataclasses.replace(
                Job.from_row(fields),
                status=STATUS_RUNNING,
                attempts=int(fields["attempts"]) + 1,
                attempted_at=now,
                attempted_by=burst.worker,
            )
            return Finished(True, nxt, following)

    def _finished_by(
        self, conn: Connection, job: Job, fresh: str, values: dict[str, Any], burst: Burst
    ) -> Finished:
        """After a retried outcome write found its token gone: was it this write that
        committed (its reply lost)? The job then holds this outcome for this attempt,
        and the lease is gone or held under the new token chosen for this write."""
        mine = conn.execute(
            sa.select(JOBS.c.status, JOBS.c.error, JOBS.c.attempts).where(JOBS.c.id == job.id)
        ).first()
        if mine is None or (mine.status, mine.error, mine.attempts) != (
            values["status"],
            values["error"],
            job.attempts,
        ):
            return Finished(False)
        lease = conn.execute(
            sa.select(LEASES.c.job_id, LEASES.c.started_at, LEASES.c.locked_by).where(
                LEASES.c.scope == self.scope, LEASES.c.queue == job.queue, LEASES.c.token == fresh
            )
        ).first()
        if lease is None:
            return Finished(True)
        row = conn.execute(sa.select(*JOB_COLUMNS).where(JOBS.c.id == lease.job_id)).mappings().first()
        if row is None:
            return Finished(True)
        following = Job.from_row(row)
        handed = Lease(job.queue, following.id, fresh, following.timeout)
        if lease.started_at is None:
            return Finished(True, handed)
        if following.status == STATUS_RUNNING and following.attempted_by == burst.worker:
            return Finished(True, handed, following)
        return Finished(True)


class _Insert(mysql.Insert):
    """MySQL's INSERT, with the one ``on_conflict_*`` the shared code uses (the claim of
    a create message's id in :meth:`SqlCore.create_jobs_once`)."""

    inherit_cache = True

    def on_conflict_do_nothing(self) -> _Insert:
        """``INSERT IGNORE``: MariaDB then returns no row for a duplicate key. IGNORE
        also turns other errors into warnings, so it is only for rows whose values are
        validated before (a message id and a scope: names of at most 255 characters)."""
        return self.prefix_with("IGNORE")


def _utc(value: dt.datetime) -> dt.datetime:
    """A datetime read through a plain column (naive UTC on MySQL) as aware UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: The oldest MariaDB this backend runs on (INSERT .. RETURNING, SKIP LOCKED).
MIN_MARIADB = (10, 6)


def configure_mysql(engine: Engine) -> None:
    """Check each new connection's server: MariaDB 10.6 or newer (MySQL lacks the
    ``INSERT .. RETURNING`` this backend relies on). The isolation level (READ
    COMMITTED) is set by :func:`~queuetopia_celery.make_engine`."""

    @event.listens_for(engine, "connect")
    def _connect(_dbapi_connection: Any, _record: Any) -> None:
        dialect = engine.dialect
        version = tuple(dialect.server_version_info or ())
        if dialect.server_version_info is not None and (
            not getattr(dialect, "is_mariadb", False) or version < MIN_MARIADB
        ):
            server = "MariaDB" if getattr(dialect, "is_mariadb", False) else "MySQL"
            found = ".".join(str(part) for part in version[:3])
            raise DatabaseError(
                f"queuetopia-celery needs MariaDB {MIN_MARIADB[0]}.{MIN_MARIADB[1]} or newer on the mysql "
                f"URL, found {server} {found} (MySQL has no INSERT .. RETURNING; see the README)"
            )


__all__ = ["MysqlBackend", "configure_mysql"]
