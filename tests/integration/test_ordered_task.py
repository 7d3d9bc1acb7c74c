"""Ordered tasks (``@qt.task``) and message creation, on PostgreSQL and SQLite, run
through ``drain()`` (the store's real transitions, in this process, no workers): the
mapping of Celery's words, clear errors that write nothing, the performer's calling
convention, ``DoNotRetry``, ``wait``, and one creation per message id."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import (
    ConfigurationError,
    DoNotRetry,
    InvalidJobError,
    Job,
    JobNotFoundError,
    JobState,
    Queuetopia,
    UnsupportedOptionError,
    WaitTimeoutError,
)
from queuetopia_celery.create_task import create_from_message
from queuetopia_celery.schema import messages
from queuetopia_celery.testing import assert_job_created

UTC = dt.timezone.utc


@pytest.fixture
def qt(backend_url: str, scope: str) -> Iterator[Queuetopia]:
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker="memory://")
    qt = Queuetopia(scope, app=app, database_url=backend_url, disabled=True)
    qt.migrate()
    yield qt
    qt.engine.dispose()


def test_celery_words_map_onto_the_job_options(qt: Queuetopia) -> None:
    @qt.task(queue="a-{key}", max_retries=4, time_limit=30, max_backoff=60)
    def celery_words(key: str) -> None: ...

    @qt.task(queue="b-{key}", soft_time_limit=12, max_attempts=2, on_exhausted="hold")
    def job_words(key: str) -> None: ...

    job = celery_words.delay("x")
    assert (job.queue, job.action, job.max_attempts, job.timeout) == ("a-x", "celery_words", 5, 30)
    assert job.max_backoff == 60
    job = job_words.delay(key="y")
    assert (job.max_attempts, job.timeout, job.on_exhausted) == (2, 12, "hold")
    # Call options override the decorator's.
    job = celery_words.apply_async(["z"], max_retries=0, timeout=5, queue="elsewhere")
    assert (job.queue, job.max_attempts, job.timeout) == ("elsewhere", 1, 5)
    eta = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert celery_words.apply_async(["z"], eta=eta).scheduled_at == eta
    before = dt.datetime.now(UTC)
    job = celery_words.apply_async(["z"], countdown=dt.timedelta(minutes=5))
    five = dt.timedelta(minutes=5)
    assert before + five <= job.scheduled_at <= dt.datetime.now(UTC) + five
    assert job.state is JobState.SCHEDULED


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"time_limit": 30, "soft_time_limit": 25}, "give one of timeout, time_limit, soft_time_limit"),
        ({"max_retries": None}, "must be a number"),
        ({"max_retries": 3, "max_attempts": 4}, "not both"),
        ({"max_retries": -1}, "int >= 0"),
        ({"timeout": -1}, "timeout"),
        ({"on_exhausted": "later"}, "on_exhausted"),
    ],
)
def test_bad_decorator_options_are_refused_at_decoration(
    qt: Queuetopia, options: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigurationError, match=error):
        qt.task(queue="q", **options)


@pytest.mark.parametrize("option", ["rate_limit", "acks_late", "ignore_result", "retry_backoff", "whatever"])
def test_unsupported_decorator_options_raise_a_clear_error(qt: Queuetopia, option: str) -> None:
    with pytest.raises(UnsupportedOptionError, match=option):
        qt.task(queue="q", **{option: True})


def test_a_template_naming_something_else_than_a_parameter_is_refused_at_decoration(qt: Queuetopia) -> None:
    with pytest.raises(ConfigurationError, match="names 'account', which is not one of its parameters"):

        @qt.task(queue="account-{account}")
        def charge(account_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="not a position"):

        @qt.task(queue="account-{0}")
        def refund(account_id: int) -> None: ...


def test_errors_at_the_call_write_nothing(qt: Queuetopia) -> None:
    @qt.task(queue="account-{account_id}")
    def charge(amount: int, account_id: int | None = None) -> None: ...

    @qt.task(queue=lambda account_id, **_: account_id)
    def refund(account_id: int) -> None: ...

    with pytest.raises(InvalidJobError, match="needs argument 'account_id', which is missing or None"):
        charge.delay(10)  # the default None would make queue "account-None"
    with pytest.raises(TypeError, match="missing a required argument: 'amount'"):
        charge.delay(account_id=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        charge.delay(1, account_id=1, colour="red")
    with pytest.raises(InvalidJobError, match="returned 7, not a string"):
        refund.delay(7)
    with pytest.raises(InvalidJobError, match="params"):
        charge.delay({1, 2}, account_id=1)  # not JSON
    with pytest.raises(UnsupportedOptionError, match="'expires'"):
        charge.apply_async([1], {"account_id": 1}, expires=10)
    with pytest.raises(InvalidJobError, match="countdown or eta"):
        charge.apply_async([1], {"account_id": 1}, countdown=1, eta=dt.datetime.now(UTC))
    with pytest.raises(InvalidJobError, match="eta"):
        charge.apply_async([1], {"account_id": 1}, eta=dt.datetime(2030, 1, 1))  # naive
    with pytest.raises(UnsupportedOptionError, match="delay"):
        charge.s(1, account_id=1)
    assert qt.list_jobs() == []


def test_the_performer_gets_the_call_arguments_and_its_return_value_is_stored(qt: Queuetopia) -> None:
    @qt.task(queue="k-{key}", name="custom.name")
    def collect(key: str, /, first: int, *rest: int, flag: bool = False, **extra: str) -> dict[str, Any]:
        return {"key": key, "first": first, "rest": list(rest), "flag": flag, "extra": extra}

    @qt.task(queue="k-{key}", bind=True)
    def bound(job: Job, key: str) -> list[Any]:
        return [job.id, job.attempts, job.idempotency_key, key]

    assert collect("a", 1, 2, flag=True) == {"key": "a", "first": 1, "rest": [2], "flag": True, "extra": {}}
    job = collect.delay("a", 1, 2, 3, flag=True, x="y")
    params = {"key": "a", "first": 1, "rest": [2, 3], "flag": True, "extra": {"x": "y"}}
    assert (job.action, job.params) == ("custom.name", params)
    other = bound.delay("a")
    assert_job_created(qt, action="custom.name", params={"first": 1, "flag": True})  # a subset
    assert qt.drain().succeeded == 2
    assert qt.wait(job, timeout=0).result == params
    assert qt.wait(other.id, timeout=0).result == [other.id, 1, other.idempotency_key, "a"]


def test_a_job_whose_arguments_the_function_no_longer_takes_fails_clearly(qt: Queuetopia) -> None:
    @qt.task(queue="q")
    def renamed(new_name: int) -> None: ...

    job = qt.create_job("q", "renamed", {"old_name": 1}, max_attempts=1)
    assert qt.drain().exhausted == 1
    failed = qt.get_job(job.id)
    assert failed is not None and failed.error is not None
    assert "passes old_name to task 'renamed', which no longer takes them" in failed.error


def test_do_not_retry_ends_the_job_at_once_and_autoretry_for_raises_it_for_others(qt: Queuetopia) -> None:
    @qt.performer("give_up")
    def give_up(job: Job) -> None:
        raise DoNotRetry("the card is gone")

    @qt.task(queue="picky", autoretry_for=[ConnectionError], max_attempts=5, backoff=lambda job: 0)
    def picky(error: str) -> None:
        raise ConnectionError("down") if error == "ConnectionError" else KeyError("nope")

    held = qt.create_job("a", "give_up", {}, on_exhausted="hold")
    skipped = qt.create_job("b", "give_up", {})
    behind = qt.create_job("b", "give_up", {})
    other = picky.delay("KeyError")
    retried = picky.apply_async(["ConnectionError"], max_attempts=2)
    result = qt.drain(with_scheduled=True)
    assert (result.exhausted, result.failed) == (5, 1)
    states = {job.id: (job.state, job.attempts) for job in qt.list_jobs()}
    assert states[held.id] == (JobState.HELD, 1)
    assert states[skipped.id] == (JobState.EXHAUSTED, 1)
    assert states[behind.id] == (JobState.EXHAUSTED, 1)  # the queue moved on
    assert states[other.id] == (JobState.EXHAUSTED, 1)
    assert states[retried.id] == (JobState.EXHAUSTED, 2)  # retried: ConnectionError is in autoretry_for
    error = qt.wait(other, timeout=0).error
    assert error is not None and error.startswith("DoNotRetry: KeyError: 'nope' (not in autoretry_for")


def test_wait_times_out_or_says_the_job_is_not_there(qt: Queuetopia) -> None:
    @qt.task(queue="q")
    def later() -> None: ...

    job = later.apply_async(countdown=60)
    with pytest.raises(WaitTimeoutError, match=f"job {job.id} is still scheduled after 0.1 s") as info:
        qt.wait(job, timeout=0.1)
    assert (info.value.job_id, info.value.state) == (job.id, "scheduled")
    with pytest.raises(JobNotFoundError):
        qt.wait(job.id + 1000, timeout=1)


def test_a_message_creates_its_jobs_once(qt: Queuetopia) -> None:
    fields = {"queue": "q", "action": "a", "params": {"n": 1}, "scheduled_at": "2030-01-01T00:00:00+00:00"}
    first = create_from_message(qt, "m-1", fields)
    assert create_from_message(qt, "m-1", fields) == first
    message = {"jobs": [{"queue": "q", "action": "a", "params": {"n": n}} for n in (2, 3)]}
    many = create_from_message(qt, "m-2", message)
    assert create_from_message(qt, "m-2", message) == many
    jobs = sorted(qt.list_jobs(queue="q"), key=lambda job: job.sequence)
    assert [job.params["n"] for job in jobs] == [1, 2, 3]
    assert [job.id for job in jobs] == [first, *many]
    assert jobs[0].scheduled_at == dt.datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"queue": "q", "action": "a", "colour": "red"}, "unknown fields"),
        ({"queue": "q"}, "missing keys"),
        ({"queue": "q", "action": "a", "scheduled_at": "tomorrow"}, "ISO 8601"),
        ({"queue": "q", "action": "a", "scheduled_at": "2030-01-01T00:00:00"}, "timezone-aware"),
        ({"jobs": []}, "non-empty list"),
        ({"jobs": [{"queue": "q", "action": "a"}], "queue": "q"}, "jobs=\\[...\\] alone"),
        ({"jobs": [{"queue": "q", "action": "a"}, {"queue": "", "action": "a"}]}, "queue"),
    ],
)
def test_a_bad_message_writes_nothing(qt: Queuetopia, fields: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidJobError, match=error):
        create_from_message(qt, "m-bad", fields)
    assert qt.list_jobs() == []
    # Its id was not taken: a corrected message with the same id creates its job.
    assert create_from_message(qt, "m-bad", {"queue": "q", "action": "a"}) == qt.list_jobs()[0].id


def test_a_message_row_goes_with_its_job_when_done_jobs_are_purged(qt: Queuetopia) -> None:
    @qt.task(queue="q")
    def noop() -> None: ...

    job_id = create_from_message(qt, "m-purged", {"queue": "q", "action": "noop"})
    assert qt.drain().succeeded == 1
    assert qt.purge_jobs(older_than=0) == 1
    assert isinstance(job_id, int) and qt.get_job(job_id) is None
    with qt.engine.connect() as conn:
        left = conn.execute(
            sa.select(sa.func.count()).select_from(messages).where(messages.c.scope == qt.scope)
        ).scalar_one()
    assert left == 0  # on SQLite too: tests/integration/test_messages.py
