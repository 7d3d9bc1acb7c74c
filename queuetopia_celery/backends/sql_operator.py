"""The operator's reads and writes, shared by the SQL backends and written once in
SQLAlchemy Core: reading, counting and listing jobs, queue statuses, retry, abort,
purge, pause and resume, bulk retry and abort, and the facts behind ``explain``. None
of it is on the workers' hot path."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.engine import Connection

from ..errors import JobNotFoundError, JobStateError, QueueNotFoundError
from ..jobs import (
    HELD_UNTIL,
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
    QueueFacts,
    QueueStatus,
)
from .connection import Executor
from .sql_core import JOB_COLUMNS, JOBS, LEASES, QUEUES
from .sql_recovery import SqlRecovery


class SqlOperator(SqlRecovery):
    """:class:`SqlRecovery` with the operator's operations."""

    # ------------------------------------------------------------------ reading jobs

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

    # ------------------------------------------------------------------ dispatching

    # ------------------------------------------------------------------ retry, abort, purge

    def retry(self, job_id: int, *, force: bool = False) -> Job:
        """Make a job that waits for a retry, is held or exhausted, or is scheduled,
        due now. An exhausted job comes back to its place in its queue for one more
        attempt (failing it exhausts or holds it again); if a later job of its queue
        has already run, it would run after that job: refused unless ``force``. Raises
        :class:`JobNotFoundError` or :class:`JobStateError`."""
        with self._transaction() as conn:
            job = self._get_for_update(conn, job_id)
            if job.status not in (STATUS_PENDING, STATUS_EXHAUSTED):
                hint = "its attempt is in progress" if job.status == STATUS_RUNNING else ""
                raise JobStateError(job_id, job.state.value, "retry", hint)
            if job.status == STATUS_EXHAUSTED and not force:
                later = conn.execute(
                    sa.select(JOBS.c.id)
                    .where(
                        JOBS.c.scope == self.scope,
                        JOBS.c.queue == job.queue,
                        JOBS.c.attempts > 0,
                        sa.or_(
                            JOBS.c.scheduled_at > job.scheduled_at,
                            sa.and_(JOBS.c.scheduled_at == job.scheduled_at, JOBS.c.sequence > job.sequence),
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
            row = self._update_returning_job(
                conn,
                sa.update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.scope == self.scope)
                .values(status=STATUS_PENDING, next_attempt_at=self._now()),
                job_id,
            )
            self._lower_due(conn, [job.queue])
        return Job.from_row(row)

    def abort(self, job_id: int, reason: str) -> Job:
        """Take a job that is not running out of its queue, for good: status
        ``aborted``, with the reason and time recorded; the row is kept. A dispatched
        but unstarted lease on it is released so that the queue moves on. Raises
        :class:`JobNotFoundError` or :class:`JobStateError`."""
        with self._transaction() as conn:
            found = conn.execute(
                sa.select(JOBS.c.queue).where(JOBS.c.scope == self.scope, JOBS.c.id == job_id)
            ).first()
            if found is None:
                raise JobNotFoundError(self.scope, job_id)
            # Lock in the workers' order (lease, then job) so that we never deadlock with them.
            lease = sa.select(LEASES.c.token).where(
                LEASES.c.scope == self.scope, LEASES.c.queue == found.queue
            )
            conn.execute(self._locked(lease))
            job = self._get_for_update(conn, job_id)
            if job.status != STATUS_PENDING:
                hint = (
                    "its attempt is in progress; abort it once the attempt has ended"
                    if job.status == STATUS_RUNNING
                    else "it is no longer in its queue"
                )
                raise JobStateError(job_id, job.state.value, "abort", hint)
            row = self._update_returning_job(
                conn,
                sa.update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.scope == self.scope, JOBS.c.status == STATUS_PENDING)
                .values(
                    status=STATUS_ABORTED,
                    abort_reason=reason,
                    aborted_at=self._now(),
                    next_attempt_at=None,
                ),
                job_id,
            )
            conn.execute(
                sa.delete(LEASES).where(
                    LEASES.c.scope == self.scope,
                    LEASES.c.queue == job.queue,
                    LEASES.c.job_id == job_id,
                    LEASES.c.started_at.is_(None),
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
            with self._transaction() as conn:
                old = (
                    sa.select(JOBS.c.id)
                    .where(
                        JOBS.c.scope == self.scope,
                        JOBS.c.status == STATUS_DONE,
                        JOBS.c.done_at < self._after(-older_than),
                    )
                    .limit(batch)
                )
                ids = list(conn.execute(old).scalars())
                if ids:
                    conn.execute(sa.delete(JOBS).where(JOBS.c.id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total

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

    # ------------------------------------------------------------------ pause, bulk, explain

    def _queue_row(self, conn: Connection, queue: str) -> Any:
        query = sa.select(QUEUES.c.paused).where(QUEUES.c.scope == self.scope, QUEUES.c.queue == queue)
        row = conn.execute(self._locked(query)).first()
        if row is None:
            raise QueueNotFoundError(self.scope, queue)
        return row

    def pause(self, queue: str) -> bool:
        """Pause a queue: no job of it starts until :meth:`resume` (the scan, the kick,
        the hand-on and the start all check the flag); a running job finishes. The
        queue's dispatched but unstarted lease is let go (its message is dropped as
        stale). Returns False when the queue was already paused (nothing changed).
        Raises :class:`QueueNotFoundError` for a queue with no row."""
        with self._transaction() as conn:
            if self._queue_row(conn, queue).paused:
                return False
            conn.execute(
                sa.update(QUEUES)
                .where(QUEUES.c.scope == self.scope, QUEUES.c.queue == queue)
                .values(paused=True)
            )
            conn.execute(
                sa.delete(LEASES).where(
                    LEASES.c.scope == self.scope, LEASES.c.queue == queue, LEASES.c.started_at.is_(None)
                )
            )
        return True

    def resume(self, queue: str) -> bool:
        """Resume a paused queue and make it due for the next scan (the caller wakes it
        at once with a kick). Returns False when it was not paused.
        Raises :class:`QueueNotFoundError` for a queue with no row."""
        with self._transaction() as conn:
            if not self._queue_row(conn, queue).paused:
                return False
            conn.execute(
                sa.update(QUEUES)
                .where(QUEUES.c.scope == self.scope, QUEUES.c.queue == queue)
                .values(paused=False)
            )
            self._lower_due(conn, [queue])
        return True

    def _bulk_filter(self, query: Any, queue: str | None, action: str | None) -> Any:
        query = query.where(JOBS.c.scope == self.scope)
        if queue is not None:
            query = query.where(JOBS.c.queue == queue)
        if action is not None:
            query = query.where(JOBS.c.action == action)
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
            sa.select(
                JOBS.c.id,
                JOBS.c.queue,
                JOBS.c.status,
                JOBS.c.scheduled_at,
                JOBS.c.sequence,
                JOBS.c.unique_key,
            ),
            queue,
            action,
        ).where(state_clause)
        candidates = self._locked(candidates)
        skipped: dict[str, int] = {}
        with self._transaction() as conn:
            rows = conn.execute(candidates.order_by(JOBS.c.id)).all()
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
                        sa.update(JOBS)
                        .where(JOBS.c.scope == self.scope, JOBS.c.id.in_(ids[start : start + 10_000]))
                        .values(status=STATUS_PENDING, next_attempt_at=self._now())
                    )
                self._lower_due(conn, queues)
        return BulkResult(count=len(chosen), skipped=skipped, dry_run=dry_run, queues=queues)

    def _last_attempted(self, conn: Connection, queues: Sequence[str]) -> dict[str, tuple[dt.datetime, int]]:
        """The queue position ``(scheduled_at, sequence)`` of each queue's last
        attempted job."""
        rank = (
            sa.func.row_number()
            .over(partition_by=JOBS.c.queue, order_by=(JOBS.c.scheduled_at.desc(), JOBS.c.sequence.desc()))
            .label("rank")
        )
        sub = (
            sa.select(JOBS.c.queue, JOBS.c.scheduled_at, JOBS.c.sequence, rank)
            .where(JOBS.c.scope == self.scope, JOBS.c.queue.in_(list(queues)), JOBS.c.attempts > 0)
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
        with self._transaction() as conn:
            counts = conn.execute(
                self._bulk_filter(sa.select(JOBS.c.status, JOBS.c.queue, func.count()), queue, action)
                .where(JOBS.c.status.in_(OPEN_STATUSES))
                .group_by(JOBS.c.status, JOBS.c.queue)
            ).all()
            running = sum(int(n) for status, _, n in counts if status == STATUS_RUNNING)
            if running:
                skipped["running"] = running
            queues = tuple(sorted({name for status, name, _ in counts if status == STATUS_PENDING}))
            count = sum(int(n) for status, _, n in counts if status == STATUS_PENDING)
            if dry_run or not count:
                return BulkResult(count=count, skipped=skipped, dry_run=dry_run, queues=queues)
            # Lock in the workers' order (leases, then jobs), as abort does.
            conn.execute(
                self._locked(
                    sa.select(LEASES.c.queue)
                    .where(LEASES.c.scope == self.scope, LEASES.c.queue.in_(list(queues)))
                    .order_by(LEASES.c.queue)
                )
            )
            done = conn.execute(
                self._bulk_filter(sa.update(JOBS), queue, action)
                .where(JOBS.c.status == STATUS_PENDING)
                .values(
                    status=STATUS_ABORTED, abort_reason=reason, aborted_at=self._now(), next_attempt_at=None
                )
            )
            count = int(done.rowcount or 0)
            aborted = (
                sa.select(JOBS.c.id)
                .where(JOBS.c.id == LEASES.c.job_id, JOBS.c.status == STATUS_ABORTED)
                .exists()
            )
            conn.execute(
                sa.delete(LEASES).where(
                    LEASES.c.scope == self.scope,
                    LEASES.c.queue.in_(list(queues)),
                    LEASES.c.started_at.is_(None),
                    aborted,
                )
            )
            self._lower_due(conn, queues)
        return BulkResult(count=count, skipped=skipped, dry_run=False, queues=queues)

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
