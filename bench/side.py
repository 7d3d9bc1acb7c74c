"""One side of ``python -m bench --compare REV``: a process that runs single
measurements of queuetopia-celery on request, with whatever ``queuetopia_celery`` its
Python imports (this checkout, or REV installed in its own virtual environment).

It owns its bench environment: a fresh database migrated by its own revision's
migrations, and its own ``celery worker`` processes (started with the same Python, so
they run the same revision). It reads one JSON command a line on stdin and answers one
JSON line each on stdout; its logs go to stderr. EOF on stdin (the driver is gone) or
SIGTERM stops its workers and drops its database."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

import queuetopia_celery
from queuetopia_celery import migrate

from .env import Env, load
from .scenarios import enqueue_once, latency_samples
from .systems import Ours

OPS = ("hello", "start", "throughput", "latency", "enqueue")


class Side:
    def __init__(self) -> None:
        self.env = Env(procrastinate=False)
        self.ours: Ours | None = None

    def _ours(self) -> Ours:
        if self.ours is None:
            self.ours = Ours(self.env)
        return self.ours

    def hello(self) -> dict[str, Any]:
        from importlib import metadata

        head = getattr(migrate, "head", None)
        return {
            "python": sys.executable,
            "queuetopia_celery_file": queuetopia_celery.__file__,
            "queuetopia_celery_version": metadata.version("queuetopia-celery"),
            "migration_head": head() if callable(head) else None,
            "database": self.env.db_name,
            "postgresql_autovacuum": self.env.autovacuum(),
        }

    def start(self) -> None:
        """Start the worker now, so that no measurement waits for it."""
        self._ours()

    def throughput(self, queues: int, per_queue: int) -> dict[str, Any]:
        return self._ours().run(queues, per_queue)

    def latency(self, samples: int) -> list[float]:
        return latency_samples(self.env, self._ours(), samples)

    def enqueue(self, mode: str, procs: int, target: str, n_total: int) -> float:
        return enqueue_once(
            self.env, "queuetopia-celery", mode=mode, procs=procs, target=target, n_total=n_total
        )

    def close(self) -> None:
        if self.ours is not None:
            self.ours.close()
        self.env.close()


def main() -> int:
    # The answers keep the real stdout; anything printed (by us or a library) goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    side = Side()
    try:
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            if op == "close":
                break
            try:
                if op not in OPS:
                    raise ValueError(f"unknown command {op!r}")
                value = getattr(side, op)(**command)
                answer: dict[str, Any] = {"ok": value, "load": load()}
            except Exception:
                answer = {"error": traceback.format_exc()}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
    finally:
        side.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
