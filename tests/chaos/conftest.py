"""Fixtures of the chaos suite: a private redis-server, a private RabbitMQ node and a
private PostgreSQL cluster (each started on a free port, so that tests can restart
them), the faults table, and a ``chaos`` object bundling a scope's producer, workers,
broker and checker.

Options: ``--soak-minutes N`` (the seeded random soak, 1 minute by default),
``--soak-seed N`` and ``--chaos-long`` (the 60 s PostgreSQL outage)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import inspect
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import signals

from queuetopia_celery import Queuetopia
from tests.apps import testapp
from tests.chaos import harness
from tests.conftest import Proc


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos")
    group.addoption(
        "--soak-minutes", type=float, default=1.0, help="duration of the seeded random soak (default 1)"
    )
    group.addoption("--soak-seed", type=int, default=None, help="seed of the soak (default: random, printed)")
    group.addoption(
        "--chaos-long", action="store_true", default=False, help="also run the 60 s PostgreSQL outage"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Time limits that follow the options: the soak runs ``--soak-minutes``, and with
    the library's default settings a lost message waits for the default grace."""
    minutes = float(config.getoption("soak_minutes", default=1.0) or 1.0)
    defaults = os.environ.get("QT_CHAOS_SETTINGS") == "defaults"
    for item in items:
        if "test_soak.py" in item.nodeid:
            item.add_marker(pytest.mark.timeout(minutes * 60 + (900 if defaults else 420)))
        elif "test_postgres_outage.py" in item.nodeid and "60" in item.nodeid:
            item.add_marker(pytest.mark.timeout(900 if defaults else 420))
        elif defaults and item.get_closest_marker("chaos"):
            item.add_marker(pytest.mark.timeout(900))


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
def chaos_rabbitmq() -> Iterator[harness.RabbitNode]:
    """A RabbitMQ node of our own, started on first use (a few seconds)."""
    node = harness.RabbitNode()
    node.start()
    try:
        yield node
    finally:
        node.destroy()


@pytest.fixture(scope="session")
def chaos_postgres() -> Iterator[harness.PostgresCluster]:
    """A PostgreSQL cluster of our own (initdb in a temporary directory), started on
    first use, so that a test can restart it or stop it for a while."""
    cluster = harness.PostgresCluster()
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def private_database_url(chaos_postgres: harness.PostgresCluster) -> str:
    """A migrated database in the private cluster, with the test tables. Modules whose
    tests stop or restart PostgreSQL use it as their ``database_url`` (see
    ``use_private_postgres``)."""
    from queuetopia_celery import make_engine, migrate

    admin = sa.create_engine(chaos_postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('CREATE DATABASE "qt_chaos"'))
    admin.dispose()
    url = chaos_postgres.url("qt_chaos")
    engine = make_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(testapp.EVENTS_DDL))
        conn.execute(sa.text(testapp.FAULTS_DDL))
    engine.dispose()
    return url


@pytest.fixture
def chaos_settings() -> str:
    """``fast`` (the suite's shortened timings) or ``defaults`` (the library's
    defaults, poll_interval 1 s aside): QT_CHAOS_SETTINGS, as the report sets it."""
    return os.environ.get("QT_CHAOS_SETTINGS", "fast")


def default_timings() -> tuple[dict[str, Any], dict[str, str]]:
    """Queuetopia's own defaults (read from its signature), poll_interval 1 s: the
    producer's options and the workers' environment knobs."""
    params = inspect.signature(Queuetopia.__init__).parameters

    def seconds(name: str) -> float:
        value = params[name].default
        return float(value.total_seconds() if isinstance(value, dt.timedelta) else value)

    options = {
        "poll_interval": 1.0,
        "dispatch_grace": seconds("dispatch_grace"),
        "lease_margin": seconds("lease_margin"),
        "time_limit_grace": seconds("time_limit_grace"),
    }
    env = {
        "QT_TEST_POLL": "1",
        "QT_TEST_DISPATCH_GRACE": str(options["dispatch_grace"]),
        "QT_TEST_LEASE_MARGIN": str(options["lease_margin"]),
        "QT_TEST_TIME_LIMIT_GRACE": str(options["time_limit_grace"]),
    }
    return options, env


@pytest.fixture
def broker_kind() -> str:
    """The broker of a chaos test: ``redis`` unless the test parametrizes it."""
    return "redis"


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
    broker: harness.RedisServer | harness.RabbitNode
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
    #: When each fault hit (the end of an outage), by the test's clock.
    fault_times: list[dt.datetime] = dataclasses.field(default_factory=list)
    #: Where every process of the scenario logs the task messages it publishes.
    send_log: Path | None = None
    #: Knobs given to every process of the scenario (the "defaults" table uses none).
    base_env: dict[str, str] = dataclasses.field(default_factory=lambda: dict(harness.FAST_ENV))
    settings: str = "fast"

    def mark_fault(self) -> None:
        """Note that a fault hit now (or an outage just ended), for the report's
        "queues back" time, and count it."""
        self.fault_times.append(dt.datetime.now(dt.timezone.utc))
        self.faults += 1

    def messages_per_job(self, jobs: int) -> float | None:
        if self.send_log is None or not jobs:
            return None
        try:
            lines = self.send_log.read_text().split()
        except FileNotFoundError:
            return 0.0
        return round(sum(1 for line in lines if line == "perform") / jobs, 2)

    @property
    def redis(self) -> harness.RedisServer | harness.RabbitNode:
        """The broker (named for the tests written when Redis was the only one)."""
        return self.broker

    @property
    def app_name(self) -> str:
        return f"qt-chaos-{self.scope}"[:63]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **self.base_env,
            **({"QT_TEST_SEND_LOG": str(self.send_log)} if self.send_log else {}),
            "QT_TEST_BROKER_URL": self.broker.url,
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
            return proc.handle.poll() is not None or proc.output().count("Connected to ") >= 2

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
            self.procs.remove(proc)  # replaced: never restarted twice
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
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        self.kills[pid] = harness.db_now(self.engine)
        self.mark_fault()

    def finish(
        self,
        fault: str,
        expect: dict[int, str] | None,
        *,
        crashes: bool,
        expected_jobs: int | None = None,
        snapshots: list[tuple[dt.datetime, list[dict[str, Any]]]] | None = None,
        timeout: float = 90,
        expected_violation: Callable[[str], bool] | None = None,
    ) -> harness.Verdict:
        """Settle, check the invariants, write the report line, return the verdict.
        Violations for which ``expected_violation`` is true (what the fault itself must
        break) are left out of the report's count and named in its notes."""
        expected = expected_jobs if expected_jobs is not None else len(expect or {})
        if self.settings == "defaults":  # a lost message waits for the default grace
            timeout += 240
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
        jobs, _, _ = harness.load(self.engine, self.scope)
        back = None
        for fault_at in self.fault_times:
            wait = harness.queues_back_seconds(jobs, events, fault_at)
            if wait is not None:
                back = wait if back is None else max(back, wait)
        expected_ones = [v for v in verdict.violations if expected_violation and expected_violation(v)]
        if expected_ones:
            self.notes.append(f"{len(expected_ones)} expected violation(s) left out: {expected_ones[0]}")
        harness.Record(
            fault=fault,
            jobs=verdict.jobs,
            faults=faults,
            recovery_s=None if recovery is None else round(recovery, 2),
            violations=len(verdict.violations) - len(expected_ones),
            repeats=verdict.repeated_side_effects,
            settle_s=round(waited, 1),
            notes="; ".join(self.notes),
            queues_back_s=None if back is None else round(back, 2),
            messages_per_job=self.messages_per_job(verdict.jobs),
            settings=self.settings,
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
    broker_kind: str,
    chaos_settings: str,
    faults_table: None,
    start_worker: Callable[..., Proc],
    start_beat: Callable[..., Proc],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Chaos]:
    broker: harness.RedisServer | harness.RabbitNode = request.getfixturevalue(
        {"redis": "chaos_redis", "rabbitmq": "chaos_rabbitmq"}[broker_kind]
    )
    if not broker.up():  # a previous test's outage must never leak
        broker.start()
    options, base_env = (
        default_timings() if chaos_settings == "defaults" else (harness.FAST_OPTIONS, harness.FAST_ENV)
    )
    _, qt = testapp.build(
        scope,
        database_url=database_url,
        broker_url=broker.url,
        celery_queue=celery_queue,
        **options,
    )
    send_log = tmp_path / "sends.log"
    receiver = testapp.log_sends(str(send_log), scope)
    chaos = Chaos(
        scope=scope,
        send_log=send_log,
        celery_queue=celery_queue,
        engine=engine,
        broker=broker,
        qt=qt,
        rng=random.Random(scope),
        _start_worker=start_worker,
        _start_beat=start_beat,
        base_env=dict(base_env),
        settings=chaos_settings,
    )
    chaos.watch()
    yield chaos
    chaos.stop_watching.set()
    signals.after_task_publish.disconnect(receiver)
    qt.engine.dispose()
    if not broker.up():
        broker.start()
