"""Jobs created by a ``create`` message (``queuetopia_messages``), on every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from queuetopia_celery import Queuetopia
from queuetopia_celery.create_task import create_from_message
from tests.apps import testapp
from tests.conftest import REDIS_URL


@pytest.fixture
def build(backend_url: str, scope: str, celery_queue: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(**options: Any) -> Queuetopia:
        _, qt = testapp.build(
            scope, database_url=backend_url, broker_url=REDIS_URL, celery_queue=celery_queue, **options
        )
        qt.migrate()
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
