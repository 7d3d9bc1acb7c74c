"""The background sender of committed jobs' perform messages (``AfterCommit``): it
publishes every lease submitted, merges what piled up while it was busy, survives a
failing publish, and a forked child starts its own thread."""

from __future__ import annotations

import os
import threading

from queuetopia_celery.backends.base import Lease
from queuetopia_celery.wakeup import AfterCommit
from tests.conftest import wait_for


def lease(n: int) -> Lease:
    return Lease(f"q{n}", n, f"t{n}", 60.0)


def test_every_lease_is_published_once_and_those_piled_up_meanwhile_together():
    calls: list[list[Lease]] = []
    busy = threading.Event()
    release = threading.Event()

    def publish(leases):
        calls.append(list(leases))
        busy.set()
        release.wait(10)

    sender = AfterCommit(publish)
    sender.submit([lease(1)])
    assert busy.wait(10)
    for n in range(2, 6):  # while the first publish is running
        sender.submit([lease(n)])
    assert not sender.flush(0.05)
    release.set()
    assert sender.flush(10)
    assert calls == [[lease(1)], [lease(n) for n in range(2, 6)]]
    sender.submit([])  # nothing to send: no call
    assert sender.flush(1) and len(calls) == 2


def test_a_failing_publish_is_logged_and_the_thread_goes_on(caplog):
    sent: list[Lease] = []

    def publish(leases):
        if leases[0].job_id == 1:
            raise SystemExit("broker gone")
        sent.extend(leases)

    sender = AfterCommit(publish)
    with caplog.at_level("ERROR", logger="queuetopia_celery.wakeup"):
        sender.submit([lease(1)])
        assert sender.flush(10)
    assert "could not send the perform messages of queues ['q1']; the next scan will" in caplog.text
    sender.submit([lease(2)])
    assert sender.flush(10) and sent == [lease(2)]


def test_a_forked_child_publishes_from_its_own_thread(tmp_path):
    out = tmp_path / "child"

    def publish(leases):
        with out.open("a") as f:
            f.write(f"{os.getpid()} {[x.job_id for x in leases]}\n")

    sender = AfterCommit(publish)
    sender.submit([lease(1)])
    assert sender.flush(10)
    pid = os.fork()
    if pid == 0:  # the child: its own thread, none of the parent's leases
        try:
            sender.submit([lease(2)])
            os._exit(0 if sender.flush(10) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: len(out.read_text().splitlines()) == 2, timeout=10, message="both lines")
    parent, child = out.read_text().splitlines()
    assert parent == f"{os.getpid()} [1]" and child == f"{pid} [2]"
