"""Ordered tasks (``@qt.task``) and the send_task path, with real ``celery worker``
processes running tests/apps/orderedapp.py on PostgreSQL and Redis."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from queuetopia_celery import InvalidJobError, JobState, Queuetopia, UnsupportedOptionError
from tests.apps import orderedapp
from tests.conftest import REDIS_URL, ROOT, Proc, events, wait_for

pytestmark = pytest.mark.acceptance


@pytest.fixture
def ordered(
    database_url: str, scope: str, celery_queue: str
) -> Iterator[tuple[Queuetopia, dict[str, Any]]]:
    """The producer side: the same module as the workers' app, in this process."""
    _, qt, tasks = orderedapp.build(
        scope, database_url=database_url, broker_url=REDIS_URL, celery_queue=celery_queue
    )
    yield qt, tasks
    qt.engine.dispose()


@pytest.fixture
def start_ordered_worker(
    database_url: str, scope: str, celery_queue: str, tmp_path: Path
) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(*, concurrency: int = 3, env: dict[str, str] | None = None) -> Proc:
        n = len(procs)
        ready = tmp_path / f"ordered-ready-{n}"
        env = {
            **os.environ,
            "QT_ORDERED_SCOPE": scope,
            "QT_ORDERED_DATABASE_URL": database_url,
            "QT_ORDERED_BROKER_URL": REDIS_URL,
            "QT_ORDERED_BACKEND_URL": REDIS_URL,
            "QT_ORDERED_CELERY_QUEUE": celery_queue,
            "QT_ORDERED_READY_FILE": str(ready),
            **(env or {}),
        }
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.orderedapp",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-Q",
            celery_queue,
            "-n",
            f"ordered{n}-{uuid.uuid4().hex[:6]}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "-B",  # the scan: scheduled jobs and retries
            "-s",
            str(tmp_path / f"ordered-beat-{n}"),
        ]
        proc = Proc(args, env, tmp_path / f"ordered-worker-{n}.log", ready)
        procs.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in procs:
        proc.stop()


def _by_queue(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["queue"], []).append(row)
    return out


def test_a_task_moved_to_an_ordered_queue_keeps_its_callers_and_runs_in_order_per_key(
    ordered: tuple[Queuetopia, dict[str, Any]],
    start_ordered_worker: Callable[..., Proc],
    engine: sa.Engine,
    scope: str,
) -> None:
    qt, tasks = ordered
    charge, checkout = tasks["charge"], tasks["checkout"]
    start_ordered_worker(concurrency=3)

    jobs = [checkout(account, n) for n in range(6) for account in (1, 2, 3)]  # Celery-style callers
    jobs.append(charge.apply_async((3, 100)))  # positional args, as with Celery
    assert {job.queue for job in jobs} == {"account-1", "account-2", "account-3"}

    # apply_async(countdown=): the job's scheduled_at, and it does not run before.
    later = charge.apply_async(kwargs={"account_id": 4, "amount": 7}, countdown=1.5)
    assert later.state is JobState.SCHEDULED
    assert later.scheduled_at > later.inserted_at + dt.timedelta(seconds=1)

    # connection=: the job joins the caller's transaction; a rollback leaves nothing.
    with qt.engine.connect() as conn:
        tx = conn.begin()
        conn.execute(sa.text("SELECT 1"))
        rolled_back = charge.apply_async(kwargs={"account_id": 1, "amount": 999}, connection=conn)
        tx.rollback()
    with qt.engine.begin() as conn:
        committed = charge.apply_async(kwargs={"account_id": 1, "amount": 555}, connection=conn)

    # Clear errors at the call, nothing written.
    before = len(qt.list_jobs())
    with pytest.raises(UnsupportedOptionError, match="priority"):
        charge.apply_async(kwargs={"account_id": 1, "amount": 1}, priority=9)
    with pytest.raises(UnsupportedOptionError, match="link"):
        charge.apply_async(kwargs={"account_id": 1, "amount": 1}, link="next")
    with pytest.raises(TypeError, match="missing a required argument: 'account_id'"):
        charge.delay(amount=1)
    with pytest.raises(InvalidJobError, match="account_id"):
        charge.delay(account_id=None, amount=1)  # never a job in queue "account-None"
    with pytest.raises(InvalidJobError, match="params"):
        charge.delay(account_id=1, amount=(1, 2))  # a tuple is not JSON
    assert len(qt.list_jobs()) == before

    done = [qt.wait(job, timeout=60) for job in [*jobs, later, committed]]
    assert {job.state for job in done} == {JobState.DONE}
    assert done[0].result == {"account_id": 1, "charged": 0, "attempt": 1}  # the return value, stored
    assert qt.get_job(rolled_back.id) is None
    assert refund_queue(tasks) == "account-5"

    by_job = {job.id: job for job in done}
    assert by_job[later.id].attempted_at is not None
    assert by_job[later.id].attempted_at >= later.scheduled_at

    rows = events(engine, scope)
    assert "charge 999" not in {row["kind"] for row in rows}
    for queue, runs in _by_queue(rows).items():
        assert [row["sequence"] for row in runs] == sorted(row["sequence"] for row in runs), queue
        for first, second in itertools.pairwise(runs):
            assert second["started_at"] >= first["ended_at"], f"{queue}: overlap"
    assert [row["kind"] for row in _by_queue(rows)["account-1"]] == [
        *(f"charge {n}" for n in range(6)),
        "charge 555",
    ]


def refund_queue(tasks: dict[str, Any]) -> str:
    """The callable key: ``queue=lambda account_id, **_: ...``."""
    job = tasks["refund"].delay(5, 10)
    return str(job.queue)


def test_bind_gives_the_job_and_autoretry_for_retries_only_those_exceptions(
    ordered: tuple[Queuetopia, dict[str, Any]], start_ordered_worker: Callable[..., Proc], scope: str
) -> None:
    qt, tasks = ordered
    start_ordered_worker(concurrency=2)
    flaky = tasks["flaky"].delay(key="a", fail_times=2)
    retried = tasks["picky"].delay(key="a", errors=["ConnectionError", "ConnectionError"])
    given_up = tasks["picky"].delay(key="b", errors=["ConnectionError", "ValueError"])
    behind = tasks["picky"].delay(key="b", errors=[])

    flaky = qt.wait(flaky, timeout=60)
    assert flaky.state is JobState.DONE
    assert flaky.result == {
        "attempt": 3,
        "idempotency_key": f"queuetopia:{scope}:{flaky.id}",
        "job_id": flaky.id,
    }

    retried = qt.wait(retried, timeout=60)
    assert (retried.state, retried.attempts, retried.result) == (JobState.DONE, 3, "ok")

    given_up = qt.wait(given_up, timeout=60)
    assert (given_up.state, given_up.attempts, given_up.max_attempts) == (JobState.EXHAUSTED, 2, 5)
    assert given_up.error is not None
    assert given_up.error.startswith("DoNotRetry: ValueError: card declined")
    assert "ValueError: card declined" in given_up.error  # the cause's traceback is kept
    assert qt.wait(behind, timeout=60).state is JobState.DONE  # the queue moved on


def _sender() -> Celery:
    """A producer that knows only Celery: no queuetopia import, no database."""
    return Celery("elsewhere", broker=REDIS_URL, backend=REDIS_URL)


def test_send_task_creates_each_message_once_in_commit_order_with_recipes_for_strict_order(
    ordered: tuple[Queuetopia, dict[str, Any]],
    start_ordered_worker: Callable[..., Proc],
    scope: str,
    celery_queue: str,
    engine: sa.Engine,
) -> None:
    qt, _ = ordered
    start_ordered_worker(concurrency=3)
    sender = _sender()
    name = f"queuetopia.{scope}.create"

    def send(task_id: str | None = None, **fields: Any) -> Any:
        return sender.send_task(name, kwargs=fields, queue=celery_queue, task_id=task_id)

    def charge(account: int, amount: int) -> dict[str, Any]:
        return {"queue": f"account-{account}", "action": "charge",
                "params": {"account_id": account, "amount": amount}}  # fmt: skip

    # A redelivered message (same task id), one after the other and all at once.
    message_id = f"{scope}-msg-{uuid.uuid4().hex}"
    first = send(message_id, **charge(1, 10)).get(timeout=30)
    again = send(message_id, **charge(1, 10)).get(timeout=30)
    assert first == again
    burst_id = f"{scope}-burst-{uuid.uuid4().hex}"
    results = [send(burst_id, **charge(2, 20)) for _ in range(5)]
    assert len({result.get(timeout=30) for result in results}) == 1
    assert [job.params["amount"] for job in qt.list_jobs(queue="account-1")] == [10]
    assert [job.params["amount"] for job in qt.list_jobs(queue="account-2")] == [20]
    assert qt.wait(first, timeout=60).result == {"account_id": 1, "charged": 10, "attempt": 1}

    # Strict order, recipe 1: the jobs in one message, created in list order.
    ids = send(jobs=[charge(3, n) for n in range(5)]).get(timeout=30)
    assert [qt.get_job(i).sequence for i in ids] == sorted(qt.get_job(i).sequence for i in ids)
    # Strict order, recipe 2: one message per queue in flight.
    for n in range(5):
        send(**charge(4, n)).get(timeout=30)
    in_order = sorted(qt.list_jobs(queue="account-4"), key=lambda job: job.sequence)
    assert [job.params["amount"] for job in in_order] == list(range(5))

    # What the path does not promise: a message whose create is delayed (here held
    # behind a lock; in life a busy worker, a retry, a redelivery) commits after a
    # message sent later, and its job is behind.
    held_id = f"{scope}-held-{uuid.uuid4().hex}"
    with engine.connect() as conn:
        tx = conn.begin()
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_messages (scope, message_id, inserted_at) VALUES (:s, :m, now())"
            ),
            {"s": scope, "m": held_id},
        )
        sent_first = send(held_id, **charge(5, 1))
        sent_second = send(**charge(5, 2))
        sent_second.get(timeout=30)
        tx.rollback()  # the first message's create goes on
    sent_first.get(timeout=30)
    in_queue = sorted(qt.list_jobs(queue="account-5"), key=lambda job: job.sequence)
    assert [job.params["amount"] for job in in_queue] == [2, 1]

    # A message with bad fields fails for good and writes nothing.
    bad = send(**{**charge(6, 1), "colour": "red"})
    bad.get(timeout=30, propagate=False)
    assert bad.state == "FAILURE"
    assert qt.list_jobs(queue="account-6") == []
    wait_for(lambda: all(job.state is JobState.DONE for job in qt.list_jobs()), timeout=60)


def test_a_message_redelivered_after_its_worker_died_creates_nothing_twice(
    ordered: tuple[Queuetopia, dict[str, Any]],
    start_ordered_worker: Callable[..., Proc],
    scope: str,
    celery_queue: str,
    tmp_path: Path,
) -> None:
    """The worker process dies after the create committed and before Celery acked the
    message: the message is requeued (acks_late, reject_on_worker_lost) and delivered
    again, and the second delivery finds the first one's jobs."""
    qt, _ = ordered
    worker = start_ordered_worker(concurrency=1, env={"QT_ORDERED_DIE_AFTER_CREATE": str(tmp_path)})
    message_id = f"die-{uuid.uuid4().hex}"
    fields = {"queue": "account-1", "action": "charge", "params": {"account_id": 1, "amount": 10}}
    result = _sender().send_task(
        f"queuetopia.{scope}.create", kwargs=fields, queue=celery_queue, task_id=message_id
    )
    job_id = result.get(timeout=60)
    assert (tmp_path / message_id).read_text() == str(job_id)  # the first delivery created it, then died
    assert "WorkerLostError" in worker.output()
    assert [job.id for job in qt.list_jobs(queue="account-1")] == [job_id]
    assert qt.wait(job_id, timeout=60).state is JobState.DONE


#: A Redis database of this test's own: the example uses Celery's default queue.
EXAMPLE_REDIS_URL = os.environ.get("QT_TEST_ACCOUNTS_REDIS_URL", "redis://127.0.0.1:6379/13")


def test_the_readme_example_runs_each_accounts_charges_in_order(
    database_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    """examples/accounts.py, shown whole in the README, run as the README says."""
    example = (ROOT / "examples" / "accounts.py").read_text()
    assert f"```python\n{example}```" in (ROOT / "README.md").read_text()
    import redis

    redis.Redis.from_url(EXAMPLE_REDIS_URL).flushdb()
    env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": EXAMPLE_REDIS_URL}
    worker = Proc(
        [sys.executable, "-m", "celery", "-A", "examples.accounts", "worker", "-B", "-c", "2",
         "-s", str(tmp_path / "schedule"), "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
        env,
        tmp_path / "worker.log",
        tmp_path / "never",
    )  # fmt: skip
    try:
        wait_for(lambda: "ready." in worker.output(), timeout=60, message="example worker ready")
        produced = subprocess.run(
            [sys.executable, "-m", "examples.accounts", "checkout", "12"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert produced.returncode == 0, produced.stderr
        payments = Queuetopia("payments", app=Celery("reader"), engine=engine, disabled=True)
        wait_for(
            lambda: len(payments.list_jobs(state=JobState.DONE)) == 12, timeout=60, message="12 charges done"
        )
        printed = [line.split("] ")[-1] for line in worker.output().splitlines() if "charging" in line]
        for account in (0, 1):
            jobs = sorted(payments.list_jobs(queue=f"account-{account}"), key=lambda job: job.sequence)
            amounts = [job.params["amount"] for job in jobs]
            assert amounts == list(range(account, 12, 2))
            assert [job.result for job in jobs] == [{"account_id": account, "charged": n} for n in amounts]
            done = [job.done_at for job in jobs]
            assert done == sorted(done)
            mine = [line for line in printed if line.startswith(f"account {account}:")]
            assert mine == [f"account {account}: charging {n}" for n in amounts]
    finally:
        worker.stop()
