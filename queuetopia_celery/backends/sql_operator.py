"""The operator's writes, shared by the SQL backends and written once in SQLAlchemy
Core: retry, abort, purge, pause and resume, bulk retry and abort (the reads are in
:mod:`.sql_reads`). None of it is on the workers' hot path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.engine import Connection

from ..errors import JobNotFoundError, JobStateError, QueueNotFoundError
from ..jobs import (
    OPEN_STATUSES,
    STATUS_ABORTED,
    STATUS_DONE,
    STATUS_EXHAUSTED,
    STATUS_PENDING,
    STATUS_RUNNING,
    BulkResult,
    Job,
    JobState,
)
from .sql_core import JOBS, LEASES, MESSAGES, QUEUES
from .sql_metrics import SqlMetrics
from .sql_reads import SqlReads


class SqlOperator(SqlMetrics, SqlReads):
    """:class:`SqlReads` with the operator's writes (and the gauges' reads of
    :class:`SqlMetrics`)."""

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
                later = self._moved_on(conn, [job]).get(job.id)
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
        seconds ago, in batches (one transaction each), with the rows of the create
        messages that made them. Exhausted and aborted jobs are kept. Returns how many
        jobs were deleted."""
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
                    # A create message's row goes with its (first) job. The foreign key
                    # cascades on PostgreSQL; SQLite enforces foreign keys only where
                    # PRAGMA foreign_keys is on, so the rows are deleted here for all.
                    conn.execute(
                        sa.delete(MESSAGES).where(MESSAGES.c.scope == self.scope, MESSAGES.c.job_id.in_(ids))
                    )
                    conn.execute(sa.delete(JOBS).where(JOBS.c.id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total

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
                moved = set(self._moved_on(conn, exhausted))
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

    def _moved_on(self, conn: Connection, jobs: Sequence[Any]) -> dict[int, int]:
        """Those of ``jobs`` (exhausted; anything with ``id``, ``queue``,
        ``scheduled_at`` and ``sequence``) whose queue has moved on: a job after them in
        their queue has already been attempted, so that retried they would run out of
        order. By job id, the id of the queue's last attempted job."""
        queues = sorted({job.queue for job in jobs})
        rank = (
            sa.func.row_number()
            .over(partition_by=JOBS.c.queue, order_by=(JOBS.c.scheduled_at.desc(), JOBS.c.sequence.desc()))
            .label("rank")
        )
        sub = (
            sa.select(JOBS.c.id, JOBS.c.queue, JOBS.c.scheduled_at, JOBS.c.sequence, rank)
            .where(JOBS.c.scope == self.scope, JOBS.c.queue.in_(queues), JOBS.c.attempts > 0)
            .subquery()
        )
        last = {
            row.queue: row
            for row in conn.execute(
                sa.select(sub.c.id, sub.c.queue, sub.c.scheduled_at, sub.c.sequence).where(sub.c.rank == 1)
            )
        }
        return {
            job.id: last[job.queue].id
            for job in jobs
            if job.queue in last
            and (last[job.queue].scheduled_at, last[job.queue].sequence) > (job.scheduled_at, job.sequence)
        }

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
