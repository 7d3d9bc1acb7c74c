"""A paused worker (``SIGSTOP``, then ``SIGCONT``) for longer than the job's lease.

* A paused prefork child: its parent enforces Celery's hard time limit and kills it
  (SIGKILL works on a stopped process) before the lease expires, so the queue is never
  run twice at once; the job's next attempt runs after the lease, nothing is lost.
* A whole paused worker (parent and children, as a frozen VM or container): nobody
  is left to enforce the limit. The lease expires, another worker runs the job again.
  The child is resumed first (its parent still paused, so that it cannot kill it on
  resume as it otherwise does at once): it finishes long after its lease, its late
  outcome is refused by the token and the job keeps the outcome of the attempt that
  owned the lease. What a resumed child does outside the database is the limit of
  fencing (see docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.chaos import harness
from tests.conftest import wait_for

pytestmark = pytest.mark.chaos

#: Long enough to be caught running; the job's timeout is harness.JOB_TIMEOUT (3 s).
LONG = 2.5


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a stopped process is alive)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" not in state and "dead" not in state


def attempt_runs(chaos, job_id: int) -> list[dict]:
    with chaos.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM qt_test_events WHERE job_id = :j ORDER BY started_at"), {"j": job_id}
        ).mappings()
        return [dict(r) for r in rows]


def long_run_in(chaos, pids: set[int]) -> dict | None:
    runs = [
        r
        for r in harness.open_runs(chaos.engine, chaos.scope)
        if r["pid"] in pids and r["queue"].startswith("long")
    ]
    if not runs:
        return None
    first = attempt_runs(chaos, runs[0]["job_id"])[-1]
    return {**runs[0], "attempt": first["attempt"]}


def test_paused_prefork_child_is_killed_by_its_parent_before_the_lease_expires(chaos):
    workers = chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 150, 8, slow=0.1)
    specs += [harness.Spec(queue=f"long{i}", params={"sleep": LONG}) for i in range(3)]
    feeder = chaos.feeder(specs, spread=3).start()
    children = {pid for w in workers for pid in w.children()}
    run = wait_for(lambda: long_run_in(chaos, children), timeout=60, message="a long job running")
    chaos.kill(run["pid"], signal.SIGSTOP)  # it does nothing from now on
    # The next attempt of the paused job starts once its lease has expired...
    nxt = wait_for(
        lambda: [r for r in attempt_runs(chaos, run["job_id"]) if r["started_at"] > run["started_at"]],
        timeout=90,
        message="the paused job's next attempt",
    )[0]
    # ...and by then the parent had killed the paused child (hard time limit).
    still_there = alive(run["pid"])
    if still_there:
        os.kill(run["pid"], signal.SIGCONT)
    expect = feeder.join()
    verdict = chaos.finish("SIGSTOP of a prefork child past its lease", expect, crashes=True)
    assert not verdict.violations, verdict.summary()
    assert not still_there, "the paused child was still alive when the job ran again"
    assert nxt["attempt"] == run["attempt"] + 1
    assert any("Hard time limit" in w.output() for w in workers), "Celery's hard limit killed it"


def test_paused_whole_worker_has_its_late_outcome_refused(chaos):
    _, victim = chaos.workers(2)
    specs = harness.mixed_workload(chaos.rng, 100, 6, slow=0.1)
    specs += [harness.Spec(queue=f"long{i}", params={"sleep": LONG}) for i in range(3)]
    feeder = chaos.feeder(specs, spread=3).start()
    run = wait_for(
        lambda: long_run_in(chaos, set(victim.children())), timeout=60, message="a long job in the victim"
    )
    paused = set(victim.children())
    os.killpg(victim.pid, signal.SIGSTOP)  # parent and children: nobody enforces the limit
    chaos.mark_fault()

    def by_a_paused_run(violation: str) -> bool:
        """Whether ``violation`` is an overlap that only a paused run itself makes: it
        went on after its lease (every child of the paused worker running a job then
        is in that state, not only the long job followed here)."""
        still_ran = re.search(r"pid (\d+)\) still ran", violation)
        return f"job {run['job_id']} " in violation + " " or (
            still_ran is not None and int(still_ran.group(1)) in paused
        )

    wait_for(
        lambda: [
            r
            for r in attempt_runs(chaos, run["job_id"])
            if r["started_at"] > run["started_at"] and r["ended_at"] is not None
        ],
        timeout=90,
        message="the paused job's next attempt to run and end elsewhere",
    )
    # The child resumes first (its parent, still paused, cannot enforce the limit):
    # it finishes its job long after its lease and tries to write the outcome.
    os.kill(run["pid"], signal.SIGCONT)
    wait_for(
        lambda: "its outcome was dropped" in victim.output() or not alive(run["pid"]),
        timeout=30,
        message="the resumed child to try its late outcome",
    )
    os.killpg(victim.pid, signal.SIGCONT)
    expect = feeder.join()
    verdict = chaos.finish(
        "SIGSTOP of a whole worker past its lease",
        expect,
        crashes=True,
        expected_violation=by_a_paused_run,
    )
    job = next(j for j in harness.load(chaos.engine, chaos.scope)[0] if j["id"] == run["job_id"])
    runs = attempt_runs(chaos, run["job_id"])
    # Every invariant holds, except what only the paused runs themselves break: they
    # resumed after their lease and ran on (a late end overlaps the next attempt).
    others = [v for v in verdict.violations if not by_a_paused_run(v)]
    assert not others, verdict.summary()
    assert "its outcome was dropped" in victim.output(), "the late outcome was refused by the token"
    assert job["status"] == "done" and job["attempts"] == run["attempt"] + 1, (job, runs)
    with chaos.engine.connect() as conn:
        result = conn.execute(
            sa.text("SELECT result FROM queuetopia_jobs WHERE id = :j"), {"j": run["job_id"]}
        ).scalar_one()
    assert result["attempt"] == run["attempt"] + 1, "the late outcome overwrote the owner's"
