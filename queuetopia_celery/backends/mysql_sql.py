"""Every statement of the MySQL/MariaDB backend that is its own (the rest is shared,
in :mod:`.sql_core`), named and kept together, built in SQLAlchemy Core so that rows
come back typed (UTC datetimes, JSON decoded). Parameters are named like the columns
they fill or compare.

MySQL has no partial indexes: the head of a queue is found through the generated
column ``is_open`` (1 for a pending or running job, see ``migrations/steps.py``),
which follows the queue in the open-jobs index, so that finding a head is one index
dive that never reads done jobs. The head is found first, by (scheduled_at,
sequence), and only then checked for due, so a not-yet-due head blocks the jobs
behind it.

The clock is the database's: ``UTC_TIMESTAMP(6)`` (the statement's start, in UTC
whatever the session's time zone). Where the time must be taken after a row lock was
obtained (the default ``scheduled_at`` of new jobs), :func:`clock_now` adds the time
the statement has run so far (``SYSDATE(6) - NOW(6)``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .. import schema
from ..jobs import STATUS_PENDING, STATUS_RUNNING
from .sql_core import JOB_COLUMNS, JOBS, LEASES, QUEUE_ORDER, QUEUES

#: The generated column of open jobs (MySQL and MariaDB only: not in the metadata).
IS_OPEN = sa.column("is_open", sa.Integer())


def utc_now() -> sa.ColumnElement[dt.datetime]:
    """The database clock, in UTC, with microseconds (the statement's start)."""
    return sa.func.utc_timestamp(sa.literal_column("6"), type_=schema.UTCDateTime())


def utc_after(seconds: Any) -> sa.ColumnElement[dt.datetime]:
    """``utc_now() + seconds`` (a number, or a bound parameter of microseconds when
    ``seconds`` is a SQL expression)."""
    micros = seconds if isinstance(seconds, sa.ColumnElement) else round(float(seconds) * 1_000_000)
    return sa.func.timestampadd(
        sa.literal_column("MICROSECOND"), micros, utc_now(), type_=schema.UTCDateTime()
    )


def clock_now() -> sa.ColumnElement[dt.datetime]:
    """The UTC time at which this expression is evaluated (not the statement's
    start): after the row locks the statement waited for."""
    # Written out: SQLAlchemy renders func.sysdate() without its precision.
    ran = sa.literal_column("TIMESTAMPDIFF(MICROSECOND, NOW(6), SYSDATE(6))", sa.BigInteger())
    return sa.func.timestampadd(sa.literal_column("MICROSECOND"), ran, utc_now(), type_=schema.UTCDateTime())


def _paused(scope: Any, queue: Any) -> sa.ColumnElement[bool]:
    return (
        sa.select(QUEUES.c.queue)
        .where(QUEUES.c.scope == scope, QUEUES.c.queue == queue, QUEUES.c.paused)
        .exists()
    )


def head_id(scope: Any, queue: Any, *, exclude_id: Any = None) -> sa.ScalarSelect[Any]:
    """The id of a queue's head: its first open job by (scheduled_at, sequence)."""
    query = (
        sa.select(JOBS.c.id)
        .where(JOBS.c.scope == scope, JOBS.c.queue == queue, IS_OPEN == 1)
        .order_by(*QUEUE_ORDER)
        .limit(1)
    )
    if exclude_id is not None:
        query = query.where(JOBS.c.id != exclude_id)
    return query.scalar_subquery()


def open_head(scope: str, queue: Any, *, exclude_id: Any = None) -> sa.Select[Any]:
    """The head of a queue (the columns :meth:`SqlCore._open_head` returns)."""
    return sa.select(
        JOBS.c.id, JOBS.c.status, JOBS.c.timeout, JOBS.c.scheduled_at, JOBS.c.next_attempt_at
    ).where(JOBS.c.id == head_id(scope, queue, exclude_id=exclude_id))


#: Whether a job is due on the database clock.
def _due(jobs: Any = JOBS) -> sa.ColumnElement[bool]:
    return sa.func.coalesce(jobs.c.next_attempt_at, jobs.c.scheduled_at) <= utc_now()


def due_heads(scope: str, queues: Sequence[str], limit: int) -> sa.Select[Any]:
    """TAKE_HEADS: the queues among ``queues`` (not paused) whose head is pending and
    due, with that head's id and timeout, in queue order, at most ``limit``."""
    names = sa.select(QUEUES.c.queue.label("queue")).where(
        QUEUES.c.scope == scope, QUEUES.c.queue.in_(list(queues)), sa.not_(QUEUES.c.paused)
    )
    named = names.subquery("w")
    head = JOBS.alias("h")
    return (
        sa.select(named.c.queue, head.c.id, head.c.timeout)
        .join_from(named, head, head.c.id == head_id(scope, named.c.queue))
        .where(head.c.status == STATUS_PENDING, _due(head))
        .order_by(named.c.queue)
        .limit(limit)
    )


def take_leases(
    scope: str, rows: Sequence[tuple[str, int, str]], first_wait: float, locked_by: str | None
) -> Any:
    """TAKE_LEASES: insert a lease per ``(queue, job_id, token)`` in queue order; an
    existing lease is left as it is (``ON DUPLICATE KEY UPDATE`` a no-op). RETURNING
    gives each queue's lease token: the new one where it was taken."""
    insert = mysql.insert(LEASES).values(
        [
            {
                "scope": scope,
                "queue": queue,
                "token": token,
                "job_id": job_id,
                "locked_at": utc_now(),
                "expires_at": utc_after(first_wait),
                "locked_by": locked_by,
            }
            for queue, job_id, token in rows
        ]
    )
    return insert.on_duplicate_key_update(queue=LEASES.c.queue).returning(LEASES.c.queue, LEASES.c.token)


def bump_sequences(scope: str, counts: dict[str, int], dues: dict[str, Any]) -> Any:
    """BUMP_SEQUENCES: upsert the queues' rows (queue order, so concurrent bulk
    producers cannot deadlock), taking ``counts[queue]`` sequence numbers each and
    lowering ``due_at`` to ``dues[queue]``. The rows stay locked until the creating
    transaction ends, so producers of one queue commit in sequence order. RETURNING
    gives each queue's last number taken, whether it is paused, and the time the row
    was locked (the default ``scheduled_at``, so (scheduled_at, sequence) follows
    commit order too)."""
    insert = mysql.insert(QUEUES).values(
        [
            {"scope": scope, "queue": queue, "last_sequence": counts[queue], "due_at": dues[queue]}
            for queue in sorted(counts)
        ]
    )
    new = insert.inserted
    return insert.on_duplicate_key_update(
        # Assignments run in this order: due_at reads last_sequence's old value nowhere.
        last_sequence=QUEUES.c.last_sequence + new.last_sequence,
        due_at=sa.case(
            (QUEUES.c.due_at.is_(None), new.due_at),
            (new.due_at < QUEUES.c.due_at, new.due_at),
            else_=QUEUES.c.due_at,
        ),
    ).returning(QUEUES.c.queue, QUEUES.c.last_sequence, QUEUES.c.paused, clock_now().label("locked_at"))


def insert_jobs(rows: Sequence[dict[str, Any]], *, unique: bool) -> Any:
    """INSERT_JOBS: the new jobs, RETURNING their rows. With ``unique`` (some job has
    a unique_key), a job whose key an open job of the scope holds is not inserted
    (``ON DUPLICATE KEY UPDATE`` a no-op on the unique index of open keys) and
    RETURNING gives the holder's row in its place."""
    insert = mysql.insert(JOBS).values(list(rows))
    if unique:
        insert = insert.on_duplicate_key_update(id=JOBS.c.id)
    return insert.returning(*JOB_COLUMNS)


def _start() -> Any:
    """START: mark the lease started and count the job's attempt, in one statement
    (a multi-table UPDATE, autocommit): only if ``:token`` holds the queue's lease for
    ``:job_id``, unstarted, the job is pending and the queue is not paused. Built once
    (parameters ``:b_scope``, ``:b_queue``, ``:b_token``, ``:b_job_id``,
    ``:b_worker``, ``:lease_micros``: an UPDATE's parameters may not be named like
    its columns)."""
    scope, queue = sa.bindparam("b_scope", type_=sa.String()), sa.bindparam("b_queue", type_=sa.String())
    worker = sa.bindparam("b_worker", type_=sa.String())
    now = utc_now()
    return (
        sa.update(LEASES)
        .where(
            LEASES.c.scope == scope,
            LEASES.c.queue == queue,
            LEASES.c.token == sa.bindparam("b_token", type_=sa.String()),
            LEASES.c.job_id == sa.bindparam("b_job_id", type_=sa.BigInteger()),
            LEASES.c.started_at.is_(None),
            JOBS.c.id == LEASES.c.job_id,
            JOBS.c.status == STATUS_PENDING,
            sa.not_(_paused(scope, queue)),
        )
        .values(
            {
                LEASES.c.started_at: now,
                LEASES.c.expires_at: utc_after(sa.bindparam("lease_micros", type_=sa.BigInteger())),
                LEASES.c.locked_by: worker,
                JOBS.c.status: STATUS_RUNNING,
                JOBS.c.attempts: JOBS.c.attempts + 1,
                JOBS.c.attempted_at: now,
                JOBS.c.attempted_by: worker,
            }
        )
    )


START = _start()


def _finishing() -> Any:
    """FINISHING: lock the lease held by ``:token`` and read, in the same statement,
    the queue's next head (the job being finished, ``:job_id``, excluded: it is about
    to end), whether that head is due, whether the queue is paused, and the database
    clock. Built once (parameters ``:scope``, ``:queue``, ``:token``, ``:job_id``)."""
    scope, queue = sa.bindparam("scope", type_=sa.String()), sa.bindparam("queue", type_=sa.String())
    job_id = sa.bindparam("job_id", type_=sa.BigInteger())
    head = JOBS.alias("h")
    return (
        sa.select(
            LEASES.c.job_id.label("lease_job_id"),
            _paused(scope, queue).label("paused"),
            _due(head).label("due"),
            utc_now().label("now"),
            *[head.c[c.name] for c in JOB_COLUMNS],
        )
        .select_from(LEASES)
        .outerjoin(head, head.c.id == head_id(scope, queue, exclude_id=job_id))
        .where(
            LEASES.c.scope == scope,
            LEASES.c.queue == queue,
            LEASES.c.token == sa.bindparam("token", type_=sa.String()),
        )
        .with_for_update()
    )


FINISHING = _finishing()
