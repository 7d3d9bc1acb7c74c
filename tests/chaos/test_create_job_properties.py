"""Property tests of ``create_job`` with arbitrary names, params and options: either a
clear exception (InvalidJobError, or TypeError for a wrong call) and nothing written,
or a job that reads back exactly as it was given."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from queuetopia_celery import InvalidJobError

pytestmark = pytest.mark.chaos

UTC = dt.timezone.utc

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_like = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
not_json = st.sampled_from([(1, 2), {1, 2}, b"bytes", object(), {1: "int key"}, dt.date(2020, 1, 1)])
# Valid shapes are drawn more often than broken ones, so that both outcomes are common.
params_values = json_like | json_like | json_like | not_json | st.lists(not_json, min_size=1, max_size=2)
plain_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30)
names = (
    plain_names | plain_names | plain_names | st.text(max_size=300) | st.integers() | st.binary(max_size=4)
)
good_durations = st.floats(min_value=0.001, max_value=1e6) | st.integers(min_value=1, max_value=10**6)
durations = (
    good_durations
    | good_durations
    | good_durations
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-10, max_value=10**9)
    | st.timedeltas(min_value=dt.timedelta(days=-2), max_value=dt.timedelta(days=400))
    | st.sampled_from(["10", None, True])
)
attempts = (
    st.integers(min_value=1, max_value=100)
    | st.integers(min_value=-3, max_value=2**33)
    | st.sampled_from([1.0, True, "3", None])
)
aware = st.datetimes(timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-7))]))
moments = (
    st.none()
    | aware
    | st.datetimes(timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-7))]))
    | st.datetimes()  # naive: refused
)


def exactly(value: Any) -> str:
    """A rendering that tells 1 from 1.0 and True from 1."""
    return json.dumps(value, sort_keys=True, allow_nan=True)


def count(engine: sa.Engine, scope: str) -> tuple[int, int]:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM queuetopia_jobs WHERE scope = :s),"
                " (SELECT count(*) FROM queuetopia_queues WHERE scope = :s)"
            ),
            {"s": scope},
        ).one()


def seconds(value: Any) -> float:
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    queue=names,
    action=names,
    params=params_values,
    options=st.fixed_dictionaries(
        {},
        optional={
            "timeout": durations,
            "max_backoff": durations,
            "max_attempts": attempts,
            "scheduled_at": moments,
        },
    ),
)
def test_create_job_refuses_cleanly_or_round_trips_exactly(  # noqa: PLR0917
    qt, engine, queue, action, params, options
):
    before = count(engine, qt.scope)
    try:
        job = qt.create_job(queue, action, params, **options)
    except (InvalidJobError, TypeError) as exc:
        event(f"refused: {type(exc).__name__} {getattr(exc, 'field', '')}")
        assert str(exc), "the error says what is wrong"
        assert count(engine, qt.scope) == before, f"{exc!r} was raised but something was written"
        return
    # Accepted: the input was valid, and the job reads back exactly.
    event("accepted")
    stored = qt.get_job(job.id)
    assert stored == job
    assert (job.queue, job.action) == (queue, action)
    assert exactly(job.params) == exactly({} if params is None else params)
    for name, default in (("timeout", 60.0), ("max_backoff", 86400.0)):
        wanted = seconds(options[name]) if name in options else default
        assert math.isclose(getattr(job, name), wanted, rel_tol=1e-12, abs_tol=1e-6)
    assert job.max_attempts == options.get("max_attempts", 20)
    if options.get("scheduled_at") is not None:
        assert job.scheduled_at == options["scheduled_at"]
        assert job.scheduled_at.utcoffset() == dt.timedelta(0)
    assert count(engine, qt.scope)[0] == before[0] + 1
