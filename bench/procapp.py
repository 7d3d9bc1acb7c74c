"""procrastinate 3.x: the same no-op job, serialized per queue with ``lock=``."""

from __future__ import annotations

import os

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PROC_DSN", "")))


@app.task(name="noop", queue="bench")
async def noop() -> None:
    return None
