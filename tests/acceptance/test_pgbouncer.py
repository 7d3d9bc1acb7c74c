"""Behind PgBouncer in transaction pooling mode (issue 13): a private PgBouncer
(tests/pgbouncer.py) in front of the shared PostgreSQL, with pools of one and two server
connections, so that the clients of these tests really share server connections from
one transaction to the next. Everything here goes through it: the migration (``migrate``
runs in one transaction, so it works through the pooler), the producers, two real
``celery worker`` processes (prefork, two children each) and the scan of the beat
embedded in one of them.

Debian 12's PgBouncer is 1.18: it does not carry prepared statements across server
connections, so the URL says ``?prepare_threshold=none`` (see docs/scaling.md).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from queuetopia_celery import DatabaseError, Job, JobState, Queuetopia
from tests.acceptance.test_core import assert_one_at_a_time, attempts_by_queue
from tests.apps import testapp
from tests.conftest import PG_ADMIN_URL, REDIS_URL, ROOT, events, wait_for
from tests.pgbouncer import PgBouncer

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

#: What a user behind PgBouncer < 1.22 in transaction mode adds to the database URL.
NO_PREPARE = "?prepare_threshold=none"
#: The pool the workers and producers share: two server connections.
POOL = 2


@pytest.fixture(scope="module")
def pgbouncer() -> Iterator[tuple[PgBouncer, str]]:
    """A fresh database on the shared server, not migrated, and a PgBouncer in front of
    it: ``qt`` (pool of 2) and ``qt_one`` (pool of 1)."""
    name = f"qt_pgbouncer_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    server = sa.engine.make_url(PG_ADMIN_URL)
    bouncer = PgBouncer(
        {"qt": (name, POOL), "qt_one": (name, 1)},
        server_host=server.host or "127.0.0.1",
        server_port=server.port or 5432,
    )
    try:
        bouncer.start()
        yield bouncer, name
    finally:
        bouncer.stop()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def database_url(pgbouncer: tuple[PgBouncer, str]) -> str:
    """The pooled URL, migrated through PgBouncer by the CLI (conftest's fixtures that
    take ``database_url`` (workers, producers) then go through PgBouncer too)."""
    bouncer, _ = pgbouncer
    url = bouncer.url("qt", NO_PREPARE)
    done = subprocess.run(
        [sys.executable, "-m", "queuetopia_celery", "migrate", "--database-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    engine = sa.create_engine(bouncer.url("qt"))
    with engine.begin() as conn:
        conn.execute(sa.text(testapp.EVENTS_DDL))
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    from queuetopia_celery import make_engine

    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_the_url_option_reaches_psycopg_and_connect_args_win(database_url: str) -> None:
    from queuetopia_celery import make_engine

    for options, expected in (({}, None), ({"connect_args": {"prepare_threshold": 3}}, 3)):
        engine = make_engine(database_url, **options)
        with engine.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold == expected
        engine.dispose()


@pytest.fixture
def producer(scope: str, celery_queue: str) -> Iterator[Callable[[str], Queuetopia]]:
    """Build producer-side Queuetopias of this test's scope on a given URL."""
    built: list[Queuetopia] = []

    def make(url: str) -> Queuetopia:
        _, qt = testapp.build(scope, database_url=url, broker_url=REDIS_URL, celery_queue=celery_queue)
        built.append(qt)
        return qt

    yield make
    for qt in built:
        qt.engine.dispose()


def test_clients_sharing_one_server_connection_need_prepare_threshold_none(
    pgbouncer: tuple[PgBouncer, str], database_url: str, producer: Callable[[str], Queuetopia]
) -> None:
    """The control: two producers through a pool of one server connection. With
    psycopg's default (prepare after 5 runs) the second producer's prepared statement
    collides with the first one's on the shared server connection; with
    ``prepare_threshold=none`` both go on."""
    bouncer, _ = pgbouncer
    plain = bouncer.url("qt_one")
    first, second = producer(plain), producer(plain)
    for i in range(6):
        first.create_job("first", "work", {"echo": i})
    with pytest.raises(DatabaseError, match="prepared statement") as info:
        for i in range(6):
            second.create_job("second", "work", {"echo": i})
    assert "add ?prepare_threshold=none to the database URL" in str(info.value)

    fixed = bouncer.url("qt_one", NO_PREPARE)
    first, second = producer(fixed), producer(fixed)
    for i in range(8):
        first.create_job("first", "work", {"echo": i})
        second.create_job("second", "work", {"echo": i})
    assert [job.params["echo"] for job in first.list_jobs(queue="second")][:8] == list(range(7, -1, -1))


def test_workers_producers_and_the_scan_behind_pgbouncer_in_transaction_mode(
    pgbouncer: tuple[PgBouncer, str],
    qt: Queuetopia,
    engine: sa.Engine,
    scope: str,
    start_worker: Callable[..., Any],
) -> None:
    bouncer, _ = pgbouncer
    start_worker(concurrency=2, beat=True)
    start_worker(concurrency=2)

    # Producers: four threads (four client connections), each with its own queue and
    # all of them in a shared one, where the order is the order of their commits.
    created: dict[str, list[Job]] = {}
    shared: list[Job] = []
    lock = threading.Lock()

    def produce(n: int) -> None:
        mine = []
        for i in range(10):
            mine.append(qt.create_job(f"own-{n}", "work", {"echo": i}))
            job = qt.create_job("shared", "work", {"echo": f"{n}-{i}"})
            with lock:
                shared.append(job)
        created[f"own-{n}"] = mine

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()

    # Retries found by the scan (beat); a held head blocks its queue until retried.
    flaky = qt.create_job("flaky", "fast_retry", {"fail_times": 1})
    held = qt.create_job("held", "fast_retry", {"fail_times": 2}, max_attempts=2, on_exhausted="hold")
    behind_held = qt.create_job("held", "work", {"echo": "behind"})
    with engine.connect() as conn:
        now = conn.execute(sa.select(sa.func.now())).scalar_one()
    scheduled = qt.create_job("later", "work", {}, scheduled_at=now + dt.timedelta(seconds=2))

    # Transactional enqueue on the caller's connection: one commits, one rolls back.
    with engine.begin() as conn:
        kept = qt.create_job("caller", "work", {"echo": "kept"}, connection=conn)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        dropped = qt.create_job("caller", "work", {"echo": "dropped"}, connection=conn)
        raise RuntimeError("rollback")

    for thread in threads:
        thread.join(60)
    assert sorted(created) == [f"own-{n}" for n in range(4)], "a producer failed"

    def state(job: Job) -> JobState:
        found = qt.get_job(job.id)
        assert found is not None
        return found.state

    every = [job for jobs in created.values() for job in jobs] + shared + [flaky, scheduled, kept]
    wait_for(lambda: all(state(j) is JobState.DONE for j in every), timeout=90, message="every job done")
    wait_for(lambda: state(held) is JobState.HELD, timeout=30, message="the held head")
    assert state(behind_held) is JobState.AVAILABLE, "a held head must block its queue"
    assert qt.get_job(dropped.id) is None

    # While the workers and producers are connected, the pool is shared.
    clients, servers = bouncer.count("CLIENTS", "qt"), bouncer.count("SERVERS", "qt")
    assert servers <= POOL < clients, (clients, servers)

    qt.retry_job(held.id)
    wait_for(lambda: state(behind_held) is JobState.DONE, timeout=30, message="the queue to move on")

    runs = attempts_by_queue(events(engine, scope))
    assert_one_at_a_time(events(engine, scope))
    for queue, jobs in created.items():
        assert [e["job_id"] for e in runs[queue]] == [j.id for j in jobs], queue
    by_sequence = sorted(shared, key=lambda job: job.sequence)
    assert [e["job_id"] for e in runs["shared"]] == [j.id for j in by_sequence]
    assert [e["kind"] for e in runs["flaky"]] == ["failed", "succeeded"]
    assert [(e["job_id"], e["kind"]) for e in runs["held"]] == [
        (held.id, "failed"),
        (held.id, "failed"),
        (held.id, "succeeded"),
        (behind_held.id, "succeeded"),
    ]
    (later,) = runs["later"]
    assert later["started_at"] >= scheduled.scheduled_at
    assert [e["job_id"] for e in runs["caller"]] == [kept.id]
    assert all(a["sequence"] < b["sequence"] for a, b in itertools.pairwise(runs["shared"]))
