"""A lost wake-up is found in seconds: an unstarted lease's perform message is re-sent
under the same token after ``resend_after``, then after twice as long each time, at most
``dispatch_grace``; a copy that arrives late still starts the job, and every copy after
the first start is dropped. On PostgreSQL and SQLite; no worker runs here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import Queuetopia, make_engine
from queuetopia_celery.backends import Burst, Outcome

GRACE = 40.0
FIRST = 5.0


def expire(qt: Queuetopia) -> None:
    """Make every lease of the scope due for the scan (its wait is over)."""
    with qt.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE queuetopia_leases SET expires_at = :t WHERE scope = :s"),
            {"t": dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1), "s": qt.scope},
        )


def waits_left(qt: Queuetopia, queue: str) -> tuple[float, int]:
    """Seconds until the lease's next re-send (rounded), and its re-send count."""
    lease = qt.backend.lease_of(queue)
    assert lease is not None
    left = (lease["expires_at"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
    return round(left), lease["resends"]


@pytest.fixture
def any_qt(request: pytest.FixtureRequest, backend_url: str) -> Iterator[Queuetopia]:
    engine = make_engine(backend_url)
    qt = Queuetopia(
        f"resend-{request.node.name[-20:]}-{id(engine)}"[:60],
        app=Celery("resend", broker="memory://"),
        engine=engine,
        dispatch_grace=GRACE,
        resend_after=FIRST,
        disabled=True,  # no messages: the test plays the scan
    )
    qt.migrate()
    yield qt
    engine.dispose()


def lease_now(qt: Queuetopia, queue: str) -> Any:
    (taken,) = qt.backend.kick([queue], grace=GRACE)
    return taken


def test_an_unstarted_lease_is_re_sent_under_its_token_waiting_twice_as_long_each_time(any_qt):
    qt = any_qt
    job = qt.create_job("q", "anything", {})
    taken = lease_now(qt, "q")
    assert waits_left(qt, "q") == (FIRST, 0)
    seen = []
    for _ in range(5):
        expire(qt)
        lost, resent = qt.backend.recover(grace=GRACE)
        assert lost == []
        assert [(d.queue, d.job_id, d.token) for d in resent] == [("q", job.id, taken.token)]
        seen.append(waits_left(qt, "q"))
    # 5 s, then 10, 20, 40 (the dispatch grace caps it), 40...
    assert seen == [(10, 1), (20, 2), (40, 3), (40, 4), (40, 5)]
    # A copy that arrives now, after five re-sends, still starts the job: same token.
    started = qt.backend.start("q", job.id, taken.token, worker="w/1", lease=30)
    assert started is not None and started.attempts == 1
    # Every other copy of it is dropped: the lease has started.
    assert qt.backend.start("q", job.id, taken.token, worker="w/2", lease=30) is None
    assert qt.get_job(job.id).attempts == 1
    # A started lease is never re-sent: its expiry means a dead worker.
    expire(qt)
    lost, resent = qt.backend.recover(grace=GRACE)
    assert resent == [] and [item.job.id for item in lost] == [job.id]


def test_a_lease_not_yet_due_for_a_re_send_is_left_alone(any_qt):
    qt = any_qt
    qt.create_job("q", "anything", {})
    lease_now(qt, "q")
    assert qt.backend.recover(grace=GRACE) == ([], [])
    assert waits_left(qt, "q") == (FIRST, 0)


def test_a_hand_on_starts_a_new_count_with_the_short_wait(any_qt):
    qt = any_qt
    first = qt.create_job("q", "anything", {})
    second = qt.create_job("q", "anything", {})
    taken = lease_now(qt, "q")
    for _ in range(3):
        expire(qt)
        qt.backend.recover(grace=GRACE)
    job = qt.backend.start("q", first.id, taken.token, worker="w/1", lease=30)
    assert job is not None
    burst = Burst(worker="w/1", start_next=False, time_limit_grace=1, lease_margin=1, deadline_left=None)
    written, nxt, _ = qt.backend.finish_and_start(job, taken.token, Outcome(True), grace=GRACE, burst=burst)
    assert written and nxt is not None and nxt.job_id == second.id
    assert waits_left(qt, "q") == (FIRST, 0)


def test_the_first_wait_is_never_longer_than_the_dispatch_grace(any_qt):
    qt = any_qt
    qt.create_job("q", "anything", {})
    qt.backend.kick(["q"], grace=2.0)
    assert waits_left(qt, "q") == (2, 0)
