"""``queuetopia-celery metrics``: serve the Prometheus metrics of one scope over HTTP
(registered on the command line group by :mod:`queuetopia_celery.cli`)."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, NoReturn

import click

logger = logging.getLogger(__name__)


def _fail(message: str) -> NoReturn:
    lines = message.strip().splitlines()
    click.echo(f"error: {lines[0] if lines else 'unknown error'}", err=True)
    sys.exit(1)


@click.command("metrics")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9808, show_default=True, help="Port to listen on."
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--top-queues",
    type=click.IntRange(0, 1000),
    default=0,
    show_default=True,
    help="Also report per-queue series for this many busiest and longest blocked queues.",
)
@click.option("--once", is_flag=True, help="Print the metrics once on stdout and exit (1 if unreadable).")
@click.pass_obj
def metrics(obj: Any, port: int, host: str, top_queues: int, once: bool) -> None:
    """Serve Prometheus metrics: the scope's gauges read from the database at each
    scrape, and the workers' attempt counters when PROMETHEUS_MULTIPROC_DIR is set."""
    try:
        from . import metrics as _metrics
    except ImportError as exc:
        _fail(f"the metrics command needs prometheus_client ({exc}): install queuetopia-celery[metrics]")
    from prometheus_client import generate_latest

    from .errors import QueuetopiaError

    qt = obj.queuetopia()
    try:
        qt.backend.scope_gauges()  # fail now, in one line, on a database we cannot read
    except QueuetopiaError as exc:
        _fail(str(exc))
    if once:
        collector = _metrics.QueuetopiaCollector([qt], top_queues=top_queues)
        click.echo(generate_latest(_metrics.registry_of(collector)).decode(), nl=False)
        if collector.errors.get(qt.scope):
            _fail(str(collector.errors[qt.scope]))
        return
    try:
        server, thread = _metrics.serve([qt], port=port, host=host, top_queues=top_queues)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    if not _metrics.multiprocess_dir():
        logger.warning(
            "PROMETHEUS_MULTIPROC_DIR is not set: serving the database gauges only "
            "(the workers' attempt counters need it, in the workers and here)"
        )
    click.echo(f"serving the metrics of scope {qt.scope!r} on http://{host}:{server.server_port}/metrics")
    stop = threading.Event()
    try:
        while thread.is_alive() and not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
