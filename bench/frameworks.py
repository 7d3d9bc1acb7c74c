"""Enqueue cost of the Django and asyncio producer paths next to the sync ones.

    python -m bench.frameworks [N]

On a fresh database of its own (created and dropped here), PostgreSQL at 127.0.0.1;
Redis db 15 as the broker (the wake-ups are published; no worker consumes them). Each
line: N jobs created one at a time, each in its own transaction, sequentially; the
median of 3 runs. Prints a Markdown table.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BROKER = "redis://127.0.0.1:6379/15"


def _rate(n: int, run: Callable[[], None]) -> float:
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(n: int) -> None:
    name = f"qt_bench_fw_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    os.environ["QT_DJANGO_DB_NAME"] = name
    os.environ["QT_TEST_BROKER_URL"] = BROKER
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.djangoproject.settings"
    try:
        _bench(n, name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _bench(n: int, name: str) -> None:
    import django
    from celery import Celery
    from django.core.management import call_command
    from django.db import transaction
    from sqlalchemy.ext.asyncio import create_async_engine

    from queuetopia_celery import Queuetopia
    from queuetopia_celery.aio import AsyncQueuetopia

    django.setup()
    call_command("migrate", verbosity=0)
    from tests.djangoproject.celery_app import shop
    from tests.djangoproject.shop.models import Order

    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    qt = Queuetopia("bench-sync", app=Celery(broker=BROKER), database_url=url, check_actions=False)
    rows: list[tuple[str, float]] = []

    def sync_own() -> None:
        for i in range(n):
            qt.create_job(f"q{i % 10}", "a")

    def sync_joined() -> None:
        for i in range(n):
            with qt.engine.begin() as conn:
                qt.create_job(f"q{i % 10}", "a", connection=conn)

    def django_model_only() -> None:
        for _ in range(n):
            with transaction.atomic():
                Order.objects.create(customer="c", item="i")

    def django_joined() -> None:
        for i in range(n):
            with transaction.atomic():
                order = Order.objects.create(customer="c", item="i")
                shop.create_job(f"q{i % 10}", "ship", {"customer": "c", "order_id": order.id})

    def django_not_joined() -> None:
        # The same view with a plain Queuetopia: the job commits on its own connection,
        # before the view's data (the pitfall), for the cost comparison only.
        for i in range(n):
            with transaction.atomic():
                order = Order.objects.create(customer="c", item="i")
                qt.create_job(f"q{i % 10}", "a", {"order_id": order.id})

    rows.append(("sync, own transaction (`create_job`)", _rate(n, sync_own)))
    rows.append(("sync, joined (`connection=` in `engine.begin()`)", _rate(n, sync_joined)))
    rows.append(("Django, model save only in `atomic()` (baseline)", _rate(n, django_model_only)))
    rows.append(("Django, model save + `DjangoQueuetopia.create_job` in `atomic()`", _rate(n, django_joined)))
    rows.append(("Django, model save + plain `create_job` (not joined)", _rate(n, django_not_joined)))

    async def run_async(joined: bool) -> float:
        engine = create_async_engine(url.replace("+psycopg://", "+psycopg_async://"))
        jobs = AsyncQueuetopia(qt)
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(n):
                if joined:
                    async with engine.begin() as conn:
                        await jobs.create_job(f"q{i % 10}", "a", connection=conn)
                else:
                    await jobs.create_job(f"q{i % 10}", "a")
            await jobs.wakeups_sent()
            rates.append(n / (time.perf_counter() - start))
        await engine.dispose()
        return statistics.median(rates)

    rows.append(("asyncio, own transaction (thread)", asyncio.run(run_async(False))))
    rows.append(("asyncio, joined (`AsyncConnection`, `run_sync`)", asyncio.run(run_async(True))))
    qt.engine.dispose()
    shop.engine.dispose()
    print(f"| path ({n} jobs, one per transaction, sequential) | jobs/s |\n|---|---|")
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
