"""``queuetopia-celery web``: serve the web view alone, with uvicorn.

Registered on the CLI group by ``cli.py``; it acts through the Queuetopia that the
global options name (``-A module:qt``, or ``--database-url`` and ``--scope``).
Starlette and uvicorn are imported only when the command runs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

import click

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..app import Queuetopia


class _HasQueuetopia(Protocol):
    def queuetopia(self, *, database_exists: bool = True) -> Queuetopia: ...


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--username", envvar="QUEUETOPIA_WEB_USERNAME", help="HTTP basic username for actions.")
@click.option(
    "--password", envvar="QUEUETOPIA_WEB_PASSWORD", help="HTTP basic password (better: its variable)."
)
@click.option("--token", envvar="QUEUETOPIA_WEB_TOKEN", help="Bearer token for actions (16+ characters).")
@click.option("--secret-key", envvar="QUEUETOPIA_WEB_SECRET_KEY", help="Signs CSRF tokens (default: random).")
@click.option("--public-reads", is_flag=True, help="Pages readable without credentials.")
@click.option("--show-params", is_flag=True, help="Show job params and results (may hold personal data).")
@click.option("--refresh", type=click.IntRange(min=0), default=10, show_default=True, help="Refresh (s).")
@click.pass_obj
def web(  # noqa: PLR0917 (one parameter per option)
    obj: _HasQueuetopia,
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    token: str | None,
    secret_key: str | None,
    public_reads: bool,
    show_params: bool,
    refresh: int,
) -> None:
    """Serve the web view: queues, jobs, retry/abort/pause (needs the "web" extra).

    Without --username/--password or --token it is read-only: actions are refused."""
    from . import BasicAuth, TokenAuth, queuetopia_web

    try:
        import uvicorn
    except ImportError:
        _fail('the web view needs the "web" extra: pip install "queuetopia-celery[web]"')
    if (username or password) and token:
        raise click.UsageError("give either --username/--password or --token, not both")
    if bool(username) != bool(password):
        raise click.UsageError("--username and --password go together")
    try:
        auth = BasicAuth(username, password) if username and password else TokenAuth(token) if token else None
        app = queuetopia_web(
            obj.queuetopia(),
            auth=auth,
            public_reads=public_reads,
            show_params=show_params,
            refresh=refresh,
            secret_key=secret_key,
        )
    except ConfigurationError as exc:
        _fail(str(exc))
    mode = "read-only (no credentials)" if auth is None else f"actions need {type(auth).__name__}"
    click.echo(f"queuetopia web view on http://{host}:{port}/ - {mode}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)
