"""Fixtures of the chaos suite: a private redis-server, the faults table, and a
``chaos`` object bundling a scope's producer, workers and checker."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from queuetopia_celery import Queuetopia
from tests.apps import testapp
from tests.chaos import harness
from tests.conftest import Proc


@pytest.fixture(scope="session")
def chaos_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.RedisServer]:
    server = harness.RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.cli("SHUTDOWN", "NOSAVE")


@pytest.fixture(scope="session")
def faults_table(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(testapp.FAULTS_DDL))
    engine.dispose()


@dataclasses.dataclass
class Chaos:
    """One chaos scenario: its scope, services, processes and findings."""

    scope: str
    celery_queue: str
    engine: sa.Engine
    redis: harness.RedisServer
    qt: Queuetopia
    rng: random.Random
    _start_worker: Callable[..., Proc]
    _start_beat: Callable[..., Proc]
    kills: dict[int, dt.datetime] = dataclasses.field(default_factory=dict)
    procs: list[Proc] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    visible: dict[int, dt.datetime] = dataclasses.field(default_factory=dict)
    watched: list[tuple[dt.datetime, list[dict[str, Any]]]] = dataclasses.field(default_factory=list)
    stop_watching: threading.Event = dataclasses.field(default_factory=threading.Event)

    def watch(self, every: float = 0.5) -> None:
        """Snapshot the leases now and then, so that recovery is measured for every
        lease that had to expire, whatever the fault."""

        def run() -> None:
            while not self.stop_watching.wait(every):
                with contextlib.suppress(Exception):
                    self.watched.append(self.snapshot())

        threading.Thread(target=run, daemon=True).start()

    faults: int = 0

    @property
    def app_name(self) -> str:
        return f"qt-chaos-{self.scope}"[:63]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **harness.FAST_ENV,
            "QT_TEST_BROKER_URL": self.redis.url,
            "QT_TEST_APP_NAME": self.app_name,
            **extra,
        }

    def worker(self, *, concurrency: int = 3, beat: bool = False, wait: bool = True, **extra: str) -> Proc:
        proc = self._start_worker(concurrency=concurrency, beat=beat, env=self.env(**extra), wait=wait)
        self.procs.append(proc)
        return proc

    def supervise_after_broker_outage(self) -> None:
        """Act as a process supervisor after Redis came back: wait until each worker
        has reconnected or died (a Celery worker can die of a broker outage: kombu's
        restore of unacked messages fails with ``AttributeError ... 'hostname'``),
        restart the dead ones (with beat where it was) and note how many died."""
        workers = list(self.procs)

        def reconnected_or_dead(proc: Proc) -> bool:
            return proc.handle.poll() is not None or proc.output().count("Connected to redis") >= 2

        deadline = time.monotonic() + 60
        while not all(reconnected_or_dead(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Neither reconnected nor dead after a minute: stuck, as a liveness probe would
        # judge it. Kill it and start another, like a supervisor.
        stuck = [p for p in workers if not reconnected_or_dead(p)]
        for proc in stuck:
            proc.stop(timeout=5)
        dead = [p for p in workers if p.handle.poll() is not None]
        for proc in dead:
            self.worker(beat="-B" in proc.args)
        if stuck:
            self.notes.append(
                f"{len(stuck)} of {len(workers)} workers stuck after the outage, killed and restarted"
            )
        if len(dead) > len(stuck):
            self.notes.append(
                f"{len(dead) - len(stuck)} of {len(workers)} workers died of the outage, restarted"
            )
        # A live worker may also stop consuming after a broker reset (a known Celery
        # issue): if no job starts for a while, add a fresh worker, and say so.
        back = harness.db_now(self.engine)
        query = sa.text(
            "SELECT (SELECT count(*) FROM qt_test_events WHERE scope = :s AND started_at > :t),"
            " (SELECT count(*) FROM queuetopia_jobs WHERE scope = :s AND status IN ('pending', 'running'))"
        )

        def progress() -> bool:
            with self.engine.connect() as conn:
                started, open_ = conn.execute(query, {"s": self.scope, "t": back}).one()
            return started > 0 or open_ == 0

        deadline = time.monotonic() + 20
        while not progress():
            if time.monotonic() > deadline:
                self.worker(beat=True)
                self.notes.append("no job started 20 s after the outage: a fresh worker was added")
                break
            time.sleep(0.2)

    def workers(self, count: int = 2, *, concurrency: int = 3, beat: bool = True, **extra: str) -> list[Proc]:
        """Start ``count`` workers at once (the first with beat) and wait for all."""
        procs = [
            self.worker(concurrency=concurrency, beat=beat and i == 0, wait=False, **extra)
            for i in range(count)
        ]
        for proc in procs:
            proc.wait_ready()
        return procs

    def beat(self, **extra: str) -> Proc:
        return self._start_beat(env=self.env(**extra))

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid`` and note when (database clock)."""
        import os

        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        self.kills[pid] = harness.db_now(self.engine)
        self.faults += 1

    def finish(
        self,
        fault: str,
        expect: dict[int, str] | None,
        *,
        crashes: bool,
        expected_jobs: int | None = None,
        snapshots: list[tuple[dt.datetime, list[dict[str, Any]]]] | None = None,
        timeout: float = 90,
    ) -> harness.Verdict:
        """Settle, check the invariants, write the report line, return the verdict."""
        expected = expected_jobs if expected_jobs is not None else len(expect or {})
        waited = harness.settle(self.engine, self.scope, expected, timeout=timeout)
        self.stop_watching.set()
        verdict = harness.check(
            self.engine, self.scope, expect, crashes=crashes, kills=self.kills, visible=self.visible
        )
        if expect is not None and verdict.jobs != len(expect):
            verdict.violations.append(f"[1] {verdict.jobs} jobs in the table, {len(expect)} created")
        _, events, _ = harness.load(self.engine, self.scope)
        recovery = None
        for taken_at, snapshot in [*(snapshots or []), *self.watched]:
            wait = harness.recovery_seconds(snapshot, events, taken_at)
            if wait is not None:
                recovery = wait if recovery is None else max(recovery, wait)
        faults = self.faults + len(harness.fault_rows(self.engine, self.scope))
        harness.Record(
            fault=fault,
            jobs=verdict.jobs,
            faults=faults,
            recovery_s=None if recovery is None else round(recovery, 2),
            violations=len(verdict.violations),
            repeats=verdict.repeated_side_effects,
            settle_s=round(waited, 1),
            notes="; ".join(self.notes),
        ).write()
        return verdict

    def feeder(self, specs: list[harness.Spec], *, spread: float = 4.0) -> harness.Feeder:
        return harness.Feeder(self.qt, specs, spread=spread, visible=self.visible)

    def snapshot(self) -> tuple[dt.datetime, list[dict[str, Any]]]:
        """The scope's leases now, to measure recovery after a fault."""
        return harness.db_now(self.engine), harness.leases(self.engine, self.scope)


@pytest.fixture
def chaos(  # noqa: PLR0917
    scope: str,
    celery_queue: str,
    engine: sa.Engine,
    database_url: str,
    chaos_redis: harness.RedisServer,
    faults_table: None,
    start_worker: Callable[..., Proc],
    start_beat: Callable[..., Proc],
    tmp_path: Path,
) -> Iterator[Chaos]:
    if not chaos_redis.up():  # a previous test's outage must never leak
        chaos_redis.start()
    _, qt = testapp.build(
        scope,
        database_url=database_url,
        broker_url=chaos_redis.url,
        celery_queue=celery_queue,
        **harness.FAST_OPTIONS,  # type: ignore[arg-type]
    )
    chaos = Chaos(
        scope=scope,
        celery_queue=celery_queue,
        engine=engine,
        redis=chaos_redis,
        qt=qt,
        rng=random.Random(scope),
        _start_worker=start_worker,
        _start_beat=start_beat,
    )
    chaos.watch()
    yield chaos
    chaos.stop_watching.set()
    qt.engine.dispose()
    if not chaos_redis.up():
        chaos_redis.start()
