"""The ``queuetopia-celery`` command line: a thin layer over the library.

Like ``celery -A proj``, it can load your own Queuetopia (``-A myapp.tasks:mail``, or
``-A myapp.tasks`` for a module holding exactly one): every command then goes through
that Queuetopia's methods, on its database and scope, and ``retry``, ``abort`` and
``resume`` wake the queue at once through its broker. Without ``-A``,
``--database-url`` and ``--scope`` build a Queuetopia that wakes nothing
(``disabled=True``): reading works the same, and a write says that the next scan
starts the queue. Either way the library validates; the CLI only parses.

Every option can also be given as an environment variable: ``-A`` is
``QUEUETOPIA_APP``, ``--database-url`` is ``QUEUETOPIA_DATABASE_URL``, ``--scope`` is
``QUEUETOPIA_SCOPE``. Expected errors print one line on stderr and exit with status 1
(2 for bad usage: a bad option, input the library refuses, an app that cannot be loaded).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from . import migrate as _migrate
from .app import Queuetopia, make_engine
from .errors import InvalidJobError, JobNotFoundError, QueuetopiaError
from .explain import QueueExplanation
from .jobs import BulkResult, Job, JobState, QueueStatus, first_line, job_to_dict, utcnow, validate_name
from .metrics_cli import metrics as metrics_command
from .operations import BULK_RETRY_STATES
from .web.command import web as web_command

#: Passwords this process knows of (database and broker URLs): never printed.
_SECRETS: list[str] = []


def _hide_secrets(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def _keep_secret(url: object) -> None:
    """Remember the password of a database or broker URL, so that no message shows it."""
    if isinstance(url, str):
        try:
            url = sa.engine.make_url(url)
        except (sa.exc.ArgumentError, ValueError):
            return
    password = getattr(url, "password", None)
    if isinstance(password, str) and password and password not in _SECRETS:
        _SECRETS.append(password)


class _Context:
    """What the global options say, and the Queuetopia the commands act through (built
    on first use, so that ``migrate`` and ``demo`` need none)."""

    def __init__(self, database_url: str | None, scope: str | None, app_spec: str | None) -> None:
        self.database_url = database_url
        self.scope = scope
        self.app_spec = app_spec
        self._queuetopia: Queuetopia | None = None
        _keep_secret(database_url)

    def require_url(self) -> str:
        if not self.database_url:
            raise click.UsageError(
                "no database: give --database-url or set QUEUETOPIA_DATABASE_URL (or -A your app)"
            )
        return self.database_url

    def use_app(self, spec: str, option: str) -> None:
        """A command's own app option (``explain --app``, kept from before ``-A``)."""
        if self.app_spec not in (None, spec):
            raise click.UsageError(f"give the app once: -A {self.app_spec} and {option} {spec} differ")
        self.app_spec = spec

    def queuetopia(self, *, database_exists: bool = True) -> Queuetopia:
        """The user's Queuetopia (``-A``), or one that wakes nothing, built from
        ``--database-url`` and ``--scope``. A SQLite file that does not exist is an
        error (connecting would create an empty one) unless ``database_exists=False``."""
        if self._queuetopia is None:
            self._queuetopia = self._load_app(self.app_spec) if self.app_spec else self._without_app()
        qt = self._queuetopia
        missing = _missing_sqlite_file(qt.engine) if database_exists else None
        if missing:
            safe = qt.engine.url.render_as_string(hide_password=True)
            _fail(
                f"no SQLite database at {missing} (the file does not exist): "
                f"create it with `queuetopia-celery migrate --database-url {safe}`"
            )
        return qt

    @property
    def wakes(self) -> bool:
        """Whether the Queuetopia's writes wake queues: the user's, unless disabled."""
        return self.app_spec is not None and not self.queuetopia().disabled

    def _without_app(self) -> Queuetopia:
        url = self.require_url()
        if not self.scope:
            raise click.UsageError("no scope: give --scope or set QUEUETOPIA_SCOPE (or -A your app)")
        from celery import Celery

        try:
            engine = make_engine(url)
            # A Celery app of its own, not made the process's current app (the Django
            # management command runs this CLI inside the project's process).
            app = Celery("queuetopia-cli", set_as_current=False)
            return Queuetopia(self.scope, app=app, engine=engine, disabled=True)
        except (QueuetopiaError, sa.exc.ArgumentError) as exc:
            _fail(str(exc))

    def _load_app(self, spec: str) -> Queuetopia:
        qt = _load_queuetopia(spec)
        _keep_secret(qt.engine.url)
        _keep_secret(getattr(qt.app.conf, "broker_url", None))
        if self.scope and self.scope != qt.scope:
            _usage_fail(f"-A {spec} is scope {qt.scope!r}, not --scope {self.scope!r}")
        if self.database_url and not _same_database(qt.engine.url, self.database_url):
            theirs = qt.engine.url.render_as_string(hide_password=True)
            _usage_fail(f"-A {spec} uses the database {theirs}, not --database-url's")
        return qt


def _same_database(url: sa.URL, given: str) -> bool:
    try:
        other = sa.engine.make_url(given)
    except (sa.exc.ArgumentError, ValueError):
        return False
    if other.drivername in ("postgresql", "postgres"):
        other = other.set(drivername="postgresql+psycopg")
    return url.set(password=None) == other.set(password=None)


def _fail(message: str, status: int = 1) -> NoReturn:
    lines = _hide_secrets(message).strip().splitlines()
    click.echo(f"error: {lines[0] if lines else 'unknown error'}", err=True)
    sys.exit(status)


def _usage_fail(message: str) -> NoReturn:
    """Bad usage (exit 2) in one line, without click's usage text."""
    _fail(message, status=2)


class _OneLine(logging.Formatter):
    """Log records as one line each: an exception is named, its traceback left out
    (``-v`` shows it), and no known password is printed."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {first_line(str(exc))})"
        return _hide_secrets(text)


class _Verbose(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _hide_secrets(super().format(record))


@click.group(context_settings={"auto_envvar_prefix": "QUEUETOPIA", "help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    "app_spec",
    envvar="QUEUETOPIA_APP",
    metavar="MODULE[:NAME]",
    help="Your Queuetopia (module:attribute, or a module holding exactly one): its database, scope, "
    "performers and broker are used, and retry, abort and resume wake the queue at once.",
)
@click.option("--database-url", envvar="QUEUETOPIA_DATABASE_URL", help="SQLAlchemy URL of the database.")
@click.option("--scope", envvar="QUEUETOPIA_SCOPE", help="The Queuetopia scope to act on.")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(package_name="queuetopia-celery")
@click.pass_context
def cli(
    ctx: click.Context, app_spec: str | None, database_url: str | None, scope: str | None, verbose: bool
) -> None:
    """Persistent, ordered, blocking job queues for Celery."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Verbose("%(levelname)s %(name)s: %(message)s") if verbose else _OneLine())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    ctx.obj = _Context(database_url, scope, app_spec)


@cli.command()
@click.option("--database-url", "local_url", help="Same as the global --database-url.")
@click.option("--dry-run", is_flag=True, help="Print the SQL instead of running it.")
@click.pass_obj
def migrate(obj: _Context, local_url: str | None, dry_run: bool) -> None:
    """Create or upgrade the queuetopia tables (idempotent)."""
    try:
        if local_url or obj.database_url or not obj.app_spec:
            url = local_url or obj.require_url()
            engine = make_engine(url)
        else:  # -A alone: the app's database
            engine = obj.queuetopia(database_exists=False).engine
            url = engine.url.render_as_string(hide_password=False)
        if dry_run:
            # Only what would run: nothing when the tables are at the newest version.
            if _missing_sqlite_file(engine):
                version, sql = None, _migrate.upgrade_sql(_offline_url(url))
            else:
                version, sql = _migrate.pending_sql(engine)
            if not sql:
                click.echo(f"-- queuetopia tables already at version {version}, the newest: nothing to run")
            else:
                click.echo(
                    f"-- queuetopia tables at version {version or 'nothing (no tables yet)'}; "
                    f"the SQL that brings them to {_migrate.head()}:"
                )
                click.echo(sql)
            return
        before = _migrate.current(engine)
        _migrate.upgrade(engine)
        after = _migrate.current(engine)
    except (QueuetopiaError, sa.exc.ArgumentError) as exc:
        _fail(str(exc))
        return
    if before == after:
        click.echo(f"queuetopia tables already at version {after}")
    else:
        click.echo(f"queuetopia tables migrated from {before or 'nothing'} to {after}")


# ---------------------------------------------------------------------- operator commands


def _explain_without_app(qt: Queuetopia, queue: str) -> QueueExplanation:
    """``explain`` without the user's app: the facts alone, with no registry to tell
    whether a performer exists (the answer says it cannot tell)."""
    from .explain import explain

    return explain(qt.backend.queue_facts(validate_name("queue", queue)))


def _missing_sqlite_file(engine: sa.Engine) -> str | None:
    """The path of a SQLite database file that does not exist (None otherwise)."""
    if engine.dialect.name != "sqlite" or engine.url.query.get("uri"):
        return None
    path = engine.url.database or ""
    return None if os.path.exists(path) else path


def _expected_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Print expected errors (unknown job, unreachable database, ...) as one line and
    exit with status 1, without a traceback; input the library refuses exits with 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except InvalidJobError as exc:
            _usage_fail(str(exc))
        except (QueuetopiaError, sa.exc.ArgumentError) as exc:
            _fail(str(exc))

    return wrapper


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w``, or a number of seconds."""
    value = text.strip().lower()
    unit = 1
    if value and value[-1] in _UNITS:
        unit = _UNITS[value[-1]]
        value = value[:-1]
    try:
        seconds = float(value) * unit
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration (examples: 30m, 12h, 7d)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise click.BadParameter(f"{text!r} must be a duration >= 0")
    return seconds


def ago(when: dt.datetime | None, now: dt.datetime) -> str:
    """``4m12s`` style age of ``when`` (``-`` when None)."""
    if when is None:
        return "-"
    return _span((now - when).total_seconds())


def _span(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _next_attempt(job: Job | None, now: dt.datetime) -> str:
    if job is None:
        return "-"
    state = job.state
    if state is JobState.HELD:
        return "held: retry or abort"
    if state is JobState.RUNNING:
        return "running"
    due = job.due_at
    return "now" if due <= now else f"in {_span((due - now).total_seconds() + 0.999)}"


def attempts_text(job: Job) -> str:
    """``1/20``; beyond the maximum (an operator retried the job after its last
    attempt) ``3 (max 2)``."""
    if job.attempts > job.max_attempts:
        return f"{job.attempts} (max {job.max_attempts})"
    return f"{job.attempts}/{job.max_attempts}"


def _status_word(row: QueueStatus) -> str:
    if row.paused:
        return "PAUSED"
    if row.head is not None and row.head.state is JobState.HELD:
        return "HELD"
    if row.blocked:
        return "BLOCKED"
    if row.locked_by is not None or (row.head is not None and row.head.state is JobState.RUNNING):
        return "running"
    if row.pending:
        return "waiting"
    return "idle"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per queue) for scripts.")
@click.option("--queue", help="Only this queue.")
@click.pass_obj
@_expected_errors
def status(obj: _Context, as_json: bool, queue: str | None) -> None:
    """One row per queue with jobs in it: blocked queues first."""
    qt = obj.queuetopia()
    rows = qt.queue_statuses(queue=queue)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    now = utcnow()
    blocked = sum(1 for row in rows if row.blocked)
    click.echo(f"scope {qt.scope!r}: {len(rows)} queue(s) with jobs, {blocked} blocked")
    if not rows:
        return
    table = []
    for row in rows:
        head = row.head
        locked = "-"
        if row.locked_by or row.locked_until:
            until = f" until {row.locked_until:%H:%M:%S}" if row.locked_until else ""
            locked = f"{row.locked_by or 'dispatched'}{until}"
        table.append(
            [
                _clip(row.queue, 40),
                _status_word(row),
                str(row.pending),
                f"#{head.id} {_clip(head.action, 24)}" if head else "-",
                attempts_text(head) if head else "-",
                _next_attempt(head, now),
                locked,
                ago(row.oldest_pending_at, now),
            ]
        )
    headers = ["QUEUE", "STATUS", "PENDING", "HEAD", "ATTEMPTS", "NEXT ATTEMPT", "LOCKED BY", "OLDEST"]
    lines = _table(headers, table)
    click.echo(lines[0])
    for line, row in zip(lines[1:], rows, strict=True):
        click.echo(line)
        if row.blocked:
            click.echo(f"  ! blocked for {ago(row.blocked_since, now)}: {_clip(row.error or '', 100)}")


@cli.command()
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--state", type=click.Choice([s.value for s in JobState]), help="Only jobs in this state.")
@click.option("--action", help="Only jobs of this action.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_expected_errors
def jobs(
    obj: _Context, *, queue: str | None, state: str | None, action: str | None, limit: int, as_json: bool
) -> None:
    """List jobs, newest first."""
    found = obj.queuetopia().list_jobs(queue=queue, action=action, state=state, limit=limit)
    if as_json:
        click.echo(json.dumps([job_to_dict(job) for job in found], indent=2))
        return
    now = utcnow()
    rows = [
        [
            str(job.id),
            _clip(job.queue, 30),
            str(job.sequence),
            _clip(job.action, 24),
            job.state.value,
            attempts_text(job),
            ago(job.inserted_at, now),
            _clip(first_line(job.error or job.abort_reason or ""), 60),
        ]
        for job in found
    ]
    if not rows:
        click.echo("no jobs")
        return
    for line in _table(["ID", "QUEUE", "SEQ", "ACTION", "STATE", "ATTEMPTS", "AGE", "ERROR"], rows):
        click.echo(line)


@cli.command()
@click.argument("job_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@_expected_errors
def show(obj: _Context, job_id: int, as_json: bool) -> None:
    """Show one job whole."""
    qt = obj.queuetopia()
    job = qt.get_job(job_id)
    if job is None:
        raise JobNotFoundError(qt.scope, job_id)
    data = job_to_dict(job)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    error = data.pop("error")
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        if key == "attempts" and job.attempts > job.max_attempts:
            shown = f"{value} (beyond max_attempts {job.max_attempts}: retried by an operator)"
        click.echo(f"{key:>16}: {'-' if shown is None else shown}")
    if error:
        click.echo(f"{'error':>16}:")
        click.echo(error.rstrip())


def _no_kick(what: str = "it") -> str:
    return f"no worker was woken from here: the next scan (every poll_interval) starts {what}"


class _LoggedErrors(logging.Handler):
    """Counts the errors the library logs: a wake-up that could not be sent (the broker
    is down) is logged, not raised, as the write it follows is committed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _writing(obj: _Context, write: Callable[[Queuetopia], Any]) -> tuple[Any, Callable[..., str]]:
    """Run ``write`` on the Queuetopia; return its result and ``said(what, queues)``,
    which says what woke ``queues``: the app's broker, or nothing (then the next scan
    starts ``what``)."""
    qt = obj.queuetopia()
    errors = _LoggedErrors()
    library = logging.getLogger(__package__)
    library.addHandler(errors)
    try:
        result = write(qt)
    finally:
        library.removeHandler(errors)

    def said(what: str, queues: str = "its queue") -> str:
        if not obj.wakes:
            return _no_kick(what)
        if errors.count:
            return f"waking {queues} through the app's broker failed (see above): the next scan starts {what}"
        return f"woke {queues} at once through the app's broker"

    return result, said


@dataclasses.dataclass(frozen=True)
class _Target:
    """What ``retry`` and ``abort`` act on: one job (JOB_ID), or in bulk the jobs of
    ``--queue`` and/or ``--action`` (``--all``: the whole scope)."""

    job_id: int | None
    queue: str | None
    action: str | None
    everything: bool
    dry_run: bool

    def is_bulk(self, other_bulk_options: bool) -> bool:
        bulk = self.queue or self.action or self.everything or self.dry_run or other_bulk_options
        return self.job_id is None or bool(bulk)

    def check_bulk(self) -> None:
        if self.job_id is not None:
            raise click.UsageError("give a JOB_ID or bulk options (--queue, --action, --all), not both")
        if self.queue is None and self.action is None and not self.everything:
            raise click.UsageError(
                "give a JOB_ID, or --queue and/or --action for a bulk action (--all for the whole scope)"
            )

    def describe(self) -> str:
        parts = [
            f"of queue {self.queue!r}" if self.queue else "",
            f"of action {self.action!r}" if self.action else "",
        ]
        return " and ".join(p for p in parts if p) or "of the whole scope"


def _one_or_bulk(jobs: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The arguments ``retry`` and ``abort`` share (JOB_ID, ``--queue``, ``--action``,
    ``--all``, ``--dry-run``), given to the command as one ``target``; ``jobs`` says
    which jobs a bulk action takes ("failed", "pending")."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def command(
            *args: Any,
            job_id: int | None,
            queue: str | None,
            action: str | None,
            everything: bool,
            dry_run: bool,
            **kwargs: Any,
        ) -> None:
            fn(*args, target=_Target(job_id, queue, action, everything, dry_run), **kwargs)

        shared = [
            click.argument("job_id", type=click.IntRange(min=1), required=False),
            click.option("--queue", help=f"Bulk: every {jobs} job of this queue."),
            click.option("--action", help=f"Bulk: every {jobs} job of this action."),
            click.option("--all", "everything", is_flag=True, help=f"Bulk: every {jobs} job of the scope."),
            click.option("--dry-run", is_flag=True, help="Bulk: count the jobs, change nothing."),
        ]
        decorated: Callable[..., None] = command
        for option in reversed(shared):
            decorated = option(decorated)
        return decorated

    return decorate


def _act(
    obj: _Context,
    target: _Target,
    *,
    one: Callable[[Queuetopia, int], Job],
    done: Callable[[Job, Callable[..., str]], str],
    many: Callable[[Queuetopia], BulkResult],
    verb: str,
    taken: str,
    bulk_options: bool = False,
) -> None:
    """Run ``one`` on the target's job and print ``done``; or in bulk (bulk options
    given: the target's, or the command's own ``bulk_options``) run ``many`` and print
    what it did (``verb``: "retry" or "abort"; ``taken``: the states it takes, in
    words)."""
    job_id = target.job_id
    if job_id is not None and not target.is_bulk(bulk_options):
        job, said = _writing(obj, lambda qt: one(qt, job_id))
        click.echo(done(job, said))
        return
    target.check_bulk()
    result, said = _writing(obj, many)
    done_words = f"would {verb}" if result.dry_run else {"retry": "retried", "abort": "aborted"}[verb]
    dry = " (dry run: nothing changed)" if result.dry_run else ""
    click.echo(f"{done_words} {result.count} job(s) {target.describe()} ({taken}){dry}")
    for reason, count in sorted(result.skipped.items()):
        click.echo(f"skipped {count}: {_SKIP_REASONS.get(reason, reason)}")
    if result.count and not result.dry_run:
        click.echo(said("them", f"their {len(result.queues)} queue(s)"))


_SKIP_REASONS = {
    "moved_on": "exhausted jobs whose queue has run later jobs "
    "(they would run out of order; --force retries them)",
    "unique_key": "exhausted jobs whose unique_key another open job holds now",
    "running": "running jobs (abort them once their attempt has ended)",
}


@cli.command()
@_one_or_bulk("failed")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in BULK_RETRY_STATES]),
    help="Bulk: only jobs in this state (repeatable; default: all three).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Retry an exhausted job even though later jobs of its queue already ran (it runs after them).",
)
@click.pass_obj
@_expected_errors
def retry(obj: _Context, *, target: _Target, states: tuple[str, ...], force: bool) -> None:
    """Make a retrying, held or exhausted job due now (JOB_ID), or every such job of
    a queue or action (--queue, --action, --all)."""
    _act(
        obj,
        target,
        one=lambda qt, job_id: qt.retry_job(job_id, force=force),
        done=lambda job, said: (
            f"job {job.id} of queue {job.queue!r} is due now ({job.attempts} attempts so far); {said('it')}"
        ),
        many=lambda qt: qt.retry_jobs(
            queue=target.queue,
            action=target.action,
            state=states or None,
            force=force,
            all=target.everything,
            dry_run=target.dry_run,
        ),
        verb="retry",
        taken=", ".join(states or tuple(s.value for s in BULK_RETRY_STATES)),
        bulk_options=bool(states),
    )


@cli.command()
@_one_or_bulk("pending")
@click.option("--reason", required=True, help="Why (recorded on the job).")
@click.pass_obj
@_expected_errors
def abort(obj: _Context, *, target: _Target, reason: str) -> None:
    """Take a blocking job out of its queue for good (recorded, never deleted), or
    every pending job of a queue or action (--queue, --action, --all)."""
    _act(
        obj,
        target,
        one=lambda qt, job_id: qt.abort_job(job_id, reason),
        done=lambda job, said: (
            f"job {job.id} of queue {job.queue!r} aborted ({job.abort_reason}); "
            f"the queue moves on to its next job; {said('that job')}"
        ),
        many=lambda qt: qt.abort_jobs(
            reason=reason,
            queue=target.queue,
            action=target.action,
            all=target.everything,
            dry_run=target.dry_run,
        ),
        verb="abort",
        taken="pending: waiting, scheduled, retrying, held",
    )


@cli.command()
@click.argument("queue")
@click.pass_obj
@_expected_errors
def pause(obj: _Context, queue: str) -> None:
    """Pause a queue: its running job finishes, nothing else starts until resume."""
    if obj.queuetopia().pause_queue(queue):
        click.echo(
            f"queue {queue!r} paused: its running job (if any) finishes; no other job of it starts "
            f"until `queuetopia-celery resume {queue}`"
        )
    else:
        click.echo(f"queue {queue!r} was already paused: nothing changed")


@cli.command()
@click.argument("queue")
@click.pass_obj
@_expected_errors
def resume(obj: _Context, queue: str) -> None:
    """Resume a paused queue."""
    changed, said = _writing(obj, lambda qt: qt.resume_queue(queue))
    if changed:
        click.echo(f"queue {queue!r} resumed; {said('its next job', 'it')}")
    else:
        click.echo(f"queue {queue!r} was not paused: nothing changed")


def _load_queuetopia(spec: str) -> Queuetopia:
    """The Queuetopia at ``module:attribute``, or the one Queuetopia of ``module`` (the
    current directory is importable, as for ``celery -A``). What goes wrong is one line
    and exit status 2."""
    import importlib

    module_name, colon, attribute = spec.partition(":")
    if not module_name or (colon and not attribute):
        _usage_fail(f"-A {spec!r} is not module:attribute or module (example: myapp.tasks:mail)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _usage_fail(f"-A {spec}: cannot import {module_name!r}: {first_line(str(exc))}")
    except Exception as exc:  # the module's own code failed: say how, in one line
        failure = f"{type(exc).__name__}: {first_line(str(exc))}"
        _usage_fail(f"-A {spec}: importing {module_name!r} failed: {failure}")
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, Queuetopia):
            what = "missing" if found is None else f"a {type(found).__name__}"
            _usage_fail(f"-A {spec}: {module_name}.{attribute} is {what}, not a Queuetopia")
        return found
    held = {id(value): (name, value) for name, value in vars(module).items() if isinstance(value, Queuetopia)}
    if len(held) != 1:
        names = ", ".join(sorted(name for name, _ in held.values()))
        count = f"{len(held)} Queuetopias ({names})" if held else "no Queuetopia"
        _usage_fail(f"-A {spec}: module {module_name!r} holds {count}: give module:attribute")
    ((_, qt),) = held.values()
    return qt


@cli.command()
@click.argument("queue")
@click.option("--app", "app_spec", hidden=True, help="Same as the global -A (kept for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@_expected_errors
def explain(obj: _Context, queue: str, app_spec: str | None, as_json: bool) -> None:
    """Why is this queue stuck? One sentence, then details. With -A, your app's
    performers and max_concurrent_queues are taken into account."""
    if app_spec:
        obj.use_app(app_spec, "--app")
    qt = obj.queuetopia()
    answer = qt.explain_queue(queue) if obj.app_spec else _explain_without_app(qt, queue)
    if as_json:
        click.echo(json.dumps(answer.to_dict(), indent=2))
        return
    click.echo(answer.summary)
    for line in answer.details:
        click.echo(f"  - {line}")


@cli.command()
@click.option(
    "--older-than", "older_than", required=True, help="Age of done jobs to delete: 30m, 12h, 7d, 2w..."
)
@click.pass_obj
@_expected_errors
def purge(obj: _Context, older_than: str) -> None:
    """Delete done jobs that finished longer ago than --older-than."""
    seconds = parse_duration(older_than)
    deleted = obj.queuetopia().purge_jobs(older_than=seconds)
    click.echo(f"deleted {deleted} done job(s) older than {older_than}")


@cli.command()
@click.option(
    "--database-url", "local_url", help="Run against this database (PostgreSQL) instead of a SQLite file."
)
@click.option(
    "--broker",
    help="Run against this broker, Redis (redis://...) or AMQP (RabbitMQ, amqp://...), "
    "with real worker processes.",
)
@click.pass_obj
def demo(obj: _Context, local_url: str | None, broker: str | None) -> None:
    """Watch ordered, blocking queues run: no server, no configuration needed."""
    from . import demo as _demo

    _demo.quiet_logs()
    try:
        summary = _demo.run(database_url=local_url, broker=broker)
    except (QueuetopiaError, sa.exc.ArgumentError) as exc:
        _fail(str(exc))
        return
    if not summary.ok:
        sys.exit(1)


@cli.command()
@click.option("-A", "--app", "app_spec", required=True, help="The Celery app, as for celery -A.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for answers.")
@click.option("--host", help="Judge the workers of this host (default: this machine's hostname).")
@click.option("--worker", "workers", multiple=True, help="Judge exactly this node (name@host); repeatable.")
@click.option("--expect", type=click.IntRange(min=1), default=1, show_default=True, help="Workers needed.")
def health(app_spec: str, timeout: float, host: str | None, workers: tuple[str, ...], expect: int) -> None:
    """Exit 0 when this host's Celery workers answer a ping, 1 otherwise (a liveness
    check for a supervisor: a stopped or stuck worker does not answer)."""
    from . import health as _health

    try:
        app = _health.load_app(app_spec)
    except Exception as exc:
        _fail(f"cannot load the Celery app {app_spec!r}: {type(exc).__name__}: {exc}")
        return
    found = _health.check(app, timeout=timeout, host=host, workers=workers, expect=expect)
    if not found.ok:
        _fail(found.message)
    click.echo(f"ok: {found.message}")


cli.add_command(metrics_command)


def _offline_url(url: str) -> str:
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


cli.add_command(web_command)


def main(argv: Any = None) -> None:
    try:
        cli.main(args=argv, prog_name="queuetopia-celery", standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
