"""The lease protocol's recovery and housekeeping, shared by the SQL backends and
written once in SQLAlchemy Core: expired leases (lost attempts claimed and recorded,
unstarted leases re-sent under their token with a doubling wait), leases given back
when their message could not be sent, running leases extended, and the helpers of
``drain`` (unstarted leases released, the clock moved forward)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import schema
from ..jobs import HELD_UNTIL, STATUS_PENDING, STATUS_RUNNING, Job
from .base import Lease, LostAttempt, Outcome, new_token
from .sql_core import _MAX_DOUBLINGS, JOB_COLUMNS, JOBS, LEASES, SqlCore


class SqlRecovery(SqlCore):
    """:class:`SqlCore` with recovery, re-sends, releases and extensions."""

    def recover(
        self, *, limit: int = 1000, claim: float = 60.0, grace: float = 120.0
    ) -> tuple[list[LostAttempt], list[Lease]]:
        """Find expired leases. Un-started ones (a message lost, or still waiting in a
        busy broker) are re-sent under the same token, so that a message that was only
        late still starts its job: each waits twice as long as the one before for its
        start (``resend_after``, then twice that, ..., at most ``grace``) and is
        returned: send it. Started ones (a worker died mid-job) are claimed (a new
        token, held ``claim`` more seconds) and returned: record each with
        :meth:`record_lost`. The claim keeps a concurrent scan from handling the same
        attempt (and calling the failure hook twice) and fences off the dead worker's
        late outcome; if this scan dies before recording, the claim expires and a
        later scan takes over. Returns (lost attempts, leases to re-send)."""
        with self._transaction() as conn:
            query = (
                sa.select(
                    LEASES.c.queue, LEASES.c.token, LEASES.c.job_id, LEASES.c.started_at, LEASES.c.resends
                )
                .where(LEASES.c.scope == self.scope, LEASES.c.expires_at < self._now())
                .limit(limit)
            )
            expired = conn.execute(self._locked(query, skip_locked=True)).all()
            unstarted = [row for row in expired if row.started_at is None]
            if unstarted:
                # A paused queue's unstarted lease is let go (its start would refuse).
                paused = self._paused_among(conn, [row.queue for row in unstarted])
                for row in unstarted:
                    if row.queue in paused:
                        self._release(conn, row.queue, row.token)
                unstarted = [row for row in unstarted if row.queue not in paused]
            resent = self._resend(conn, unstarted, grace)
            started: dict[int, str] = {}
            for row in expired:
                if row.started_at is None:
                    continue
                started[row.job_id] = claimed = new_token()
                conn.execute(
                    sa.update(LEASES)
                    .where(
                        LEASES.c.scope == self.scope, LEASES.c.queue == row.queue, LEASES.c.token == row.token
                    )
                    .values(token=claimed, expires_at=self._after(claim))
                )
            lost = []
            if started:
                rows = conn.execute(sa.select(*JOB_COLUMNS).where(JOBS.c.id.in_(list(started)))).mappings()
                lost = [LostAttempt(Job.from_row(row), started[row["id"]]) for row in rows]
        return lost, resent

    def _resend(self, conn: Connection, unstarted: Sequence[Any], grace: float) -> list[Lease]:
        """Count a re-send of each of these unstarted leases (locked) and set when the
        next is due: ``resend_after * 2 ** resends``, at most ``grace``, from now."""
        if not unstarted:
            return []
        first = self._first_wait(grace)
        timeouts = dict(
            conn.execute(
                sa.select(JOBS.c.id, JOBS.c.timeout).where(
                    JOBS.c.id.in_(sorted({row.job_id for row in unstarted}))
                )
            ).all()
        )
        updates = []
        for row in unstarted:
            wait = dt.timedelta(seconds=min(first * 2 ** min(row.resends + 1, _MAX_DOUBLINGS), grace))
            updates.append(
                {
                    "b_queue": row.queue,
                    "b_token": row.token,
                    "b_resends": row.resends + 1,
                    "b_wait": self._wait_value(wait),
                }
            )
        until = self._after_each("b_wait")
        conn.execute(
            sa.update(LEASES)
            .where(LEASES.c.scope == self.scope, LEASES.c.queue == sa.bindparam("b_queue"))
            .where(LEASES.c.token == sa.bindparam("b_token"))
            .values(resends=sa.bindparam("b_resends"), expires_at=until),
            updates,
        )
        # A job gone from the table (deleted by hand): the message's start releases the lease.
        return [
            Lease(row.queue, row.job_id, row.token, float(timeouts.get(row.job_id, 60.0)))
            for row in sorted(unstarted, key=lambda r: r.queue)
        ]

    def record_lost(self, lost: LostAttempt, outcome: Outcome) -> bool:
        """Record the failed attempt of a job whose worker died, and drop its lease,
        if the lease is still held by the claim :meth:`recover` took."""
        job = lost.job
        with self._transaction() as conn:
            lease = sa.select(LEASES.c.token).where(
                LEASES.c.scope == self.scope,
                LEASES.c.queue == job.queue,
                LEASES.c.token == lost.token,
            )
            if conn.execute(self._locked(lease, skip_locked=True)).first() is None:
                return False
            conn.execute(
                sa.update(JOBS)
                .where(JOBS.c.id == job.id, JOBS.c.status == STATUS_RUNNING)
                .values(error=outcome.error, **self._failed_values(job, outcome))
            )
            self._release(conn, job.queue, lost.token)
        return True

    def replace_error(self, job_id: int, recorded: str, error: str) -> bool:
        """Replace a job's stored error with ``error`` if it is still ``recorded`` (no
        other attempt has ended since): how the scan adds what a failure hook raised to
        a lost attempt it has already recorded."""
        with self._transaction() as conn:
            moved = conn.execute(
                sa.update(JOBS)
                .where(JOBS.c.scope == self.scope, JOBS.c.id == job_id, JOBS.c.error == recorded)
                .values(error=error)
            )
        return moved.rowcount == 1

    def release_unsent(self, leases: Sequence[Lease]) -> int:
        """Give back leases whose perform message could not be sent (the broker is
        down): each is dropped if its token still holds it unstarted, and its queue is
        made due, so that the next scan takes it again instead of waiting for the
        lease to expire. Returns how many were dropped."""
        if not leases:
            return 0
        with self._transaction() as conn:
            dropped = 0
            for lease in leases:
                dropped += int(
                    conn.execute(
                        sa.delete(LEASES).where(
                            LEASES.c.scope == self.scope,
                            LEASES.c.queue == lease.queue,
                            LEASES.c.token == lease.token,
                            LEASES.c.started_at.is_(None),
                        )
                    ).rowcount
                    or 0
                )
            self._lower_due(conn, sorted({lease.queue for lease in leases}))
        return dropped

    def extend_lease(self, queue: str, token: str, seconds: float) -> bool:
        """Make a started lease last ``seconds`` from now (database clock), if
        ``token`` still holds it."""
        with self._transaction() as conn:
            moved = conn.execute(
                sa.update(LEASES)
                .where(LEASES.c.scope == self.scope, LEASES.c.queue == queue, LEASES.c.token == token)
                .values(expires_at=self._after(seconds))
            )
        return moved.rowcount == 1

    def lease_of(self, queue: str) -> dict[str, Any] | None:
        """The lease row of a queue, for inspection (tests, status)."""
        with self._transaction() as conn:
            row = (
                conn.execute(sa.select(LEASES).where(LEASES.c.scope == self.scope, LEASES.c.queue == queue))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    # ------------------------------------------------------------------ operator
    # Everything below serves operators and tests (status, retry, abort, purge, drain);
    # none of it is on the workers' hot path, except _failed_values.

    def release_unstarted(self, queue: str | None = None) -> int:
        """Drop the dispatched-but-unstarted leases of the scope (their messages are
        only wake-ups and will be dropped as stale). Used by ``drain``."""
        with self._transaction() as conn:
            query = sa.delete(LEASES).where(LEASES.c.scope == self.scope, LEASES.c.started_at.is_(None))
            if queue is not None:
                query = query.where(LEASES.c.queue == queue)
            return int(conn.execute(query).rowcount or 0)

    def advance(self, queue: str | None = None) -> bool:
        """Move time forward for the open jobs of the scope (or of one queue), for a
        test's ``drain(with_scheduled=True)``: if no queue head is due, shift every
        pending job's ``scheduled_at`` and retry time back by the same amount so that
        the earliest head becomes due now. Order within each queue is kept. Held
        jobs stay held. Returns False when there is nothing to advance to."""
        with self._transaction() as conn:
            now = self._clock(conn)
            leased = set(
                conn.execute(sa.select(LEASES.c.queue).where(LEASES.c.scope == self.scope)).scalars()
            )
            due_times = [
                head.due_at
                for head in self._heads(conn, None if queue is None else [queue]).values()
                if head.status == STATUS_PENDING and not head.held and head.queue not in leased
            ]
            if not due_times:
                return False
            earliest = min(due_times)
            if earliest > now:
                delta = earliest - now
                select = sa.select(JOBS.c.id, JOBS.c.scheduled_at, JOBS.c.next_attempt_at).where(
                    JOBS.c.scope == self.scope, JOBS.c.status == STATUS_PENDING
                )
                if queue is not None:
                    select = select.where(JOBS.c.queue == queue)
                rows = [
                    {
                        "b_id": row.id,
                        "b_scheduled_at": row.scheduled_at - delta,
                        "b_next": row.next_attempt_at
                        if row.next_attempt_at is None or row.next_attempt_at >= HELD_UNTIL
                        else row.next_attempt_at - delta,
                    }
                    for row in conn.execute(select)
                ]
                if rows:
                    conn.execute(
                        sa.update(JOBS)
                        .where(JOBS.c.id == sa.bindparam("b_id"))
                        .values(
                            scheduled_at=sa.bindparam("b_scheduled_at", type_=schema.UTCDateTime()),
                            next_attempt_at=sa.bindparam("b_next", type_=schema.UTCDateTime()),
                        ),
                        rows,
                    )
            self._lower_due(conn, [queue] if queue is not None else None)
        return True
