"""asyncio producers in a real FastAPI app on PostgreSQL (psycopg 3's async driver),
with a real celery worker running the jobs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from queuetopia_celery import DatabaseError, InvalidJobError, Queuetopia
from queuetopia_celery.aio import AsyncQueuetopia
from tests.apps import fastapiapp
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.acceptance


def _async_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql+psycopg_async://")


def _run(database_url: str, qt: Queuetopia, body: Callable[..., Any]) -> Any:
    async def main() -> Any:
        engine = create_async_engine(_async_url(database_url))
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(fastapiapp.ORDERS_DDL))
            jobs = AsyncQueuetopia(qt)
            app = fastapiapp.build(jobs, engine)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                result = await body(client, jobs, engine)
            await jobs.wakeups_sent()
            return result
        finally:
            await engine.dispose()

    return asyncio.run(main())


def broker_messages(celery_queue: str) -> int:
    """Messages waiting in the test's Celery queue (no worker consumes it here)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sum(int(client.llen(key)) for key in client.scan_iter(match=f"{celery_queue}*"))
    finally:
        client.close()


def test_a_rolled_back_endpoint_leaves_neither_the_row_nor_the_job_and_wakes_nobody(
    database_url: str, qt: Queuetopia, engine: sa.Engine, celery_queue: str
) -> None:
    customer = f"c{uuid.uuid4().hex[:8]}"

    async def body(client: httpx.AsyncClient, jobs: AsyncQueuetopia, _: Any) -> None:
        response = await client.post("/orders", json={"customer": customer, "fail": True})
        assert response.status_code == 409
        assert await jobs.list_jobs(queue=f"customer-{customer}") == []

    _run(database_url, qt, body)
    assert broker_messages(celery_queue) == 0
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM fa_orders WHERE customer = :c"), {"c": customer})
        assert rows.scalar_one() == 0

    async def commit(client: httpx.AsyncClient, jobs: AsyncQueuetopia, _: Any) -> None:
        response = await client.post("/orders", json={"customer": customer})
        assert response.status_code == 200

    _run(database_url, qt, commit)  # waits for the wake-ups it sent
    assert broker_messages(celery_queue) == 1


def test_committed_endpoints_run_their_jobs_in_order(
    database_url: str, qt: Queuetopia, start_worker: Callable[..., Any]
) -> None:
    start_worker()
    customer = f"c{uuid.uuid4().hex[:8]}"

    async def body(client: httpx.AsyncClient, jobs: AsyncQueuetopia, _: Any) -> list[Any]:
        orders = []
        for _n in range(5):
            response = await client.post("/orders", json={"customer": customer})
            assert response.status_code == 200, response.text
            orders.append(response.json())
        refused = await client.post("/orders", json={"customer": customer, "fail": True})
        assert refused.status_code == 409
        done = [await jobs.wait(order["job"], timeout=60) for order in orders]
        return [(order, job) for order, job in zip(orders, done, strict=True)]

    results = _run(database_url, qt, body)
    for order, job in results:
        assert job.status == "done", job.error
        assert job.result["echo"] == order["order"]
    done_at = [job.done_at for _, job in results]
    assert done_at == sorted(done_at)
    assert [job.sequence for _, job in results] == [1, 2, 3, 4, 5]


def test_an_async_session_joins_too_and_wakes_the_queue_after_its_commit(
    database_url: str, qt: Queuetopia, start_worker: Callable[..., Any]
) -> None:
    start_worker()
    queue = f"s{uuid.uuid4().hex[:8]}"

    async def body(_client: Any, jobs: AsyncQueuetopia, engine: Any) -> Any:
        async with AsyncSession(engine) as session:
            job = await jobs.create_job(queue, "work", {"echo": 1}, connection=session)
            assert await jobs.get_job(job.id) is None  # not committed yet
            await session.rollback()
        assert await jobs.get_job(job.id) is None
        async with AsyncSession(engine) as session, session.begin():
            job = await jobs.create_job(queue, "work", {"echo": 2}, connection=session)
        return await jobs.wait(job, timeout=60)

    job = _run(database_url, qt, body)
    assert job.status == "done" and job.result["echo"] == 2


def test_bad_input_raises_the_sync_errors_and_writes_nothing(database_url: str, qt: Queuetopia) -> None:
    queue = f"b{uuid.uuid4().hex[:8]}"

    async def body(_client: Any, jobs: AsyncQueuetopia, engine: Any) -> None:
        with pytest.raises(InvalidJobError):
            await jobs.create_job(queue, "work", {"x": object()})
        async with engine.begin() as conn:
            with pytest.raises(InvalidJobError):
                await jobs.create_jobs(
                    [{"queue": queue, "action": "work"}, {"queue": "", "action": "work"}], connection=conn
                )
        assert await jobs.list_jobs(queue=queue) == []
        # Without a connection: the sync path in a thread.
        job = await jobs.create_job(queue, "work", {"echo": 3})
        assert (await jobs.get_job(job.id)) == job

    _run(database_url, qt, body)


def test_a_dropped_connection_is_a_clear_error_and_creates_nothing(
    database_url: str, qt: Queuetopia, engine: sa.Engine
) -> None:
    queue = f"d{uuid.uuid4().hex[:8]}"

    async def body(_client: Any, jobs: AsyncQueuetopia, async_engine: Any) -> None:
        async with async_engine.connect() as conn:
            pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            await conn.commit()
            with engine.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            with pytest.raises(DatabaseError, match="database error") as info:
                await jobs.create_job(queue, "work", {"echo": 1}, connection=conn)
            assert info.value.__cause__ is not None
        assert await jobs.list_jobs(queue=queue) == []
        # The next call, on a fresh connection, works: one job, not two.
        async with async_engine.begin() as conn:
            await jobs.create_job(queue, "work", {"echo": 2}, connection=conn)
        assert [job.params["echo"] for job in await jobs.list_jobs(queue=queue)] == [2]

    _run(database_url, qt, body)
