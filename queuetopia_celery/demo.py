"""``queuetopia-celery demo``: see ordered, blocking queues work, with nothing to set up.

By default everything runs in this process: a SQLite file in a temporary directory, a
Celery app on the in-memory broker and a Celery worker (thread pool) in a thread. With
``--database-url`` (PostgreSQL) and ``--broker`` (Redis or AMQP), the same demo runs
against those, with real ``celery worker`` subprocesses whose output goes to a log file:
a worker that dies, or does not start, ends the demo with one line naming the cause.
This process plays beat (it runs the scan every half second) and draws a live table of
the queues. On a database and a broker of yours, the demo deletes what it created when
it ends (its scope's rows, its Celery queue and exchange), and says so.

Three queues, four jobs each. The second job of ``account-42`` fails twice before it
succeeds: its queue stays blocked behind it (retried after 2 s, then 3 s) while the
other queues go on. At the end the demo checks, from what the performers recorded,
that each queue ran its jobs one at a time, in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import schema
from .app import Queuetopia
from .errors import QueuetopiaError
from .jobs import Job, JobState, utcnow

#: The demo's queues: (queue, [params of each job]).
PLAN: list[tuple[str, list[dict[str, Any]]]] = [
    ("account-7", [{"step": "open"}, {"step": "deposit"}, {"step": "transfer"}, {"step": "close"}]),
    (
        "account-42",
        [{"step": "open"}, {"step": "charge", "fail_times": 2}, {"step": "refund"}, {"step": "close"}],
    ),
    ("mailbox-ada", [{"step": "welcome"}, {"step": "receipt"}, {"step": "newsletter"}, {"step": "bye"}]),
]
#: How long each job works, in seconds.
WORK_SECONDS = 0.4
#: The demo gives up after this many seconds.
DEADLINE = 90.0
#: A worker process must be ready within this many seconds.
WORKER_START_TIMEOUT = 60.0

_ENV_SCOPE = "QUEUETOPIA_DEMO_SCOPE"
_ENV_DATABASE = "QUEUETOPIA_DEMO_DATABASE_URL"
_ENV_BROKER = "QUEUETOPIA_DEMO_BROKER"


class DemoError(QueuetopiaError):
    """The demo cannot run: an unusable broker, a worker process that died or did not
    start. The message is one line naming the cause."""


def build(scope: str, *, database_url: str, broker: str) -> tuple[Celery, Queuetopia]:
    """The demo's Celery app and Queuetopia, with its one performer."""
    app = Celery(f"queuetopia-demo-{scope}", broker=broker)
    app.conf.update(
        task_default_queue=f"queuetopia-demo-{scope}",
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
    )
    if broker.startswith("memory://"):
        # The in-memory transport polls; its default (1 s) would pace every hand-off.
        app.conf.broker_transport_options = {"polling_interval": 0.02}
    qt = Queuetopia(
        scope,
        app=app,
        database_url=database_url,
        celery_queue=f"queuetopia-demo-{scope}",
        poll_interval=0.5,
        dispatch_grace=15,
        lease_margin=2,
        time_limit_grace=2,
    )

    @qt.performer("step")
    def step(job: Job) -> dict[str, Any]:
        started = time.time()
        time.sleep(WORK_SECONDS)
        if job.attempts <= job.params.get("fail_times", 0):
            raise RuntimeError(f"payment gateway timed out (attempt {job.attempts})")
        return {"started": started, "ended": time.time(), "pid": os.getpid()}

    return app, qt


# A worker subprocess imports this module with the demo's settings in its environment:
# ``celery -A queuetopia_celery.demo:worker_app worker``.
if os.environ.get(_ENV_SCOPE):
    worker_app, _worker_qt = build(
        os.environ[_ENV_SCOPE], database_url=os.environ[_ENV_DATABASE], broker=os.environ[_ENV_BROKER]
    )


# ---------------------------------------------------------------------------- running


@dataclasses.dataclass
class Summary:
    jobs: int
    attempts: int
    order_ok: dict[str, bool]
    seconds: float
    finished: bool

    @property
    def ok(self) -> bool:
        return self.finished and all(self.order_ok.values())


def run(
    *, database_url: str | None = None, broker: str | None = None, console: Console | None = None
) -> Summary:
    """Run the demo; returns its summary (``ok`` tells whether everything held)."""
    console = console or Console()
    began = time.monotonic()
    scope = f"demo-{uuid.uuid4().hex[:6]}"
    with contextlib.ExitStack() as stack:
        temporary = database_url is None
        if database_url is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="queuetopia-demo-"))
            database_url = f"sqlite:///{Path(directory) / 'demo.db'}"
        _, qt = build(scope, database_url=database_url, broker=broker or "memory://")
        stack.callback(qt.engine.dispose)
        qt.migrate()
        if not temporary or broker is not None:
            # Registered before the workers start, so it runs after they stopped.
            stack.callback(_clean_up, qt, console, rows=not temporary, celery_queue=broker is not None)
        where = qt.engine.url.render_as_string(hide_password=True)
        check: Callable[[], None] = _nothing
        if broker is None:
            console.print(
                f"[bold]queuetopia-celery demo[/] (scope {scope}): {where}, "
                "in-process Celery worker (threads)"
            )
            stack.enter_context(_thread_worker(qt))
        else:
            broker_shown = _check_broker(qt)
            console.print(
                f"[bold]queuetopia-celery demo[/] (scope {scope}): {where}, broker {broker_shown}, "
                "2 worker processes"
            )
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="queuetopia-demo-logs-")))
            check = stack.enter_context(_worker_processes(qt, database_url, broker, logs))
        total = sum(len(params) for _, params in PLAN)
        qt.create_jobs([{"queue": queue, "action": "step", "params": p} for queue, ps in PLAN for p in ps])
        finished = _watch(qt, total, console, check)
        jobs = qt.list_jobs()
        order_ok = {queue: _in_order([j for j in jobs if j.queue == queue]) for queue, _ in PLAN}
        summary = Summary(
            jobs=sum(1 for j in jobs if j.state is JobState.DONE),
            attempts=sum(j.attempts for j in jobs),
            order_ok=order_ok,
            seconds=time.monotonic() - began,
            finished=finished,
        )
        console.print()
        _print_summary(summary, total, console)
    return summary


def _nothing() -> None:
    pass


def _watch(qt: Queuetopia, total: int, console: Console, check: Callable[[], None] = _nothing) -> bool:
    """Play beat (a scan every half second) and redraw the table until every job is
    done. Returns False if the deadline passed first. ``check`` raises
    :class:`DemoError` when a worker process died."""
    deadline = time.monotonic() + DEADLINE
    next_scan = 0.0
    with Live(_render(qt), console=console, refresh_per_second=8, transient=False) as live:
        while True:
            check()
            now = time.monotonic()
            if now >= next_scan:
                qt.scan()
                next_scan = now + qt.poll_interval
            finished = qt.backend.count_jobs(state=JobState.DONE) == total
            live.update(_render(qt))
            if finished:
                return True
            if now > deadline:
                return False
            time.sleep(0.125)


def _render(qt: Queuetopia) -> Group:
    statuses = {row.queue: row for row in qt.queue_statuses()}
    now = utcnow()
    table = Table(title="queues", title_justify="left", expand=False)
    for name in ("queue", "state", "done", "head job (seq)", "attempts", "detail"):
        table.add_column(name)
    for queue, params in PLAN:
        done = qt.backend.count_jobs(queue=queue, state=JobState.DONE)
        row = statuses.get(queue)
        head = row.head if row else None
        if head is None:
            state, style, detail = "done", "green", ""
        elif head.state is JobState.RUNNING:
            state, style = "running", "cyan"
            detail = (
                f"{head.params.get('step')} in worker process {(head.attempted_by or '').rsplit('/')[-1]}"
            )
        elif row is not None and row.blocked:
            state, style = "blocked", "bold red"
            wait = (head.due_at - now).total_seconds()
            retry = f"next retry in {wait:.0f} s" if wait > 0 else "retry due now"
            detail = f"{row.error}; {retry}"
        else:
            state, style, detail = "waiting", "yellow", "next job due, waiting for a worker"
        table.add_row(
            queue,
            Text(state, style=style),
            f"{done}/{len(params)}",
            f"#{head.id} (seq {head.sequence}) {head.params.get('step')}" if head else "-",
            f"{head.attempts}/{head.max_attempts}" if head else "-",
            detail,
        )
    return Group(table)


def _in_order(jobs: list[Job]) -> bool:
    """Each job of the queue started after the previous one ended, in sequence order."""
    jobs = sorted(jobs, key=lambda job: job.sequence)
    results = [job.result for job in jobs]
    if not jobs or any(not isinstance(r, dict) for r in results):
        return False
    return all(later["started"] >= earlier["ended"] for earlier, later in itertools.pairwise(results))


def _print_summary(summary: Summary, total: int, console: Console) -> None:
    if not summary.finished:
        console.print(f"[bold red]gave up after {DEADLINE:.0f} s[/]: {summary.jobs}/{total} jobs done")
    console.print(
        f"[bold]{summary.jobs}/{total} jobs run[/] in {summary.attempts} attempts, "
        f"wall time {summary.seconds:.1f} s"
    )
    for queue, ok in summary.order_ok.items():
        mark = "[green]ok[/]" if ok else "[red]NOT in order[/]"
        console.print(f"  {queue}: one job at a time, in creation order: {mark}")


@contextlib.contextmanager
def _thread_worker(qt: Queuetopia) -> Iterator[None]:
    """A Celery worker (thread pool) running in a thread of this process."""
    from celery.worker import state

    worker = qt.app.WorkController(
        pool_cls="threads",
        concurrency=4,
        queues=[qt.celery_queue],
        hostname=f"demo-{uuid.uuid4().hex[:4]}@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="ERROR",
    )
    thread = threading.Thread(target=worker.start, daemon=True, name="celery-worker")
    thread.start()
    try:
        yield
    finally:
        state.should_terminate = 0
        thread.join(15)
        state.should_terminate = None


def _check_broker(qt: Queuetopia) -> str:
    """Connect to the broker once (this also imports its transport); a broker that
    cannot be used is a :class:`DemoError` at once, not a demo waiting for workers.
    Returns the broker's URL with its password masked."""
    shown = str(maybe_sanitize_url(qt.app.conf.broker_url))
    with qt.app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        except Exception as exc:
            raise DemoError(f"cannot use the broker {shown}: {_one_line(exc)}") from None
    return shown


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if type(exc).__name__ == "OperationalError" and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclasses.dataclass
class _Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def failure(self) -> str | None:
        """Why this worker is gone (one line), or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        if code < 0:
            return f"demo worker {self.name} was killed by signal {-code}"
        return f"demo worker {self.name} exited with status {code}" + _cause(self.output())


def _cause(output: str) -> str:
    """The last error line of a worker's output (a traceback's last line, a fatal
    message), as ``: <line>``; empty when there is none."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line) or "ERROR" in line or "CRITICAL" in line:
            return f": {line}"
    return f": {lines[-1]}" if lines else ""


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


@contextlib.contextmanager
def _worker_processes(
    qt: Queuetopia, database_url: str, broker: str, logs: Path
) -> Iterator[Callable[[], None]]:
    """Two real ``celery worker`` processes (prefork) of the demo app, their output in
    ``logs``. Waits until both are ready; yields a check that raises
    :class:`DemoError` when one of them is gone."""
    env = {**os.environ, _ENV_SCOPE: qt.scope, _ENV_DATABASE: database_url, _ENV_BROKER: broker}
    workers: list[_Worker] = []

    def check() -> None:
        for worker in workers:
            failure = worker.failure()
            if failure:
                raise DemoError(failure)

    try:
        for n in range(2):
            name = f"demo{n}-{qt.scope}"
            args = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "queuetopia_celery.demo:worker_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-Q",
                str(qt.celery_queue),
                "-n",
                f"{name}@%h",
                "--loglevel",
                "INFO",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ]
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            workers.append(_Worker(name, proc, log))
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not all(" ready." in worker.output() for worker in workers):
            check()
            if time.monotonic() > deadline:
                late = next(w for w in workers if " ready." not in w.output())
                raise DemoError(
                    f"demo worker {late.name} was not ready after {WORKER_START_TIMEOUT:.0f} s"
                    + _cause(late.output())
                )
            time.sleep(0.1)
        yield check
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.proc.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(5)


def _clean_up(qt: Queuetopia, console: Console, *, rows: bool, celery_queue: bool) -> None:
    """Delete what the demo created on a database and a broker that outlive it: its
    scope's rows, its Celery queue (with its exchange). Says what it did, or what was
    left where."""
    done: list[str] = []
    left: list[str] = []
    if rows:
        try:
            with qt.engine.begin() as conn:
                for table in (schema.leases, schema.queues, schema.jobs):
                    conn.execute(sa.delete(table).where(table.c.scope == qt.scope))
            done.append(f"the jobs of scope {qt.scope!r}")
        except Exception as exc:
            left.append(f"the rows of scope {qt.scope!r} in its database ({_one_line(exc)})")
    if celery_queue:
        try:
            with qt.app.connection_for_write() as conn:
                # Declared first: a channel deletes only the bindings it knows.
                queue = qt.app.amqp.queues[qt.celery_queue](conn.default_channel)
                queue.declare()
                queue.delete()
                if queue.exchange.name:
                    queue.exchange.delete()
            done.append(f"the Celery queue {qt.celery_queue!r}")
        except Exception as exc:
            left.append(f"the Celery queue {qt.celery_queue!r} on the broker ({_one_line(exc)})")
    if done:
        console.print(f"cleaned up: {' and '.join(done)} deleted")
    if left:
        console.print(f"[yellow]left behind:[/] {'; '.join(left)}")


def quiet_logs() -> None:
    """Keep expected failure warnings (the planned failures) out of the live table."""
    for name in ("queuetopia_celery", "celery", "kombu"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
