"""Jobs created by a ``create`` message (``queuetopia_messages``), on every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from queuetopia_celery import Job, Queuetopia
from queuetopia_celery.create_task import create_from_message
from queuetopia_celery.schema import messages
from tests.apps import testapp
from tests.conftest import REDIS_URL


def _fail(job: Job) -> None:
    raise RuntimeError("fails")


@pytest.fixture
def build(backend_url: str, scope: str, celery_queue: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(**options: Any) -> Queuetopia:
        _, qt = testapp.build(
            scope,
            database_url=backend_url,
            broker_url=REDIS_URL,
            celery_queue=celery_queue,
            with_performers=False,
            **options,
        )
        qt.migrate()
        qt.performer("work")(lambda job: None)
        qt.performer("fail")(_fail)
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def test_a_message_wakes_its_queues_once_its_jobs_are_committed(build: Callable[..., Queuetopia]) -> None:
    qt = build()
    message = {"jobs": [{"queue": "a", "action": "work"}, {"queue": "b", "action": "work"}]}
    ids = create_from_message(qt, "m-wake", message)
    assert isinstance(ids, list) and len(ids) == 2
    # The wake-up took the queues' leases at once (and sent their perform messages).
    leases = [qt.backend.lease_of(queue) for queue in ("a", "b")]
    assert [lease["job_id"] if lease else None for lease in leases] == ids
    # A redelivery creates nothing and wakes nothing more.
    assert create_from_message(qt, "m-wake", message) == ids
    assert len(qt.list_jobs()) == 2
    assert [qt.backend.lease_of(queue) for queue in ("a", "b")] == leases


def test_a_message_row_goes_with_its_first_job_when_done_jobs_are_purged(
    build: Callable[..., Queuetopia],
) -> None:
    qt = build()
    kept = create_from_message(qt, "m-kept", {"queue": "k", "action": "fail", "max_attempts": 1})
    purged = create_from_message(qt, "m-purged", {"jobs": [{"queue": "p", "action": "work"}] * 2})
    assert isinstance(kept, int) and isinstance(purged, list)
    qt.drain()
    assert qt.purge_jobs(older_than=0) == 2
    with qt.engine.connect() as conn:
        rows = conn.execute(sa.select(messages.c.message_id).where(messages.c.scope == qt.scope)).scalars()
        assert sorted(rows) == ["m-kept"]
    assert qt.get_job(kept) is not None and all(qt.get_job(job_id) is None for job_id in purged)
