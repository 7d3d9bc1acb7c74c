"""The ``queuetopia-celery`` command line: a thin layer over the library.

Every option can also be given as an environment variable: ``--database-url`` is
``QUEUETOPIA_DATABASE_URL``, ``--scope`` is ``QUEUETOPIA_SCOPE``. Expected errors print
one line on stderr and exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
import sqlalchemy as sa

from . import migrate as _migrate
from .app import make_engine
from .errors import QueuetopiaError


class _Context:
    def __init__(self, database_url: str | None, scope: str | None) -> None:
        self.database_url = database_url
        self.scope = scope

    def require_url(self) -> str:
        if not self.database_url:
            raise click.UsageError("no database: give --database-url or set QUEUETOPIA_DATABASE_URL")
        return self.database_url


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
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
