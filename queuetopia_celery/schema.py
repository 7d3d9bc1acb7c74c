"""The tables, as SQLAlchemy Core metadata.

The migrations in ``migrations/`` (top level) build exactly these tables; a test
compares the two.

* ``queuetopia_jobs``: one row per job. Open jobs (``pending`` or ``running``) are
  reached only through a partial index, so done jobs never slow the hot path.
* ``queuetopia_queues``: one row per (scope, queue), written by producers only. It
  holds the per-queue sequence counter (upserted in the creating transaction, so
  sequence follows commit order) and ``due_at``, a lower bound of when the queue's head
  job becomes due: the scan reads only queues whose ``due_at`` has passed.
* ``queuetopia_leases``: at most one row per (scope, queue): the queue is taken. The
  ``token`` fences stale messages and stale workers; ``expires_at`` is computed by the
  database clock. An unstarted lease "expires" when its message is due to be re-sent
  (same token); ``resends`` counts the re-sends.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeDecorator, TypeEngine

UTC = dt.timezone.utc

#: SQLAlchemy's names of MySQL and MariaDB (``mariadb+pymysql://`` URLs say the latter).
MYSQL_DIALECTS = ("mysql", "mariadb")

metadata = MetaData()


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite stores naive UTC text and MySQL/MariaDB
    naive UTC ``DATETIME(6)`` (microseconds, as PostgreSQL), which this type converts on
    the way in and out so that comparisons stay correct.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in MYSQL_DIALECTS:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite" or dialect.name in MYSQL_DIALECTS:
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


ID = BigInteger().with_variant(Integer(), "sqlite")

#: A float column: double precision everywhere (MySQL's FLOAT is single precision).
DOUBLE = Float().with_variant(mysql.DOUBLE(asdecimal=False), *MYSQL_DIALECTS)

jobs = Table(
    "queuetopia_jobs",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("scope", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("action", String(255), nullable=False),
    Column("params", JSON(), nullable=False),
    Column("result", JSON(none_as_null=True), nullable=True),
    Column("sequence", BigInteger(), nullable=False),
    Column("timeout", DOUBLE, nullable=False),
    Column("max_backoff", DOUBLE, nullable=False),
    Column("max_attempts", Integer(), nullable=False),
    Column("scheduled_at", UTCDateTime(), nullable=False),
    Column("status", String(16), nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer(), nullable=False, server_default=text("0")),
    Column("attempted_at", UTCDateTime(), nullable=True),
    Column("attempted_by", String(255), nullable=True),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("done_at", UTCDateTime(), nullable=True),
    Column("error", Text(), nullable=True),
    Column("inserted_at", UTCDateTime(), nullable=False),
    # Version 2 (operator tools): what happens at the last failed attempt, and aborts.
    Column("on_exhausted", String(8), nullable=False, server_default=text("'skip'")),
    Column("abort_reason", Text(), nullable=True),
    Column("aborted_at", UTCDateTime(), nullable=True),
    # Version 4: the id of the create call that inserted the job (on PostgreSQL, without
    # a caller connection), so that a retried insert whose reply was lost finds its jobs.
    Column("create_key", String(32), nullable=True),
    # Version 5: a unique job's key (at most one open job per key in the scope).
    Column("unique_key", String(255), nullable=True),
    # Version 7: the creating code's trace context (OpenTelemetry propagation fields), or NULL.
    Column("trace_context", JSON(none_as_null=True), nullable=True),
    UniqueConstraint("scope", "queue", "sequence", name="uq_queuetopia_jobs_scope_queue_sequence"),
)

_OPEN = "status IN ('pending', 'running')"

Index(
    "ix_queuetopia_jobs_open",
    jobs.c.scope,
    jobs.c.queue,
    jobs.c.scheduled_at,
    jobs.c.sequence,
    postgresql_where=text(_OPEN),
    sqlite_where=text(_OPEN),
)
Index("ix_queuetopia_jobs_scope_id", jobs.c.scope, jobs.c.id)
Index(
    "ix_queuetopia_jobs_create_key",
    jobs.c.create_key,
    postgresql_where=text("create_key IS NOT NULL"),
    sqlite_where=text("create_key IS NOT NULL"),
)
#: The predicate of the unique-key index: only open jobs with a key take part, so a
#: key is free again once its job is done, exhausted or aborted.
UNIQUE_OPEN = "unique_key IS NOT NULL AND status IN ('pending', 'running')"

Index(
    "uq_queuetopia_jobs_open_unique_key",
    jobs.c.scope,
    jobs.c.unique_key,
    unique=True,
    postgresql_where=text(UNIQUE_OPEN),
    sqlite_where=text(UNIQUE_OPEN),
)
#: The predicate of the failing-jobs index (version 7): open jobs with an error, the
#: candidates for a blocked queue's head (few; read by the metrics and blocked_queues).
FAILING_OPEN = "error IS NOT NULL AND status IN ('pending', 'running')"

Index(
    "ix_queuetopia_jobs_failing",
    jobs.c.scope,
    jobs.c.queue,
    postgresql_where=text(FAILING_OPEN),
    sqlite_where=text(FAILING_OPEN),
)
Index(
    "ix_queuetopia_jobs_done",
    jobs.c.scope,
    jobs.c.done_at,
    postgresql_where=text("status = 'done'"),
    sqlite_where=text("status = 'done'"),
)

queues = Table(
    "queuetopia_queues",
    metadata,
    Column("scope", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("last_sequence", BigInteger(), nullable=False),
    Column("due_at", UTCDateTime(), nullable=True),
    # Version 5: an operator paused the queue: no job of it starts until resumed.
    Column("paused", Boolean(), nullable=False, server_default=false()),
    PrimaryKeyConstraint("scope", "queue", name="pk_queuetopia_queues"),
)

Index(
    "ix_queuetopia_queues_due",
    queues.c.scope,
    queues.c.due_at,
    postgresql_where=text("due_at IS NOT NULL"),
    sqlite_where=text("due_at IS NOT NULL"),
)

leases = Table(
    "queuetopia_leases",
    metadata,
    Column("scope", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("token", String(36), nullable=False),
    Column("job_id", ID, nullable=False),
    Column("locked_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("locked_by", String(255), nullable=True),
    # Version 4: how many times the perform message of an unstarted lease was re-sent
    # (the next re-send waits twice as long).
    Column("resends", Integer(), nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("scope", "queue", name="pk_queuetopia_leases"),
)

# On expires_at alone: an index led by scope would compete with the primary key for
# every lookup of one lease (see migration 0003).
Index("ix_queuetopia_leases_expires", leases.c.expires_at)

#: Alembic's version table for our migrations, apart from the host app's own.
VERSION_TABLE = "queuetopia_alembic_version"

# Version 5: one row per ``queuetopia.<scope>.create`` message that created jobs (the
# Celery task id), so that a redelivered message does not create them twice. Deleted
# with its (first) job by the cleanup (on SQLite only when foreign keys are enabled).
messages = Table(
    "queuetopia_messages",
    metadata,
    Column("scope", String(255), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column(
        "job_id", ID, ForeignKey("queuetopia_jobs.id", name="fk_queuetopia_messages_job", ondelete="CASCADE")
    ),
    Column("job_ids", JSON(), nullable=True),
    Column("inserted_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("scope", "message_id", name="pk_queuetopia_messages"),
)

Index("ix_queuetopia_messages_job", messages.c.job_id)
