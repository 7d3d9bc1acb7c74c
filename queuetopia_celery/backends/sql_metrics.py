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
            states, queues_open, oldest_due = self._open_jobs(conn)
            blocked = self._blocked_queues(conn, now)
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
            oldest_due_age=0.0 if oldest_due is None else max((now - oldest_due).total_seconds(), 0.0),
            longest_blocked=ages[0][0] if ages else 0.0,
            top_open=top_open,
            top_blocked=[(queue, age) for age, queue in ages[:top_queues]] if top_queues > 0 else [],
        )

    def _open_jobs(self, conn: Connection) -> tuple[dict[str, int], int, dt.datetime | None]:
        """Open jobs by state, queues with open jobs, and the earliest due time of a
        pending job that is due (not held): one pass over the open jobs."""
        now = self._now()
        pending = JOBS.c.status == STATUS_PENDING
        held = sa.and_(pending, JOBS.c.next_attempt_at >= HELD_UNTIL)
        not_held = sa.or_(JOBS.c.next_attempt_at.is_(None), JOBS.c.next_attempt_at < HELD_UNTIL)
        due = func.coalesce(JOBS.c.next_attempt_at, JOBS.c.scheduled_at, type_=schema.UTCDateTime())
        row = conn.execute(
            sa.select(
                _count(JOBS.c.status == STATUS_RUNNING).label(JobState.RUNNING.value),
                _count(held).label(JobState.HELD.value),
                _count(sa.and_(pending, JOBS.c.attempts > 0, not_held)).label(JobState.RETRYING.value),
                _count(sa.and_(pending, JOBS.c.attempts == 0, JOBS.c.scheduled_at > now)).label(
                    JobState.SCHEDULED.value
                ),
                _count(sa.and_(pending, JOBS.c.attempts == 0, JOBS.c.scheduled_at <= now)).label(
                    JobState.AVAILABLE.value
                ),
                func.count(sa.distinct(JOBS.c.queue)).label("queues"),
                func.min(sa.case((sa.and_(pending, due <= now), due), else_=None)).label("oldest_due"),
            ).where(JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES))
        ).one()
        mapping = row._mapping
        states = {state.value: int(mapping[state.value]) for state in OPEN_STATES}
        return states, int(mapping["queues"]), _utc(mapping["oldest_due"])

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
