"""PostgreSQL restarted, crashed or unreachable mid-run, on a private cluster of the
suite (initdb into a temporary directory, see ``harness.PostgresCluster``): workers,
beat and producers must carry on by themselves, ``create_job`` during the outage
must raise a clear :class:`~queuetopia_celery.DatabaseError` without the password and
write nothing twice, and every job must end with the invariants intact.

The 60 s outage runs with ``--chaos-long`` only (it adds a minute and a half)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from queuetopia_celery import DatabaseError, make_engine
from tests.chaos import harness
from tests.conftest import wait_for

pytestmark = pytest.mark.chaos


# This module runs on the private cluster: these override the session fixtures of the
# shared PostgreSQL.
@pytest.fixture(scope="module")
def database_url(private_database_url: str) -> str:
    return private_database_url


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def faults_table() -> None:
    """Created with the private database."""


def assert_refused_cleanly(exc: BaseException, password: str) -> None:
    assert isinstance(exc, DatabaseError), f"{type(exc).__name__}: {exc}"
    assert password not in str(exc) and password not in repr(exc), "the password leaked"
    assert str(exc).startswith("database error"), str(exc)


def outage(chaos, cluster: harness.PostgresCluster, *, mode: str, down: float) -> list[BaseException]:
    """Stop the cluster in ``mode``; while it is down, try a ``create_job`` (it must be
    refused); start it again after ``down`` seconds. Returns what the tries raised."""
    refusals: list[BaseException] = []
    if down <= 0 and mode == "fast":
        cluster.restart("fast")
    else:
        cluster.stop(mode)
        began = time.monotonic()
        try:
            while time.monotonic() - began < down or not refusals:
                try:
                    chaos.qt.create_job("during-outage", "fast_retry", {"echo": "never"})
                except Exception as exc:
                    refusals.append(exc)
                else:
                    pytest.fail("create_job succeeded while PostgreSQL was down")
                time.sleep(1)  # the outage goes on; one refused try a second
        finally:
            cluster.start()
    chaos.mark_fault()
    return refusals


@pytest.mark.parametrize(
    ("how", "mode", "down"),
    [
        ("fast restart (pg_ctl restart -m fast)", "fast", 0.0),
        ("crash and restart (pg_ctl stop -m immediate)", "immediate", 0.0),
        ("down 10 s", "fast", 10.0),
        ("down 60 s", "fast", 60.0),
    ],
)
def test_postgres_restarted_or_down_mid_run(chaos, chaos_postgres, request, how, mode, down):  # noqa: PLR0917
    if down >= 60 and not request.config.getoption("chaos_long", default=False):
        pytest.skip("the 60 s outage runs with --chaos-long")
    workers = chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 250, 10, slow=0.15, slow_sleep=(0.3, 0.8))
    feeder = chaos.feeder(specs, spread=8).start()
    wait_for(
        lambda: len(harness.open_runs(chaos.engine, chaos.scope)) >= 2 or None,
        timeout=60,
        message="jobs running",
    )
    snapshots = [chaos.snapshot()]
    refusals = outage(chaos, chaos_postgres, mode=mode, down=down)
    expect = feeder.join(timeout=240)
    verdict = chaos.finish(
        f"PostgreSQL {how}",
        expect,
        crashes=harness.outage_may_repeat(chaos.settings),
        snapshots=snapshots,
        timeout=120,
    )
    assert not verdict.violations, verdict.summary()
    for exc in [*refusals, *feeder.refusals]:
        assert_refused_cleanly(exc, chaos_postgres.PASSWORD)
    if down > 0:
        assert refusals, "create_job was tried during the outage"
    with chaos.engine.connect() as conn:
        stray = conn.execute(
            sa.text("SELECT count(*) FROM queuetopia_jobs WHERE scope = :s AND queue = 'during-outage'"),
            {"s": chaos.scope},
        ).scalar_one()
    assert stray == 0, "a refused create_job wrote a job"
    # Nobody was restarted: the same worker processes (one with beat) did everything.
    assert all(proc.handle.poll() is None for proc in workers), "a worker died of the outage"
    assert len(chaos.procs) == len(workers)
    for proc in workers:
        assert chaos_postgres.PASSWORD not in proc.output(), "the password is in a worker's log"
