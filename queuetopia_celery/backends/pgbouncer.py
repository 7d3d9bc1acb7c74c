"""Running behind PgBouncer in transaction pooling mode (see docs/scaling.md).

The library keeps no session state between transactions: its advisory locks are all
transaction-level (``pg_advisory_xact_lock``), it sets no session parameters, makes no
temporary tables and does not LISTEN. One thing does not survive transaction pooling on
PgBouncer before 1.22 (Debian 12 ships 1.18), or on a newer one without
``max_prepared_statements``: psycopg 3 prepares a statement on the server once it has
run ``prepare_threshold`` times (5) on a connection, and the next transaction may run on
another server connection, where that statement does not exist, or where another
client's statement of the same name does (``prepared statement "_pg3_0" already
exists``). ``?prepare_threshold=none`` in the database URL turns preparing off; this
module reads it, since SQLAlchemy would hand the text ``"none"`` to psycopg as is.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy.engine import URL

from ..errors import ConfigurationError

#: The URL query parameter read here, named as psycopg names the connection attribute.
PREPARE_THRESHOLD = "prepare_threshold"


def driver_options(url: URL) -> tuple[URL, dict[str, Any]]:
    """``url`` without the query parameters that are psycopg connection options rather
    than connection-string keywords, and those options as ``connect_args``:
    ``prepare_threshold=none`` (never prepare: behind PgBouncer in transaction mode)
    or an int >= 0. Raises :class:`~queuetopia_celery.ConfigurationError` on any other
    value."""
    if PREPARE_THRESHOLD not in url.query:
        return url, {}
    raw = url.query[PREPARE_THRESHOLD]
    text = (raw[-1] if isinstance(raw, tuple) else raw).strip().lower()
    threshold: int | None
    if text in ("none", "null", ""):
        threshold = None
    elif text.isdigit():
        threshold = int(text)
    else:
        raise ConfigurationError(
            f"prepare_threshold in the database URL must be an int >= 0 or none (never prepare, "
            f"for PgBouncer in transaction mode); got {text[:20]!r}"
        )
    return url.difference_update_query([PREPARE_THRESHOLD]), {PREPARE_THRESHOLD: threshold}


def prepared_statement_hint(exc: BaseException) -> str:
    """A hint to append to the message of a driver error that says a prepared
    statement is missing or already exists: what a transaction-mode pooler causes."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, (psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName)):
        return (
            " (behind PgBouncer in transaction pooling mode? add ?prepare_threshold=none to the "
            "database URL, or set max_prepared_statements on PgBouncer 1.22+: see docs/scaling.md)"
        )
    return ""
