"""``queuetopia-celery health``, the liveness check a supervisor calls, against real
workers: healthy workers pass it, a stopped (SIGSTOP) one fails it, and it passes
again once the worker runs again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.chaos


def node_name(proc) -> str:
    return proc.args[proc.args.index("-n") + 1].replace("%h", socket.gethostname())


def health(chaos, worker_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **worker_env}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "queuetopia_celery",
            "health",
            "-A",
            "tests.apps.testapp",
            "--timeout",
            "3",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("broker_kind", ["redis", "rabbitmq"])
def test_health_fails_for_a_stopped_worker_and_passes_again_after(chaos, database_url, broker_kind):
    healthy, victim = chaos.workers(2)
    env = {
        **chaos.env(),
        "QT_TEST_SCOPE": chaos.scope,
        "QT_TEST_DATABASE_URL": database_url,
        "QT_TEST_CELERY_QUEUE": chaos.celery_queue,
    }
    both = health(chaos, env, "--expect", "2")
    assert both.returncode == 0, both.stderr
    assert node_name(healthy) in both.stdout and node_name(victim) in both.stdout

    os.kill(victim.pid, signal.SIGSTOP)  # the main process: it consumes and answers
    try:
        stopped = health(chaos, env, "--worker", node_name(victim))
        assert stopped.returncode == 1, stopped.stdout
        assert node_name(victim) in stopped.stderr
        short = health(chaos, env, "--expect", "2")
        assert short.returncode == 1, short.stdout
        assert "1 of the 2 expected workers" in short.stderr
        other = health(chaos, env, "--worker", node_name(healthy))
        assert other.returncode == 0, other.stderr
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    again = health(chaos, env, "--worker", node_name(victim))
    assert again.returncode == 0, again.stderr


def test_health_without_a_broker_fails_with_one_line(chaos, database_url):
    env = {
        **chaos.env(),
        "QT_TEST_SCOPE": chaos.scope,
        "QT_TEST_DATABASE_URL": database_url,
        "QT_TEST_CELERY_QUEUE": chaos.celery_queue,
        "QT_TEST_BROKER_URL": "redis://:secret-pw@127.0.0.1:1/0",
    }
    down = health(chaos, env)
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot reach the broker"), down.stderr
    assert "secret-pw" not in down.stderr + down.stdout
