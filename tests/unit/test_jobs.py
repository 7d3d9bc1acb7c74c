"""Pure logic of jobs: validation, default backoff, state derivation, pages."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from queuetopia_celery import InvalidJobError, JobState, default_backoff
from queuetopia_celery.jobs import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_TIMEOUT,
    MAX_NAME_LENGTH,
    STATUS_DONE,
    STATUS_EXHAUSTED,
    STATUS_PENDING,
    STATUS_RUNNING,
    Page,
    new_job,
    state_of,
    validate_json,
)

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- backoff


def test_default_backoff_is_2_3_5_9_17_after_each_failure():
    assert [default_backoff(n, 86400) for n in range(1, 6)] == [2, 3, 5, 9, 17]


def test_default_backoff_is_capped_at_max_backoff():
    assert default_backoff(10, 100) == 100
    assert default_backoff(3, 4) == 4
    assert default_backoff(1, 0) == 0


def test_default_backoff_does_not_overflow_for_huge_attempt_counts():
    assert default_backoff(10_000, 86400) == 86400
    assert default_backoff(2**31 - 1, 60.5) == 60.5


def test_default_backoff_before_any_failure_is_the_first_step():
    assert default_backoff(0, 86400) == 2


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize(
    ("status", "attempts", "scheduled_at", "expected"),
    [
        (STATUS_PENDING, 0, NOW + dt.timedelta(seconds=1), JobState.SCHEDULED),
        (STATUS_PENDING, 0, NOW, JobState.AVAILABLE),
        (STATUS_PENDING, 0, NOW - dt.timedelta(days=1), JobState.AVAILABLE),
        (STATUS_PENDING, 1, NOW + dt.timedelta(days=1), JobState.RETRYING),
        (STATUS_PENDING, 3, NOW, JobState.RETRYING),
        (STATUS_RUNNING, 1, NOW, JobState.RUNNING),
        (STATUS_DONE, 2, NOW, JobState.DONE),
        (STATUS_EXHAUSTED, 20, NOW, JobState.EXHAUSTED),
    ],
)
def test_state_is_derived_from_status_attempts_and_schedule(status, attempts, scheduled_at, expected):
    assert state_of(status, attempts, scheduled_at, NOW) is expected


def test_states_are_strings():
    assert str(JobState.RETRYING) == "retrying"
    assert JobState("exhausted") is JobState.EXHAUSTED
    expected = {"scheduled", "available", "running", "retrying", "done", "exhausted"}
    assert expected <= {s.value for s in JobState}


# --------------------------------------------------------------------------- validation


def test_new_job_has_queuetopia_defaults():
    spec = new_job("q", "a", {"x": 1})
    assert (spec.timeout, spec.max_backoff, spec.max_attempts) == (60, 86400, 20)
    assert (DEFAULT_TIMEOUT, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_ATTEMPTS) == (60, 86400, 20)
    assert spec.scheduled_at is None


def test_new_job_accepts_timedeltas_and_converts_scheduled_at_to_utc():
    paris = dt.timezone(dt.timedelta(hours=1))
    spec = new_job(
        "q",
        "a",
        [1, "two", None, True, 1.5, {"k": []}],
        scheduled_at=dt.datetime(2026, 1, 1, 13, 0, tzinfo=paris),
        timeout=dt.timedelta(minutes=2),
        max_backoff=0,
        max_attempts=1,
    )
    assert spec.timeout == 120
    assert spec.max_backoff == 0
    assert spec.scheduled_at == NOW and spec.scheduled_at.tzinfo == UTC


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"queue": ""}, "queue"),
        ({"queue": "x" * (MAX_NAME_LENGTH + 1)}, "queue"),
        ({"queue": None}, "queue"),
        ({"queue": "a\x00b"}, "queue"),
        ({"action": ""}, "action"),
        ({"action": "y" * 1000}, "action"),
        ({"action": 3}, "action"),
        ({"params": {1: "int key"}}, "params"),
        ({"params": {"s": {1, 2}}}, "params"),
        ({"params": (1, 2)}, "params"),
        ({"params": b"bytes"}, "params"),
        ({"params": {"nan": math.nan}}, "params"),
        ({"params": [math.inf]}, "params"),
        ({"params": 2**70}, "params"),
        ({"params": {"o": object()}}, "params"),
        ({"params": "lone \ud800 surrogate"}, "params"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": "60"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": dt.timedelta(seconds=-5)}, "timeout"),
        ({"timeout": 10**9}, "timeout"),
        ({"max_backoff": -0.5}, "max_backoff"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"max_attempts": 1.0}, "max_attempts"),
        ({"max_attempts": 2**31}, "max_attempts"),
        ({"scheduled_at": dt.datetime(2026, 1, 1)}, "scheduled_at"),
        ({"scheduled_at": "2026-01-01T00:00:00Z"}, "scheduled_at"),
    ],
)
def test_bad_input_is_refused_with_the_offending_field(kwargs, field):
    args = {"queue": "q", "action": "a", "params": {}, **kwargs}
    with pytest.raises(InvalidJobError) as info:
        new_job(args.pop("queue"), args.pop("action"), args.pop("params"), **args)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("blank", [" ", "   ", "\t", "\n", " \t\r\n ", "\u00a0", "\u2003"])
@pytest.mark.parametrize("field", ["queue", "action"])
def test_blank_names_are_refused_like_queuetopia_does(field, blank):
    args = {"queue": "q", "action": "a", field: blank}
    with pytest.raises(InvalidJobError, match="blank") as info:
        new_job(args["queue"], args["action"], {})
    assert info.value.field == field


def test_names_with_whitespace_around_other_characters_are_kept_as_given():
    spec = new_job(" q ", "\tsend mail", {})
    assert (spec.queue, spec.action) == (" q ", "\tsend mail")


def test_names_of_exactly_the_maximum_length_are_accepted():
    spec = new_job("q" * MAX_NAME_LENGTH, "a" * MAX_NAME_LENGTH, {})
    assert len(spec.queue) == MAX_NAME_LENGTH


def test_oversized_params_are_refused():
    with pytest.raises(InvalidJobError, match="bytes"):
        validate_json("params", {"blob": "x" * (9 * 1024 * 1024)})


def test_deeply_nested_params_are_refused():
    value: list[object] = []
    for _ in range(300):
        value = [value]
    with pytest.raises(InvalidJobError, match="nested"):
        validate_json("params", value)


# --------------------------------------------------------------------------- pages


def test_page_counts_pages():
    assert Page(items=[], total=0, page_number=1, page_size=10).total_pages == 1
    assert Page(items=[], total=10, page_number=1, page_size=10).total_pages == 1
    assert Page(items=[], total=11, page_number=2, page_size=10).total_pages == 2
