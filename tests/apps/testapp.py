"""A Celery app with one Queuetopia, used by the tests' worker and beat processes.

Configured by environment variables (QT_TEST_*), so that each test runs its own
scope on its own Celery queue. Performers record what they do in ``qt_test_events``,
stamped with the database clock, so tests can check order and overlap.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery, signals

from queuetopia_celery import Job, JobTimeoutError, Queuetopia, make_engine

EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS qt_test_events (
    id bigserial PRIMARY KEY,
    scope text NOT NULL,
    queue text NOT NULL,
    job_id bigint NOT NULL,
    sequence bigint NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    kind text NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz
)
"""

#: The same table on MariaDB (naive UTC times, as queuetopia's own).
EVENTS_DDL_MYSQL = """
CREATE TABLE IF NOT EXISTS qt_test_events (
    id bigint AUTO_INCREMENT PRIMARY KEY,
    scope varchar(255) NOT NULL,
    queue varchar(255) NOT NULL,
    job_id bigint NOT NULL,
    sequence bigint NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    kind varchar(16) NOT NULL,
    started_at datetime(6) NOT NULL,
    ended_at datetime(6)
)
"""


def _clock(conn: sa.Connection) -> str:
    """The database's clock at the time a statement runs, in SQL."""
    return "clock_timestamp()" if conn.dialect.name == "postgresql" else "UTC_TIMESTAMP(6)"


def build(
    scope: str,
    *,
    database_url: str,
    broker_url: str,
    celery_queue: str,
    poll_interval: float = 0.5,
    dispatch_grace: float = 20,
    lease_margin: float = 2,
    time_limit_grace: float = 1,
    max_concurrent_queues: int | None = None,
    burst_jobs: int = 50,
    with_performers: bool = True,
    application_name: str | None = None,
    cleanup_interval: float | None = None,
) -> tuple[Celery, Queuetopia]:
    app = Celery(f"qt-test-{scope}", broker=broker_url)
    app.conf.update(
        task_default_queue=celery_queue,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        timezone="UTC",
        worker_hijack_root_logger=False,
    )
    qt = Queuetopia(
        scope,
        app=app,
        **(
            {"engine": make_engine(database_url, connect_args={"application_name": application_name})}
            if application_name
            else {"database_url": database_url}
        ),
        poll_interval=poll_interval,
        celery_queue=celery_queue,
        dispatch_grace=dispatch_grace,
        lease_margin=lease_margin,
        time_limit_grace=time_limit_grace,
        max_concurrent_queues=max_concurrent_queues,
        burst_jobs=burst_jobs,
        cleanup_interval=cleanup_interval,
    )
    if with_performers:
        _register(qt)
    return app, qt


def _record(qt: Queuetopia, job: Job, kind: str, started: bool) -> int:
    with qt.engine.begin() as conn:
        if started:
            return int(
                conn.execute(
                    sa.text(
                        "INSERT INTO qt_test_events"
                        " (scope, queue, job_id, sequence, attempt, pid, kind, started_at)"
                        f" VALUES (:s, :q, :j, :seq, :a, :p, :k, {_clock(conn)}) RETURNING id"
                    ),
                    {
                        "s": job.scope,
                        "q": job.queue,
                        "j": job.id,
                        "seq": job.sequence,
                        "a": job.attempts,
                        "p": os.getpid(),
                        "k": kind,
                    },
                ).scalar_one()
            )
        return 0


def _end(qt: Queuetopia, event_id: int, kind: str) -> None:
    """Record the run's end. When the database is down or the connection was cut,
    keep trying (for up to 60 s) with the end time taken now, so that a run is left
    open only by a process that died (the chaos checker relies on it); the database
    runs on this machine, so its clock and ours agree."""
    import datetime as dt

    ended = dt.datetime.now(dt.timezone.utc)
    deadline = time.monotonic() + 60
    while True:
        try:
            with qt.engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE qt_test_events SET ended_at = :e, kind = :k WHERE id = :i"),
                    {"i": event_id, "k": kind, "e": ended},
                )
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _heartbeat(qt: Queuetopia, event_id: int) -> None:
    with qt.engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE qt_test_events SET ended_at = {_clock(conn)} WHERE id = :i"), {"i": event_id}
        )


def _register(qt: Queuetopia) -> None:
    @qt.performer("work")
    def work(job: Job) -> Any:
        """params: sleep (s), fail_times (fail while attempts <= n), crash_times
        (kill own process while attempts <= n), exit_times (sys.exit(1) while attempts
        <= n), hang (ignore the soft time limit)."""
        params = job.params
        event = _record(qt, job, "started", True)
        try:
            if job.attempts <= params.get("crash_times", 0):
                os.kill(os.getpid(), signal.SIGKILL)
            if job.attempts <= params.get("exit_times", 0):
                sys.exit(1)
            if params.get("sleep"):
                if params.get("hang"):
                    deadline = time.monotonic() + params["sleep"]
                    while time.monotonic() < deadline:
                        with contextlib.suppress(JobTimeoutError):
                            time.sleep(0.05)
                            if params.get("heartbeat"):
                                # ended_at = last sign of life while hanging. The soft
                                # limit's SIGALRM is held off meanwhile: raised in the
                                # middle of the driver's read, it would leave the pooled
                                # connection half-read and the next heartbeat failing.
                                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                                try:
                                    _heartbeat(qt, event)
                                finally:
                                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
                else:
                    time.sleep(params["sleep"])
            if job.attempts <= params.get("fail_times", 0):
                raise RuntimeError(f"planned failure {job.attempts}")
        except BaseException:
            _end(qt, event, "failed")
            raise
        _end(qt, event, "succeeded")
        return {"attempt": job.attempts, "echo": params.get("echo")}

    @qt.performer("fast_retry", backoff=lambda job: 0.2)
    def fast_retry(job: Job) -> Any:
        return work(job)

    def on_failure(job: Job) -> None:
        """Records kind "hook" with the failed attempt; raises when params hook_raises,
        calls sys.exit(3) when params hook_exits."""
        _record(qt, job, "hook", True)
        if job.params.get("hook_raises"):
            raise RuntimeError(f"hook boom {job.attempts}")
        if job.params.get("hook_exits"):
            sys.exit(3)

    def backoff(job: Job) -> float:
        """params backoff (s); calls sys.exit(4) when params backoff_exits."""
        if job.params.get("backoff_exits"):
            sys.exit(4)
        return float(job.params["backoff"])

    @qt.performer("hooked", backoff=backoff, on_failure=on_failure)
    def hooked(job: Job) -> Any:
        """work, retried after params backoff seconds, with the on_failure hook above."""
        return work(job)


# --------------------------------------------------------------------------- fault knobs
# Used by tests/chaos: each knob is off unless its QT_TEST_* variable is set.


def _install_faults(app: Celery, qt: Queuetopia) -> None:
    """Install the fault-injection knobs read from the environment.

    * QT_TEST_PREFETCH_MULTIPLIER=n: Celery's worker_prefetch_multiplier (default here 1).
    * QT_TEST_ACKS_LATE=1, QT_TEST_VISIBILITY_TIMEOUT=s: ack after the task, and let
      Redis redeliver a message unacked for that long (duplicate delivery).
    * QT_TEST_TRANSPORT_OPTIONS='{"ack_emulation": false}': broker transport options.
    * QT_TEST_SEND_LOG=path: log every task message of the scope published (one line).
    * QT_TEST_DUPLICATE_SENDS=1: publish every perform message twice.
    * QT_TEST_PG_KILL="dispatch=0.1,start=0.1,finish=0.1": while the backend runs that
      call, terminate its own PostgreSQL backend before a statement with that
      probability (logged in qt_test_faults), until QT_TEST_PG_KILL_MAX kills are
      logged for the scope.
    * QT_TEST_NO_TIME_LIMIT=1: deliberately broken, perform messages sent without the
      hard time limit (shows what the paused-child test relies on).
    * QT_TEST_BREAK_FENCING=1: deliberately broken worker that runs a job even when
      its message's token is stale. Only for proving that the chaos checker sees it.
    """
    env = os.environ
    if env.get("QT_TEST_PREFETCH_MULTIPLIER"):
        # Celery's default is 4 (this app sets 1): a worker then holds more messages.
        app.conf.worker_prefetch_multiplier = int(env["QT_TEST_PREFETCH_MULTIPLIER"])
    if env.get("QT_TEST_SEND_LOG"):
        log_sends(env["QT_TEST_SEND_LOG"], qt.scope)
    if env.get("QT_TEST_ACKS_LATE") == "1":
        app.conf.task_acks_late = True
    if env.get("QT_TEST_VISIBILITY_TIMEOUT"):
        app.conf.broker_transport_options = {"visibility_timeout": float(env["QT_TEST_VISIBILITY_TIMEOUT"])}
    if env.get("QT_TEST_TRANSPORT_OPTIONS"):  # JSON, merged into broker_transport_options
        import json

        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            **json.loads(env["QT_TEST_TRANSPORT_OPTIONS"]),
        }
    if env.get("QT_TEST_DUPLICATE_SENDS") == "1":
        send = qt.send

        def send_twice(dispatches: Any) -> None:
            send(dispatches)
            send(dispatches)

        qt.send = send_twice  # type: ignore[method-assign]
    if env.get("QT_TEST_PG_KILL"):
        _install_pg_kill(qt, env["QT_TEST_PG_KILL"])
    if env.get("QT_TEST_NO_TIME_LIMIT") == "1":
        drop_time_limits(qt)
    if env.get("QT_TEST_BREAK_FENCING") == "1":
        store = qt.backend
        start = store.start

        def start_ignoring_token(queue: str, job_id: int, token: str, **kwargs: Any) -> Job | None:
            job = start(queue, job_id, token, **kwargs)
            return job if job is not None else store.get_job(job_id)

        store.start = start_ignoring_token  # type: ignore[method-assign]


def log_sends(path: str, scope: str) -> Callable[..., None]:
    """Append one line per task message of ``scope`` published by this process to
    ``path`` (the task's name), so that the chaos report can count messages per job.
    Returns the signal receiver (to disconnect it)."""
    prefix = f"queuetopia.{scope}."

    def receiver(sender: Any = None, **_: Any) -> None:
        name = str(sender)
        if name.startswith(prefix):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (name[len(prefix) :] + "\n").encode())
            finally:
                os.close(fd)

    signals.after_task_publish.connect(receiver, weak=False)
    return receiver


def drop_time_limits(qt: Queuetopia) -> None:
    """Deliberately broken: ``qt`` sends its perform messages without Celery's hard
    time limit. Only for showing that the paused-child test depends on it."""
    apply_async = qt.perform_task.apply_async

    def without_limit(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("time_limit", None)
        return apply_async(*args, **kwargs)

    qt.perform_task.apply_async = without_limit


FAULTS_DDL = """
CREATE TABLE IF NOT EXISTS qt_test_faults (
    id bigserial PRIMARY KEY,
    scope text NOT NULL,
    kind text NOT NULL,
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def _install_pg_kill(qt: Queuetopia, spec: str) -> None:
    import random
    import threading

    import psycopg

    rates = {name: float(rate) for name, rate in (part.split("=") for part in spec.split(","))}
    budget = int(os.environ.get("QT_TEST_PG_KILL_MAX", "1000000"))
    phase = threading.local()
    admin: dict[int, Any] = {}
    rngs: dict[int, random.Random] = {}
    url = qt.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def terminate(driver: Any) -> None:
        """Maybe terminate ``driver``'s backend (a psycopg connection about to run a
        statement) from a side connection, so that the statement fails."""
        name = getattr(phase, "name", None)
        rng = rngs.setdefault(os.getpid(), random.Random(os.getpid()))  # forked children differ
        if name is None or rng.random() >= rates.get(name, 0.0):
            return
        phase.name = None  # once per call
        killer = admin.get(os.getpid())
        if killer is None:
            killer = admin[os.getpid()] = psycopg.connect(url, autocommit=True)
        done = killer.execute("SELECT count(*) FROM qt_test_faults WHERE scope = %s", (qt.scope,)).fetchone()
        if done[0] >= budget:
            rates.clear()
            return
        pid = driver.info.backend_pid
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):
            if killer.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None:
                break
            time.sleep(0.01)
        killer.execute(
            "INSERT INTO qt_test_faults (scope, kind, pid) VALUES (%s, %s, %s)",
            (qt.scope, f"pg-kill-{name}", os.getpid()),
        )

    class KillingCursor(psycopg.Cursor[Any]):
        """Every statement, through SQLAlchemy or on the driver directly, may be hit."""

        def execute(self, *args: Any, **kwargs: Any) -> Any:
            terminate(self.connection)
            return super().execute(*args, **kwargs)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            terminate(self.connection)
            return super().executemany(*args, **kwargs)

    @sa.event.listens_for(qt.engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.cursor_factory = KillingCursor

    store = qt.backend
    # "finish" also covers the backend's combined calls (finish_and_start, ...);
    # "dispatch" is every call that takes leases (kick, kick_after_producers, scan,
    # fill_slots: one Store.dispatch before the backend split).
    prefixes = {"dispatch": ("kick", "scan", "fill_slots")}
    methods = [
        (attr, name)
        for name in list(rates)
        for prefix in prefixes.get(name, (name,))
        for attr in dir(store)
        if attr == prefix or (attr.startswith(prefix + "_") and callable(getattr(store, attr)))
    ]
    for attr, name in methods:
        method = getattr(store, attr)

        def wrapped(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            outer = getattr(phase, "name", None)
            phase.name = _name
            try:
                return _method(*args, **kwargs)
            finally:
                phase.name = outer

        setattr(store, attr, wrapped)


if os.environ.get("QT_TEST_SCOPE"):
    app, qt = build(
        os.environ["QT_TEST_SCOPE"],
        database_url=os.environ["QT_TEST_DATABASE_URL"],
        broker_url=os.environ["QT_TEST_BROKER_URL"],
        celery_queue=os.environ["QT_TEST_CELERY_QUEUE"],
        poll_interval=float(os.environ.get("QT_TEST_POLL", "0.5")),
        dispatch_grace=float(os.environ.get("QT_TEST_DISPATCH_GRACE", "20")),
        lease_margin=float(os.environ.get("QT_TEST_LEASE_MARGIN", "2")),
        max_concurrent_queues=int(os.environ["QT_TEST_MAX_CONCURRENT"])
        if os.environ.get("QT_TEST_MAX_CONCURRENT")
        else None,
        burst_jobs=int(os.environ.get("QT_TEST_BURST_JOBS", "50")),
        with_performers=os.environ.get("QT_TEST_NO_PERFORMERS") != "1",
        time_limit_grace=float(os.environ.get("QT_TEST_TIME_LIMIT_GRACE", "1")),
        application_name=os.environ.get("QT_TEST_APP_NAME") or None,
        cleanup_interval=float(os.environ["QT_TEST_CLEANUP_INTERVAL"])
        if os.environ.get("QT_TEST_CLEANUP_INTERVAL")
        else None,
    )
    _install_faults(app, qt)
    if os.environ.get("QT_TEST_EXTRA_SCOPE"):
        # A second scope on the same Celery app and Celery queue.
        extra_qt = Queuetopia(
            os.environ["QT_TEST_EXTRA_SCOPE"],
            app=app,
            database_url=os.environ["QT_TEST_DATABASE_URL"],
            poll_interval=float(os.environ.get("QT_TEST_POLL", "0.5")),
            celery_queue=os.environ["QT_TEST_CELERY_QUEUE"],
            dispatch_grace=float(os.environ.get("QT_TEST_DISPATCH_GRACE", "20")),
            lease_margin=float(os.environ.get("QT_TEST_LEASE_MARGIN", "2")),
            time_limit_grace=1,
        )
        _register(extra_qt)

    @signals.worker_ready.connect
    def _ready(**_: Any) -> None:
        path = os.environ.get("QT_TEST_READY_FILE")
        if path:
            Path(path).write_text(str(os.getpid()))

    @signals.beat_init.connect
    def _beat_ready(**_: Any) -> None:
        path = os.environ.get("QT_TEST_BEAT_READY_FILE")
        if path:
            Path(path).write_text(str(os.getpid()))
