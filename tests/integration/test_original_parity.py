"""Where Queuetopia (the Elixir original) was ahead (issue 12), on PostgreSQL and on
SQLite, through the store and ``drain()`` in this process (no workers): user code that
raises ``SystemExit``, blank names, the order of job lists, a freed concurrency slot,
and what ``params`` may be."""

from __future__ import annotations

import datetime as dt
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import WorkerShutdown, WorkerTerminate

from queuetopia_celery import ConfigurationError, InvalidJobError, Job, JobState, Queuetopia
from tests.conftest import wait_for

UTC = dt.timezone.utc


@pytest.fixture
def build(backend_url: str, scope: str) -> Iterator[Callable[..., Queuetopia]]:
    built: list[Queuetopia] = []

    def make(**options: Any) -> Queuetopia:
        app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
        qt = Queuetopia(scope, app=app, database_url=backend_url, disabled=True, **options)
        qt.migrate()
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def count_rows(qt: Queuetopia) -> int:
    return len(qt.list_jobs())


# --------------------------------------------------------------------------- 1. SystemExit


def test_sys_exit_in_a_performer_is_a_failed_attempt_with_its_error_stored(build):
    qt = build()

    @qt.performer("exits")
    def exits(job: Job) -> Any:
        sys.exit(1)

    @qt.performer("ok")
    def ok(job: Job) -> Any:
        return {"ok": True}

    job = qt.create_job("q", "exits", max_attempts=1)
    after = qt.create_job("q", "ok")
    result = qt.drain()  # would raise SystemExit if the attempt were not caught
    assert (result.exhausted, result.succeeded) == (1, 1)
    failed = qt.get_job(job.id)
    assert failed.state is JobState.EXHAUSTED
    assert failed.error.startswith("SystemExit: 1")
    assert qt.get_job(after.id).state is JobState.DONE


def test_a_failure_hook_or_backoff_hook_calling_sys_exit_is_added_to_the_error(build):
    qt = build()
    hooked: list[int] = []

    def exit_hook(job: Job) -> None:
        hooked.append(job.attempts)
        sys.exit(3)

    def exit_backoff(job: Job) -> float:
        sys.exit(4)

    @qt.performer("fails", on_failure=exit_hook, backoff=exit_backoff)
    def fails(job: Job) -> Any:
        raise RuntimeError("planned")

    job = qt.create_job("q", "fails", max_attempts=2)
    result = qt.drain(with_scheduled=True)
    assert (result.failed, result.exhausted) == (1, 1)
    assert hooked == [1, 2]
    stored = qt.get_job(job.id)
    assert stored.state is JobState.EXHAUSTED
    assert stored.error.startswith("RuntimeError: planned")
    assert "backoff hook raised SystemExit: 4; used the default backoff" in stored.error
    assert "handle_failed_job raised SystemExit: 3" in stored.error


@pytest.mark.parametrize("stop", [KeyboardInterrupt, WorkerShutdown, WorkerTerminate])
@pytest.mark.parametrize("where", ["perform", "hook", "backoff"])
def test_a_request_to_stop_the_process_is_not_taken_for_a_failed_attempt(build, stop, where):
    qt = build()

    def hook(job: Job) -> None:
        if where == "hook":
            raise stop()

    def backoff(job: Job) -> float:
        if where == "backoff":
            raise stop()
        return 1.0

    @qt.performer("stops", on_failure=hook, backoff=backoff)
    def stops(job: Job) -> Any:
        if where == "perform":
            raise stop()
        raise RuntimeError("planned")

    job = qt.create_job("q", "stops")
    with pytest.raises(stop):
        qt.drain()
    # The attempt stays begun: the scan records it once its lease expires.
    left = qt.get_job(job.id)
    assert (left.state, left.attempts, left.error) == (JobState.RUNNING, 1, None)


def lose_attempt(qt: Queuetopia, queue: str) -> Job:
    """Begin the attempt of ``queue``'s head under a lease that expires at once, as if
    its worker had died."""
    (lease,) = qt.backend.kick([queue], grace=60)
    started = qt.backend.start(queue, lease.job_id, lease.token, worker="gone/1", lease=0)
    assert started is not None
    return started


@pytest.mark.parametrize("hook_raises", [SystemExit(3), RuntimeError("hook boom")])
def test_a_lost_attempt_is_recorded_even_when_the_failure_hook_misbehaves(build, hook_raises):
    qt = build()
    hooked: list[tuple[int, str | None]] = []

    def hook(job: Job) -> None:
        hooked.append((job.attempts, job.error))
        raise hook_raises

    @qt.performer("work", on_failure=hook)
    def work(job: Job) -> Any:
        return {"ok": True}

    job = qt.create_job("q", "work", max_attempts=1)
    after = qt.create_job("q", "work")
    lose_attempt(qt, "q")
    # Each scan survives the hook; the first one after the lease's expiry records it.
    wait_for(lambda: qt.scan() is not None and qt.get_job(job.id).state is JobState.EXHAUSTED)
    stored = qt.get_job(job.id)
    assert stored.error.startswith("WorkerLostError: attempt 1 of job")
    assert f"handle_failed_job raised {type(hook_raises).__name__}: {hook_raises}" in stored.error
    assert len(hooked) == 1 and hooked[0][0] == 1
    assert hooked[0][1].startswith("WorkerLostError")
    assert qt.backend.lease_of("q") is None or qt.backend.lease_of("q")["job_id"] == after.id
    qt.drain()
    assert qt.get_job(after.id).state is JobState.DONE


def test_a_lost_attempt_is_recorded_before_the_failure_hook_runs(build):
    """A hook that never returns (here: one that checks what is stored, then stops the
    process) cannot keep the lost attempt unrecorded: it runs after the record."""
    qt = build()
    seen: list[Job | None] = []

    def hook(job: Job) -> None:
        seen.append(qt.get_job(job.id))
        raise KeyboardInterrupt  # a stop request goes through, after the record

    @qt.performer("work", on_failure=hook)
    def work(job: Job) -> Any:
        return None

    qt.create_job("q", "work", max_attempts=3)
    lose_attempt(qt, "q")

    def scanned() -> bool:
        try:
            qt.scan()
        except KeyboardInterrupt:
            return True
        return False

    wait_for(scanned, message="a scan to find the lost attempt")
    (stored,) = seen
    assert stored is not None and stored.state is JobState.RETRYING
    assert stored.error.startswith("WorkerLostError")
    assert qt.backend.lease_of("q") is None


# --------------------------------------------------------------------------- 2. blank names


@pytest.mark.parametrize("field", ["queue", "action"])
@pytest.mark.parametrize("blank", [" ", "\t\n", "\u3000"])
def test_blank_names_are_refused_and_nothing_is_written(build, field, blank):
    qt = build()
    args = {"queue": "q", "action": "a", field: blank}
    with pytest.raises(InvalidJobError, match="blank") as info:
        qt.create_job(args["queue"], args["action"])
    assert info.value.field == field
    with pytest.raises(InvalidJobError, match="blank"):
        qt.create_jobs([{"queue": "ok", "action": "a"}, {"queue": args["queue"], "action": args["action"]}])
    assert count_rows(qt) == 0


def test_a_blank_action_cannot_get_a_performer(build):
    qt = build()
    with pytest.raises(InvalidJobError, match="blank"):
        qt.performer("  ")(lambda job: None)
    assert qt.registry.actions == []


# --------------------------------------------------------------------------- 3. list order


def test_jobs_are_listed_newest_created_first_across_queues(build):
    qt = build()
    a1 = qt.create_job("A", "a")
    a2 = qt.create_job("A", "a")
    b1 = qt.create_job("B", "a")
    assert [j.id for j in qt.list_jobs()] == [b1.id, a2.id, a1.id]
    assert [j.id for j in qt.list_jobs(limit=2)] == [b1.id, a2.id]
    first, second = qt.paginate_jobs(2, 1), qt.paginate_jobs(2, 2)
    assert [j.id for j in first.items] == [b1.id, a2.id]
    assert [j.id for j in second.items] == [a1.id]
    assert first.total == 3


def test_jobs_created_together_are_listed_by_sequence_within_their_queue(build):
    qt = build()
    old = qt.create_job("B", "a")
    bulk = qt.create_jobs([{"queue": "A", "action": "a"} for _ in range(5)])
    listed = qt.list_jobs()
    assert [j.id for j in listed] == [j.id for j in reversed(bulk)] + [old.id]
    assert [j.sequence for j in listed if j.queue == "A"] == [5, 4, 3, 2, 1]


# --------------------------------------------------------------------------- 5. freed slot


def test_a_freed_slot_goes_to_a_waiting_queue_past_one_that_emptied(build):
    """Under a concurrency limit, a queue that ran and emptied keeps the due time it
    had; the next dispatch passes it over for a queue that waits, instead of spending
    the free slot on it."""
    qt = build(max_concurrent_queues=1)

    @qt.performer("work")
    def work(job: Job) -> Any:
        return None

    a1 = qt.create_job("A", "work")
    b1 = qt.create_job("B", "work")
    (lease,) = qt.backend.fill_slots(None, grace=60, max_concurrent=1)
    assert lease.queue == "A"
    assert qt.backend.fill_slots(None, grace=60, max_concurrent=1) == []  # the one slot is A's
    job = qt.backend.start("A", a1.id, lease.token, worker="w/1", lease=60)
    assert job is not None
    written, nxt = qt.backend.finish(job, lease.token, qt.perform_runner._attempt(job)[0], grace=60)
    assert (written, nxt) == (True, None)  # A released
    (freed,) = qt.backend.fill_slots(None, grace=60, max_concurrent=1)
    assert (freed.queue, freed.job_id) == ("B", b1.id)


# --------------------------------------------------------------------------- 6. params


@pytest.mark.parametrize(
    ("params", "stored"),
    [
        (None, {}),
        ({"to": "a"}, {"to": "a"}),
        ([1, "two", None], [1, "two", None]),
        ("text", "text"),
        (42, 42),
        (1.5, 1.5),
        (False, False),
        ({}, {}),
        ([], []),
    ],
)
def test_params_are_any_json_value_and_none_is_stored_as_an_empty_dict(build, params, stored):
    qt = build()
    seen: list[Any] = []

    @qt.performer("p")
    def p(job: Job) -> Any:
        seen.append(job.params)
        return None

    job = qt.create_job("q", "p", params)
    (bulk,) = qt.create_jobs([{"queue": "r", "action": "p", "params": params}])
    assert job.params == stored and bulk.params == stored
    assert qt.get_job(job.id).params == stored
    qt.drain()
    assert seen == [stored, stored]
    assert type(seen[0]) is type(stored)


def test_params_left_out_are_an_empty_dict(build):
    qt = build()
    assert qt.create_job("q", "a").params == {}
    assert qt.create_jobs([{"queue": "q", "action": "a"}])[0].params == {}


def test_a_blank_scope_is_refused(backend_url):
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
    with pytest.raises(ConfigurationError, match="blank"):
        Queuetopia(" \t", app=app, database_url=backend_url, disabled=True)
