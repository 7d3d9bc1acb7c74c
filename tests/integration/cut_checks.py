"""Checks shared by the connection-loss tests of each backend: each backend cuts its
connection its own way (a closed socket on PostgreSQL, KILL CONNECTION on MariaDB), and
the same promise is then checked the same way."""

from __future__ import annotations

from typing import Any

from queuetopia_celery import JobState
from queuetopia_celery.backends import Burst, Outcome


def outcome_write_cut_is_written_once_and_hands_on(
    qt: Any, cutter: Any, finish: str, when: str, start_next: bool
) -> None:
    """Two jobs in a queue; the first one's outcome write is cut (``cutter.arm(finish,
    when)``). The retry must recognise its own write, hand the queue to the second job
    (started inline, or leased unstarted), and count each attempt once."""
    first = qt.create_job("q", "work", {})
    second = qt.create_job("q", "work", {})
    token = qt.backend.lease_of("q")["token"]
    with qt.backend.pinned():
        job = qt.backend.start("q", first.id, token, worker="w/1", lease=30)
        assert job is not None
        cutter.arm(finish, when)
        burst = Burst(
            worker="w/1", start_next=start_next, time_limit_grace=1, lease_margin=1, deadline_left=None
        )
        written, nxt, started = qt.backend.finish_and_start(
            job, token, Outcome(True, result=7), grace=20, burst=burst
        )
    assert cutter.cuts == 1
    assert written, "the retry did not recognise its own write"
    assert nxt is not None and nxt.job_id == second.id
    assert qt.backend.lease_of("q")["token"] == nxt.token
    if start_next:
        assert started is not None and started.id == second.id and started.attempts == 1
    else:
        assert started is None and qt.backend.lease_of("q")["started_at"] is None
    done = qt.get_job(first.id)
    assert (done.state, done.result, done.attempts) == (JobState.DONE, 7, 1)
    assert qt.get_job(second.id).attempts == (1 if start_next else 0)
