"""What the SQL backends share: the lease protocol's steps that are written once in
SQLAlchemy Core for every database (finding due queues, handing a lease on, recovery
and re-sends, releases), with the few places where databases differ (the clock, row
locks, upserts, producers' locks) left to each backend as small hooks. The statements
that make a backend fast (PostgreSQL's single-statement create, take, scan, start and
finish) live in the backend's own module."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .. import schema
from ..errors import DatabaseError, JobNotFoundError
from ..jobs import (
    OPEN_STATUSES,
    STATUS_DONE,
    STATUS_PENDING,
    STATUS_RUNNING,
    Job,
    NewJob,
    utcnow,
)
from .base import Burst, Finished, Inserted, Lease, MessageJobs, Outcome, chunks, failure_plan, new_token

__all__ = ["chunks"]
from .connection import Connections, Executor

JOBS = schema.jobs
QUEUES = schema.queues
LEASES = schema.leases
MESSAGES = schema.messages

JOB_COLUMNS = [JOBS.c[name] for name in (f.name for f in dataclasses.fields(Job))]

#: The order of a queue's jobs: the head is its first open job in this order.
QUEUE_ORDER = (JOBS.c.scheduled_at, JOBS.c.sequence)

#: The re-send wait doubles at each re-send of one lease, up to 2 ** this many times.
_MAX_DOUBLINGS = 30


class SqlCore(Connections, abc.ABC):
    """The lease protocol's shared steps, on top of the dialect hooks below."""

    def __init__(self, engine: Engine, scope: str, *, resend_after: float = 5.0) -> None:
        super().__init__(engine)
        self.scope = scope
        #: Seconds an unstarted lease's message may wait before its first re-send.
        self.resend_after = resend_after

    # ------------------------------------------------------------------ dialect hooks

    @abc.abstractmethod
    def _now(self) -> sa.ColumnElement[dt.datetime]:
        """The clock leases and jobs are stamped with, as a SQL expression."""

    @abc.abstractmethod
    def _after(self, seconds: float) -> sa.ColumnElement[dt.datetime]:
        """``now + seconds`` on that clock."""

    @abc.abstractmethod
    def _clock(self, conn: Connection) -> dt.datetime:
        """That clock's time now (UTC)."""

    @abc.abstractmethod
    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT (with ``on_conflict_do_*``)."""

    @abc.abstractmethod
    def _locked(self, query: Any, *, skip_locked: bool = False) -> Any:
        """``query`` locking the rows it reads until the transaction ends (where the
        database locks rows; SQLite serializes writing transactions instead)."""

    @abc.abstractmethod
    def _after_each(self, name: str) -> Any:
        """A bound ``now + :name`` for executemany: ``:name`` is what :meth:`_wait_value`
        returns for each row."""

    @abc.abstractmethod
    def _wait_value(self, wait: dt.timedelta) -> Any:
        """The value of :meth:`_after_each`'s parameter for a wait of ``wait``."""

    @abc.abstractmethod
    def _lock_scope(self, conn: Connection) -> None:
        """Serialize the scope's leases count (the concurrency limit) until the
        transaction ends."""

    @abc.abstractmethod
    def _take_leases(
        self, conn: Connection, queues: Sequence[str], grace: float, limit: int, locked_by: str | None
    ) -> list[Lease]:
        """Take the lease of each of ``queues`` (sorted) whose head is pending and due
        and which nobody holds, up to ``limit``."""

    def _first_wait(self, grace: float) -> float:
        """How long a new unstarted lease waits for its start before its message is
        re-sent: ``resend_after``, at most ``grace``."""
        return min(self.resend_after, grace)

    def _open_head(self, queue: sa.ColumnElement[str] | str, *, exclude_id: Any = None) -> sa.Select[Any]:
        """The head of a queue: its first open job by (scheduled_at, sequence)."""
        query = (
            sa.select(JOBS.c.id, JOBS.c.status, JOBS.c.timeout, JOBS.c.scheduled_at, JOBS.c.next_attempt_at)
            .where(JOBS.c.scope == self.scope, JOBS.c.queue == queue, JOBS.c.status.in_(OPEN_STATUSES))
            .order_by(*QUEUE_ORDER)
            .limit(1)
        )
        if exclude_id is not None:
            query = query.where(JOBS.c.id != exclude_id)
        return query

    def _heads(self, conn: Connection, queues: Sequence[str] | None) -> dict[str, Job]:
        """The head (first open job) of each queue of the scope."""
        rank = sa.func.row_number().over(partition_by=JOBS.c.queue, order_by=QUEUE_ORDER).label("rank")
        ranked = sa.select(*JOB_COLUMNS, rank).where(
            JOBS.c.scope == self.scope, JOBS.c.status.in_(OPEN_STATUSES)
        )
        if queues is not None:
            ranked = ranked.where(JOBS.c.queue.in_(list(queues)))
        sub = ranked.subquery()
        rows = conn.execute(
            sa.select(*[sub.c[c.name] for c in JOB_COLUMNS]).where(sub.c.rank == 1)
        ).mappings()
        return {row["queue"]: Job.from_row(row) for row in rows}

    def _paused_clause(self, queue: str) -> sa.ColumnElement[bool]:
        """Whether an operator paused the queue (see :meth:`pause`)."""
        return (
            sa.select(QUEUES.c.queue)
            .where(QUEUES.c.scope == self.scope, QUEUES.c.queue == queue, QUEUES.c.paused)
            .exists()
        )

    def _is_paused(self, conn: Connection, queue: str) -> bool:
        return bool(conn.execute(sa.select(self._paused_clause(queue))).scalar())

    def _paused_among(self, conn: Connection, queues: Sequence[str]) -> set[str]:
        query = sa.select(QUEUES.c.queue).where(
            QUEUES.c.scope == self.scope, QUEUES.c.queue.in_(sorted(set(queues))), QUEUES.c.paused
        )
        return set(conn.execute(query).scalars())

    # ------------------------------------------------------------------ creating jobs

    def _open_by_key(self, conn: Connection, keys: Sequence[str]) -> dict[str, Job]:
        """The open job holding each of these unique keys, where one does."""
        if not keys:
            return {}
        rows = conn.execute(
            sa.select(*JOB_COLUMNS).where(
                JOBS.c.scope == self.scope,
                JOBS.c.unique_key.in_(sorted(set(keys))),
                JOBS.c.unique_key.is_not(None),
                JOBS.c.status.in_(OPEN_STATUSES),
            )
        ).mappings()
        return {row["unique_key"]: Job.from_row(row) for row in rows}

    def _fill_existing(self, conn: Connection, specs: Sequence[NewJob], created: list[Job | None]) -> None:
        """Fill the places of items not inserted because an open job held their
        unique_key with that job. This runs in a statement after the insert, which
        sees the holder even when it was committed by another producer while the
        insert waited; if the holder has ended since, the newest job with the key is
        the one that held it."""
        missing = [i for i, job in enumerate(created) if job is None]
        keys = [specs[i].unique_key for i in missing]
        if any(key is None for key in keys):
            raise DatabaseError("a job without unique_key was not inserted")
        found = self._open_by_key(conn, [key for key in keys if key is not None])
        gone = sorted({key for key in keys if key is not None and key not in found})
        if gone:
            rows = conn.execute(
                sa.select(*JOB_COLUMNS)
                .where(JOBS.c.scope == self.scope, JOBS.c.unique_key.in_(gone))
                .order_by(JOBS.c.id)
            ).mappings()
            found.update({row["unique_key"]: Job.from_row(row) for row in rows})
        for i in missing:
            key = specs[i].unique_key
            if key not in found:
                raise DatabaseError(f"the job holding unique_key {key!r} vanished; create the job again")
            created[i] = found[key]

    def _created_by(
        self, conn: Connection, specs: Sequence[NewJob], key: str
    ) -> tuple[list[Job], list[Lease]] | None:
        """The jobs inserted by the create call ``key`` (in the order given), with the
        unstarted leases held for them (to send again: a duplicate message is
        harmless), or None when that call wrote nothing. Read by a retry whose first
        try's connection died: the server has ended that try's transaction by then."""
        rows = conn.execute(
            sa.select(*JOB_COLUMNS).where(JOBS.c.create_key == key).order_by(JOBS.c.queue, JOBS.c.sequence)
        ).mappings()
        found: dict[str, list[Job]] = {}
        for row in rows:
            job = Job.from_row(row)
            found.setdefault(job.queue, []).append(job)
        if not found:
            return None
        created: list[Job | None] = [None] * len(specs)
        for queue, indexes in positions_by_queue(specs).items():
            # In sequence order; an item whose unique_key was taken inserted nothing.
            mine = iter(found.get(queue, []))
            following = next(mine, None)
            for i in indexes:
                wanted = specs[i].unique_key
                if following is not None and (wanted is None or following.unique_key == wanted):
                    created[i] = following
                    following = next(mine, None)
        if any(job is None for job in created):
            self._fill_existing(conn, specs, created)
        by_id = {job.id: job for jobs in found.values() for job in jobs}
        leases = conn.execute(
            sa.select(LEASES.c.queue, LEASES.c.job_id, LEASES.c.token)
            .where(
                LEASES.c.scope == self.scope, LEASES.c.queue.in_(sorted(found)), LEASES.c.started_at.is_(None)
            )
            .order_by(LEASES.c.queue)
        )
        taken = [
            Lease(row.queue, row.job_id, row.token, by_id[row.job_id].timeout)
            for row in leases
            if row.job_id in by_id
        ]
        return [job for job in created if job is not None], taken

    def create_jobs(self, specs: Sequence[NewJob], *, connection: Executor | None = None) -> list[Job]:
        """Insert jobs, numbering them per queue in commit order (in the caller's
        transaction when ``connection`` is given). Returns them in the order given; an
        item repeating an earlier item's unique_key gets that item's job."""
        if not specs:
            return []
        kept, position = unique_specs(specs)
        made = self._insert_jobs(kept, connection)
        return [made[p] for p in position] if len(kept) < len(specs) else made

    def create_jobs_taking_leases(
        self, specs: Sequence[NewJob], *, grace: float
    ) -> tuple[list[Job], list[Lease]]:
        """:meth:`create_jobs` in its own transaction, taking in it, where the backend
        can, the lease of each queue whose head is then pending and due and which nobody
        holds: the kick of a new or idle queue without a second statement.

        Returns the jobs (in the order given) and the leases taken: send them. Queues
        without a lease taken here (held, not due, or not decidable in this statement)
        still need a kick once this returns, as after :meth:`create_jobs`.
        """
        if not specs:
            return [], []
        kept, position = unique_specs(specs)
        made, taken = self._insert_jobs_taking_leases(kept, grace)
        return ([made[p] for p in position] if len(kept) < len(specs) else made), taken

    def insert_jobs(
        self, specs: Sequence[NewJob], *, connection: Executor | None = None, grace: float | None = None
    ) -> Inserted:
        """:meth:`create_jobs` (or :meth:`create_jobs_taking_leases`, in its own
        transaction with a ``grace``) returning the ids only. This portable version
        reads the jobs back all the same; a backend with a faster bulk path (PostgreSQL's
        COPY) replaces it."""
        if connection is None and grace is not None:
            made, taken = self.create_jobs_taking_leases(specs, grace=grace)
        else:
            made, taken = self.create_jobs(specs, connection=connection), []
        return Inserted([job.id for job in made], taken)

    def create_jobs_once(self, message_id: str, specs: Sequence[NewJob]) -> MessageJobs:
        """:meth:`create_jobs` in its own transaction, once per ``message_id``: the id
        is claimed (a row in ``queuetopia_messages``) and the jobs' ids recorded on it in
        that transaction. A message seen before creates nothing and gets the ids its
        first delivery created (on PostgreSQL the claim waits for a concurrent
        delivery's transaction to end)."""
        key = (MESSAGES.c.scope == self.scope) & (MESSAGES.c.message_id == message_id)
        with self._transaction() as conn:
            claimed = conn.execute(
                self._insert(MESSAGES)
                .values(scope=self.scope, message_id=message_id, inserted_at=utcnow())
                .on_conflict_do_nothing()
                .returning(MESSAGES.c.message_id)
            ).first()
            if claimed is None:
                ids = list(conn.execute(sa.select(MESSAGES.c.job_ids).where(key)).scalar_one() or [])
                return MessageJobs(job_ids=ids, created=False)
            ids = [job.id for job in self.create_jobs(specs, connection=conn)]
            conn.execute(sa.update(MESSAGES).where(key).values(job_id=ids[0], job_ids=ids))
        return MessageJobs(job_ids=ids, created=True)

    @abc.abstractmethod
    def _insert_jobs(self, specs: Sequence[NewJob], connection: Executor | None) -> list[Job]:
        """:meth:`create_jobs` of specs whose unique keys are all different."""

    @abc.abstractmethod
    def _insert_jobs_taking_leases(
        self, specs: Sequence[NewJob], grace: float
    ) -> tuple[list[Job], list[Lease]]:
        """:meth:`create_jobs_taking_leases` of specs whose unique keys are all different."""

    # ------------------------------------------------------------------ producers' commits

    def on_commit(
        self,
        connection: Executor,
        key: str,
        items: Iterable[str],
        callback: Callable[[set[str]], None] | Callable[[set[str], bool], None],
    ) -> None:
        """Collect ``items`` under ``key`` on the caller's connection and call
        ``callback(items, committed)`` once when its transaction commits.

        With a Session the callback runs after the commit (``committed=True``). A
        Connection has no after-commit event: the callback runs just before the commit
        (``committed=False``), and the backend holds a lock per item until the
        transaction ends (:meth:`_hold_until_commit`), so that
        :meth:`kick_after_producers` can wait for the commit. A rollback discards the
        items.
        """
        info = connection.info
        pending: set[str] = info.setdefault(key, set())
        new = set(items) - pending
        pending.update(new)
        if new and not isinstance(connection, Session):
            with self._transaction(connection) as conn:
                self._hold_until_commit(conn, sorted(new))
        self._commit_hook(connection, key, callback)

    def _hold_until_commit(self, conn: Connection, queues: Sequence[str]) -> None:
        """Hold these queues' commit locks until the caller's transaction ends (none
        here: one writer at a time)."""

    # ------------------------------------------------------------------ taking leases

    def kick(
        self, queues: Sequence[str], *, grace: float, limit: int = 1000, locked_by: str | None = None
    ) -> list[Lease]:
        """Take the lease of each given queue whose head job is due and which nobody
        holds. Returns the leases taken: send a message for each."""
        return self._kick_in(queues, grace=grace, limit=limit, locked_by=locked_by)

    def kick_after_producers(self, queues: Sequence[str], *, grace: float, limit: int = 1000) -> list[Lease]:
        """:meth:`kick` after the producers that named these queues in
        :meth:`on_commit` have committed (or rolled back)."""
        return self._kick_in(queues, grace=grace, limit=limit, wait_for_producers=True)

    def _wait_for_producers(self, conn: Connection, queues: Sequence[str]) -> None:
        """Wait for the producers holding these queues' commit locks (none here)."""

    def _kick_in(
        self,
        queues: Sequence[str],
        *,
        grace: float,
        limit: int,
        locked_by: str | None = None,
        wait_for_producers: bool = False,
    ) -> list[Lease]:
        """:meth:`kick` in one transaction."""
        # Every queue named is wanted (a bulk kick may name more than ``limit``).
        limit = max(limit, len(queues))
        with self._transaction() as conn:
            if wait_for_producers:
                self._wait_for_producers(conn, sorted(set(queues)))
            return self._take_all(conn, sorted(set(queues)), grace, limit, locked_by)

    def _take_all(
        self, conn: Connection, candidates: Sequence[str], grace: float, limit: int, locked_by: str | None
    ) -> list[Lease]:
        # Leases are always inserted in queue order: two multi-row inserts (a bulk kick
        # and a scan) waiting on each other's uncommitted lease rows in opposite orders
        # would deadlock.
        taken: list[Lease] = []
        for chunk in chunks(candidates, 500):
            if len(taken) >= limit:
                break
            taken.extend(self._take_leases(conn, chunk, grace, limit - len(taken), locked_by))
        return taken

    def scan(self, *, grace: float, limit: int = 1000, locked_by: str | None = None) -> list[Lease]:
        """Take the leases of up to ``limit`` queues whose ``due_at`` has passed and
        which nobody holds; raise the ``due_at`` of those found not due."""
        with self._transaction() as conn:
            candidates = sorted(set(self._due_queues(conn, limit)))
            if not candidates:
                return []
            taken = self._take_all(conn, candidates, grace, limit, locked_by)
            stale = sorted(set(candidates) - {lease.queue for lease in taken})
            if stale:
                self._refresh_due(conn, stale)
        return taken

    def fill_slots(
        self,
        queues: Sequence[str] | None,
        *,
        grace: float,
        max_concurrent: int,
        limit: int = 1000,
        locked_by: str | None = None,
        wait_for_producers: bool = False,
    ) -> list[Lease]:
        """:meth:`kick` of ``queues`` (or :meth:`scan` when None) while the scope holds
        fewer than ``max_concurrent`` leases: at most the free slots are taken. With
        ``wait_for_producers``, first wait as :meth:`kick_after_producers` does."""
        with self._transaction() as conn:
            if wait_for_producers and queues:
                self._wait_for_producers(conn, sorted(set(queues)))
            self._lock_scope(conn)
            held = conn.execute(
                sa.select(sa.func.count()).select_from(LEASES).where(LEASES.c.scope == self.scope)
            ).scalar_one()
            limit = min(limit, max(max_concurrent - int(held), 0))
            if limit == 0:
                return []
            if queues is None:
                return self._fill_free(conn, grace, limit, locked_by)
            return self._take_all(conn, sorted(set(queues)), grace, limit, locked_by)

    def _fill_free(self, conn: Connection, grace: float, slots: int, locked_by: str | None) -> list[Lease]:
        """:meth:`fill_slots` of the due queues: up to ``slots``
        leases, taken in ``due_at`` order. A queue found not due (its ``due_at`` left
        behind when it emptied) is passed over for the next one and its ``due_at``
        raised, so that it never keeps a free slot from a waiting queue."""
        candidates = self._due_queues(conn, max(slots, 1000))
        taken: list[Lease] = []
        stale: list[str] = []
        tried = 0
        while len(taken) < slots and tried < len(candidates):
            chunk = candidates[tried : tried + slots - len(taken)]
            tried += len(chunk)
            got = self._take_leases(conn, sorted(chunk), grace, len(chunk), locked_by)
            taken.extend(got)
            leased = {lease.queue for lease in got}
            stale.extend(queue for queue in chunk if queue not in leased)
        if stale:
            self._refresh_due(conn, sorted(stale))
        return taken

    def _due_queues(self, conn: Connection, limit: int) -> list[str]:
        held = sa.select(LEASES.c.queue).where(
            LEASES.c.scope == QUEUES.c.scope, LEASES.c.queue == QUEUES.c.queue
        )
        query = (
            sa.select(QUEUES.c.queue)
            .where(
                QUEUES.c.scope == self.scope, QUEUES.c.due_at <= self._now(), ~held.exists(), ~QUEUES.c.paused
            )
            .order_by(QUEUES.c.due_at)
            .limit(limit)
        )
        return list(conn.execute(query).scalars())

    def _refresh_due(self, conn: Connection, queues: Sequence[str]) -> None:
        """Raise ``due_at`` of queues found not due to their head's real due time
        (NULL when empty). Rows a producer holds are skipped: that producer lowers
        ``due_at`` itself."""
        lock = sa.select(QUEUES.c.queue).where(QUEUES.c.scope == self.scope, QUEUES.c.queue.in_(queues))
        lock = self._locked(lock, skip_locked=True)
        locked = list(conn.execute(lock).scalars())
        if not locked:
            return
        head = (
            sa.select(sa.func.coalesce(JOBS.c.next_attempt_at, JOBS.c.scheduled_at))
            .where(
                JOBS.c.scope == QUEUES.c.scope,
                JOBS.c.queue == QUEUES.c.queue,
                JOBS.c.status.in_(OPEN_STATUSES),
            )
            .order_by(*QUEUE_ORDER)
            .limit(1)
            .scalar_subquery()
        )
        conn.execute(
            sa.update(QUEUES)
            .where(QUEUES.c.scope == self.scope, QUEUES.c.queue.in_(locked))
            .values(due_at=head)
        )

    # ------------------------------------------------------------------ running jobs

    # ------------------------------------------------------------------ ending attempts

    @abc.abstractmethod
    def finish_and_start(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, burst: Burst
    ) -> Finished:
        """Write an attempt's outcome under ``token`` and hand the lease on; when
        ``burst.start_next`` and the queue's next job is due and fits in
        ``burst.deadline_left`` seconds (with ``time_limit_grace``), start it under the
        new token, running lease ``max(timeout + time_limit_grace, deadline_left) +
        lease_margin``. See :class:`Finished`."""

    def finish(
        self, job: Job, token: str, outcome: Outcome, *, grace: float, hand_off: bool = True
    ) -> tuple[bool, Lease | None]:
        """Write an attempt's outcome under ``token`` and pass the lease on.

        Returns ``(written, next)``: ``written`` is False when the token was no longer
        valid (the lease expired and was recovered; the outcome is dropped). ``next``
        is the lease handed to the queue's next due job (send it), or None when the
        queue was released (the caller then re-checks it with a kick).
        """
        with self._transaction() as conn:
            lease = sa.select(LEASES.c.job_id).where(
                LEASES.c.scope == self.scope, LEASES.c.queue == job.queue, LEASES.c.token == token
            )
            held = conn.execute(self._locked(lease)).first()
            if held is None or held.job_id != job.id:
                return False, None
            values: dict[str, Any]
            if outcome.succeeded:
                values = {
                    "status": STATUS_DONE,
                    "done_at": self._now(),
                    "result": outcome.result,
                    "error": None,
                    "next_attempt_at": None,
                }
            else:
                values = {"error": outcome.error, **self._failed_values(job, outcome)}
            written = conn.execute(
                # By id alone (the lease ties the job to this scope): see _START_SQL.
                sa.update(JOBS).where(JOBS.c.id == job.id, JOBS.c.status == STATUS_RUNNING).values(**values)
            )
            if written.rowcount != 1:
                self._release(conn, job.queue, token)
                return False, None
            nxt = self._pass_on(conn, job.queue, token, grace) if hand_off else None
            if nxt is None:
                self._release(conn, job.queue, token)
            return True, nxt

    def _pass_on(self, conn: Connection, queue: str, token: str, grace: float) -> Lease | None:
        head = conn.execute(self._open_head(queue)).first()
        if head is None or head.status != STATUS_PENDING or self._is_paused(conn, queue):
            return None
        due = head.next_attempt_at or head.scheduled_at
        now = self._clock(conn)
        if due > now:
            return None
        fresh = new_token()
        moved = conn.execute(
            sa.update(LEASES)
            .where(LEASES.c.scope == self.scope, LEASES.c.queue == queue, LEASES.c.token == token)
            .values(
                token=fresh,
                job_id=head.id,
                started_at=None,
                locked_at=self._now(),
                expires_at=self._after(self._first_wait(grace)),
                resends=0,
            )
        )
        if moved.rowcount != 1:
            return None
        return Lease(queue, head.id, fresh, head.timeout)

    def _release(self, conn: Connection, queue: str, token: str) -> None:
        """Drop the queue's lease if ``token`` still holds it."""
        conn.execute(
            sa.delete(LEASES).where(
                LEASES.c.scope == self.scope, LEASES.c.queue == queue, LEASES.c.token == token
            )
        )

    def _failed_values(self, job: Job, outcome: Outcome) -> dict[str, Any]:
        """Status and next attempt of a job whose attempt failed (see _failure_plan)."""
        plan = failure_plan(job, outcome)
        until = plan.until if plan.backoff is None else self._after(plan.backoff)
        return {"status": plan.status, "next_attempt_at": until}

    def _update_returning_job(self, conn: Connection, update: Any, job_id: int) -> Any:
        """Run ``update`` of job ``job_id`` and return the job's row after it (a
        database without UPDATE .. RETURNING reads it after the update)."""
        return conn.execute(update.returning(*JOB_COLUMNS)).mappings().one()

    def _get_for_update(self, conn: Connection, job_id: int) -> Job:
        query = sa.select(*JOB_COLUMNS).where(JOBS.c.scope == self.scope, JOBS.c.id == job_id)
        row = conn.execute(self._locked(query)).mappings().first()
        if row is None:
            raise JobNotFoundError(self.scope, job_id)
        return Job.from_row(row)

    def _lower_due(self, conn: Connection, queues: Sequence[str] | None) -> None:
        """Make queues due for the next scan (``due_at`` is only a lower bound)."""
        now = self._now()
        query = sa.update(QUEUES).where(
            QUEUES.c.scope == self.scope, sa.or_(QUEUES.c.due_at.is_(None), QUEUES.c.due_at > now)
        )
        if queues is not None:
            query = query.where(QUEUES.c.queue.in_(list(queues)))
        conn.execute(query.values(due_at=now))


def unique_specs(specs: Sequence[NewJob]) -> tuple[list[NewJob], list[int]]:
    """The specs without those repeating an earlier spec's unique_key, and for each
    spec given the position of its kept spec."""
    kept: list[NewJob] = []
    position: list[int] = []
    first: dict[str, int] = {}
    for spec in specs:
        key = spec.unique_key
        if key is not None and key in first:
            position.append(first[key])
            continue
        if key is not None:
            first[key] = len(kept)
        position.append(len(kept))
        kept.append(spec)
    return kept, position


def job_row(
    scope: str, spec: NewJob, sequence: int, locked_at: Any, create_key: str | None = None
) -> dict[str, Any]:
    """The row of a new job: ``spec`` at ``sequence`` of its queue, inserted at
    ``locked_at``, the time its queue row was locked. Not ``now`` (the transaction's
    start): a producer that started earlier but got the queue row later must not sort
    before jobs committed ahead of it."""
    return {
        "scope": scope,
        "queue": spec.queue,
        "action": spec.action,
        "params": spec.params,
        "sequence": sequence,
        "timeout": spec.timeout,
        "max_backoff": spec.max_backoff,
        "max_attempts": spec.max_attempts,
        "on_exhausted": spec.on_exhausted,
        "scheduled_at": spec.scheduled_at or locked_at,
        "status": STATUS_PENDING,
        "attempts": 0,
        "inserted_at": locked_at,
        "unique_key": spec.unique_key,
        "trace_context": spec.trace_context,
        "create_key": create_key,
    }


def positions_by_queue(specs: Sequence[NewJob]) -> dict[str, list[int]]:
    """The positions of the specs of each queue, in the order given."""
    by_queue: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        by_queue.setdefault(spec.queue, []).append(index)
    return by_queue
