"""``?prepare_threshold=`` in a PostgreSQL URL (for PgBouncer in transaction mode):
read by make_engine into psycopg's connection option, never sent as a connection-string
keyword, and refused with a clear error when it is not a number or ``none``."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from queuetopia_celery import ConfigurationError, make_engine
from queuetopia_celery.backends.pgbouncer import driver_options


@pytest.mark.parametrize(
    ("query", "expected"),
    [("none", None), ("None", None), ("null", None), ("0", 0), ("12", 12)],
)
def test_prepare_threshold_is_read_from_the_url(query: str, expected: int | None) -> None:
    url = sa.engine.make_url(f"postgresql+psycopg://u:secret@h/db?prepare_threshold={query}&sslmode=disable")
    rest, args = driver_options(url)
    assert args == {"prepare_threshold": expected}
    assert dict(rest.query) == {"sslmode": "disable"}


def test_a_url_without_it_is_left_alone() -> None:
    url = sa.engine.make_url("postgresql+psycopg://u@h/db?sslmode=disable")
    assert driver_options(url) == (url, {})


def test_make_engine_does_not_pass_it_as_a_connection_string_keyword() -> None:
    engine = make_engine("postgresql://u:secret@h/db?prepare_threshold=none")
    _, params = engine.dialect.create_connect_args(engine.url)
    assert "prepare_threshold" not in engine.url.query
    assert "prepare_threshold" not in params


@pytest.mark.parametrize("value", ["never", "-1", "1.5"])
def test_a_bad_value_is_a_clear_error_without_the_password(value: str) -> None:
    with pytest.raises(ConfigurationError, match="prepare_threshold") as info:
        make_engine(f"postgresql://u:secret@h/db?prepare_threshold={value}")
    assert "secret" not in str(info.value)


def test_django_options_prepare_threshold_reaches_the_workers_url() -> None:
    """Django passes OPTIONS to its own psycopg connections; the workers' engine is built
    from the same settings and must not prepare either."""
    from django.db import connections

    from queuetopia_celery.contrib.django.queuetopia import database_url

    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    options["prepare_threshold"] = None
    try:
        url = sa.engine.make_url(database_url("default"))
    finally:
        del options["prepare_threshold"]
    assert driver_options(url)[1] == {"prepare_threshold": None}
