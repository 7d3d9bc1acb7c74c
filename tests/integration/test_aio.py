"""AsyncQueuetopia's producer calls on PostgreSQL: the sync API's options, awaited."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from queuetopia_celery import Queuetopia
from queuetopia_celery.aio import AsyncQueuetopia

T = TypeVar("T")


def _run(database_url: str, body: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = create_async_engine(
            database_url.replace("postgresql+psycopg://", "postgresql+psycopg_async://")
        )
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_a_unique_key_gives_back_the_open_job_with_or_without_a_connection(
    database_url: str, qt: Queuetopia
) -> None:
    jobs = AsyncQueuetopia(qt)
    key = f"k{uuid.uuid4().hex[:8]}"

    async def body(engine: AsyncEngine) -> list[int]:
        first = await jobs.create_job("q1", "work", {"n": 1}, unique_key=key)
        again = await jobs.create_job("q2", "work", {"n": 2}, unique_key=key)
        async with engine.begin() as conn:
            joined = await jobs.create_job("q3", "work", {"n": 3}, unique_key=key, connection=conn)
        other = await jobs.create_job("q1", "work", {"n": 4}, unique_key=key + "-other")
        await jobs.wakeups_sent()
        assert first.unique_key == key and other.unique_key == key + "-other"
        return [first.id, again.id, joined.id, other.id]

    first, again, joined, other = _run(database_url, body)
    assert first == again == joined != other
    assert [job.params for job in qt.list_jobs(queue="q1")] == [{"n": 4}, {"n": 1}]
    assert qt.list_jobs(queue="q2") == qt.list_jobs(queue="q3") == []


def test_delay_makes_the_job_the_sync_delay_makes(database_url: str, qt: Queuetopia) -> None:
    @qt.task(queue="account-{account}", max_retries=2, timeout=7, name=f"t{uuid.uuid4().hex[:6]}")
    def charge(account: int, *amounts: int, note: str = "") -> None:
        return None

    jobs = AsyncQueuetopia(qt)
    sync = charge.delay(42, 1, 2, note="n")

    async def body(_: AsyncEngine) -> Any:
        return await jobs.delay(charge, 42, 1, 2, note="n")

    awaited = _run(database_url, body)
    fields = ("queue", "action", "params", "max_attempts", "timeout", "max_backoff", "on_exhausted")
    assert [getattr(awaited, f) for f in fields] == [getattr(sync, f) for f in fields]
    assert (awaited.queue, awaited.params, awaited.max_attempts, awaited.timeout) == (
        "account-42",
        {"account": 42, "amounts": [1, 2], "note": "n"},
        3,
        7.0,
    )
    assert awaited.sequence == sync.sequence + 1
