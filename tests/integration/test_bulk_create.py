"""``create_jobs(returning="ids" | None)``: the bulk path that does not read the jobs
back (COPY on PostgreSQL, the portable path on SQLite) writes the same jobs as
``create_jobs``, numbered in the same order, wakes the same queues, and keeps the
transactional and unique-key behaviour; cut mid-transaction it creates each job once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import InvalidJobError, Queuetopia
from queuetopia_celery.jobs import new_job
from tests.integration.test_connection_loss import CREATE, cut_qt, jobs_in  # noqa: F401 (cut_qt: a fixture)

UTC = dt.timezone.utc


@pytest.fixture
def build(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(**options: Any) -> Queuetopia:
        app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
        qt = Queuetopia(scope, app=app, database_url=backend_url, **options)
        qt.migrate()
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def test_ids_are_those_of_the_jobs_given_in_order_numbered_after_the_queues_jobs(build):
    qt = build()
    later = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    specs = [
        new_job("a", "work", {"n": 1}),
        new_job("b", "work", {"n": 2, "text": "tab\tnew\nline \\ quote'\""}, timeout=7, max_attempts=3),
        new_job("a", "work", [1, 2, {"x": None}], max_backoff=9, on_exhausted="hold"),
        new_job("c", "work", {"n": 4}, scheduled_at=later),
    ]
    before = qt.create_jobs([new_job("a", "work", {"n": 0})])
    ids = qt.create_jobs(specs, returning="ids")
    after = qt.create_jobs([new_job("a", "work", {"n": 5})])

    got = [qt.get_job(job_id) for job_id in ids]
    assert [job.params for job in got] == [spec.params for spec in specs]
    for job, spec in zip(got, specs, strict=True):
        assert (job.queue, job.action, job.timeout, job.max_backoff, job.max_attempts, job.on_exhausted) == (
            spec.queue,
            spec.action,
            spec.timeout,
            spec.max_backoff,
            spec.max_attempts,
            spec.on_exhausted,
        )
        assert job.attempts == 0 and job.status == "pending" and job.scheduled_at is not None
    assert got[3].scheduled_at == later
    in_a = [before[0].sequence, got[0].sequence, got[2].sequence, after[0].sequence]
    assert in_a == [1, 2, 3, 4]


def test_the_bulk_path_keeps_queue_order_with_the_usual_path(build):
    qt = build()
    qt.create_jobs([new_job("a", "work", {"n": n}) for n in range(3)])
    qt.create_jobs([new_job("a", "work", {"n": n}) for n in range(3, 6)], returning="ids")
    qt.create_jobs([new_job("a", "work", {"n": n}) for n in range(6, 9)])
    jobs = sorted(qt.list_jobs(queue="a"), key=lambda job: (job.scheduled_at, job.sequence))
    assert [job.params["n"] for job in jobs] == list(range(9))
    assert [job.sequence for job in jobs] == list(range(1, 10))


def test_returning_none_returns_nothing_and_wakes_the_new_queues(build):
    qt = build()
    later = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    items = [{"queue": f"q{i % 4}", "action": "work", "params": {"i": i}} for i in range(12)]
    items.append({"queue": "later", "action": "work", "scheduled_at": later})
    assert qt.create_jobs(items, returning=None) is None
    assert len(qt.list_jobs()) == 13
    for i in range(4):
        lease = qt.backend.lease_of(f"q{i}")
        assert lease is not None and lease["job_id"] == min(j.id for j in qt.list_jobs(queue=f"q{i}"))
    assert qt.backend.lease_of("later") is None  # not due


def test_a_bad_returning_value_writes_nothing(build):
    qt = build()
    with pytest.raises(InvalidJobError, match="returning"):
        qt.create_jobs([new_job("a", "work", {})], returning="rows")  # type: ignore[call-overload]
    assert qt.list_jobs() == []
    assert qt.create_jobs([], returning="ids") == [] and qt.create_jobs([], returning=None) is None


def test_unique_keys_in_a_bulk_batch_give_the_holders_ids(build):
    qt = build()
    held = qt.create_job("a", "work", {"n": 0}, unique_key="k1")
    ids = qt.create_jobs(
        [
            new_job("a", "work", {"n": 1}, unique_key="k1"),
            new_job("b", "work", {"n": 2}, unique_key="k2"),
            new_job("c", "work", {"n": 3}, unique_key="k2"),
            new_job("c", "work", {"n": 4}),
        ],
        returning="ids",
    )
    assert ids[0] == held.id and ids[1] == ids[2] and len(set(ids)) == 3
    assert qt.get_job(ids[3]).params == {"n": 4}


def test_in_the_callers_transaction_the_batch_commits_or_rolls_back_with_it(build):
    qt = build()
    with qt.engine.connect() as conn:
        with conn.begin():
            ids = qt.create_jobs(
                [new_job("t", "work", {"n": n}) for n in range(5)], connection=conn, returning="ids"
            )
            assert len(ids) == 5
        with conn.begin() as tx:
            qt.create_jobs([new_job("t", "work", {"n": 9})], connection=conn, returning=None)
            tx.rollback()
    assert sorted(job.id for job in qt.list_jobs(queue="t")) == sorted(ids)


def test_a_bulk_insert_cut_mid_transaction_creates_each_job_once(cut_qt, engine, scope):  # noqa: F811
    qt, cutter = cut_qt
    cutter.arm(CREATE, "after")
    items = [{"queue": f"q{i % 3}", "action": "work", "params": {"echo": i}} for i in range(10)]
    ids = qt.create_jobs(items, returning="ids")
    assert cutter.cuts == 1
    assert jobs_in(engine, scope) == 10
    assert [qt.get_job(job_id).params["echo"] for job_id in ids] == list(range(10))
    with engine.connect() as conn:
        sequences = conn.execute(
            sa.text(
                "SELECT queue, array_agg(sequence ORDER BY sequence) FROM queuetopia_jobs"
                " WHERE scope = :s GROUP BY queue"
            ),
            {"s": scope},
        ).all()
    assert {queue: list(seq) for queue, seq in sequences} == {
        "q0": [1, 2, 3, 4],
        "q1": [1, 2, 3],
        "q2": [1, 2, 3],
    }


def test_the_bulk_path_keeps_a_jobs_trace_context(build):
    qt = build()
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    (job_id,) = qt.create_jobs(
        [dataclasses.replace(new_job("t", "work", {}), trace_context=carrier)], returning="ids"
    )
    assert qt.get_job(job_id).trace_context == carrier
