"""One driver per system: seed jobs, let a worker run them, time it."""

from __future__ import annotations

import itertools
import time
from typing import Any

import redis
import sqlalchemy as sa

from queuetopia_celery import Queuetopia
from queuetopia_celery.jobs import new_job

from . import qtapp
from .env import REDIS_URL, Env, Proc, wait_for

CONCURRENCY = 2


def open_count(qt: Queuetopia, queues: str | None = None) -> int:
    """1 while any job of the scope (of queues named ``queues*``) is open, else 0: an
    EXISTS probe, cheap enough to poll without loading the database under test."""
    sql = "SELECT 1 FROM queuetopia_jobs WHERE scope = :s AND status IN ('pending', 'running')"
    params: dict[str, Any] = {"s": qt.scope}
    if queues is not None:
        sql += " AND queue LIKE :q"
        params["q"] = queues + "%"
    with qt.engine.connect() as conn:
        return 1 if conn.execute(sa.text(sql + " LIMIT 1"), params).first() else 0


def backend_of(qt: Queuetopia) -> Any:
    """The facade's backend: ``qt.backend``, or ``qt.store`` on a revision from before
    the backend split (``python -m bench --compare`` runs this code against older
    revisions too)."""
    backend = getattr(qt, "backend", None)
    return backend if backend is not None else getattr(qt, "store")  # noqa: B009


def seed(qt: Queuetopia, queues: list[str], per_queue: int, action: str = "noop", **opts: Any) -> None:
    """Create the jobs without waking anyone (backend level: no kick)."""
    specs = [new_job(q, action, {}, **opts) for _ in range(per_queue) for q in queues]
    backend = backend_of(qt)
    for start in range(0, len(specs), 5000):
        backend.create_jobs(specs[start : start + 5000])


def dispatch_all(qt: Queuetopia, queues: list[str]) -> None:
    """What the producers' kicks do: take the leases, send the perform messages."""
    backend = backend_of(qt)
    # ``kick``; ``dispatch`` on a revision from before the backend split.
    kick = getattr(backend, "kick", None) or backend.dispatch
    for start in range(0, len(queues), 1000):
        qt.send(kick(queues[start : start + 1000], grace=qt.dispatch_grace))


class Ours:
    name = "queuetopia-celery"

    def __init__(self, env: Env, *, beat: bool = False, poll: float = 1.0, **worker_env: str) -> None:
        self.env = env
        self.scope = env.unique("qt")
        self.celery_queue = env.unique("qtq")
        extra = {"BENCH_POLL": str(poll), **worker_env}
        envvars = env.qt_env(self.scope, self.celery_queue, **extra)
        _, self.qt = qtapp.build(
            self.scope, database_url=env.database_url, broker_url=REDIS_URL, celery_queue=self.celery_queue
        )
        self.worker = env.celery_worker("bench.qtapp", self.celery_queue, envvars, concurrency=CONCURRENCY)
        self.beat: Proc | None = env.celery_beat("bench.qtapp", envvars) if beat else None

    def run(self, queues: int, per_queue: int) -> dict[str, Any]:
        prefix = self.env.unique("r")
        names = [f"{prefix}-{i}" for i in range(queues)]
        seed(self.qt, names, per_queue)
        self.env.vacuum()
        t0 = time.perf_counter()
        dispatch_all(self.qt, names)
        wait_for(lambda: open_count(self.qt, prefix) == 0, interval=0.02)
        elapsed = time.perf_counter() - t0
        out: dict[str, Any] = {
            "jobs": queues * per_queue,
            "seconds": elapsed,
            "rate": queues * per_queue / elapsed,
        }
        if queues == 1:
            with self.qt.engine.connect() as conn:
                starts = list(
                    conn.execute(
                        sa.text(
                            "SELECT extract(epoch FROM attempted_at) FROM queuetopia_jobs"
                            " WHERE scope = :s AND queue = :q ORDER BY sequence"
                        ),
                        {"s": self.scope, "q": names[0]},
                    ).scalars()
                )
            out["gaps_ms"] = [(float(b) - float(a)) * 1000 for a, b in itertools.pairwise(starts)]
        return out

    def close(self) -> None:
        self.env.stop(self.worker)
        if self.beat:
            self.env.stop(self.beat)
        self.qt.engine.dispose()


class PlainCelery:
    """No-op tasks published to a fresh Celery queue, then consumed by an idle worker
    (add_consumer), timed until the queue and the unacked set are empty."""

    name = "celery"

    def __init__(self, env: Env) -> None:
        from . import celeryapp

        self.env = env
        self.app = celeryapp.app
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.idle = env.unique("idle")
        self.worker = env.celery_worker("bench.celeryapp", self.idle, {}, concurrency=CONCURRENCY)

    def run(self, queues: int, per_queue: int) -> dict[str, Any]:
        n = queues * per_queue
        q = self.env.unique("cq")
        noop = self.app.tasks["bench.noop"]
        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                noop.apply_async(queue=q, producer=producer)
        t0 = time.perf_counter()
        self.app.control.add_consumer(q, destination=[self.worker.node], reply=True, limit=1, timeout=5)
        wait_for(lambda: self.redis.llen(q) == 0 and self.redis.hlen("unacked") == 0, interval=0.002)
        elapsed = time.perf_counter() - t0
        self.app.control.cancel_consumer(q, destination=[self.worker.node], reply=True, limit=1, timeout=5)
        return {"jobs": n, "seconds": elapsed, "rate": n / elapsed}

    def close(self) -> None:
        self.env.stop(self.worker)


class Procrastinate:
    """Jobs deferred with ``lock=<queue>`` (serial per lock), then a worker with the same
    concurrency is started; timed from the first 'started' event to the last
    'succeeded' event (database clock), so worker start-up is not counted."""

    name = "procrastinate"

    def __init__(self, env: Env) -> None:
        import os

        os.environ["BENCH_PROC_DSN"] = env.proc_dsn
        env.proc_schema()
        from . import procapp

        self.env = env
        self.app = procapp.app
        self.task = procapp.noop
        self.engine = sa.create_engine(env.proc_dsn.replace("postgresql://", "postgresql+psycopg://", 1))

    def seed(self, names: list[str], per_queue: int) -> int:
        # Each run starts from an empty table: procrastinate's fetch query slows down
        # as finished jobs pile up (we keep them for the events timestamps).
        with self.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE procrastinate_jobs CASCADE"))
        with self.engine.connect() as conn:
            first = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM procrastinate_jobs")).scalar_one()
        # Deferred round-robin over the locks, as producers of many keys would: deferred
        # lock by lock, procrastinate's fetch query (which skips the todo jobs behind a
        # busy lock one by one) degrades to a few jobs per second at 5,000 jobs.
        jobs = [self.task.configure(lock=name).job for _ in range(per_queue) for name in names]
        with self.app.open():
            for start in range(0, len(jobs), 1000):
                self.app.job_manager.batch_defer_jobs(jobs=jobs[start : start + 1000])
        return int(first)

    #: procrastinate runs 1/SCALE of the jobs per queue (at least 1): at 20-50 jobs/s
    #: here the full counts would not fit the time budget. Fewer pending jobs can only
    #: help its fetch query, so its rate is if anything flattered.
    SCALE = 10

    def run(self, queues: int, per_queue: int) -> dict[str, Any]:
        per_queue = max(per_queue // self.SCALE, 1)
        n = queues * per_queue
        prefix = self.env.unique("p")
        names = [f"{prefix}-{i}" for i in range(queues)]
        first = self.seed(names, per_queue)
        worker = self.env.proc_worker("bench", concurrency=CONCURRENCY)
        try:

            def done() -> bool:
                worker.check()
                with self.engine.connect() as conn:
                    left = conn.execute(
                        sa.text(
                            "SELECT count(*) FROM procrastinate_jobs"
                            " WHERE id > :f AND status IN ('todo', 'doing')"
                        ),
                        {"f": first},
                    ).scalar_one()
                return left == 0

            wait_for(done, timeout=300, interval=0.02)
        finally:
            self.env.stop(worker)
        with self.engine.connect() as conn:
            span = conn.execute(
                sa.text(
                    "SELECT extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
                    " - min(at) FILTER (WHERE type = 'started'))"
                    " FROM procrastinate_events WHERE job_id > :f"
                ),
                {"f": first},
            ).scalar_one()
            out: dict[str, Any] = {"jobs": n, "seconds": float(span), "rate": n / float(span)}
            if queues == 1:
                starts = list(
                    conn.execute(
                        sa.text(
                            "SELECT extract(epoch FROM at) FROM procrastinate_events"
                            " WHERE job_id > :f AND type = 'started' ORDER BY at, id"
                        ),
                        {"f": first},
                    ).scalars()
                )
                out["gaps_ms"] = [(float(b) - float(a)) * 1000 for a, b in itertools.pairwise(starts)]
        return out

    def close(self) -> None:
        self.engine.dispose()
