"""A seeded random soak: a steady workload for ``--soak-minutes`` (1 by default) while
a random mix of faults hits it, chosen by ``--soak-seed`` (random by default; the
seed is printed and written in the report line, so that a failing run can be
replayed). Every invariant is checked at the end.

    bash scripts/test.sh tests/chaos/test_soak.py --soak-minutes 10 --soak-seed 7

Faults: ``kill -9`` of a whole worker (its process group; a replacement starts, as
under a supervisor), ``kill -9`` of a prefork child mid-job, a Redis restart (every
queued message lost), ``pg_terminate_backend`` of every worker connection, a
PostgreSQL fast restart, and ``SIGSTOP``/``SIGCONT`` of a child mid-job (1 to 6 s).
It runs on the suite's private PostgreSQL cluster and Redis."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from queuetopia_celery import make_engine
from tests.chaos import harness

pytestmark = pytest.mark.chaos


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


class Soak:
    """The fault injector: each method is one fault, returns False when it could not
    be applied now (nothing running to hit)."""

    def __init__(self, chaos, cluster: harness.PostgresCluster, rng: random.Random) -> None:
        self.chaos, self.cluster, self.rng = chaos, cluster, rng

    def live_workers(self) -> list:
        return [p for p in self.chaos.procs if p.handle.poll() is None]

    def running_child(self) -> dict | None:
        children = {pid for w in self.live_workers() for pid in w.children()}
        runs = [r for r in harness.open_runs(self.chaos.engine, self.chaos.scope) if r["pid"] in children]
        return self.rng.choice(runs) if runs else None

    def worker_kill9(self) -> bool:
        workers = self.live_workers()
        if len(workers) < 2:
            return False
        victim = self.rng.choice(workers)
        children = victim.children()
        self.chaos.kill(victim.pid, signal.SIGKILL)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            self.chaos.kills[pid] = self.chaos.kills[victim.pid]
        # The supervisor starts another; the dead one is no longer the soak's to watch
        # (a later broker outage must not "restart" it again).
        self.chaos.procs.remove(victim)
        self.chaos.worker(beat="-B" in victim.args)
        return True

    def child_kill9(self) -> bool:
        run = self.running_child()
        if run is None:
            return False
        self.chaos.kill(run["pid"], signal.SIGKILL)
        return True

    def redis_restart(self) -> bool:
        self.chaos.broker.restart()
        self.chaos.mark_fault()
        self.chaos.supervise_after_broker_outage()
        return True

    def pg_terminate(self) -> bool:
        with self.chaos.engine.connect() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a"),
                {"a": self.chaos.app_name},
            )
        self.chaos.mark_fault()
        return True

    def pg_fast_restart(self) -> bool:
        self.cluster.restart("fast")
        self.chaos.mark_fault()
        return True

    def sigstop_child(self) -> bool:
        run = self.running_child()
        if run is None:
            return False
        os.kill(run["pid"], signal.SIGSTOP)
        self.chaos.mark_fault()
        time.sleep(self.rng.uniform(1, 6))  # the pause itself
        with contextlib.suppress(ProcessLookupError):  # its parent may have killed it
            os.kill(run["pid"], signal.SIGCONT)
        return True


KINDS = ["worker_kill9", "child_kill9", "redis_restart", "pg_terminate", "pg_fast_restart", "sigstop_child"]


def test_seeded_random_soak(chaos, chaos_postgres, request):
    minutes = float(request.config.getoption("soak_minutes", default=1.0))
    seed = request.config.getoption("soak_seed", default=None)
    seed = random.randrange(1 << 30) if seed is None else int(seed)
    print(f"soak seed {seed}, {minutes:g} min")
    rng = random.Random(seed)
    chaos.rng = random.Random(seed + 1)
    duration = minutes * 60
    chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, int(5 * duration), 12, slow=0.1, slow_sleep=(0.3, 1.0))
    feeder = chaos.feeder(specs, spread=duration).start()
    soak = Soak(chaos, chaos_postgres, rng)
    done: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + duration
    time.sleep(2)
    while time.monotonic() < deadline:
        kind = rng.choice(KINDS)
        if getattr(soak, kind)():
            done[kind] += 1
        time.sleep(rng.uniform(2, 6))
    expect = feeder.join(timeout=300)
    chaos.notes.append(f"seed {seed}: " + ", ".join(f"{k} x{n}" for k, n in sorted(done.items())))
    verdict = chaos.finish(f"seeded random soak, {minutes:g} min", expect, crashes=True, timeout=240)
    assert not verdict.violations, f"seed {seed}: " + verdict.summary()
    assert sum(done.values()) >= max(3, duration / 20), f"too few faults injected: {done}"
