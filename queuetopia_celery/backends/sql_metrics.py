"""The reads behind the Prometheus gauges (:mod:`queuetopia_celery.metrics`): a scope's
open jobs by state, its queues with open jobs, blocked and paused, the age of its
oldest due job and its longest blocked queue, and optionally the queues with the most
open jobs and the longest blocked ones. Written once in SQLAlchemy Core for every SQL
database; a scrape runs these few statements in one transaction and never reads done
jobs (every statement is limited to open jobs, the partial index's rows)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.engine import Connection

from .. import schema
from ..jobs import HELD_UNTIL, OPEN_STATUSES, STATUS_PENDING, STATUS_RUNNING, UTC, JobState
from .base import ScopeGauges
from .sql_core import JOBS, QUEUE_ORDER, QUEUES, SqlCore

#: The states an open job can be in, as the gauges name them.
OPEN_STATES = (JobState.AVAILABLE, JobState.SCHEDULED, JobState.RUNNING, JobState.RETRYING, JobState.HELD)


def _utc(value: Any) -> dt.datetime | None:
    """A timestamp read back through an expression (SQLite may hand back text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
    return value.astimezone(UTC)  # type: ignore[no-any-return]


def _count(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    return func.coalesce(func.sum(sa.case((condition, 1), else_=0)), 0)


class SqlMetrics(SqlCore):
    """:class:`SqlCore` with the gauges' reads."""

    def scope_gauges(self, *, top_queues: int = 0) -> ScopeGauges:
        """The gauges of this scope, read in one transaction on the database clock.
        With ``top_queues`` > 0, also the ``top_queues`` queues with the most open jobs
        and the ``top_queues`` longest blocked ones."""
        with self._transaction() as conn:
            now = self._clock(conn).astimezone(UTC)
            states, queues_open, first_due, failing = self._open_jobs(conn)
            blocked = self._blocked_queues(conn, now) if failing else []
            paused = conn.execute(
                sa.select(func.count())
                .select_from(QUEUES)
                .where(QUEUES.c.scope == self.scope, QUEUES.c.paused)
            ).scalar_one()
            top_open: list[tuple[str, int]] = []
            if top_queues > 0:
                top_open = self._most_open(conn, top_queues)
        ages = sorted(((max((now - since).total_seconds(), 0.0), q) for q, since in blocked), reverse=True)
        return ScopeGauges(
            scope=self.scope,
            open_jobs=states,
            queues_open=queues_open,
            queues_blocked=len(blocked),
            queues_paused=int(paused),
            oldest_due_age=0.0 if first_due is None else max((now - first_due).total_seconds(), 0.0),
            longest_blocked=ages[0][0] if ages else 0.0,
            top_open=top_open,
            top_blocked=[(queue, age) for age, queue in ages[:top_queues]] if top_queues > 0 else [],
        )

    def _open_jobs(self, conn: Connection) -> tuple[dict[str, int], int, dt.datetime | None, int]:
        """Open jobs by state, the earliest due time of a pending job (that job is due
        if it has passed), and how many open jobs have an error (none: no queue is
        blocked), in one pass over the open jobs; then the queues with open jobs.

        Few expressions per row, the other states found by subtraction: a job not yet
        attempted is pending (scheduled or available); one attempted is running, held
        (never due: ``next_attempt_at`` is :data:`HELD_UNTIL`) or else retrying."""
        open_jobs = sa.and_(JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES))
        fresh = JOBS.c.attempts == 0
        due = func.coalesce(JOBS.c.next_attempt_at, JOBS.c.scheduled_at, type_=schema.UTCDateTime())
        row = (
            conn.execute(
                sa.select(
                    func.count().label("total"),
                    _count(JOBS.c.status == STATUS_RUNNING).label("running"),
                    _count(JOBS.c.next_attempt_at >= HELD_UNTIL).label("held"),
                    _count(fresh).label("fresh"),
                    _count(sa.and_(fresh, JOBS.c.scheduled_at > self._now())).label("scheduled"),
                    _count(JOBS.c.error.is_not(None)).label("failing"),
                    func.min(sa.case((JOBS.c.status == STATUS_PENDING, due), else_=None)).label("first_due"),
                ).where(open_jobs)
            )
            .one()
            ._mapping
        )
        total, running, held = int(row["total"]), int(row["running"]), int(row["held"])
        fresh_n, scheduled = int(row["fresh"]), int(row["scheduled"])
        states = {
            JobState.AVAILABLE.value: fresh_n - scheduled,
            JobState.SCHEDULED.value: scheduled,
            JobState.RUNNING.value: running,
            JobState.RETRYING.value: total - fresh_n - running - held,
            JobState.HELD.value: held,
        }
        # Counted apart: COUNT(DISTINCT) in the pass above sorts every open job.
        queues = conn.execute(
            sa.select(func.count()).select_from(
                sa.select(JOBS.c.queue).where(open_jobs).group_by(JOBS.c.queue).subquery()
            )
        ).scalar_one()
        return states, int(queues), _utc(row["first_due"]), int(row["failing"])

    def _blocked_queues(self, conn: Connection, now: dt.datetime) -> list[tuple[str, dt.datetime]]:
        """Each blocked queue (its head has failed: retrying or held) and since when:
        when its head became head (the end of the job before it, or the head's
        ``scheduled_at``, whichever is later), as :meth:`queue_statuses` says. Only
        queues with a failing open job are looked at."""
        failing = (
            sa.select(JOBS.c.queue)
            .where(JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES), JOBS.c.error.is_not(None))
            .distinct()
        )
        rank = func.row_number().over(partition_by=JOBS.c.queue, order_by=QUEUE_ORDER).label("rank")
        heads = (
            sa.select(
                JOBS.c.queue,
                JOBS.c.sequence,
                JOBS.c.scheduled_at,
                sa.case((JOBS.c.error.is_(None), 0), else_=1).label("failing"),
                rank,
            )
            .where(JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES), JOBS.c.queue.in_(failing))
            .subquery()
        )
        before = schema.jobs.alias("before")
        ended = (
            sa.select(func.coalesce(before.c.done_at, before.c.aborted_at, before.c.attempted_at))
            .where(
                before.c.scope == self.scope,
                before.c.queue == heads.c.queue,
                before.c.sequence < heads.c.sequence,
                before.c.status.not_in(OPEN_STATUSES),
            )
            .order_by(before.c.sequence.desc())
            .limit(1)
            .scalar_subquery()
        )
        rows = conn.execute(
            sa.select(heads.c.queue, heads.c.scheduled_at, ended.label("ended")).where(
                heads.c.rank == 1, heads.c.failing == 1
            )
        )
        out = []
        for queue, scheduled_at, ended_at in rows:
            scheduled = _utc(scheduled_at) or now
            previous = _utc(ended_at)
            out.append((queue, max(scheduled, previous) if previous is not None else scheduled))
        return out

    def _most_open(self, conn: Connection, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` queues with the most open jobs, most first (then by name)."""
        count = func.count().label("open_jobs")
        rows = conn.execute(
            sa.select(JOBS.c.queue, count)
            .where(JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES))
            .group_by(JOBS.c.queue)
            .order_by(count.desc(), JOBS.c.queue)
            .limit(limit)
        )
        return [(queue, int(n)) for queue, n in rows]
