"""The ``queuetopia-celery`` command line: a thin layer over the library.

Every option can also be given as an environment variable: ``--database-url`` is
``QUEUETOPIA_DATABASE_URL``, ``--scope`` is ``QUEUETOPIA_SCOPE``. Expected errors print
one line on stderr and exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import sqlalchemy as sa

from . import migrate as _migrate
from .app import make_engine
from .errors import JobNotFoundError, QueuetopiaError
from .jobs import Job, JobState, QueueStatus, first_line, job_to_dict, utcnow, validate_name
from .store import Store


class _Context:
    def __init__(self, database_url: str | None, scope: str | None) -> None:
        self.database_url = database_url
        self.scope = scope

    def require_url(self) -> str:
        if not self.database_url:
            raise click.UsageError("no database: give --database-url or set QUEUETOPIA_DATABASE_URL")
        return self.database_url


def _fail(message: str) -> None:
    lines = message.strip().splitlines()
    click.echo(f"error: {lines[0] if lines else 'unknown error'}", err=True)
    sys.exit(1)


@click.group(context_settings={"auto_envvar_prefix": "QUEUETOPIA", "help_option_names": ["-h", "--help"]})
@click.option("--database-url", envvar="QUEUETOPIA_DATABASE_URL", help="SQLAlchemy URL of the database.")
@click.option("--scope", envvar="QUEUETOPIA_SCOPE", help="The Queuetopia scope to act on.")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(package_name="queuetopia-celery")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, scope: str | None, verbose: bool) -> None:
    """Persistent, ordered, blocking job queues for Celery."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = _Context(database_url, scope)


@cli.command()
@click.option("--database-url", "local_url", help="Same as the global --database-url.")
@click.option("--dry-run", is_flag=True, help="Print the SQL instead of running it.")
@click.pass_obj
def migrate(obj: _Context, local_url: str | None, dry_run: bool) -> None:
    """Create or upgrade the queuetopia tables (idempotent)."""
    url = local_url or obj.require_url()
    try:
        if dry_run:
            click.echo(_migrate.upgrade_sql(_offline_url(url)))
            return
        engine = make_engine(url)
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


def _store(obj: _Context) -> Store:
    url = obj.require_url()
    if not obj.scope:
        raise click.UsageError("no scope: give --scope or set QUEUETOPIA_SCOPE")
    try:
        return Store(make_engine(url), validate_name("scope", obj.scope))
    except (QueuetopiaError, sa.exc.ArgumentError) as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _expected_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Print expected errors (unknown job, unreachable database, ...) as one line and
    exit with status 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
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


def _status_word(row: QueueStatus) -> str:
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
    store = _store(obj)
    rows = store.queue_statuses(queue=queue)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    now = utcnow()
    blocked = sum(1 for row in rows if row.blocked)
    click.echo(f"scope {store.scope!r}: {len(rows)} queue(s) with jobs, {blocked} blocked")
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
                f"{head.attempts}/{head.max_attempts}" if head else "-",
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
    store = _store(obj)
    found = store.list_jobs(queue=queue, action=action, state=JobState(state) if state else None, limit=limit)
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
            f"{job.attempts}/{job.max_attempts}",
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
    store = _store(obj)
    job = store.get_job(job_id)
    if job is None:
        raise JobNotFoundError(store.scope, job_id)
    data = job_to_dict(job)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    error = data.pop("error")
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        click.echo(f"{key:>16}: {'-' if shown is None else shown}")
    if error:
        click.echo(f"{'error':>16}:")
        click.echo(error.rstrip())


_NO_KICK = "no worker was woken from here: the next scan (every poll_interval) starts it"


@cli.command()
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
@_expected_errors
def retry(obj: _Context, job_id: int) -> None:
    """Make a retrying, held or exhausted job due now."""
    job = _store(obj).retry(job_id)
    click.echo(f"job {job.id} of queue {job.queue!r} is due now ({job.attempts} attempts so far); {_NO_KICK}")


@cli.command()
@click.argument("job_id", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="Why (recorded on the job).")
@click.pass_obj
@_expected_errors
def abort(obj: _Context, job_id: int, reason: str) -> None:
    """Take a blocking job out of its queue for good (recorded, never deleted)."""
    if not reason.strip():
        raise click.BadParameter("must not be empty", param_hint="--reason")
    job = _store(obj).abort(job_id, reason.strip())
    click.echo(
        f"job {job.id} of queue {job.queue!r} aborted ({reason.strip()}); "
        f"the queue moves on to its next job; {_NO_KICK.replace('it', 'that job', 1)}"
    )


@cli.command()
@click.option(
    "--older-than", "older_than", required=True, help="Age of done jobs to delete: 30m, 12h, 7d, 2w..."
)
@click.pass_obj
@_expected_errors
def purge(obj: _Context, older_than: str) -> None:
    """Delete done jobs that finished longer ago than --older-than."""
    seconds = parse_duration(older_than)
    deleted = _store(obj).purge(seconds)
    click.echo(f"deleted {deleted} done job(s) older than {older_than}")


@cli.command()
@click.option(
    "--database-url", "local_url", help="Run against this database (PostgreSQL) instead of a SQLite file."
)
@click.option("--broker", help="Run against this broker (Redis) with real worker processes.")
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


def _offline_url(url: str) -> str:
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def main(argv: Any = None) -> None:
    try:
        cli.main(args=argv, prog_name="queuetopia-celery", standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
