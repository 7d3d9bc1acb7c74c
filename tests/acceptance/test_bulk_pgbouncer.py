"""The bulk path (``create_jobs(returning="ids")``: queue rows, ids, COPY and leases in
one transaction) behind PgBouncer in transaction pooling mode, two producers sharing one
server connection: each batch is whole, numbered in order, and woken; a real worker
runs every job."""

from __future__ import annotations

import threading

import pytest

from queuetopia_celery import JobState
from tests.acceptance.test_pgbouncer import (  # noqa: F401 (fixtures)
    NO_PREPARE,
    database_url,
    pgbouncer,
)
from tests.apps import testapp
from tests.conftest import REDIS_URL, wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]


def test_bulk_batches_through_one_pooled_server_connection(
    pgbouncer,  # noqa: F811
    database_url,  # noqa: F811
    scope,
    celery_queue,
    start_worker,
):
    bouncer, _ = pgbouncer
    url = bouncer.url("qt_one", NO_PREPARE)
    producers = [
        testapp.build(scope, database_url=url, broker_url=REDIS_URL, celery_queue=celery_queue)[1]
        for _ in range(2)
    ]
    ids: dict[int, list[int]] = {0: [], 1: []}

    def produce(n: int) -> None:
        qt = producers[n]
        for batch in range(5):
            items = [
                {"queue": f"shared-{i % 3}", "action": "work", "params": {"echo": f"{n}-{batch}-{i}"}}
                for i in range(30)
            ]
            ids[n].extend(qt.create_jobs(items, returning="ids"))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        qt = producers[0]
        assert len(ids[0]) == len(ids[1]) == 150
        for queue in ("shared-0", "shared-1", "shared-2"):
            jobs = qt.list_jobs(queue=queue)
            assert sorted(job.sequence for job in jobs) == list(range(1, 101))
            # Each producer's jobs keep their order within the queue.
            for n in range(2):
                mine = [
                    job
                    for job in sorted(jobs, key=lambda j: j.sequence)
                    if job.params["echo"].startswith(f"{n}-")
                ]
                assert [job.id for job in mine] == sorted(job.id for job in mine)
        start_worker(concurrency=2, beat=True)
        wait_for(
            lambda: all(qt.get_job(i).state is JobState.DONE for i in ids[0] + ids[1]),
            timeout=120,
            message="every job of the bulk batches",
        )
    finally:
        for producer in producers:
            producer.engine.dispose()
