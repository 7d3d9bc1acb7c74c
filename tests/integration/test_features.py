"""Issue 12's features users ask for, through the API, on PostgreSQL and on SQLite:
unique jobs, paused queues, bulk retry and abort by filter, and explain_queue."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from queuetopia_celery import (
    InvalidJobError,
    Job,
    Queuetopia,
)

UTC = dt.timezone.utc


@pytest.fixture(params=["postgresql", "sqlite"])
def backend_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return database_url
    return f"sqlite:///{tmp_path / 'jobs.db'}"


def _build(url: str, scope: str, **options: Any) -> Queuetopia:
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
    return Queuetopia(scope, app=app, database_url=url, **options)


@pytest.fixture
def build(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(**options: Any) -> Queuetopia:
        qt = _build(backend_url, scope, **options)
        qt.migrate()
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def _count(qt: Queuetopia, **where: Any) -> int:
    jobs = qt.store.list_jobs()
    return sum(1 for job in jobs if all(getattr(job, k) == v for k, v in where.items()))


# ---------------------------------------------------------------------- unique jobs


def test_a_unique_key_held_by_an_open_job_returns_that_job(build):
    qt = build()
    first = qt.create_job("q1", "work", {"n": 1}, unique_key="invoice-7")
    again = qt.create_job("q1", "work", {"n": 2}, unique_key="invoice-7")
    elsewhere = qt.create_job("q2", "work", {"n": 3}, unique_key="invoice-7")
    assert again.id == first.id and elsewhere.id == first.id
    assert again.params == {"n": 1} and first.unique_key == "invoice-7"
    other = qt.create_job("q1", "work", unique_key="invoice-8")
    assert other.id != first.id
    assert _count(qt) == 2


def test_a_unique_key_is_free_again_once_its_job_is_done_or_aborted(build):
    qt = build(disabled=True)

    @qt.performer("work")
    def work(job: Job) -> None:
        return None

    first = qt.create_job("q", "work", unique_key="k")
    assert qt.drain().succeeded == 1
    second = qt.create_job("q", "work", unique_key="k")
    assert second.id != first.id
    qt.abort_job(second.id, "not needed")
    third = qt.create_job("q", "work", unique_key="k")
    assert len({first.id, second.id, third.id}) == 3
    # Keys are per scope: another scope's job with the same key is not compared.
    other = _build(str(qt.engine.url.render_as_string(hide_password=False)), qt.scope + "-b", disabled=True)
    try:
        assert other.create_job("q", "work", unique_key="k").id != third.id
    finally:
        other.engine.dispose()


def test_unique_keys_in_bulk_within_the_call_and_against_open_jobs(build):
    qt = build()
    held = qt.create_job("a", "work", unique_key="k1")
    jobs = qt.create_jobs(
        [
            {"queue": "a", "action": "work", "params": {"i": 0}},
            {"queue": "a", "action": "work", "params": {"i": 1}, "unique_key": "k1"},
            {"queue": "b", "action": "work", "params": {"i": 2}, "unique_key": "k2"},
            {"queue": "a", "action": "work", "params": {"i": 3}, "unique_key": "k2"},
            {"queue": "a", "action": "work", "params": {"i": 4}},
        ]
    )
    assert jobs[1].id == held.id
    assert jobs[3].id == jobs[2].id and jobs[2].queue == "b"
    assert [j.params for j in (jobs[0], jobs[4])] == [{"i": 0}, {"i": 4}]
    assert _count(qt) == 4
    # Order within queue a is kept (a gap where k1 was refused is harmless).
    a = [j for j in qt.list_jobs(queue="a")][::-1]
    assert [j.id for j in a] == [held.id, jobs[0].id, jobs[4].id]
    assert [j.sequence for j in a] == sorted(j.sequence for j in a)


def test_unique_job_in_the_callers_transaction(build):
    qt = build()
    with qt.engine.connect() as conn, conn.begin():
        first = qt.create_job("q", "work", unique_key="tx", connection=conn)
        again = qt.create_job("q", "work", unique_key="tx", connection=conn)
        assert again.id == first.id
    assert qt.create_job("q", "work", unique_key="tx").id == first.id
    with qt.engine.connect() as conn, conn.begin() as tx:
        rolled = qt.create_job("q", "work", unique_key="rolled", connection=conn)
        tx.rollback()
    assert qt.get_job(rolled.id) is None
    assert qt.create_job("q", "work", unique_key="rolled", params={"n": 2}).params == {"n": 2}
    assert _count(qt) == 2


@pytest.mark.parametrize(
    ("key", "reason"),
    [("x" * 256, "at most 255"), ("   ", "blank"), ("", "blank"), (42, "must be a string"), ("a\x00", "NUL")],
)
def test_a_bad_unique_key_is_refused_and_nothing_written(build, key, reason):
    qt = build()
    with pytest.raises(InvalidJobError, match=reason) as info:
        qt.create_job("q", "work", unique_key=key)
    assert info.value.field == "unique_key"
    with pytest.raises(InvalidJobError, match=reason):
        qt.create_jobs(
            [{"queue": "q", "action": "work"}, {"queue": "q", "action": "work", "unique_key": key}]
        )
    assert _count(qt) == 0
    assert qt.create_job("q", "work", unique_key="x" * 255).unique_key == "x" * 255


def _produce(url: str, scope: str, barrier: Any, results: Any, bulk: bool) -> None:
    qt = _build(url, scope)
    try:
        barrier.wait(30)
        if bulk:
            jobs = qt.create_jobs(
                [{"queue": f"q{i % 3}", "action": "work", "unique_key": f"k{i}"} for i in range(20)]
            )
            results.put([job.id for job in jobs])
        else:
            results.put([qt.create_job("q", "work", unique_key="same").id])
    except BaseException as exc:
        results.put(repr(exc))
        raise
    finally:
        qt.engine.dispose()


@pytest.mark.parametrize("bulk", [False, True], ids=["one", "bulk"])
def test_concurrent_producers_of_one_key_create_one_job(build, backend_url, scope, bulk):
    qt = build()
    producers = 6
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(producers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_produce, args=(backend_url, scope, barrier, results, bulk))
        for _ in range(producers)
    ]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert all(isinstance(ids, list) for ids in got), got
    assert all(ids == got[0] for ids in got), got
    jobs = qt.list_jobs()
    assert len(jobs) == (20 if bulk else 1)
    assert sorted(job.id for job in jobs) == sorted(got[0])
