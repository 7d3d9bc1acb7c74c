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
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import sqlalchemy as sa

from . import migrate as _migrate
from .app import bulk_states, bulk_target, make_engine
from .backends import Backend, open_backend
from .errors import JobNotFoundError, QueuetopiaError
from .jobs import BulkResult, Job, JobState, QueueStatus, first_line, job_to_dict, utcnow, validate_name


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
        engine = make_engine(url)
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


def _store(obj: _Context) -> Backend:
    url = obj.require_url()
    if not obj.scope:
        raise click.UsageError("no scope: give --scope or set QUEUETOPIA_SCOPE")
    try:
        engine = make_engine(url)
        missing = _missing_sqlite_file(engine)
        if missing:
            # Connecting would create an empty file.
            safe = engine.url.render_as_string(hide_password=True)
            _fail(
                f"no SQLite database at {missing} (the file does not exist): "
                f"create it with `queuetopia-celery migrate --database-url {safe}`"
            )
        return open_backend(engine, validate_name("scope", obj.scope))
    except (QueuetopiaError, sa.exc.ArgumentError) as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _missing_sqlite_file(engine: sa.Engine) -> str | None:
    """The path of a SQLite database file that does not exist (None otherwise)."""
    if engine.dialect.name != "sqlite" or engine.url.query.get("uri"):
        return None
    path = engine.url.database or ""
    return None if os.path.exists(path) else path


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
        if key == "attempts" and job.attempts > job.max_attempts:
            shown = f"{value} (beyond max_attempts {job.max_attempts}: retried by an operator)"
        click.echo(f"{key:>16}: {'-' if shown is None else shown}")
    if error:
        click.echo(f"{'error':>16}:")
        click.echo(error.rstrip())


_NO_KICK = "no worker was woken from here: the next scan (every poll_interval) starts it"


@cli.command()
@click.argument("job_id", type=click.IntRange(min=1), required=False)
@click.option("--queue", help="Bulk: every failed job of this queue.")
@click.option("--action", help="Bulk: every failed job of this action.")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["exhausted", "held", "retrying"]),
    help="Bulk: only jobs in this state (repeatable; default: all three).",
)
@click.option("--all", "everything", is_flag=True, help="Bulk: every failed job of the scope.")
@click.option(
    "--force",
    is_flag=True,
    help="Retry an exhausted job even though later jobs of its queue already ran (it runs after them).",
)
@click.option("--dry-run", is_flag=True, help="Bulk: count the jobs, change nothing.")
@click.pass_obj
@_expected_errors
def retry(
    obj: _Context,
    job_id: int | None,
    *,
    queue: str | None,
    action: str | None,
    states: tuple[str, ...],
    everything: bool,
    force: bool,
    dry_run: bool,
) -> None:
    """Make a retrying, held or exhausted job due now (JOB_ID), or every such job of
    a queue or action (--queue, --action, --all)."""
    if job_id is None or queue or action or states or everything or dry_run:
        _retry_bulk(
            obj,
            job_id,
            queue=queue,
            action=action,
            states=states,
            everything=everything,
            force=force,
            dry_run=dry_run,
        )
        return
    job = _store(obj).retry(job_id, force=force)
    click.echo(f"job {job.id} of queue {job.queue!r} is due now ({job.attempts} attempts so far); {_NO_KICK}")


@cli.command()
@click.argument("job_id", type=click.IntRange(min=1), required=False)
@click.option("--reason", required=True, help="Why (recorded on the job).")
@click.option("--queue", help="Bulk: every pending job of this queue.")
@click.option("--action", help="Bulk: every pending job of this action.")
@click.option("--all", "everything", is_flag=True, help="Bulk: every pending job of the scope.")
@click.option("--dry-run", is_flag=True, help="Bulk: count the jobs, change nothing.")
@click.pass_obj
@_expected_errors
def abort(
    obj: _Context,
    job_id: int | None,
    *,
    reason: str,
    queue: str | None,
    action: str | None,
    everything: bool,
    dry_run: bool,
) -> None:
    """Take a blocking job out of its queue for good (recorded, never deleted), or
    every pending job of a queue or action (--queue, --action, --all)."""
    if not reason.strip():
        raise click.BadParameter("must not be empty", param_hint="--reason")
    if job_id is None or queue or action or everything or dry_run:
        _abort_bulk(
            obj,
            job_id,
            reason=reason.strip(),
            queue=queue,
            action=action,
            everything=everything,
            dry_run=dry_run,
        )
        return
    job = _store(obj).abort(job_id, reason.strip())
    click.echo(
        f"job {job.id} of queue {job.queue!r} aborted ({reason.strip()}); "
        f"the queue moves on to its next job; {_NO_KICK.replace('it', 'that job', 1)}"
    )


# ---------------------------------------------------------------------- issue 12: pause, bulk, explain


def _bulk_usage(job_id: int | None, queue: str | None, action: str | None, everything: bool) -> None:
    if job_id is not None:
        raise click.UsageError("give a JOB_ID or bulk options (--queue, --action, --all), not both")
    if queue is None and action is None and not everything:
        raise click.UsageError(
            "give a JOB_ID, or --queue and/or --action for a bulk action (--all for the whole scope)"
        )


_SKIP_REASONS = {
    "moved_on": "exhausted jobs whose queue has run later jobs "
    "(they would run out of order; --force retries them)",
    "unique_key": "exhausted jobs whose unique_key another open job holds now",
    "running": "running jobs (abort them once their attempt has ended)",
}


def _bulk_report(verb: str, result: BulkResult, target: str) -> None:
    done = f"would {verb}" if result.dry_run else {"retry": "retried", "abort": "aborted"}[verb]
    click.echo(
        f"{done} {result.count} job(s) {target}" + (" (dry run: nothing changed)" if result.dry_run else "")
    )
    for reason, count in sorted(result.skipped.items()):
        click.echo(f"skipped {count}: {_SKIP_REASONS.get(reason, reason)}")
    if result.count and not result.dry_run:
        click.echo(_NO_KICK.replace("it", "them", 1))


def _target(queue: str | None, action: str | None) -> str:
    parts = [f"of queue {queue!r}" if queue else "", f"of action {action!r}" if action else ""]
    return " and ".join(p for p in parts if p) or "of the whole scope"


def _retry_bulk(
    obj: _Context,
    job_id: int | None,
    *,
    queue: str | None,
    action: str | None,
    states: tuple[str, ...],
    everything: bool,
    force: bool,
    dry_run: bool,
) -> None:
    _bulk_usage(job_id, queue, action, everything)
    queue, action = bulk_target(queue, action, everything)
    chosen = bulk_states(list(states) or None)
    result = _store(obj).retry_many(queue=queue, action=action, states=chosen, force=force, dry_run=dry_run)
    _bulk_report("retry", result, f"{_target(queue, action)} ({', '.join(s.value for s in chosen)})")


def _abort_bulk(
    obj: _Context,
    job_id: int | None,
    *,
    reason: str,
    queue: str | None,
    action: str | None,
    everything: bool,
    dry_run: bool,
) -> None:
    _bulk_usage(job_id, queue, action, everything)
    queue, action = bulk_target(queue, action, everything)
    result = _store(obj).abort_many(queue=queue, action=action, reason=reason, dry_run=dry_run)
    _bulk_report("abort", result, f"{_target(queue, action)} (pending: waiting, scheduled, retrying, held)")


@cli.command()
@click.argument("queue")
@click.pass_obj
@_expected_errors
def pause(obj: _Context, queue: str) -> None:
    """Pause a queue: its running job finishes, nothing else starts until resume."""
    if _store(obj).pause(validate_name("queue", queue)):
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
    if _store(obj).resume(validate_name("queue", queue)):
        click.echo(f"queue {queue!r} resumed; {_NO_KICK.replace('it', 'its next job', 1)}")
    else:
        click.echo(f"queue {queue!r} was not paused: nothing changed")


def _load_queuetopia(spec: str) -> Any:
    """The Queuetopia at ``module:attribute`` (the current directory is importable)."""
    import importlib

    from .app import Queuetopia

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{spec!r} is not module:attribute (example: myapp:qt)", param_hint="--app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="--app") from None
    found = getattr(module, attribute, None)
    if not isinstance(found, Queuetopia):
        raise click.BadParameter(
            f"{spec!r} is {type(found).__name__ if found is not None else 'missing'}, not a Queuetopia",
            param_hint="--app",
        )
    return found


@cli.command()
@click.argument("queue")
@click.option(
    "--app",
    "app_spec",
    envvar="QUEUETOPIA_APP",
    help="module:attribute of your Queuetopia, to tell whether a performer exists for the head's action "
    "and what max_concurrent_queues is.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@_expected_errors
def explain(obj: _Context, queue: str, app_spec: str | None, as_json: bool) -> None:
    """Why is this queue stuck? One sentence, then details."""
    from .explain import explain as _explain

    store = _store(obj)
    has_performer: Callable[[str], bool] | None = None
    max_concurrent = None
    if app_spec:
        qt = _load_queuetopia(app_spec)
        if qt.scope != store.scope:
            raise click.BadParameter(
                f"{app_spec} is scope {qt.scope!r}, not {store.scope!r}", param_hint="--app"
            )
        registry = qt.registry

        def has_performer(action: str) -> bool:
            return registry.default is not None or action in registry.actions

        max_concurrent = qt.max_concurrent_queues
    answer = _explain(
        store.queue_facts(validate_name("queue", queue)),
        has_performer=has_performer,
        max_concurrent=max_concurrent,
    )
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
    deleted = _store(obj).purge(seconds)
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
