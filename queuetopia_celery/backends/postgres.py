"""The PostgreSQL backend: the lease protocol's hot steps each in one statement (see
:mod:`.postgres_sql`), run on autocommit connections (one pinned per worker thread
during a burst) and retried on a new connection when theirs dies, the retry
recognising its own write when the first one committed and only its reply was lost.
Row locks (``FOR UPDATE``) and advisory locks order concurrent writers."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from psycopg.postgres import types as postgres_types
from sqlalchemy import func
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from ..jobs import STATUS_DONE, STATUS_PENDING, STATUS_RUNNING, UTC, Job, NewJob
from . import postgres_sql as sql
from .base import Burst, Finished, Inserted, Lease, Outcome, failure_plan, new_token
from .connection import AutocommitConnections, Executor
from .sql_core import JOB_COLUMNS, JOBS, LEASES, QUEUES, chunks, positions_by_queue
from .sql_operator import SqlOperator


class PostgresBackend(SqlOperator, AutocommitConnections):
    """All reads and writes of one scope on PostgreSQL."""

    # ------------------------------------------------------------------ dialect hooks

    def _now(self) -> sa.ColumnElement[dt.datetime]:
        """The database clock."""
        return func.now()

    def _after(self, seconds: float) -> sa.ColumnElement[dt.datetime]:
        return func.now() + sa.literal(dt.timedelta(seconds=seconds), sa.Interval())

    def _clock(self, conn: Connection) -> dt.datetime:
        now: dt.datetime = conn.execute(sa.select(func.now())).scalar_one()
        return now.astimezone(UTC)

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def _locked(self, query: Any, *, skip_locked: bool = False) -> Any:
        return query.with_for_update(skip_locked=skip_locked)

    def _after_each(self, name: str) -> Any:
        return func.now() + sa.bindparam(name, type_=sa.Interval())

    def _wait_value(self, wait: dt.timedelta) -> Any:
        return wait

    def _lock_scope(self, conn: Connection) -> None:
        key = func.hashtextextended(sa.literal(f"queuetopia-scope\x1f{self.scope}"), 0)
        conn.execute(sa.select(func.pg_advisory_xact_lock(key)))

    def _queue_key(self, queue: str) -> sa.ColumnElement[int]:
        return func.hashtextextended(sa.literal(f"queuetopia\x1f{self.scope}\x1f{queue}"), 0)

    def _hold_until_commit(self, conn: Connection, queues: Sequence[str]) -> None:
        """A shared advisory lock per queue, held until the producer's transaction ends."""
        for queue in queues:
            conn.execute(sa.select(func.pg_advisory_xact_lock_shared(self._queue_key(queue))))

    def _wait_for_producers(self, conn: Connection, queues: Sequence[str]) -> None:
        for queue in queues:
            conn.execute(sa.select(func.pg_advisory_xact_lock(self._queue_key(queue))))

    # ------------------------------------------------------------------ creating jobs

    def _insert_jobs(self, specs: Sequence[NewJob], connection: Executor | None) -> list[Job]:
        """One statement for any number of jobs and queues."""
        if connection is None:
            # One statement is its own transaction: no BEGIN/COMMIT round trips.
            return self._create_jobs_own(specs, positions_by_queue(specs), None)[0]
        with self._transaction(connection) as conn:
            return self._create_jobs_in(conn, specs, positions_by_queue(specs), None, None)[0]

    def _insert_jobs_taking_leases(
        self, specs: Sequence[NewJob], grace: float
    ) -> tuple[list[Job], list[Lease]]:
        """The same statement, taking the leases it can decide (see ``CREATE_JOBS``)."""
        return self._create_jobs_own(specs, positions_by_queue(specs), grace)

    def _create_jobs_own(
        self, specs: Sequence[NewJob], by_queue: dict[str, list[int]], grace: float | None
    ) -> tuple[list[Job], list[Lease]]:
        """:meth:`_create_jobs_in` in its own autocommit statement, retried on a new
        connection when the connection dies. The jobs carry a key of this call: a retry
        first looks for them, so an insert that committed but whose reply was lost is
        returned, not made twice."""
        key = new_token()

        def attempt(retry: bool) -> tuple[list[Job], list[Lease]]:
            if not retry:
                with self._autocommit() as conn:
                    return self._create_jobs_in(conn, specs, by_queue, grace, key)
            with self._transaction() as conn:
                self._wait_for_creators(conn, sorted(by_queue))
                found = self._created_by(conn, specs, key)
                if found is not None:
                    return found
                return self._create_jobs_in(conn, specs, by_queue, grace, key)

        return self._retried("create_jobs", attempt, {"scope": self.scope})

    def _wait_for_creators(self, conn: Connection, queues: Sequence[str]) -> None:
        """Lock the rows of these queues (creating missing ones) until this transaction
        ends: a lost insert that the server may still be running (the connection cut by
        the network, not by the server) holds them, so it has ended, committed or not,
        before this transaction looks for its jobs."""
        insert = postgresql.insert(QUEUES).values(
            [{"scope": self.scope, "queue": queue, "last_sequence": 0, "due_at": None} for queue in queues]
        )
        conn.execute(insert.on_conflict_do_nothing(index_elements=[QUEUES.c.scope, QUEUES.c.queue]))
        conn.execute(
            sa.select(QUEUES.c.queue)
            .where(QUEUES.c.scope == self.scope, QUEUES.c.queue.in_(list(queues)))
            .order_by(QUEUES.c.queue)
            .with_for_update()
        )

    def _create_jobs_in(
        self,
        conn: Connection,
        specs: Sequence[NewJob],
        by_queue: dict[str, list[int]],
        grace: float | None,
        key: str | None,
    ) -> tuple[list[Job], list[Lease]]:
        """:meth:`create_jobs` on PostgreSQL: one statement for any number of jobs and
        queues (queue rows upserted in queue order, so concurrent bulk producers cannot
        deadlock; then the jobs inserted, numbered from each queue's counter). With a
        ``grace``, the statement also takes the leases it can (see
        :meth:`create_jobs_taking_leases`)."""
        offsets = [0] * len(specs)
        counts = [0] * len(specs)
        for indexes in by_queue.values():
            for offset, i in enumerate(indexes):
                offsets[i] = offset + 1
                counts[i] = len(indexes)
        params = {
            "scope": self.scope,
            # The new jobs in one JSON parameter, each queue's count and due time taken
            # from it by the statement: psycopg's conversion of array parameters cost
            # more client CPU than anything else of the call.
            "jobs": json.dumps(
                [
                    {
                        "queue": spec.queue,
                        "action": spec.action,
                        "params": spec.params,
                        "k": offsets[i],
                        "n": counts[i],
                        "timeout": float(spec.timeout),
                        "max_backoff": float(spec.max_backoff),
                        "max_attempts": spec.max_attempts,
                        "on_exhausted": spec.on_exhausted,
                        "scheduled_at": None if spec.scheduled_at is None else spec.scheduled_at.isoformat(),
                        "unique_key": spec.unique_key,
                        "trace_context": spec.trace_context,
                    }
                    for i, spec in enumerate(specs)
                ]
            ),
            "take_leases": grace is not None,
            "first_wait": 0.0 if grace is None else self._first_wait(grace),
            "create_key": key,
        }
        created: list[Job | None] = [None] * len(specs)
        taken: dict[str, Lease] = {}
        index_of = {(specs[i].queue, offsets[i]): i for i in range(len(specs))}
        for row in raw_all(conn, sql.CREATE_JOBS, params):
            offset = row["back"] + len(by_queue[row["queue"]])
            created[index_of[(row["queue"], offset)]] = Job.from_row(row)
            if row["lease_token"] is not None:
                taken[row["queue"]] = Lease(
                    row["queue"], int(row["lease_job_id"]), row["lease_token"], float(row["lease_timeout"])
                )
        if any(job is None for job in created):
            # Unique jobs whose key an open job holds: that job instead.
            self._fill_existing(conn, specs, created)
        return [job for job in created if job is not None], [taken[q] for q in sorted(taken)]

    def insert_jobs(
        self, specs: Sequence[NewJob], *, connection: Executor | None = None, grace: float | None = None
    ) -> Inserted:
        """The bulk path: queue rows upserted and ids reserved (two statements), the
        jobs written by COPY, and with a ``grace`` (own transaction) the leases of the
        queues taken, in one transaction; nothing is read back. A batch with unique
        keys (which need the insert's ``ON CONFLICT``) takes the portable path.

        In its own transaction it is retried on a new connection when the connection
        dies, recognising by the call's key a batch that committed (as
        :meth:`create_jobs` does)."""
        if not specs:
            return Inserted([], [])
        if any(spec.unique_key is not None for spec in specs):
            return super().insert_jobs(specs, connection=connection, grace=grace)
        by_queue = positions_by_queue(specs)
        if connection is not None:
            with self._transaction(connection) as conn:
                return self._copy_jobs(conn, specs, by_queue, None, None)
        key = new_token()

        def attempt(retry: bool) -> Inserted:
            with self._transaction() as conn:
                if retry:
                    self._wait_for_creators(conn, sorted(by_queue))
                    found = self._created_by(conn, specs, key)
                    if found is not None:
                        return Inserted([job.id for job in found[0]], found[1])
                return self._copy_jobs(conn, specs, by_queue, grace, key)

        return self._retried("create_jobs", attempt, {"scope": self.scope})

    def _copy_jobs(
        self,
        conn: Connection,
        specs: Sequence[NewJob],
        by_queue: dict[str, list[int]],
        grace: float | None,
        key: str | None,
    ) -> Inserted:
        queues = sorted(by_queue)
        dues, nows = queue_dues(specs, by_queue, queues)
        driver: Any = conn.connection.dbapi_connection
        with driver.cursor() as cur:
            cur.execute(
                sql.RESERVE_QUEUES,
                {
                    "scope": self.scope,
                    "queues": queues,
                    "queue_counts": [len(by_queue[q]) for q in queues],
                    "queue_due_at": dues,
                    "queue_has_now": nows,
                },
            )
            # Each queue's jobs are numbered up to its counter, in the order given.
            reserved = {queue: (last - len(by_queue[queue]), at) for queue, last, at in cur.fetchall()}
            cur.execute(sql.RESERVE_IDS, {"count": len(specs)})
            ids = [row[0] for row in cur.fetchall()]
            with cur.copy(sql.COPY_JOBS) as copy:
                for i, spec in enumerate(specs):
                    base, locked_at = reserved[spec.queue]
                    reserved[spec.queue] = (base + 1, locked_at)
                    copy.write_row(
                        (
                            ids[i],
                            self.scope,
                            spec.queue,
                            spec.action,
                            json.dumps(spec.params),
                            base + 1,
                            float(spec.timeout),
                            float(spec.max_backoff),
                            spec.max_attempts,
                            spec.on_exhausted,
                            locked_at if spec.scheduled_at is None else spec.scheduled_at,
                            STATUS_PENDING,
                            0,
                            locked_at,
                            key,
                            None if spec.trace_context is None else json.dumps(spec.trace_context),
                        )
                    )
        taken = [] if grace is None else self._take_all(conn, queues, grace, len(queues), None)
        return Inserted(ids, taken)

    # ------------------------------------------------------------------ taking leases

    def kick(
        self, queues: Sequence[str], *, grace: float, limit: int = 1000, locked_by: str | None = None
    ) -> list[Lease]:
        """The plain kick: one autocommit statement per 500 queues."""
        # Every queue named is wanted (a bulk kick may name more than ``limit``).
        limit = max(limit, len(queues))
        kicked: list[Lease] = []
        with self._autocommit() as conn:
            # Leases are always inserted in queue order: two multi-row inserts (a bulk
            # kick and a scan) waiting on each other's uncommitted lease rows in
            # opposite orders would deadlock.
            for chunk in chunks(sorted(set(queues)), 500):
                kicked.extend(self._take_leases(conn, chunk, grace, limit - len(kicked), locked_by))
        return kicked

    def scan(self, *, grace: float, limit: int = 1000, locked_by: str | None = None) -> list[Lease]:
        """One autocommit statement finds the due queues, looks up their heads and
        takes the leases; then the ``due_at`` of the queues found not due is raised."""
        params = {
            "scope": self.scope,
            "limit": limit,
            "first_wait": self._first_wait(grace),
            "locked_by": locked_by,
        }
        taken: list[Lease] = []
        stale: list[str] = []
        with self._autocommit() as conn:
            for row in raw_all(conn, sql.SCAN, params):
                if row["token"] is None:
                    stale.append(row["queue"])
                else:
                    taken.append(Lease(row["queue"], row["job_id"], row["token"], row["timeout"]))
        if stale:
            with self._transaction() as conn:
                self._refresh_due(conn, sorted(stale))
        return taken

    def _take_leases(
        self, conn: Connection, queues: Sequence[str], grace: float, limit: int, locked_by: str | None
    ) -> list[Lease]:
        params = {
            "scope": self.scope,
            "queues": list(queues),
            "limit": limit,
            "locked_by": locked_by,
            "first_wait": self._first_wait(grace),
        }
        return [
            Lease(row["queue"], row["job_id"], row["token"], row["timeout"])
            for row in raw_all(conn, sql.TAKE_LEASES, params)
        ]

    # ------------------------------------------------------------------ running jobs

    def start(self, queue: str, job_id: int, token: str, *, worker: str, lease: float) -> Job | None:
        """Begin an attempt if ``token`` still holds the queue's lease for ``job_id``
        and no attempt was begun under it, in one statement (one round trip,
        autocommit). Counts the attempt now, so a job that kills its worker still runs
        out of attempts. Returns the job, or None (stale message: drop it).

        A connection found dead (a pooled connection in use less than a second ago is
        not pinged first, the server restarted) is replaced and the start tried again;
        if the lost statement did commit, the retry finds the lease started by this
        worker under this token and the job running for it, and begins the attempt (a
        duplicate message, which finds the lease started by another, is still dropped)."""
        params = {
            "scope": self.scope,
            "queue": queue,
            "token": token,
            "job_id": job_id,
            "worker": worker,
            "lease_seconds": lease,
        }
        return self._retried(
            f"the start of job {job_id}",
            lambda retry: self._start_once(queue, token, params, retry),
            {"scope": self.scope, "queue": queue, "job_id": job_id},
        )

    def _start_once(self, queue: str, token: str, params: dict[str, Any], retry: bool) -> Job | None:
        with self._autocommit() as conn:
            row = raw_one(conn, sql.START, params)
            if row["id"] is not None:
                return Job.from_row(row)
            if row["leased"]:
                # The lease points at a job that is no longer open: release the queue.
                self._release(conn, queue, token)
            elif retry:
                mine = raw_all(conn, sql.STARTED_BY, params)
                if mine:
                    return Job.from_row(mine[0])
        return None

    def finish_and_start(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, burst: Burst
    ) -> Finished:
        """See :meth:`SqlCore.finish_and_start`. One statement (one round trip), for a
        success as for a failure: the lease check, the outcome, the next-head lookup,
        the hand-on and the next start together."""
        fresh = new_token()
        if outcome.succeeded:
            status, backoff, until = STATUS_DONE, None, None
        else:
            plan = failure_plan(job, outcome)
            status, backoff, until = plan.status, plan.backoff, plan.until
        params = {
            "scope": self.scope,
            "queue": job.queue,
            "token": token,
            "job_id": job.id,
            "status": status,
            "error": outcome.error,
            "backoff": backoff,
            "until": until,
            "result": None if outcome.result is None else json.dumps(outcome.result),
            "new_token": fresh,
            "first_wait": self._first_wait(grace),
            "start_next": burst.start_next,
            "worker": burst.worker,
            "time_limit_grace": burst.time_limit_grace,
            "lease_margin": burst.lease_margin,
            "deadline_left": burst.deadline_left,
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

    def _finish_once(self, job: Job, params: dict[str, Any], burst: Burst, retry: bool) -> Finished:
        fresh = params["new_token"]
        with self._autocommit() as conn:
            row = raw_one(conn, sql.FINISH_AND_START, params)
            if not row["written"]:
                if retry:
                    return self._finished_by(conn, job, params, burst)
                return Finished(False)
            if row["next_id"] is None:
                return Finished(True)
            nxt = Lease(job.queue, int(row["next_id"]), fresh, float(row["next_timeout"]))
            if not row["inline"]:
                return Finished(True, nxt)
            if row["id"] is None:
                # The next job was no longer pending (aborted meanwhile): let go of the
                # queue; the caller re-checks it.
                self._release(conn, job.queue, fresh)
                return Finished(True)
            return Finished(True, nxt, Job.from_row(row))

    def _finished_by(self, conn: Connection, job: Job, params: dict[str, Any], burst: Burst) -> Finished:
        """After a retried outcome write found its token gone: was it this write that
        committed (its reply lost)? The job then holds exactly this outcome for this
        attempt (a lost attempt recorded by the scan has another error), and the lease
        is released, handed on under the new token chosen for this write (the message
        is to be sent), or started at once for this worker (the burst runs it)."""
        mine = conn.execute(
            sa.select(JOBS.c.status, JOBS.c.error, JOBS.c.attempts).where(JOBS.c.id == job.id)
        ).first()
        if mine is None or (mine.status, mine.error, mine.attempts) != (
            params["status"],
            params["error"],
            job.attempts,
        ):
            return Finished(False)
        lease = conn.execute(
            sa.select(LEASES.c.job_id, LEASES.c.started_at, LEASES.c.locked_at, LEASES.c.locked_by).where(
                LEASES.c.scope == self.scope,
                LEASES.c.queue == job.queue,
                LEASES.c.token == params["new_token"],
            )
        ).first()
        if lease is None:
            return Finished(True)
        nxt = conn.execute(sa.select(*JOB_COLUMNS).where(JOBS.c.id == lease.job_id)).mappings().first()
        if nxt is None:
            return Finished(True)
        following = Job.from_row(nxt)
        handed = Lease(job.queue, following.id, params["new_token"], following.timeout)
        if lease.started_at is None:
            return Finished(True, handed)
        inline = lease.started_at == lease.locked_at and lease.locked_by == burst.worker
        if inline and following.status == STATUS_RUNNING and following.attempted_by == burst.worker:
            return Finished(True, handed, following)
        return Finished(True)


def queue_dues(
    specs: Sequence[NewJob], by_queue: dict[str, list[int]], queues: Sequence[str]
) -> tuple[list[dt.datetime | None], list[bool]]:
    """For each of ``queues``: the earliest ``scheduled_at`` given to its new jobs (or
    None), and whether one of them is due now (no ``scheduled_at``)."""
    dues: list[dt.datetime | None] = []
    nows: list[bool] = []
    for queue in queues:
        explicit = [specs[i].scheduled_at for i in by_queue[queue]]
        given = [d for d in explicit if d is not None]
        dues.append(min(given) if given else None)
        nows.append(len(given) < len(explicit))
    return dues, nows


#: The ``timestamptz`` type's oid: those columns are returned in UTC.
TIMESTAMPTZ = postgres_types["timestamptz"].oid

#: Of each statement run by :func:`raw_all` (by its text): its column names, and the
#: names of its ``timestamptz`` columns.
_COLUMNS: dict[str, tuple[list[str], list[str]]] = {}


def raw_all(conn: Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a hot-path statement on the psycopg connection itself (in the connection's
    transaction, if any) and return its rows, timestamps in UTC. SQLAlchemy's result
    machinery (rebuilt for every textual statement) cost about as much client CPU as
    the rest of a job.

    The columns are read from ``cursor.description`` once per statement text and
    kept: a statement's text fixes its columns (ours name every column, or ``j.*`` of
    a CTE that does), and building the description (a ``Column`` object per column,
    its type looked up) cost about 20 µs for the 27 columns of a start, a sixth of the
    worker's client CPU per job. The texts are this package's constants, so the cache
    stays small; a row of another length than its names raises."""
    # The DBAPI connection, not the driver's: the same psycopg connection on a sync
    # engine, and SQLAlchemy's sync facade over it under an AsyncConnection's run_sync.
    driver: Any = conn.connection.dbapi_connection
    assert driver is not None
    cur = driver.cursor()
    try:
        cur.execute(sql, params)
        columns = _COLUMNS.get(sql)
        if columns is None:
            description = cur.description or ()
            columns = _COLUMNS[sql] = (
                [column.name for column in description],
                [column.name for column in description if column.type_code == TIMESTAMPTZ],
            )
        names, stamps = columns
        rows = [dict(zip(names, values, strict=True)) for values in cur.fetchall()]
    finally:
        cur.close()
    for row in rows:
        for key in stamps:
            value = row[key]
            if value is not None:
                row[key] = value.astimezone(UTC)
    return rows


def raw_one(conn: Connection, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """:func:`raw_all` of a statement returning one row."""
    (row,) = raw_all(conn, sql, params)
    return row
