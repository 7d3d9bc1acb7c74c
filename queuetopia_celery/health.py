"""A liveness check of this host's Celery workers, for a process supervisor.

``queuetopia-celery health -A myapp`` asks the workers, through the broker, to answer a
ping (Celery's remote control) and exits with status 0 when enough of this host's
workers answered within ``--timeout`` seconds, 1 otherwise. A worker answers from its
main event loop, the one that consumes messages, so a worker that is stopped, stuck
in a broker reconnection or hung in a warm shutdown does not answer: restart it.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any


@dataclasses.dataclass(frozen=True)
class Health:
    """What a liveness check found: ``ok``, the workers of the host that answered,
    and a one-line ``message`` (never the broker's password)."""

    ok: bool
    answered: tuple[str, ...]
    message: str


def load_app(spec: str) -> Any:
    """The Celery app named by ``spec`` the way ``celery -A`` takes it (``module``,
    ``module:attribute`` or ``module.attribute``)."""
    from celery.app.utils import find_app

    return find_app(spec)


def check(
    app: Any,
    *,
    timeout: float,
    host: str | None = None,
    workers: tuple[str, ...] = (),
    expect: int = 1,
) -> Health:
    """Ping the workers of ``host`` (this host by default), or exactly ``workers``
    (full node names, ``name@host``), and judge the answers."""
    host = host or socket.gethostname()
    url = app.connection_for_write().as_uri()  # the password masked
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            replies = app.control.ping(destination=list(workers) or None, timeout=timeout, connection=conn)
    except Exception as exc:  # the broker cannot be reached: nobody can be judged alive
        return Health(False, (), f"cannot reach the broker {url}: {type(exc).__name__}")
    names = sorted(name for reply in replies or [] for name in reply)
    if workers:
        answered = tuple(name for name in names if name in workers)
        missing = sorted(set(workers) - set(answered))
        if missing:
            return Health(False, answered, f"no answer within {timeout:g} s from {', '.join(missing)}")
        return Health(True, answered, f"{len(answered)} workers answered: {', '.join(answered)}")
    answered = tuple(name for name in names if name.rpartition("@")[2] == host)
    if len(answered) < expect:
        return Health(
            False,
            answered,
            f"{len(answered)} of the {expect} expected workers on {host} answered within {timeout:g} s"
            + (f" ({', '.join(answered)})" if answered else ""),
        )
    return Health(True, answered, f"{len(answered)} workers on {host} answered: {', '.join(answered)}")
