"""What the web view reads: paginated, read-only views of one scope's queues.

The facade's :meth:`Queuetopia.queue_statuses` builds every queue's row at once: right
for the CLI, too much for a page with 10 000 queues. These few statements read one page
at a time, each bounded by the open-jobs index (``ix_queuetopia_jobs_open``), never
done jobs. Nothing here writes: every action goes through the facade's operator
methods, which validate and wake queues.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import sqlalchemy as sa

from ..jobs import (
    HELD_UNTIL,
    OPEN_STATUSES,
    STATUS_PENDING,
    STATUS_RUNNING,
    Job,
    JobState,
    utcnow,
)
from ..schema import jobs as JOBS
from ..schema import leases as LEASES
from ..schema import queues as QUEUES

JOB_COLUMNS = [JOBS.c[field.name] for field in dataclasses.fields(Job)]
#: A queue's run order: its head is its first open job in this order.
RUN_ORDER = (JOBS.c.scheduled_at, JOBS.c.sequence)
#: The open states, in the order the overview lists their counts.
OPEN_STATES = (JobState.RUNNING, JobState.RETRYING, JobState.HELD, JobState.AVAILABLE, JobState.SCHEDULED)


@dataclasses.dataclass(frozen=True)
class Lease:
    """Who holds a queue (``host/pid``), since when, until when; started or only dispatched."""

    locked_by: str | None
    locked_at: dt.datetime
    expires_at: dt.datetime
    started_at: dt.datetime | None
    job_id: int


@dataclasses.dataclass(frozen=True)
class QueueRow:
    """One queue of the overview (or the head of the queue page)."""

    queue: str
    open_jobs: int
    head: Job | None
    #: The head failed at least once and has not succeeded yet (retrying or held).
    blocked: bool
    blocked_since: dt.datetime | None
    oldest_open_at: dt.datetime | None
    paused: bool
    lease: Lease | None


@dataclasses.dataclass(frozen=True)
class OldestDue:
    job_id: int
    queue: str
    due_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Overview:
    now: dt.datetime
    counts: dict[JobState, int]
    queues_open: int
    queues_failing: int
    queues_paused: int
    oldest_due: OldestDue | None
    rows: list[QueueRow]
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.queues_open // self.page_size))

    @property
    def open_jobs(self) -> int:
        return sum(self.counts.values())


@dataclasses.dataclass(frozen=True)
class QueuePage:
    now: dt.datetime
    row: QueueRow
    jobs: list[Job]
    recent: list[Job]
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.row.open_jobs // self.page_size))


class Reads:
    """Read-only statements for the web view, on ``engine``, in ``scope``."""

    def __init__(self, engine: sa.Engine, scope: str) -> None:
        self.engine = engine
        self.scope = scope
        self._open = sa.and_(JOBS.c.scope == scope, JOBS.c.status.in_(OPEN_STATUSES))

    # ------------------------------------------------------------------ overview

    def overview(self, *, page: int, page_size: int) -> Overview:
        """One page of the scope's queues with open jobs, blocked ones first, and the
        scope's totals: one pass over the open jobs (grouped by queue), the totals
        summed over the groups by window functions, then the page's heads and leases."""
        now = utcnow()
        held = JOBS.c.next_attempt_at >= HELD_UNTIL
        pending = JOBS.c.status == STATUS_PENDING
        due = sa.func.coalesce(JOBS.c.next_attempt_at, JOBS.c.scheduled_at)
        per_state = {
            JobState.RUNNING: JOBS.c.status == STATUS_RUNNING,
            JobState.HELD: sa.and_(pending, held),
            JobState.RETRYING: sa.and_(pending, JOBS.c.attempts > 0, sa.not_(held)),
            JobState.SCHEDULED: sa.and_(pending, JOBS.c.attempts == 0, JOBS.c.scheduled_at > now),
            JobState.AVAILABLE: sa.and_(pending, JOBS.c.attempts == 0, JOBS.c.scheduled_at <= now),
        }
        per_queue = (
            sa.select(
                JOBS.c.queue,
                sa.func.count().label("open_jobs"),
                sa.func.max(sa.case((JOBS.c.error.is_not(None), 1), else_=0)).label("failing"),
                sa.func.min(JOBS.c.inserted_at).label("oldest"),
                sa.func.min(sa.case((sa.and_(pending, due <= now), due))).label("due"),
                *(
                    sa.func.sum(sa.case((condition, 1), else_=0)).label(state.value)
                    for state, condition in per_state.items()
                ),
            )
            .where(self._open)
            .group_by(JOBS.c.queue)
            .subquery()
        )
        # The totals: window functions over every group (the whole scope), on each row.
        query = sa.select(
            per_queue.c.queue,
            per_queue.c.open_jobs,
            per_queue.c.oldest,
            sa.over(sa.func.count()).label("queues"),
            sa.over(sa.func.sum(per_queue.c.failing)).label("failing"),
            sa.over(sa.func.min(per_queue.c.due)).label("due"),
            sa.over(  # the first due queue; (due IS NULL, due) is NULLS LAST on every database
                sa.func.first_value(per_queue.c.queue),
                order_by=(per_queue.c.due.is_(None), per_queue.c.due.asc()),
            ).label("due_queue"),
            *(sa.over(sa.func.sum(per_queue.c[state.value])).label(state.value) for state in per_state),
        ).order_by(per_queue.c.failing.desc(), per_queue.c.queue)
        with self.engine.connect() as conn:
            chosen = conn.execute(query.limit(page_size).offset((page - 1) * page_size)).all()
            totals = chosen[0] if chosen else conn.execute(query.limit(1)).first()
            paused_total = conn.execute(
                sa.select(sa.func.count()).where(QUEUES.c.scope == self.scope, QUEUES.c.paused)
            ).scalar_one()
            rows = self._rows(conn, [(r.queue, int(r.open_jobs), r.oldest) for r in chosen])
            oldest_due = None
            if totals is not None and totals.due is not None:
                oldest_due = self._oldest_due(conn, totals.due_queue, now)
        counts = dict.fromkeys(OPEN_STATES, 0)
        if totals is not None:
            counts.update({state: int(getattr(totals, state.value) or 0) for state in per_state})
        return Overview(
            now=now,
            counts=counts,
            queues_open=int(totals.queues) if totals is not None else 0,
            queues_failing=int(totals.failing or 0) if totals is not None else 0,
            queues_paused=int(paused_total),
            oldest_due=oldest_due,
            rows=rows,
            page=page,
            page_size=page_size,
        )

    def _oldest_due(self, conn: sa.Connection, queue: str, now: dt.datetime) -> OldestDue | None:
        """The pending job of ``queue`` that has been due the longest."""
        due = sa.func.coalesce(JOBS.c.next_attempt_at, JOBS.c.scheduled_at).label("due_at")
        row = conn.execute(
            sa.select(JOBS.c.id, JOBS.c.queue, due)
            .where(self._open, JOBS.c.queue == queue, JOBS.c.status == STATUS_PENDING, due <= now)
            .order_by(due)
            .limit(1)
        ).first()
        if row is None:
            return None
        return OldestDue(job_id=int(row.id), queue=row.queue, due_at=_aware(row.due_at))

    # ------------------------------------------------------------------ one queue

    def queue(self, queue: str, *, page: int, page_size: int) -> QueuePage:
        now = utcnow()
        mine = sa.and_(self._open, JOBS.c.queue == queue)
        with self.engine.connect() as conn:
            count, oldest = conn.execute(
                sa.select(sa.func.count(), sa.func.min(JOBS.c.inserted_at)).where(mine)
            ).one()
            rows = self._rows(conn, [(queue, int(count), oldest)])
            jobs = [
                Job.from_row(r)
                for r in conn.execute(
                    sa.select(*JOB_COLUMNS)
                    .where(mine)
                    .order_by(*RUN_ORDER)
                    .limit(page_size)
                    .offset((page - 1) * page_size)
                ).mappings()
            ]
            recent = [
                Job.from_row(r)
                for r in conn.execute(
                    sa.select(*JOB_COLUMNS)
                    .where(
                        JOBS.c.scope == self.scope,
                        JOBS.c.queue == queue,
                        JOBS.c.status.not_in(OPEN_STATUSES),
                    )
                    .order_by(JOBS.c.sequence.desc())
                    .limit(10)
                ).mappings()
            ]
        return QueuePage(now=now, row=rows[0], jobs=jobs, recent=recent, page=page, page_size=page_size)

    def lease_of(self, queue: str) -> Lease | None:
        with self.engine.connect() as conn:
            return self._leases(conn, [queue]).get(queue)

    # ------------------------------------------------------------------ shared

    def _rows(self, conn: sa.Connection, chosen: list[tuple[str, int, object]]) -> list[QueueRow]:
        names = [name for name, _, _ in chosen]
        if not names:
            return []
        rank = sa.func.row_number().over(partition_by=JOBS.c.queue, order_by=RUN_ORDER).label("rank")
        ranked = sa.select(*JOB_COLUMNS, rank).where(self._open, JOBS.c.queue.in_(names)).subquery()
        heads = {
            r["queue"]: Job.from_row(r)
            for r in conn.execute(
                sa.select(*[ranked.c[c.name] for c in JOB_COLUMNS]).where(ranked.c.rank == 1)
            ).mappings()
        }
        leases = self._leases(conn, names)
        paused = set(
            conn.execute(
                sa.select(QUEUES.c.queue).where(
                    QUEUES.c.scope == self.scope, QUEUES.c.queue.in_(names), QUEUES.c.paused
                )
            ).scalars()
        )
        since = self._blocked_since(conn, [job for job in heads.values() if job.error is not None])
        out = []
        for name, count, oldest in chosen:
            head = heads.get(name)
            blocked = head is not None and head.error is not None
            out.append(
                QueueRow(
                    queue=name,
                    open_jobs=count,
                    head=head,
                    blocked=blocked,
                    blocked_since=since.get(head.id) if head is not None else None,
                    oldest_open_at=_aware(oldest) if oldest is not None else None,
                    paused=name in paused,
                    lease=leases.get(name),
                )
            )
        return out

    def _leases(self, conn: sa.Connection, names: list[str]) -> dict[str, Lease]:
        rows = conn.execute(
            sa.select(LEASES).where(LEASES.c.scope == self.scope, LEASES.c.queue.in_(names))
        ).mappings()
        return {
            r["queue"]: Lease(
                locked_by=r["locked_by"],
                locked_at=r["locked_at"],
                expires_at=r["expires_at"],
                started_at=r["started_at"],
                job_id=int(r["job_id"]),
            )
            for r in rows
        }

    def _blocked_since(self, conn: sa.Connection, heads: list[Job]) -> dict[int, dt.datetime]:
        """When each of these heads became its queue's head: when the job before it
        ended, or when it was scheduled, whichever is later (the estimate of
        ``queue_statuses``). One statement: a correlated subquery per head, each a
        backward step on the (scope, queue, sequence) index."""
        if not heads:
            return {}
        head = JOBS.alias("head")
        ended = sa.func.coalesce(JOBS.c.done_at, JOBS.c.aborted_at, JOBS.c.attempted_at)
        previous = (
            sa.select(ended)
            .where(
                JOBS.c.scope == head.c.scope,
                JOBS.c.queue == head.c.queue,
                JOBS.c.sequence < head.c.sequence,
                JOBS.c.status.not_in(OPEN_STATUSES),
            )
            .order_by(JOBS.c.sequence.desc())
            .limit(1)
            .correlate(head)
            .scalar_subquery()
        )
        rows = conn.execute(
            sa.select(head.c.id, previous.label("previous")).where(head.c.id.in_([job.id for job in heads]))
        ).all()
        ended_before = {int(row.id): row.previous for row in rows}
        out = {}
        for job in heads:
            before = ended_before.get(job.id)
            out[job.id] = job.scheduled_at if before is None else max(job.scheduled_at, _aware(before))
        return out


def _aware(value: object) -> dt.datetime:
    """A UTC datetime from what an aggregate returns (SQLite gives text, or naive)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        raise TypeError(f"not a datetime: {value!r}")
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)
