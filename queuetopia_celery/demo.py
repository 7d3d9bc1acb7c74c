"""``queuetopia-celery demo``: see ordered, blocking queues work, with nothing to set up.

By default everything runs in this process: a SQLite file in a temporary directory, a
Celery app on the in-memory broker and a Celery worker (thread pool) in a thread. With
``--database-url`` (PostgreSQL) and ``--broker`` (Redis), the same demo runs against
those, with real ``celery worker`` subprocesses. This process plays beat (it runs the
scan every half second) and draws a live table of the queues.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .app import Queuetopia
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

_ENV_SCOPE = "QUEUETOPIA_DEMO_SCOPE"
_ENV_DATABASE = "QUEUETOPIA_DEMO_DATABASE_URL"
_ENV_BROKER = "QUEUETOPIA_DEMO_BROKER"


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
        if database_url is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="queuetopia-demo-"))
            database_url = f"sqlite:///{Path(directory) / 'demo.db'}"
        _, qt = build(scope, database_url=database_url, broker=broker or "memory://")
        stack.callback(qt.engine.dispose)
        qt.migrate()
        where = qt.engine.url.render_as_string(hide_password=True)
        if broker is None:
            console.print(
                f"[bold]queuetopia-celery demo[/] (scope {scope}): {where}, "
                "in-process Celery worker (threads)"
            )
            stack.enter_context(_thread_worker(qt))
        else:
            console.print(
                f"[bold]queuetopia-celery demo[/] (scope {scope}): {where}, broker {broker}, "
                "2 worker processes"
            )
            stack.enter_context(_worker_processes(qt, database_url, broker))
        total = sum(len(params) for _, params in PLAN)
        qt.create_jobs([{"queue": queue, "action": "step", "params": p} for queue, ps in PLAN for p in ps])
        finished = _watch(qt, total, console)
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


def _watch(qt: Queuetopia, total: int, console: Console) -> bool:
    """Play beat (a scan every half second) and redraw the table until every job is
    done. Returns False if the deadline passed first."""
    deadline = time.monotonic() + DEADLINE
    next_scan = 0.0
    with Live(_render(qt), console=console, refresh_per_second=8, transient=False) as live:
        while True:
            now = time.monotonic()
            if now >= next_scan:
                qt.scan()
                next_scan = now + qt.poll_interval
            finished = qt.store.count_jobs(state=JobState.DONE) == total
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
    for name in ("queue", "state", "done", "head job", "attempts", "detail"):
        table.add_column(name)
    for queue, params in PLAN:
        done = qt.store.count_jobs(queue=queue, state=JobState.DONE)
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
            f"#{head.sequence} {head.params.get('step')}" if head else "-",
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


@contextlib.contextmanager
def _worker_processes(qt: Queuetopia, database_url: str, broker: str) -> Iterator[None]:
    """Two real ``celery worker`` processes (prefork) of the demo app."""
    env = {**os.environ, _ENV_SCOPE: qt.scope, _ENV_DATABASE: database_url, _ENV_BROKER: broker}
    procs = []
    for n in range(2):
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
            f"demo{n}-{qt.scope}@%h",
            "--loglevel",
            "ERROR",
            "--without-mingle",
            "--without-gossip",
        ]
        procs.append(
            subprocess.Popen(
                args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        )
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def quiet_logs() -> None:
    """Keep expected failure warnings (the planned failures) out of the live table."""
    for name in ("queuetopia_celery", "celery", "kombu"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
