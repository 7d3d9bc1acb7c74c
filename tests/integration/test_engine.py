"""make_engine's pool on PostgreSQL: a connection idle for a while is pinged (and
replaced when its backend is gone) before use; one in steady use is not."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from queuetopia_celery import make_engine
from queuetopia_celery.backends import ping_when_idle


def backend_pid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def counting_pings(engine: sa.Engine) -> list[int]:
    pings: list[int] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return ping(dbapi_connection)

    engine.dialect.do_ping = counted  # type: ignore[method-assign]
    return pings


def test_a_connection_in_steady_use_is_handed_out_without_a_ping(database_url):
    engine = make_engine(database_url)
    try:
        pings = counting_pings(engine)
        first = backend_pid(engine)
        assert [backend_pid(engine) for _ in range(5)] == [first] * 5
        assert pings == []
    finally:
        engine.dispose()


def test_an_idle_connection_whose_backend_is_gone_is_replaced_before_use(database_url, engine):
    idle = sa.create_engine(sa.engine.make_url(database_url), pool_size=1)
    ping_when_idle(idle, 0.05)
    try:
        pings = counting_pings(idle)
        dead = backend_pid(idle)
        with engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": dead})
        time.sleep(0.1)  # idle for longer than the window
        assert backend_pid(idle) != dead  # no error: the dead connection was replaced
        assert len(pings) >= 1
    finally:
        idle.dispose()
