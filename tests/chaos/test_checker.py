"""The invariant checker itself: each invariant it guards, broken on purpose in
made-up rows, must be reported (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.chaos.harness import judge, recovery_seconds

pytestmark = pytest.mark.chaos

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def t(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def job(id_: int, seq: int, *, status="done", attempts=1, max_attempts=5, queue="q", scheduled=0.0):
    return {
        "id": id_,
        "queue": queue,
        "sequence": seq,
        "scheduled_at": t(scheduled),
        "inserted_at": t(scheduled),
        "status": status,
        "attempts": attempts,
        "max_attempts": max_attempts,
    }


def run(job_id: int, start: float, end: float | None, *, attempt=1, kind="succeeded", queue="q", pid=1):
    return {
        "job_id": job_id,
        "queue": queue,
        "attempt": attempt,
        "pid": pid,
        "kind": kind,
        "started_at": t(start),
        "ended_at": None if end is None else t(end),
    }


def violations(jobs, events, *, held=0, expect=None, crashes=False, kills=None, visible=None):
    verdict = judge(jobs, events, held, expect or {}, crashes=crashes, kills=kills or {}, visible=visible)
    return [v[:3] for v in verdict.violations], verdict


def test_a_clean_history_passes():
    jobs = [job(1, 1), job(2, 2, attempts=2)]
    events = [run(1, 0, 1), run(2, 1, 2, kind="failed"), run(2, 3, 4, attempt=2)]
    assert violations(jobs, events)[0] == []


def test_each_broken_invariant_is_reported():
    # 1: a job left pending, and one that should have been exhausted
    assert violations([job(1, 1, status="pending")], [])[0] == ["[1]"]
    assert violations([job(1, 1)], [run(1, 0, 1)], expect={1: "exhausted"})[0] == ["[1]"]
    # 2: two jobs of one queue overlap
    jobs = [job(1, 1), job(2, 2)]
    assert "[2]" in violations(jobs, [run(1, 0, 2), run(2, 1, 3)])[0]
    # 2: a killed run overlaps its successor until it was killed
    kills = {7: t(2)}
    events = [run(1, 0, None, pid=7, kind="started"), run(1, 1, 3, attempt=2)]
    assert "[2]" in violations([job(1, 1, attempts=2)], events, crashes=True, kills=kills)[0]
    # 3: completions out of order
    assert "[3]" in violations(jobs, [run(2, 2, 3), run(1, 3, 4)])[0]
    # ... but not when the job that comes first was committed after the other started
    late = [job(1, 1, scheduled=1), job(2, 2, scheduled=2)]
    assert violations(late, [run(2, 2.5, 3), run(1, 3, 4)], visible={1: t(2.6)})[0] == []
    assert "[3]" in violations(late, [run(2, 2.5, 3), run(1, 3, 4)], visible={1: t(2.4)})[0]
    # 4: one attempt started twice; a second success without a crash; too many attempts
    assert "[4]" in violations([job(1, 1)], [run(1, 0, 1), run(1, 1, 2)])[0]
    twice = [run(1, 0, 1), run(1, 1, 2, attempt=2)]
    assert "[4]" in violations([job(1, 1, attempts=2)], twice)[0]
    assert "[4]" in violations([job(1, 1, attempts=6, status="exhausted")], [], expect={1: "exhausted"})[0]
    # 5: a lease left behind
    assert violations([job(1, 1)], [run(1, 0, 1)], held=1)[0] == ["[5]"]


def test_a_success_lost_in_a_crash_is_counted_not_condemned():
    twice = [run(1, 0, 1), run(1, 1, 2, attempt=2)]
    found, verdict = violations([job(1, 1, attempts=2)], twice, crashes=True)
    assert found == [] and verdict.repeated_side_effects == 1


def test_recovery_is_measured_from_lease_expiry_to_the_next_start():
    snapshot = [
        {"queue": "q", "job_id": 1, "expires_at": t(5)},  # lost: job 1 starts again after expiry
        {"queue": "r", "job_id": 2, "expires_at": t(5)},  # started in time
        {"queue": "s", "job_id": 4, "expires_at": t(5)},  # finished, never started again
    ]
    events = [run(1, 6.5, 7), run(2, 2, 3, queue="r"), run(3, 9, 10, queue="r"), run(5, 9, 10, queue="s")]
    assert recovery_seconds(snapshot, events, t(1)) == 1.5


def test_a_run_left_open_ends_before_its_process_ran_something_else():
    """A run whose end was never written (the database was down) by a child that
    went on to run other jobs, and was killed much later: it ended before the child's
    next run, not at the kill."""
    jobs = [job(1, 1, attempts=2), job(2, 2)]
    events = [
        run(1, 0, None, attempt=1, pid=7),
        run(1, 5, 6, attempt=2, pid=7),
        run(2, 7, 8, pid=8),
    ]
    assert violations(jobs, events, crashes=True, kills={7: t(20)})[0] == []
    # Another process still overlaps the open run up to the kill.
    late = [run(1, 0, None, attempt=1, pid=7), run(1, 5, 6, attempt=2, pid=9)]
    assert "[2]" in violations([job(1, 1, attempts=2)], late, crashes=True, kills={7: t(20)})[0]
