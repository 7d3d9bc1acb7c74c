"""The bench environment: a dedicated PostgreSQL database (and one for procrastinate),
Redis db 5, and worker/beat subprocesses with their RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from queuetopia_celery import make_engine, migrate

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
#: procrastinate's worker fetches the next job of a lock only when notified of a new
#: job or when this polling interval elapses (default 5 s): a short one is its best case.
PROC_POLL = float(os.environ.get("BENCH_PROC_POLL", "0.01"))


#: The enqueue scenario's modes: one by one; bulk returning the jobs; bulk returning
#: their ids (procrastinate's batch_defer is the same call in both bulk modes).
ENQUEUE_MODES = ("one", "bulk", "bulk_ids")


def wait_for(condition: Callable[[], Any], *, timeout: float = 120, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(interval)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated runs."""
    vals = sorted(values)
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def percentile(values: Sequence[float], p: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = (len(vals) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


class Env:
    """Databases and a temp dir that live for one bench run."""

    def __init__(self, *, procrastinate: bool = True) -> None:
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.tag = tag
        self.db_name = f"qt_bench_{tag}"
        self.proc_db_name = f"qt_bench_proc_{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"qt-bench-{tag}-"))
        self.admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.db_name}"'))
            if procrastinate:
                conn.execute(sa.text(f'CREATE DATABASE "{self.proc_db_name}"'))
        base = sa.engine.make_url(PG_ADMIN_URL)
        self.database_url = base.set(database=self.db_name).render_as_string(hide_password=False)
        proc_url = base.set(database=self.proc_db_name, drivername="postgresql")
        self.proc_dsn = proc_url.render_as_string(hide_password=False)
        self.engine = make_engine(self.database_url)
        migrate.upgrade(self.engine)
        self.procs: list[Proc] = []
        self._proc_schema = False

    def proc_schema(self) -> None:
        if self._proc_schema:
            return
        subprocess.run(
            [sys.executable, "-m", "procrastinate", "--app=bench.procapp.app", "schema", "--apply"],
            env={**os.environ, "BENCH_PROC_DSN": self.proc_dsn},
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        self._proc_schema = True

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.proc_db_name}" WITH (FORCE)'))
        self.admin.dispose()

    def autovacuum(self) -> str:
        with self.engine.connect() as conn:
            return str(conn.execute(sa.text("SHOW autovacuum")).scalar_one())

    def vacuum(self) -> None:
        """VACUUM (ANALYZE) our tables, outside any timing: what autovacuum does between
        bursts on a production server. Without it, on a server with autovacuum off (as
        here), dead rows of the previous runs (two job updates and a lease per job)
        pile up and every later run measures the bloat, not the engine."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("queuetopia_jobs", "queuetopia_queues", "queuetopia_leases"):
                conn.execute(sa.text(f"VACUUM (ANALYZE) {table}"))

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{self.tag}-{uuid.uuid4().hex[:6]}"

    # ------------------------------------------------------------------ processes

    def qt_env(self, scope: str, celery_queue: str, **extra: str) -> dict[str, str]:
        return {
            "BENCH_SCOPE": scope,
            "BENCH_DATABASE_URL": self.database_url,
            "BENCH_BROKER_URL": REDIS_URL,
            "BENCH_CELERY_QUEUE": celery_queue,
            **extra,
        }

    def celery_worker(
        self, module: str, queue: str, env: dict[str, str], *, concurrency: int, pool: str = "prefork"
    ) -> Proc:
        ready = self.tmp / f"ready-{uuid.uuid4().hex[:6]}"
        node = f"bench-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        args = [
            sys.executable, "-m", "celery", "-A", module, "worker",
            "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", node,
            "--loglevel", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        proc = Proc(args, {"BENCH_READY_FILE": str(ready), "BENCH_BROKER_URL": REDIS_URL, **env}, self.tmp)
        proc.node = node
        self.procs.append(proc)
        wait_for(lambda: proc.check() and ready.exists(), timeout=90, interval=0.05)
        return proc

    def celery_beat(self, module: str, env: dict[str, str]) -> Proc:
        ready = self.tmp / f"beat-ready-{uuid.uuid4().hex[:6]}"
        args = [
            sys.executable, "-m", "celery", "-A", module, "beat",
            "-s", str(self.tmp / f"beat-{uuid.uuid4().hex[:6]}"), "--loglevel", "WARNING",
        ]  # fmt: skip
        proc = Proc(args, {"BENCH_BEAT_READY_FILE": str(ready), **env}, self.tmp)
        self.procs.append(proc)
        wait_for(lambda: proc.check() and ready.exists(), timeout=90, interval=0.05)
        return proc

    def proc_worker(self, queue: str, *, concurrency: int) -> Proc:
        self.proc_schema()
        args = [
            sys.executable, "-m", "procrastinate", "--app=bench.procapp.app", "--log-level=warning", "worker",
            f"--concurrency={concurrency}", f"--queues={queue}", "--delete-jobs=never",
            f"--fetch-job-polling-interval={PROC_POLL}",
        ]  # fmt: skip
        proc = Proc(args, {"BENCH_PROC_DSN": self.proc_dsn}, self.tmp)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)


class Proc:
    """A subprocess in its own process group, output to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], tmp: Path) -> None:
        self.args = args
        self.node = ""
        self.log = tmp / f"proc-{uuid.uuid4().hex[:6]}.log"
        with self.log.open("wb") as out:
            self.handle = subprocess.Popen(
                args,
                env={**os.environ, **env},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.handle.pid

    def check(self) -> bool:
        if self.handle.poll() is not None:
            raise RuntimeError(f"{self.args[3:6]} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        return True

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], check=False, capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, timeout: float = 20) -> None:
        if self.handle.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.handle.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.handle.wait(10)


def rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, in kB."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                values[key] = int(val.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
