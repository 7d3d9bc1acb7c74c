"""The Celery side, and the only module of the engine that registers Celery tasks: the
four tasks of a scope, the beat entries that send the periodic ones, and the publishing
of perform messages. What the tasks do is :mod:`queuetopia_celery.worker`'s.

Four tasks per scope, all carrying only names, ids and tokens (JSON):

* ``queuetopia.<scope>.perform(queue, job_id, token)``: run a dispatched job, then the
  queue's next due jobs in the same task within a burst budget, then hand the queue on
  through the broker or release it.
* ``queuetopia.<scope>.scan()``: sent by beat every ``poll_interval``: recover expired
  leases (re-send the messages of unstarted ones), dispatch every queue whose head job
  is due.
* ``queuetopia.<scope>.kick(queues)``: dispatch these queues now (sent by producers
  whose transaction commits through a plain SQLAlchemy Connection).
* ``queuetopia.<scope>.cleanup()``: with ``cleanup_interval=``, purge done jobs past
  ``job_retention``; also sent once when beat starts.

The ``create`` task of ``send_task`` producers is :mod:`queuetopia_celery.create_task`'s.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from celery import signals as celery_signals

from .backends.base import Lease
from .worker import Runner, WorkerHost

logger = logging.getLogger(__name__)


class CeleryHost(WorkerHost, Protocol):
    """What the tasks need of the Queuetopia they serve (the facade is one)."""

    app: Any
    celery_queue: str | None
    poll_interval: float
    cleanup_interval: float | None
    disabled: bool

    def purge_jobs(self, *, older_than: float | dt.timedelta | None = None) -> int: ...


#: Shortest life of a beat message (scan, cleanup) in the broker: a worker whose clock
#: runs ahead of beat's by less than this never discards a fresh one.
MIN_PERIODIC_EXPIRY = 5.0


def periodic_expiry(interval: float) -> float:
    """Seconds a periodic (beat) message may wait in the broker before a worker discards
    it: its interval (a newer one follows), at least :data:`MIN_PERIODIC_EXPIRY`."""
    return max(interval, MIN_PERIODIC_EXPIRY)


class CeleryTasks:
    """The tasks of one scope on its Celery app, and their beat entries."""

    def __init__(self, qt: CeleryHost) -> None:
        self.qt = qt
        app = qt.app
        runner = Runner(qt)
        prefix = f"queuetopia.{qt.scope}"

        @app.task(name=f"{prefix}.perform", bind=True, ignore_result=True, typing=False)  # type: ignore[untyped-decorator]
        def perform(self: Any, queue: str, job_id: int, token: str) -> int:
            limit = self.request.timelimit[0] if self.request.timelimit else None
            return runner.perform(queue, job_id, token, hostname=self.request.hostname, time_limit=limit)

        @app.task(name=f"{prefix}.scan", ignore_result=True, typing=False)  # type: ignore[untyped-decorator]
        def scan() -> int:
            return runner.unless_schema_missing(runner.scan)

        @app.task(name=f"{prefix}.kick", ignore_result=True, typing=False)  # type: ignore[untyped-decorator]
        def kick(queues: list[str]) -> int:
            return runner.kick(queues)

        quiet_routine_tasks([f"{prefix}.scan", f"{prefix}.kick", f"{prefix}.cleanup"])
        self.perform: Any = perform
        self.scan: Any = scan
        self.kick: Any = kick
        if not qt.disabled:
            app.add_periodic_task(
                dt.timedelta(seconds=qt.poll_interval),
                scan.s().set(queue=qt.celery_queue) if qt.celery_queue else scan.s(),
                name=f"{prefix}.scan",
                # A scan waiting in the broker longer than this is useless (a newer one
                # follows): while no worker runs, old scans are discarded, not piled up.
                expires=periodic_expiry(qt.poll_interval),
            )
        self.cleanup: Any = self._register_cleanup(runner)
        self.runner = runner
        # Weakly held, as the beat receiver below.
        celery_signals.celeryd_after_setup.connect(self._check_schema_at_start)

    def _check_schema_at_start(self, sender: Any = None, instance: Any = None, **_: Any) -> None:
        """On ``celeryd_after_setup``, in the worker's main process once its logging is
        set up and before the pool forks: say once that the tables are missing. The
        prefork children inherit that it was said, so a worker says it once, not once
        per child."""
        if getattr(instance, "app", None) is not self.qt.app or self.qt.disabled:
            return
        try:
            self.runner.unless_schema_missing(self.runner.check_schema)
        except Exception:  # unreachable database and the like: the tasks will say it
            logger.debug("schema check at worker start failed", exc_info=True)

    def _register_cleanup(self, runner: Runner) -> Any:
        """The periodic cleanup task (only with ``cleanup_interval=``, not disabled)."""
        qt = self.qt
        if qt.cleanup_interval is None or qt.disabled:
            return None

        @qt.app.task(name=f"queuetopia.{qt.scope}.cleanup", ignore_result=True, typing=False)  # type: ignore[untyped-decorator]
        def cleanup() -> int:
            return runner.unless_schema_missing(qt.purge_jobs)

        qt.app.add_periodic_task(
            dt.timedelta(seconds=qt.cleanup_interval),
            cleanup.s().set(queue=qt.celery_queue) if qt.celery_queue else cleanup.s(),
            name=f"queuetopia.{qt.scope}.cleanup",
            expires=periodic_expiry(qt.cleanup_interval),
        )
        # Weakly held: the receiver goes with these tasks (held by their Queuetopia).
        celery_signals.beat_init.connect(self._cleanup_at_start)
        return cleanup

    def _cleanup_at_start(self, sender: Any = None, **_: Any) -> None:
        """On ``beat_init``: send one cleanup as beat starts, as Queuetopia cleans when
        its scheduler starts (an interval entry first fires one interval after start,
        so a beat restarted more often than ``cleanup_interval`` would never clean).
        Several beats each send one; the cleanup is idempotent."""
        qt = self.qt
        if getattr(sender, "app", None) is not qt.app or self.cleanup is None:
            return
        try:
            self.cleanup.apply_async(queue=qt.celery_queue)
        except Exception:
            logger.exception(
                "could not send the cleanup at beat start; it runs every cleanup_interval",
                extra={"scope": qt.scope},
            )


class _RoutineTasks(logging.Filter):
    """Celery logs three INFO lines for every task (beat's "Sending due task", the
    worker's "received" and "succeeded"): for a scan every poll_interval, noise that
    hides what an operator must act on. For the tasks named here, those lines are
    logged at DEBUG instead (dropped unless the logger is enabled for DEBUG). Failures
    keep Celery's levels; what a scan finds that matters (a lost attempt, a failed job)
    is logged by queuetopia itself."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._routine(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True

    def _routine(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict):
            return args.get("name") in self.names
        return isinstance(args, tuple) and any(arg in self.names for arg in args if isinstance(arg, str))


_ROUTINE = _RoutineTasks()
#: Celery's loggers of the per-task INFO lines (beat's send, the worker's receipt,
#: success, and discarding an expired message).
_CELERY_TASK_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace", "celery.worker.request")


def quiet_routine_tasks(names: Sequence[str]) -> None:
    """Log Celery's routine INFO lines about these tasks at DEBUG (see _RoutineTasks)."""
    _ROUTINE.names.update(names)
    for name in _CELERY_TASK_LOGGERS:
        celery_logger = logging.getLogger(name)
        if _ROUTINE not in celery_logger.filters:
            celery_logger.addFilter(_ROUTINE)


def publish(qt: CeleryHost, perform_task: Any, leases: Sequence[Lease]) -> None:
    """Send one perform message per lease, with the hard time limit set for the job."""
    if not leases:
        return
    extra = qt.burst_seconds + qt.time_limit_grace
    amqp = qt.app.amqp
    shown_max = min(amqp.argsrepr_maxsize, amqp.kwargsrepr_maxsize)
    with qt.app.producer_or_acquire() as producer:
        for lease in leases:
            args = (lease.queue, lease.job_id, lease.token)
            perform_task.apply_async(
                args=args,
                queue=qt.celery_queue,
                time_limit=lease.timeout + extra,
                producer=producer,
                **shown_arguments(args, shown_max),
            )


def shown_arguments(args: tuple[str, int, str], max_size: int) -> dict[str, str]:
    """The ``argsrepr`` and ``kwargsrepr`` options of ``apply_async`` (the arguments as
    logs and monitors show them) for a perform message, when Python's ``repr`` writes
    exactly what Celery's ``saferepr`` would (Celery's own work for every message, a
    twentieth of a publish): a queue name and token of printable ASCII without quote or
    backslash, well under Celery's ``max_size`` (``argsrepr_maxsize``). Otherwise none:
    Celery writes them."""
    queue, _, token = args
    for text in (queue, token):
        if not (text.isascii() and text.isprintable()) or "'" in text or "\\" in text:
            return {}
    shown = repr(args)
    if 2 * len(shown) > max_size:
        return {}
    return {"argsrepr": shown, "kwargsrepr": "{}"}
