"""The operator's reads, shared by the SQL backends and written once in SQLAlchemy
Core: reading, counting and listing jobs, queue statuses, and the facts behind
``explain``. None of it is on the workers' hot path; none of it writes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.engine import Connection

from ..jobs import (
    HELD_UNTIL,
    OPEN_STATUSES,
    STATUS_ABORTED,
    STATUS_DONE,
    STATUS_EXHAUSTED,
    STATUS_PENDING,
    STATUS_RUNNING,
    UTC,
    Job,
    JobState,
    QueueFacts,
    QueueStatus,
)
from .connection import Executor
from .sql_core import JOB_COLUMNS, JOBS, LEASES, QUEUES
from .sql_recovery import SqlRecovery


class SqlReads(SqlRecovery):
    """:class:`SqlRecovery` with the operator's reads."""

    def get_job(self, job_id: int, *, connection: Executor | None = None) -> Job | None:
        with self._transaction(connection) as conn:
            row = (
                conn.execute(sa.select(*JOB_COLUMNS).where(JOBS.c.scope == self.scope, JOBS.c.id == job_id))
                .mappings()
                .first()
            )
        return Job.from_row(row) if row else None

    def _filtered(self, query: Any, queue: str | None, action: str | None, state: JobState | None) -> Any:
        query = query.where(JOBS.c.scope == self.scope)
        if queue is not None:
            query = query.where(JOBS.c.queue == queue)
        if action is not None:
            query = query.where(JOBS.c.action == action)
        if state is not None:
            query = query.where(self._state_clause(state))
        return query

    def _state_clause(self, state: JobState) -> sa.ColumnElement[bool]:
        pending = JOBS.c.status == STATUS_PENDING
        by_status = {
            JobState.DONE: STATUS_DONE,
            JobState.EXHAUSTED: STATUS_EXHAUSTED,
            JobState.ABORTED: STATUS_ABORTED,
            JobState.RUNNING: STATUS_RUNNING,
        }
        if state in by_status:
            return JOBS.c.status == by_status[state]
        if state is JobState.HELD:
            return sa.and_(pending, JOBS.c.next_attempt_at >= HELD_UNTIL)
        if state is JobState.RETRYING:
            not_held = sa.or_(JOBS.c.next_attempt_at.is_(None), JOBS.c.next_attempt_at < HELD_UNTIL)
            return sa.and_(pending, JOBS.c.attempts > 0, not_held)
        if state is JobState.SCHEDULED:
            return sa.and_(pending, JOBS.c.attempts == 0, JOBS.c.scheduled_at > self._now())
        return sa.and_(pending, JOBS.c.attempts == 0, JOBS.c.scheduled_at <= self._now())

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Job]:
        query = self._filtered(sa.select(*JOB_COLUMNS), queue, action, state)
        # Newest created first across queues (Queuetopia's order), by sequence within
        # a queue (jobs created together share their inserted_at).
        query = query.order_by(JOBS.c.inserted_at.desc(), JOBS.c.sequence.desc(), JOBS.c.id.desc()).offset(
            offset
        )
        if limit is not None:
            query = query.limit(limit)
        with self._transaction() as conn:
            return [Job.from_row(row) for row in conn.execute(query).mappings()]

    def count_jobs(
        self, *, queue: str | None = None, action: str | None = None, state: JobState | None = None
    ) -> int:
        query = self._filtered(sa.select(func.count()).select_from(JOBS), queue, action, state)
        with self._transaction() as conn:
            return int(conn.execute(query).scalar_one())

    def _blocked_since(self, conn: Connection, head: Job) -> dt.datetime:
        """When ``head`` became its queue's head: when the job before it ended, or
        when it was scheduled, whichever is later."""
        ended = sa.func.coalesce(JOBS.c.done_at, JOBS.c.aborted_at, JOBS.c.attempted_at)
        previous = conn.execute(
            sa.select(ended)
            .where(
                JOBS.c.scope == self.scope,
                JOBS.c.queue == head.queue,
                JOBS.c.sequence < head.sequence,
                JOBS.c.status.not_in(OPEN_STATUSES),
            )
            .order_by(JOBS.c.sequence.desc())
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
        with self._transaction() as conn:
            names: list[str] | None = None if queue is None else [queue]
            if blocked_only:
                # Only queues with a failing open job can be blocked: look at those alone.
                failing = (
                    sa.select(JOBS.c.queue)
                    .distinct()
                    .where(
                        JOBS.c.scope == self.scope,
                        JOBS.c.status.in_(OPEN_STATUSES),
                        JOBS.c.error.is_not(None),
                    )
                )
                if queue is not None:
                    failing = failing.where(JOBS.c.queue == queue)
                names = list(conn.execute(failing).scalars())
                if not names:
                    return []
            counts = sa.select(JOBS.c.queue, func.count(), func.min(JOBS.c.inserted_at)).where(
                JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES)
            )
            if names is not None:
                counts = counts.where(JOBS.c.queue.in_(names))
            pending = {row[0]: (int(row[1]), row[2]) for row in conn.execute(counts.group_by(JOBS.c.queue))}
            heads = self._heads(conn, names)
            lease_q = sa.select(LEASES).where(LEASES.c.scope == self.scope)
            if names is not None:
                lease_q = lease_q.where(LEASES.c.queue.in_(names))
            held = {row["queue"]: row for row in conn.execute(lease_q).mappings()}
            paused_q = sa.select(QUEUES.c.queue).where(QUEUES.c.scope == self.scope, QUEUES.c.paused)
            if names is not None:
                paused_q = paused_q.where(QUEUES.c.queue.in_(names))
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

    def queue_facts(self, queue: str) -> QueueFacts:
        """What :func:`queuetopia_celery.explain.explain` needs about one queue, read
        in one transaction."""
        with self._transaction() as conn:
            now = self._clock(conn)
            row = conn.execute(
                sa.select(QUEUES.c.paused).where(QUEUES.c.scope == self.scope, QUEUES.c.queue == queue)
            ).first()
            open_jobs = conn.execute(
                sa.select(func.count()).where(
                    JOBS.c.scope == self.scope, JOBS.c.queue == queue, JOBS.c.status.in_(OPEN_STATUSES)
                )
            ).scalar_one()
            head = self._heads(conn, [queue]).get(queue)
            lease = (
                conn.execute(sa.select(LEASES).where(LEASES.c.scope == self.scope, LEASES.c.queue == queue))
                .mappings()
                .first()
            )
            scope_leases = conn.execute(
                sa.select(func.count()).select_from(LEASES).where(LEASES.c.scope == self.scope)
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
