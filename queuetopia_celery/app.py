"""The :class:`Queuetopia`: one scope of persistent, ordered, blocking queues on a
Celery app."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import migrate as _migrate
from . import tracing
from .backends import (
    Backend,
    Executor,
    Lease,
    configure_mysql,
    configure_sqlite,
    open_backend,
    ping_when_idle,
)
from .backends.pgbouncer import driver_options
from .celery_defaults import apply_celery_defaults
from .create_task import register_create_task
from .drain import drain as _drain
from .errors import ConfigurationError, InvalidJobError, UnknownActionError
from .explain import QueueExplanation
from .jobs import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_TIMEOUT,
    ON_EXHAUSTED_SKIP,
    BulkResult,
    DrainResult,
    Job,
    JobState,
    NewJob,
    Page,
    QueueStatus,
    job_arguments,
    new_job,
    validate_duration,
    validate_name,
    validate_on_exhausted,
)
from .operations import Operator
from .ordered_task import TaskDecorator, wait_for_job
from .performer import BackoffFn, FailureFn, PerformerProtocol, PerformFn, Registry
from .tasks import CeleryTasks, publish
from .wakeup import WakeUp
from .worker import Runner

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=PerformFn)

#: How long done jobs are kept by the periodic cleanup (Queuetopia's default: 7 days).
DEFAULT_JOB_RETENTION = 7 * 24 * 3600.0


#: The databases and drivers queuetopia-celery runs on, as said in URL errors.
SUPPORTED_DATABASES = (
    "supported: PostgreSQL with psycopg 3 (postgresql+psycopg://user@host/dbname, or postgresql://), "
    "MariaDB with PyMySQL (mysql+pymysql://user@host/dbname, or mysql:// or mariadb://) "
    "and SQLite (sqlite:///path/to/jobs.db)"
)

#: A pooled connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE = 1.0


def make_engine(database_url: str, **options: Any) -> Engine:
    """An engine for ``database_url``; ``postgresql://`` means psycopg 3. Any other
    database or driver raises :class:`~queuetopia_celery.ConfigurationError` naming the
    supported ones.

    On PostgreSQL a pooled connection is checked with a ping before use when it has been
    idle for more than :data:`PING_AFTER_IDLE` seconds (a dead one is replaced), so a
    restarted server or a terminated backend is not noticed by a job; one used within
    that time is handed out without a round trip. ``pool_pre_ping=True`` pings every
    time instead.

    Behind PgBouncer in transaction pooling mode (before 1.22, or without its
    ``max_prepared_statements``), add ``?prepare_threshold=none`` to a PostgreSQL URL:
    psycopg then never prepares statements on the server (see docs/scaling.md).
    """
    try:
        url = sa.engine.make_url(database_url)
    except (sa.exc.ArgumentError, ValueError):
        # Never echo the text: it may hold a password.
        raise ConfigurationError(f"the database URL cannot be parsed; {SUPPORTED_DATABASES}") from None
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        url = url.set(drivername="postgresql+psycopg")
        backend = "postgresql"
        url, driver_args = driver_options(url)
        if driver_args:
            options = {**options, "connect_args": {**driver_args, **options.get("connect_args", {})}}
    elif backend in ("mysql", "mariadb") and driver in ("", "pymysql"):
        # MariaDB: PyMySQL, and READ COMMITTED (see the README's MySQL section).
        url = url.set(drivername=f"{backend}+pymysql")
        options.setdefault("isolation_level", "READ COMMITTED")
    elif backend != "sqlite" or driver not in ("", "pysqlite"):
        raise ConfigurationError(f"unsupported database URL {url.drivername}://...; {SUPPORTED_DATABASES}")
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared by workers: use a file, sqlite:///jobs.db"
        )
    try:
        engine = sa.create_engine(url, **options)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigurationError(f"cannot load the database driver ({exc}); {SUPPORTED_DATABASES}") from None
    if backend == "sqlite":
        configure_sqlite(engine)
    elif backend in ("mysql", "mariadb"):
        configure_mysql(engine)
    if backend != "sqlite" and "pool_pre_ping" not in options:
        ping_when_idle(engine, PING_AFTER_IDLE)
    return engine


class Queuetopia:
    """A scope of named, persistent, blocking FIFO queues run by Celery workers.

    Builds its tables' access on ``database_url`` (or ``engine``) and registers four
    tasks (``queuetopia.<scope>.perform``, ``.scan``, ``.kick``, ``.create``) and one beat entry on
    ``app``. All options are keyword-only; the defaults work.
    """

    def __init__(
        self,
        scope: str,
        *,
        app: Any,
        database_url: str | None = None,
        engine: Engine | None = None,
        poll_interval: float | dt.timedelta = 60,
        max_concurrent_queues: int | None = None,
        performer: PerformerProtocol | None = None,
        celery_queue: str | None = None,
        dispatch_grace: float | dt.timedelta = 120,
        resend_after: float | dt.timedelta = 5,
        time_limit_grace: float | dt.timedelta = 5,
        lease_margin: float | dt.timedelta = 10,
        burst_jobs: int = 50,
        burst_seconds: float | dt.timedelta = 0.25,
        scan_limit: int = 1000,
        disabled: bool = False,
        on_exhausted: str = ON_EXHAUSTED_SKIP,
        cleanup_interval: float | dt.timedelta | None = None,
        job_retention: float | dt.timedelta = DEFAULT_JOB_RETENTION,
        check_actions: bool = True,
    ) -> None:
        try:
            self.scope = validate_name("scope", scope)
            self.poll_interval = validate_duration("poll_interval", poll_interval, allow_zero=False)
            self.dispatch_grace = validate_duration("dispatch_grace", dispatch_grace, allow_zero=False)
            self.resend_after = validate_duration("resend_after", resend_after, allow_zero=False)
            self.time_limit_grace = validate_duration("time_limit_grace", time_limit_grace, allow_zero=True)
            self.lease_margin = validate_duration("lease_margin", lease_margin, allow_zero=True)
            self.burst_seconds = validate_duration("burst_seconds", burst_seconds, allow_zero=True)
            self.on_exhausted = validate_on_exhausted(on_exhausted)
            self.job_retention = validate_duration("job_retention", job_retention, allow_zero=False)
            self.cleanup_interval = (
                None
                if cleanup_interval is None
                else validate_duration("cleanup_interval", cleanup_interval, allow_zero=False)
            )
        except InvalidJobError as exc:
            raise ConfigurationError(str(exc)) from None
        if (database_url is None) == (engine is None):
            raise ConfigurationError("give exactly one of database_url= and engine=")
        if max_concurrent_queues is not None and (
            isinstance(max_concurrent_queues, bool)
            or not isinstance(max_concurrent_queues, int)
            or max_concurrent_queues < 1
        ):
            raise ConfigurationError("max_concurrent_queues must be None or an int >= 1")
        for name, value in (("burst_jobs", burst_jobs), ("scan_limit", scan_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an int >= 1")
        if app is None:
            raise ConfigurationError("app= must be a Celery app")
        scopes: set[str] = app.__dict__.setdefault("_queuetopia_scopes", set())
        if scope in scopes:
            raise ConfigurationError(
                f"a Queuetopia with scope {scope!r} is already registered on this Celery app"
            )
        scopes.add(scope)
        self.app = app
        apply_celery_defaults(app)
        self.engine = engine if engine is not None else make_engine(str(database_url))
        self.backend: Backend = open_backend(self.engine, self.scope, resend_after=self.resend_after)
        self.registry = Registry(self.scope, performer)
        self.max_concurrent_queues = max_concurrent_queues
        self.celery_queue = celery_queue
        self.burst_jobs = burst_jobs
        self.scan_limit = scan_limit
        self.disabled = disabled
        self.check_actions = bool(check_actions)
        #: The wake-up policy: which leases to take when, sent through :meth:`send`.
        self.wakeup = WakeUp(
            self.backend,
            grace=self.dispatch_grace,
            scan_limit=self.scan_limit,
            max_concurrent=self.max_concurrent_queues,
            send=self.send,
        )
        self.celery_tasks = CeleryTasks(self)
        self.perform_task = self.celery_tasks.perform
        self.scan_task = self.celery_tasks.scan
        self.kick_task = self.celery_tasks.kick
        self.cleanup_task = self.celery_tasks.cleanup
        self.create_task = register_create_task(self)  # send_task path: see create_task.py
        #: The operator's reads and writes (operations.py), behind the methods below.
        self.operator = Operator(self)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<Queuetopia scope={self.scope!r} database={url!r}>"

    # ------------------------------------------------------------------ performers

    def performer(
        self, action: str, *, backoff: BackoffFn | None = None, on_failure: FailureFn | None = None
    ) -> Callable[[F], F]:
        """Register the decorated function as the performer of ``action``.

        ``backoff(job) -> seconds`` and ``on_failure(job)`` (called after each failed
        attempt) are optional hooks, as on :class:`~queuetopia_celery.Performer`.
        """

        def decorate(fn: F) -> F:
            self.registry.register(action, fn, backoff=backoff, on_failure=on_failure)
            return fn

        return decorate

    @property
    def task(self) -> TaskDecorator:
        """``@qt.task(queue="account-{account_id}", ...)``: the decorated function becomes
        an ordered task, called like a Celery task (``delay``, ``apply_async``); see
        :class:`~queuetopia_celery.ordered_task.TaskDecorator`."""
        return TaskDecorator(self)

    def wait(self, job: Job | int, *, timeout: float = 60.0) -> Job:
        """Wait until ``job`` is done, exhausted, aborted or held and return it: for
        tests and scripts (see :func:`~queuetopia_celery.ordered_task.wait_for_job`)."""
        return wait_for_job(self, job, timeout=timeout)

    # ------------------------------------------------------------------ schema

    def migrate(self) -> None:
        """Create or upgrade the tables (idempotent; safe to run from several processes)."""
        _migrate.upgrade(self.engine)

    # ------------------------------------------------------------------ creating jobs

    def create_job(
        self,
        queue: str,
        action: str,
        params: Any = None,
        *,
        scheduled_at: dt.datetime | None = None,
        timeout: float | dt.timedelta = DEFAULT_TIMEOUT,
        max_backoff: float | dt.timedelta = DEFAULT_MAX_BACKOFF,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_exhausted: str | None = None,
        connection: Executor | None = None,
        unique_key: str | None = None,
    ) -> Job:
        """Create a job at the end of ``queue``; the queue exists from its first job.

        ``params`` is any JSON value (Queuetopia takes a map only); None is stored as ``{}``.

        With ``connection`` (a SQLAlchemy Connection or Session) the job joins the
        caller's transaction: it commits or rolls back with it, and workers are woken
        only after the commit. Raises :class:`~queuetopia_celery.InvalidJobError` on bad
        input, writing nothing; :class:`~queuetopia_celery.UnknownActionError` (one of
        them) when no registered performer handles ``action`` (see ``check_actions``).

        With ``unique_key`` (at most 255 characters): while an open job (pending,
        running, retrying or held: not done, exhausted nor aborted) of this scope has
        the same key, in any queue, no job is created and that job is returned
        instead. The database enforces it (a partial unique index), so concurrent
        producers create one job between them.
        """
        spec = self.job_spec(
            queue,
            action,
            params,
            scheduled_at=scheduled_at,
            timeout=timeout,
            max_backoff=max_backoff,
            max_attempts=max_attempts,
            on_exhausted=on_exhausted,
            unique_key=unique_key,
        )
        return self.create_jobs([spec], connection=connection)[0]

    def job_spec(
        self,
        queue: str,
        action: str,
        params: Any = None,
        *,
        scheduled_at: dt.datetime | None = None,
        timeout: float | dt.timedelta = DEFAULT_TIMEOUT,
        max_backoff: float | dt.timedelta = DEFAULT_MAX_BACKOFF,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_exhausted: str | None = None,
        unique_key: str | None = None,
    ) -> NewJob:
        """The job :meth:`create_job` would create with these arguments, validated and
        with this Queuetopia's defaults, not written: for doors that write jobs their
        own way (:class:`~queuetopia_celery.aio.AsyncQueuetopia`) and then call
        :meth:`wake_after_commit`. Raises :class:`~queuetopia_celery.InvalidJobError`."""
        return new_job(
            queue,
            action,
            {} if params is None else params,
            scheduled_at=scheduled_at,
            timeout=timeout,
            max_backoff=max_backoff,
            max_attempts=max_attempts,
            on_exhausted=self.on_exhausted if on_exhausted is None else on_exhausted,
            unique_key=unique_key,
        )

    def build_specs(self, jobs: Iterable[NewJob | dict[str, Any]]) -> list[NewJob]:
        """The items of :meth:`create_jobs` (NewJobs, or dicts of :meth:`create_job`'s
        arguments) as validated NewJobs, not written: raises
        :class:`~queuetopia_celery.InvalidJobError` on the first bad one, and
        :class:`~queuetopia_celery.UnknownActionError` for an action no performer
        handles, when this Queuetopia knows its performers (some function performers
        and no class performer; not with ``check_actions=False``): such a job would
        block its queue for all its attempts."""
        specs = [item if isinstance(item, NewJob) else self.job_spec(**job_arguments(item)) for item in jobs]
        known = self.registry.actions
        if self.check_actions and known and self.registry.default is None:
            handled = set(known)
            for spec in specs:
                if spec.action not in handled:
                    raise UnknownActionError(self.scope, spec.action, known)
        return specs

    @overload
    def create_jobs(
        self,
        jobs: Iterable[NewJob | dict[str, Any]],
        *,
        connection: Executor | None = None,
        returning: Literal["jobs"] = "jobs",
    ) -> list[Job]: ...

    @overload
    def create_jobs(
        self,
        jobs: Iterable[NewJob | dict[str, Any]],
        *,
        connection: Executor | None = None,
        returning: Literal["ids"],
    ) -> list[int]: ...

    @overload
    def create_jobs(
        self, jobs: Iterable[NewJob | dict[str, Any]], *, connection: Executor | None = None, returning: None
    ) -> None: ...

    # mypy cannot match a ParamSpec-typed decorator's result with the overloads.
    @tracing.traced_create  # type: ignore[misc]
    def create_jobs(
        self,
        jobs: Iterable[NewJob | dict[str, Any]],
        *,
        connection: Executor | None = None,
        returning: Literal["jobs", "ids"] | None = "jobs",
    ) -> list[Job] | list[int] | None:
        """Create many jobs in one transaction; each queue is woken once.

        Each item is a :class:`~queuetopia_celery.jobs.NewJob` or a dict of
        ``create_job``'s arguments (``queue``, ``action``, ``params``, options). If one
        item is invalid, nothing is written.

        Returns the jobs, in the order given. ``returning="ids"`` returns their ids
        only and ``returning=None`` nothing: the jobs are then not read back (on
        PostgreSQL they are written by COPY), the fast path for large batches.
        """
        if returning not in ("jobs", "ids", None):
            raise InvalidJobError("returning", f"must be 'jobs', 'ids' or None, got {returning!r}")
        specs = self.build_specs(jobs)
        if not specs:
            return None if returning is None else []
        specs = tracing.stamp(specs)  # the caller's trace, continued when the jobs run
        queues = list(dict.fromkeys(spec.queue for spec in specs))
        if connection is not None:
            return self._write_jobs(specs, queues, connection, returning)
        with self._new_jobs_connection(queues) as default:
            return self._write_jobs(specs, queues, default, returning)

    def _new_jobs_connection(
        self, queues: Sequence[str]
    ) -> contextlib.AbstractContextManager[Executor | None]:
        """The connection new jobs are written on when the caller gives none: None here
        (this Queuetopia's own transaction, committed before the call returns). A door
        on a framework's database gives the framework's connection instead, and wakes
        ``queues`` from the framework's after-commit hook (see contrib.django)."""
        return contextlib.nullcontext()

    def _write_jobs(
        self,
        specs: list[NewJob],
        queues: Sequence[str],
        connection: Executor | None,
        returning: Literal["jobs", "ids"] | None,
    ) -> list[Job] | list[int] | None:
        # Without a caller's transaction the insert itself takes the leases of new and
        # idle queues, unless a concurrency limit (counted under a lock by dispatch) or
        # disabled=True says otherwise.
        own_leases = connection is None and not self.disabled and self.max_concurrent_queues is None
        if returning != "jobs":
            inserted = self.backend.insert_jobs(
                specs, connection=connection, grace=self.dispatch_grace if own_leases else None
            )
            self._wake_created(queues, inserted.leases, connection)
            return inserted.ids if returning == "ids" else None
        # One connection for the insert and the kick that may follow: one pool checkout.
        with self.backend.pinned() if connection is None else contextlib.nullcontext():
            if own_leases:
                created, taken = self.backend.create_jobs_taking_leases(specs, grace=self.dispatch_grace)
            else:
                created, taken = self.backend.create_jobs(specs, connection=connection), []
            self._wake_created(queues, taken, connection)
        return created

    def _wake_created(
        self, queues: Sequence[str], taken: Sequence[Lease], connection: Executor | None
    ) -> None:
        """Wake the queues of jobs just created: in their own transaction (committed),
        send the leases taken and kick the other queues now; in the caller's, once it
        commits."""
        if self.disabled:
            return
        if connection is None:
            self._kick(queues, committed=True, taken=taken)
        else:
            self.backend.on_commit(
                connection, f"queuetopia_kicks:{self.scope}", queues, self.wake_after_commit
            )

    def wake_after_commit(self, queues: Iterable[str], committed: bool = True) -> None:
        """Wake ``queues`` once jobs created in them (or made due) are committed: for a
        door that commits the jobs itself (a framework's transaction, an asyncio
        connection) and then calls this from its after-commit hook.
        ``committed=False`` says the caller runs at the commit but before it is
        visible (a SQLAlchemy Connection's commit event): a worker is then asked to wake
        them, and waits for the commit. Never raises: a wake-up that cannot be sent is
        logged, and the next scan starts the jobs."""
        self._kick(sorted(set(queues)), committed=committed)

    def _kick(self, queues: Sequence[str], *, committed: bool, taken: Sequence[Lease] = ()) -> None:
        """Wake the given queues: dispatch them now (after a commit), or ask a worker
        to, once the caller's transaction has committed. ``taken``: leases already
        taken for some of them, to send."""
        if self.disabled or not queues:
            return
        try:
            if committed:
                self.send(taken)
                held = {lease.queue for lease in taken}
                rest = [queue for queue in queues if queue not in held]
                if rest:
                    self.wakeup.kick(rest)
            else:
                self.kick_task.apply_async(args=(list(queues),), queue=self.celery_queue)
        except Exception:
            # The jobs are committed; the next scan will start them.
            logger.exception(
                "could not wake queues %s; the next scan will", list(queues), extra={"scope": self.scope}
            )

    def send(self, leases: Sequence[Lease]) -> None:
        """Publish one perform message per lease taken. If publishing fails (the broker
        is down), the leases are given back before the error propagates, so that the
        next scan sends them again (a message that did go out finds its token gone and
        is dropped)."""
        try:
            publish(self, self.perform_task, leases)
        except Exception:
            try:
                self.backend.release_unsent(leases)
            except Exception:
                logger.warning(
                    "could not give back the leases of queues %s either: they are sent again "
                    "when they expire (dispatch_grace)",
                    [lease.queue for lease in leases],
                    exc_info=True,
                    extra={"scope": self.scope},
                )
            raise

    # ------------------------------------------------------------------ reading jobs

    def get_job(self, job_id: int) -> Job | None:
        return self.backend.get_job(job_id)

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        """Jobs of this scope, newest first (by creation across queues, by sequence
        within a queue), filtered by queue, action, state."""
        return self.operator.list_jobs(queue=queue, action=action, state=state, limit=limit)

    def paginate_jobs(
        self,
        page_size: int,
        page_number: int,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | None = None,
    ) -> Page:
        """One page of :meth:`list_jobs` (pages count from 1) with the total count."""
        return self.operator.paginate_jobs(page_size, page_number, queue=queue, action=action, state=state)

    # ------------------------------------------------------------------ running

    def scan(self) -> int:
        """Run one scan here, now (what beat triggers every ``poll_interval``)."""
        return int(self.perform_runner.scan())

    @property
    def perform_runner(self) -> Runner:
        return Runner(self)

    def drain(self, queue: str | None = None, *, with_scheduled: bool = False) -> DrainResult:
        """Run jobs now, in this process, without Celery workers: for tests.

        Goes through the same steps as a worker (lease, token-checked start, outcome,
        hand-on), so queue order, blocking and retries behave as in production: a job
        that fails blocks its queue until its retry is due. Runs the due jobs of every
        queue (or of ``queue``) until none is due. With ``with_scheduled=True``, jobs
        scheduled later and retries waiting for their backoff are run too: the clock is
        moved forward for them (their ``scheduled_at`` and retry times are shifted back
        by the same amount, keeping each queue's order), until every job succeeded,
        exhausted or is held. Unstarted leases taken by kicks are released first.
        """
        return _drain(self, queue, with_scheduled=with_scheduled)

    # ------------------------------------------------------------------ operator
    # Tools for the person on call and for tests, in operations.py: status, retry,
    # abort, pause, explain, purge.

    def queue_statuses(self, *, queue: str | None = None) -> list[QueueStatus]:
        """One row per queue with jobs in it (or a lease): pending count, head job,
        lease holder, oldest pending job. Blocked queues come first."""
        return self.operator.queue_statuses(queue=queue)

    def blocked_queues(self) -> list[QueueStatus]:
        """Queues whose head job is failing (waiting for a retry, or being retried) or
        held, longest blocked first: ``status.error`` and ``status.blocked_since`` say
        why and since when. For alerts and dashboards."""
        return self.operator.queue_statuses(blocked_only=True)

    def retry_job(self, job_id: int, *, force: bool = False) -> Job:
        """Make a retrying, held, exhausted or scheduled job due now, and wake its
        queue. Raises :class:`~queuetopia_celery.JobNotFoundError` (no such job in
        this scope) or :class:`~queuetopia_celery.JobStateError` (running, done,
        aborted; or exhausted while a later job of its queue has already run, so that
        it would run out of order: ``force=True`` retries it anyway)."""
        return self.operator.retry_job(job_id, force=force)

    def abort_job(self, job_id: int, reason: str) -> Job:
        """Take a job out of its queue for good so that the queue moves on; the job is
        kept with status ``aborted``, the reason and the time. A running job cannot be
        aborted (its queue must not run two jobs at once): abort it once its attempt
        ended. Raises :class:`~queuetopia_celery.JobNotFoundError` or
        :class:`~queuetopia_celery.JobStateError`."""
        return self.operator.abort_job(job_id, reason)

    def pause_queue(self, queue: str) -> bool:
        """Pause ``queue``: its running job (if any) finishes, and no other job of it
        starts (scan, kick, hand-on and start all check) until :meth:`resume_queue`.
        Nothing is aborted; jobs can still be created in it. Returns False when the
        queue was already paused (nothing changed). Raises
        :class:`~queuetopia_celery.QueueNotFoundError` for a queue with no job ever."""
        return self.operator.pause_queue(queue)

    def resume_queue(self, queue: str) -> bool:
        """Resume a paused queue and wake it at once. Returns False when it was not
        paused. Raises :class:`~queuetopia_celery.QueueNotFoundError`."""
        return self.operator.resume_queue(queue)

    def retry_jobs(
        self,
        *,
        queue: str | None = None,
        action: str | None = None,
        state: JobState | str | Sequence[JobState | str] | None = None,
        force: bool = False,
        all: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        """:meth:`retry_job` for every failed job of ``queue`` and/or ``action``:
        exhausted, held and retrying ones (or only ``state``), in one transaction.
        An exhausted job whose queue has since run a later job would run out of order:
        skipped unless ``force`` (``result.skipped["moved_on"]``), as is one whose
        unique key another open job holds now. With neither ``queue`` nor ``action``
        the whole scope is meant: refused unless ``all=True``. ``dry_run`` counts
        without changing anything. Wakes the queues retried."""
        return self.operator.retry_jobs(
            queue=queue, action=action, state=state, force=force, everything=all, dry_run=dry_run
        )

    def abort_jobs(
        self,
        *,
        reason: str,
        queue: str | None = None,
        action: str | None = None,
        all: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        """:meth:`abort_job` for every pending job (waiting, scheduled, retrying,
        held) of ``queue`` and/or ``action``, in one statement; running jobs are
        skipped (``result.skipped["running"]``). With neither ``queue`` nor ``action``
        refused unless ``all=True``. ``dry_run`` counts without changing anything."""
        return self.operator.abort_jobs(
            reason=reason, queue=queue, action=action, everything=all, dry_run=dry_run
        )

    def explain_queue(self, queue: str) -> QueueExplanation:
        """Why ``queue``'s head job is (not) running now: ``summary`` in one sentence,
        ``details`` after it, ``reason`` a stable code (see
        :data:`queuetopia_celery.explain.REASONS`). Uses this process's registry to
        tell whether a performer exists for the head's action."""
        return self.operator.explain_queue(queue)

    def purge_jobs(self, *, older_than: float | dt.timedelta | None = None) -> int:
        """Delete done jobs that finished more than ``older_than`` ago (default
        ``job_retention``). Exhausted and aborted jobs are kept. Returns the count."""
        return self.operator.purge_jobs(older_than=older_than)
