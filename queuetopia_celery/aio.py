"""asyncio producers: create and read jobs without blocking the event loop.

``AsyncQueuetopia(qt)`` offers ``create_job``, ``create_jobs``, ``get_job`` and
``list_jobs`` as coroutines over a :class:`~queuetopia_celery.Queuetopia`:

* Without ``connection=`` the sync path runs in a worker thread (``asyncio.to_thread``):
  the same single statement, the same pool, the same wake-up; the loop only awaits.
* With ``connection=`` (SQLAlchemy's ``AsyncConnection`` or ``AsyncSession`` on
  ``postgresql+psycopg_async://``), the jobs join the caller's transaction: the same
  statement runs on its connection through ``run_sync`` (awaited, not blocking), and
  commits or rolls back with it. The wake-up is published from a worker thread: after
  the commit for an ``AsyncSession``, at the commit for an ``AsyncConnection`` (the kick
  then waits on the database for the commit, as on the sync path).

Validation and errors are those of the sync API; bad input raises before anything is
written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from . import tracing
from .app import Queuetopia
from .errors import ConfigurationError
from .jobs import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_TIMEOUT,
    Job,
    JobState,
    NewJob,
)
from .ordered_task import BoundOrderedTask, OrderedTask

AsyncExecutor = AsyncConnection | AsyncSession


class AsyncQueuetopia:
    """The producer side of ``qt`` for asyncio code."""

    def __init__(self, qt: Queuetopia) -> None:
        self.qt = qt
        self._key = f"queuetopia_async_kicks:{qt.scope}"
        self._pending: set[asyncio.Future[Any]] = set()

    async def create_job(
        self,
        queue: str,
        action: str,
        params: Any = None,
        *,
        scheduled_at: dt.datetime | None = None,
        timeout: float | dt.timedelta = DEFAULT_TIMEOUT,
        max_backoff: float | dt.timedelta = DEFAULT_MAX_BACKOFF,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_exhausted: str | None = None,
        connection: AsyncExecutor | None = None,
        unique_key: str | None = None,
    ) -> Job:
        """:meth:`Queuetopia.create_job <queuetopia_celery.Queuetopia.create_job>`, awaited."""
        spec = self.qt.job_spec(
            queue,
            action,
            params,
            scheduled_at=scheduled_at,
            timeout=timeout,
            max_backoff=max_backoff,
            max_attempts=max_attempts,
            on_exhausted=on_exhausted,
            unique_key=unique_key,
        )
        return (await self.create_jobs([spec], connection=connection))[0]

    async def create_jobs(
        self, jobs: Iterable[NewJob | dict[str, Any]], *, connection: AsyncExecutor | None = None
    ) -> list[Job]:
        """:meth:`Queuetopia.create_jobs <queuetopia_celery.Queuetopia.create_jobs>`, awaited."""
        qt = self.qt
        specs = qt.build_specs(jobs)
        if not specs:
            return []
        if connection is None:
            return await asyncio.to_thread(qt.create_jobs, specs)
        if not isinstance(connection, (AsyncConnection, AsyncSession)):
            raise TypeError("connection= must be a SQLAlchemy AsyncConnection or AsyncSession")
        queues = sorted({spec.queue for spec in specs})
        specs = tracing.stamp(specs)  # the caller's trace, continued when the jobs run

        def create(sync: Any) -> list[Job]:
            created = qt.backend.create_jobs(specs, connection=sync)
            if not qt.disabled:
                qt.backend.on_commit(sync, self._key, queues, self._wake_in_thread)
            return created

        return await connection.run_sync(create)

    async def delay(
        self, task: OrderedTask[Any, Any] | BoundOrderedTask[Any, Any], /, *args: Any,
        connection: AsyncExecutor | None = None, **kwargs: Any,
    ) -> Job:  # fmt: skip
        """``task.delay(*args, **kwargs)`` of an ordered task (``@qt.task``), awaited,
        optionally in the caller's transaction (``connection=``): the same queue key,
        params and job options as the sync call."""
        if task.qt is not self.qt:
            raise ConfigurationError(f"{task!r} belongs to another Queuetopia than {self.qt!r}")
        call = task.job_call(args, kwargs)
        options = task.options.create_kwargs()
        return await self.create_job(call.queue, task.name, call.params, connection=connection, **options)

    def _wake_in_thread(self, queues: set[str], committed: bool) -> None:
        """Called by the caller's commit, on the event loop's thread: publish the
        wake-up from a worker thread, never on the loop."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.qt.wake_after_commit, queues, committed)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def wakeups_sent(self) -> None:
        """Wait until the wake-ups of committed transactions are published (for tests
        and for a clean shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def get_job(self, job_id: int) -> Job | None:
        return await asyncio.to_thread(self.qt.get_job, job_id)

    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        return await asyncio.to_thread(
            self.qt.list_jobs, queue=queue, action=action, state=state, limit=limit
        )

    async def wait(self, job: Job | int, *, timeout: float = 60.0) -> Job:
        """:meth:`Queuetopia.wait <queuetopia_celery.Queuetopia.wait>` in a thread."""
        return await asyncio.to_thread(self.qt.wait, job, timeout=timeout)
