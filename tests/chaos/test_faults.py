"""Fault injection against real ``celery worker`` / ``beat`` processes, PostgreSQL and
Redis. Each test feeds a workload, injects one fault, waits for the system to settle
and checks the invariants of :mod:`tests.chaos.harness` (which must find none
broken). ``test_the_checker_sees_a_broken_lease_check`` proves that it can fail."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from tests.chaos import harness
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.chaos


def assert_clean(verdict: harness.Verdict) -> None:
    assert not verdict.violations, verdict.summary()


def running_in(chaos, pids: set[int]) -> list[dict]:
    """Runs in progress in one of ``pids`` (started, not ended, slow enough to hit)."""
    return [run for run in harness.open_runs(chaos.engine, chaos.scope) if run["pid"] in pids]


# --------------------------------------------------------------------------- process deaths


def test_kill_9_of_a_worker_child_mid_job(chaos):
    workers = chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 300, 12, slow=0.15, slow_sleep=(0.5, 1.2))
    feeder = chaos.feeder(specs, spread=5).start()
    snapshots = []
    for _ in range(3):
        children = {pid for w in workers for pid in w.children()}
        run = wait_for(lambda c=children: running_in(chaos, c), timeout=60, message="a job running")[0]
        chaos.kill(run["pid"], signal.SIGKILL)
        snapshots.append(chaos.snapshot())
        wait_for(
            lambda: all(len(w.children()) >= 3 for w in workers), timeout=30, message="the pools to refill"
        )
    expect = feeder.join()
    verdict = chaos.finish("kill -9 worker child mid-job", expect, crashes=True, snapshots=snapshots)
    assert_clean(verdict)
    assert chaos.faults == 3


BROKERS = pytest.mark.parametrize("broker_kind", ["redis", "rabbitmq"])


def on_broker(chaos, fault: str) -> str:
    """The report's name of a fault: RabbitMQ runs say so."""
    return fault + " (RabbitMQ)" if chaos.broker.url.startswith("amqp") else fault


@BROKERS
def test_kill_9_of_the_worker_main_process(chaos):
    _, victim = chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 300, 12, slow=0.15, slow_sleep=(0.5, 1.2))
    feeder = chaos.feeder(specs, spread=4).start()
    wait_for(lambda: running_in(chaos, set(victim.children())), timeout=60, message="a job in the victim")
    children = victim.children()
    chaos.kill(victim.pid, signal.SIGKILL)
    snapshots = [chaos.snapshot()]
    for pid in children:  # orphaned children may end their job; they get no more
        chaos.kills.setdefault(pid, chaos.kills[victim.pid])
    chaos.worker()  # a replacement comes up, as under a supervisor
    expect = feeder.join()
    verdict = chaos.finish(
        on_broker(chaos, "kill -9 worker main process"), expect, crashes=True, snapshots=snapshots
    )
    assert_clean(verdict)


def test_warm_shutdown_during_a_long_job(chaos):
    _, victim = chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 200, 8, slow=0.1)
    specs += [harness.Spec(queue=f"long{i}", params={"sleep": 2.5}) for i in range(4)]
    feeder = chaos.feeder(specs, spread=3).start()
    run = wait_for(
        lambda: [r for r in running_in(chaos, set(victim.children())) if r["queue"].startswith("long")],
        timeout=60,
        message="a long job in the victim",
    )[0]
    victim.handle.send_signal(signal.SIGTERM)
    chaos.faults += 1
    victim.handle.wait(60)
    expect = feeder.join()
    verdict = chaos.finish("SIGTERM (warm shutdown) during a long job", expect, crashes=False)
    assert_clean(verdict)
    with chaos.engine.connect() as conn:
        kind = conn.execute(
            sa.text("SELECT kind FROM qt_test_events WHERE job_id = :j AND pid = :p"),
            {"j": run["job_id"], "p": run["pid"]},
        ).scalar_one()
    assert kind == "succeeded", "the warm shutdown let the running job finish"


def test_jobs_that_time_out_or_kill_their_process_every_time_end_exhausted(chaos):
    chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 150, 6)
    bad = [
        # The soft limit raises JobTimeoutError in the performer.
        harness.Spec(queue="timeout", params={"sleep": 5}, timeout=0.5, max_attempts=3, expect="exhausted"),
        # The performer ignores the soft limit: the hard limit kills the child.
        harness.Spec(
            queue="hang", params={"sleep": 5, "hang": True}, timeout=0.5, max_attempts=2, expect="exhausted"
        ),
        # The performer kills its own process every time.
        harness.Spec(queue="crash", params={"crash_times": 99}, max_attempts=3, expect="exhausted"),
    ]
    after = [harness.Spec(queue=spec.queue, params={"echo": "after"}) for spec in bad]
    feeder = chaos.feeder([], spread=0)
    feeder.create(bad)
    feeder.create(after)
    chaos.faults += sum(spec.max_attempts for spec in bad)  # every attempt times out or crashes
    feeder.specs = specs
    feeder.start()
    expect = feeder.join()
    verdict = chaos.finish("job timing out / killing itself every time", expect, crashes=True, timeout=120)
    assert_clean(verdict)
    exhausted = [j for j in harness.load(chaos.engine, chaos.scope)[0] if expect[j["id"]] == "exhausted"]
    assert sorted((j["queue"], j["attempts"]) for j in exhausted) == sorted(
        (spec.queue, spec.max_attempts) for spec in bad
    ), "each ran exactly max_attempts attempts, never more"


# --------------------------------------------------------------------------- Redis


@BROKERS
def test_broker_restarted_mid_run(chaos, broker_kind):
    """Redis: ``SHUTDOWN NOSAVE`` and a restart, every queued message lost. RabbitMQ:
    ``stop_app``/``start_app`` of the private node, every connection dropped (durable
    queues keep their persistent messages)."""
    chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 300, 12)
    feeder = chaos.feeder(specs, spread=4).start()
    wait_for(
        lambda: len(harness.open_runs(chaos.engine, chaos.scope)) or None, timeout=60, message="jobs running"
    )
    snapshots = [chaos.snapshot()]
    chaos.broker.restart()
    chaos.mark_fault()
    chaos.supervise_after_broker_outage()
    expect = feeder.join()
    fault = {
        "redis": "Redis restarted, queued messages lost",
        "rabbitmq": "RabbitMQ restarted (stop_app/start_app)",
    }[broker_kind]
    verdict = chaos.finish(fault, expect, crashes=False, snapshots=snapshots)
    assert_clean(verdict)


def test_redis_unavailable_while_jobs_are_created_and_finished(chaos):
    chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 300, 12, slow=0.1)
    feeder = chaos.feeder(specs, spread=6).start()
    wait_for(
        lambda: len(harness.open_runs(chaos.engine, chaos.scope)) or None, timeout=60, message="jobs running"
    )
    snapshots = [chaos.snapshot()]
    chaos.redis.restart(down=4)  # the feeder and the workers carry on meanwhile
    chaos.mark_fault()
    chaos.supervise_after_broker_outage()
    expect = feeder.join()
    verdict = chaos.finish("Redis down 4 s during create/finish", expect, crashes=False, snapshots=snapshots)
    assert_clean(verdict)


# --------------------------------------------------------------------------- PostgreSQL


class Terminator:
    """Terminates every backend of the workers (by application_name) now and then."""

    def __init__(self, chaos, every: float) -> None:
        self.chaos, self.every = chaos, every
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :a"
        )
        while not self.stop.wait(self.every):
            with self.chaos.engine.connect() as conn:
                self.count += conn.execute(query, {"a": self.chaos.app_name}).scalar_one()

    def __enter__(self) -> Terminator:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.parametrize(
    ("phase", "knob", "external", "crashes"),
    [
        ("dispatch", "dispatch=0.3", False, False),
        ("a job", "start=0.1", True, True),
        ("the write-back", "finish=0.1", False, True),
    ],
)
def test_postgres_connections_terminated(chaos, phase, knob, external, crashes):
    chaos.workers(2, QT_TEST_PG_KILL=knob, QT_TEST_PG_KILL_MAX="12")
    specs = harness.mixed_workload(chaos.rng, 250, 10, slow=0.15, slow_sleep=(0.3, 0.8))
    feeder = chaos.feeder(specs, spread=4).start()
    if external:
        with Terminator(chaos, every=1.5) as terminator:
            feeder.join()
        chaos.faults += terminator.count
    expect = feeder.join()
    verdict = chaos.finish(f"pg_terminate_backend during {phase}", expect, crashes=crashes)
    assert_clean(verdict)
    assert chaos.faults + len(harness.fault_rows(chaos.engine, chaos.scope)) > 0, "no fault was injected"


# --------------------------------------------------------------------------- several nodes


@pytest.mark.parametrize("beats", [2, 3])
def test_several_beat_processes_at_once(chaos, beats):
    chaos.workers(2, beat=False)
    for _ in range(beats):
        chaos.beat()
    chaos.faults += beats - 1
    specs = harness.mixed_workload(chaos.rng, 250, 12)
    expect = chaos.feeder(specs, spread=3).start().join()
    verdict = chaos.finish(f"{beats} beat processes at once", expect, crashes=False)
    assert_clean(verdict)


def test_scan_run_concurrently_from_several_workers(chaos):
    chaos.workers(3, concurrency=2)
    specs = harness.mixed_workload(chaos.rng, 300, 12)
    feeder = chaos.feeder(specs, spread=4).start()
    while not feeder.done.is_set():
        for _ in range(10):  # a burst of scans for every child to run at once
            chaos.qt.scan_task.apply_async(queue=chaos.celery_queue)
        chaos.faults += 10
        time.sleep(0.3)
    expect = feeder.join()
    verdict = chaos.finish("scan concurrently from several workers", expect, crashes=False)
    assert_clean(verdict)


# --------------------------------------------------------------------------- messages


def test_duplicate_delivery_of_perform_messages(chaos):
    """Every perform message is sent twice, and Redis redelivers the ones left unacked
    (acks_late) past a 1 s visibility timeout while their job still runs."""
    knobs = {"QT_TEST_DUPLICATE_SENDS": "1", "QT_TEST_ACKS_LATE": "1", "QT_TEST_VISIBILITY_TIMEOUT": "1"}
    workers = chaos.workers(2, **knobs)
    specs = harness.mixed_workload(chaos.rng, 200, 8, slow=0.1, slow_sleep=(1.5, 2.5))
    expect = chaos.feeder(specs, spread=12).start().join()
    harness.settle(chaos.engine, chaos.scope, len(expect), timeout=120)
    chaos.faults = sum(w.output().count("dropped a stale perform message") for w in workers)
    verdict = chaos.finish("duplicate delivery of perform messages", expect, crashes=False)
    assert_clean(verdict)


def stale_messages_scenario(chaos, **knobs: str) -> harness.Verdict:
    """Leases are taken, their messages lost; the leases expire and are re-dispatched;
    then the old messages arrive (during the run and after it)."""
    specs = harness.mixed_workload(chaos.rng, 80, 8, failing=0.1, scheduled=0)
    feeder = chaos.feeder([], spread=0)
    feeder.create(specs)
    stale = [
        (lease["queue"], lease["job_id"], lease["token"])
        for lease in harness.leases(chaos.engine, chaos.scope)
    ]
    assert stale, "the producer's kick took leases"
    chaos.redis.cli("DEL", chaos.celery_queue)  # the messages are lost
    snapshots = [chaos.snapshot()]
    chaos.worker(beat=True, concurrency=1, **knobs)

    def resend(messages) -> None:
        for message in messages:
            chaos.qt.perform_task.apply_async(args=message, queue=chaos.celery_queue)
            chaos.faults += 1

    wait_for(
        lambda: harness.open_runs(chaos.engine, chaos.scope) or harness.load(chaos.engine, chaos.scope)[1],
        timeout=60,
        message="the re-dispatched jobs to start",
    )
    resend(stale[: len(stale) // 2])
    harness.settle(chaos.engine, chaos.scope, len(specs), timeout=60)
    resend(stale[len(stale) // 2 :])
    # One child, one FIFO: once this job is done, every stale message has been handled.
    sentinel = chaos.qt.create_job("sentinel", "fast_retry", {})
    feeder.expect[sentinel.id] = "done"
    return chaos.finish(
        "stale messages after lease expiry" + (" (lease check broken: control)" if knobs else ""),
        feeder.expect,
        crashes=False,
        snapshots=snapshots,
    )


def test_stale_message_after_its_lease_expired_and_was_redispatched(chaos):
    assert_clean(stale_messages_scenario(chaos))


def test_the_checker_sees_a_broken_lease_check(chaos):
    """The same scenario with workers that skip the token check must go red."""
    verdict = stale_messages_scenario(chaos, QT_TEST_BREAK_FENCING="1")
    assert any(v.startswith("[4]") for v in verdict.violations), verdict.summary()


# --------------------------------------------------------------------------- producers


def test_producers_in_several_processes_number_jobs_in_commit_order(chaos, database_url):
    chaos.worker(beat=True)
    producers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.producer", chaos.scope, database_url, chaos.redis.url,
             chaos.celery_queue, "shared", "40", str(seed)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        for seed in range(4)
    ]  # fmt: skip
    gaps: list[str] = []

    def observe() -> None:
        """At every instant the committed sequences must be 1..n: a later commit
        never takes a number below one already visible."""
        query = sa.text("SELECT sequence FROM queuetopia_jobs WHERE scope = :s AND queue = 'shared'")
        while any(p.poll() is None for p in producers):
            with chaos.engine.connect() as conn:
                seen = sorted(conn.execute(query, {"s": chaos.scope}).scalars())
            if seen != list(range(1, len(seen) + 1)):
                gaps.append(f"visible sequences {seen[:5]}..{seen[-5:]} are not 1..{len(seen)}")

    observer = threading.Thread(target=observe, daemon=True)
    observer.start()
    committed = sum(int(p.communicate(timeout=120)[0]) for p in producers)
    observer.join(10)
    chaos.faults += len(producers)
    verdict = chaos.finish(
        "producers in 4 processes, one queue", None, crashes=False, expected_jobs=committed
    )
    assert not gaps, gaps[:5]
    assert verdict.jobs == committed
    assert_clean(verdict)
