"""The README's "With Django" commands as written (in examples/djangoshop, on a database
and a Redis database of this test's own), and the FastAPI example with a real worker."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.acceptance.test_first_hour import readme_command, substitute
from tests.conftest import PG_ADMIN_URL, ROOT, wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(300)]

DJANGO_DIR = ROOT / "examples" / "djangoshop"
BIN = Path(sys.executable).parent


@pytest.fixture
def fresh_db() -> Iterator[str]:
    name = f"qt_ex_{uuid.uuid4().hex[:8]}"
    yield name
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _sh(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def test_with_django_as_the_readme_says(fresh_db: str, tmp_path: Path) -> None:
    names = {"djangoshop": fresh_db, "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/13"}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    createdb = readme_command("createdb -h 127.0.0.1 -U postgres djangoshop")
    _sh(substitute(createdb, {"djangoshop": fresh_db}), env, ROOT)
    readme_command("cd examples/djangoshop")
    export = readme_command(
        "export DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/djangoshop BROKER_URL=redis://127.0.0.1:6379/0"
    )
    prefix = substitute(export, names) + " && "
    _sh(prefix + readme_command("python manage.py migrate"), env, DJANGO_DIR)
    worker_cmd = readme_command("celery -A djangoshop worker --loglevel INFO &").rstrip(" &")
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        ["bash", "-c", prefix + "exec " + worker_cmd], env=env, cwd=DJANGO_DIR, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: "ready." in (tmp_path / "worker.log").read_text(), timeout=60, message="worker ready"
        )
        placed = _sh(prefix + readme_command("python manage.py place_orders 5"), env, DJANGO_DIR).stdout
        lines = placed.splitlines()
        assert lines[0] == "cancelled one order: neither it nor its job exists"
        assert [line.split(":", 1)[1].strip() for line in lines[1:]] == [
            f"shipped item {n} to alice" for n in range(1, 6)
        ]
        assert [f"(#{n} of customer-alice)" in line for n, line in enumerate(lines[1:], 1)] == [True] * 5
        status = _sh(prefix + readme_command("python manage.py queuetopia status"), env, DJANGO_DIR).stdout
        assert "scope 'shipping'" in status
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        log.close()


def test_the_fastapi_example_commits_orders_with_their_jobs(
    database_url: str, fresh_db: str, tmp_path: Path
) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{fresh_db}"'))
    admin.dispose()
    url = sa.engine.make_url(database_url).set(database=fresh_db).render_as_string(hide_password=False)
    broker = "redis://127.0.0.1:6379/14"
    env = {**os.environ, "DATABASE_URL": url, "BROKER_URL": broker}
    _sh(f"{BIN}/queuetopia-celery migrate --database-url {url}", env, ROOT)
    os.environ["DATABASE_URL"], os.environ["BROKER_URL"] = url, broker
    try:
        example = importlib.reload(importlib.import_module("examples.fastapi_orders"))
    finally:
        del os.environ["DATABASE_URL"], os.environ["BROKER_URL"]
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "examples.fastapi_orders", "worker", "--loglevel", "INFO"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    async def scenario() -> list[dict[str, int]]:
        async with example.engine.begin() as conn:
            await conn.execute(sa.text(example.ORDERS_DDL))
        transport = httpx.ASGITransport(app=example.api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            placed = []
            for n in range(4):
                response = await client.post("/orders", json={"customer": "bob", "item": f"i{n}"})
                assert response.status_code == 200, response.text
                placed.append(response.json())
            refused = await client.post("/orders", json={"customer": "bob", "item": ""})
            assert refused.status_code == 422
        await example.jobs.wakeups_sent()
        await example.engine.dispose()
        return placed

    try:
        wait_for(
            lambda: "ready." in (tmp_path / "worker.log").read_text(), timeout=60, message="worker ready"
        )
        placed = asyncio.run(scenario())
        done = [example.orders.wait(p["job"], timeout=60) for p in placed]
        assert [job.result for job in done] == [f"shipped order {p['order']} to bob" for p in placed]
        assert [job.sequence for job in done] == [1, 2, 3, 4]
        assert len(example.orders.list_jobs(queue="customer-bob")) == 4
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        log.close()
        example.orders.engine.dispose()
