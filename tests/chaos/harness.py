"""The chaos harness: a workload, a settle wait, and the invariant checker.

The checker reads only what the performers logged (``qt_test_events``) and the
public tables (``queuetopia_jobs``, ``queuetopia_leases``): it does not depend on how
the engine reaches its result, only on what it promises.

Invariants (numbered as in issue 3):

1. every job ends ``done`` (or ``exhausted`` where the workload said so); none lost;
2. no two runs of one queue overlap in time;
3. within a queue, successful completions follow (scheduled_at, sequence) order;
4. no job succeeds twice under one attempt, no attempt starts twice, no job runs
   more than ``max_attempts`` attempts; a success whose outcome was lost (the job ran
   again) is a *repeated side effect*: allowed only where the fault may crash a job
   mid-way, and always counted;
5. no lease left behind, no queue left blocked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from queuetopia_celery import Queuetopia

UTC = dt.timezone.utc

#: Env knobs every chaos worker gets: short poll, grace and margins, so that a lost
#: message or a dead worker is recovered within seconds.
FAST_ENV = {
    "QT_TEST_POLL": "0.3",
    "QT_TEST_DISPATCH_GRACE": "4",
    "QT_TEST_LEASE_MARGIN": "1",
    "QT_TEST_TIME_LIMIT_GRACE": "0.5",
}
#: The producer side uses the same timings.
FAST_OPTIONS = {"poll_interval": 0.3, "dispatch_grace": 4.0, "lease_margin": 1.0, "time_limit_grace": 0.5}
#: How long after its ``inserted_at`` a job is surely committed, for jobs whose
#: producer did not say when it committed.
COMMIT_SLACK = dt.timedelta(seconds=1)
#: Whether a lost database connection (a restart, an outage, a terminated backend)
#: may repeat a job that had succeeded, with the default timings: no, the outcome write
#: is retried on a new connection under the same token while its lease lasts (75 s by
#: default). See :func:`outage_may_repeat` for the shortened timings.
CONNECTION_LOSS_MAY_REPEAT = False


def outage_may_repeat(settings: str) -> bool:
    """Whether a PostgreSQL outage or restart may repeat a job under ``settings``. With
    the shortened timings a running lease lasts JOB_TIMEOUT + 1.5 s (4.5 s): a restart
    under load or a 10 s outage outlives it, so the scan rightly takes the job from a
    worker that could not reach the database to write its outcome (the one repeat a
    lease allows). With the defaults, it may not."""
    return CONNECTION_LOSS_MAY_REPEAT or settings == "fast"
#: Job timeout used by the workload (keeps the running lease, hence recovery, short).
JOB_TIMEOUT = 3.0


def scale() -> float:
    """QT_CHAOS_SCALE multiplies the workload sizes (the report runs bigger ones)."""
    return float(os.environ.get("QT_CHAOS_SCALE", "1"))


# --------------------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Spec:
    """One planned job and how it must end."""

    queue: str
    params: dict[str, Any]
    action: str = "fast_retry"
    delay: float = 0.0  # scheduled this many seconds after creation
    timeout: float = JOB_TIMEOUT
    max_attempts: int = 5
    expect: str = "done"

    def as_create(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "queue": self.queue,
            "action": self.action,
            "params": self.params,
            "timeout": self.timeout,
            "max_attempts": self.max_attempts,
        }
        if self.delay:
            item["scheduled_at"] = dt.datetime.now(UTC) + dt.timedelta(seconds=self.delay)
        return item


def mixed_workload(
    rng: random.Random,
    jobs: int,
    queues: int,
    *,
    slow: float = 0.08,
    slow_sleep: tuple[float, float] = (0.2, 0.6),
    failing: float = 0.15,
    scheduled: float = 0.05,
    prefix: str = "q",
) -> list[Spec]:
    """Many queues; most jobs quick, some slow, some failing once or twice at random
    before succeeding, some scheduled a little in the future."""
    specs = []
    for i in range(int(jobs * scale())):
        params: dict[str, Any] = {"echo": i}
        roll = rng.random()
        if roll < slow:
            params["sleep"] = round(rng.uniform(*slow_sleep), 2)
        elif roll < slow + failing:
            params["fail_times"] = rng.choice((1, 1, 2))
        delay = round(rng.uniform(0.5, 2.5), 2) if rng.random() < scheduled else 0.0
        specs.append(Spec(queue=f"{prefix}{rng.randrange(queues)}", params=params, delay=delay))
    return specs


class Feeder:
    """Creates the planned jobs from a background thread, in batches (one
    transaction each) and singly, spread over ``spread`` seconds."""

    def __init__(
        self,
        qt: Queuetopia,
        specs: Sequence[Spec],
        *,
        spread: float = 4.0,
        seed: int = 0,
        visible: dict[int, dt.datetime] | None = None,
    ) -> None:
        self.qt = qt
        #: When each job was known committed (create_jobs returned): see :func:`judge`.
        self.visible = visible if visible is not None else {}
        self.specs = list(specs)
        self.spread = spread
        self.rng = random.Random(seed)
        self.expect: dict[int, str] = {}
        self.errors: list[BaseException] = []
        #: Every exception a create raised before it was tried again.
        self.refusals: list[BaseException] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            chunks: list[list[Spec]] = []
            rest = list(self.specs)
            while rest:
                size = 1 if self.rng.random() < 0.3 else self.rng.randint(5, 60)
                chunks.append(rest[:size])
                rest = rest[size:]
            pause = self.spread / max(len(chunks), 1)
            for chunk in chunks:
                self.create(chunk)
                time.sleep(pause)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)
        finally:
            self.done.set()

    def create(self, chunk: Sequence[Spec], *, patience: float = 150) -> None:
        """Create ``chunk`` in one transaction; while the database is under attack (or
        down), note the error and try again, for up to ``patience`` seconds."""
        deadline = time.monotonic() + patience
        while True:
            try:
                jobs = self.qt.create_jobs([spec.as_create() for spec in chunk])
                break
            except Exception as exc:  # the database may be under attack: try again
                self.refusals.append(exc)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        committed = dt.datetime.now(UTC)
        for job, spec in zip(jobs, chunk, strict=True):
            self.expect[job.id] = spec.expect
            self.visible[job.id] = committed

    def join(self, timeout: float = 120) -> dict[int, str]:
        self.thread.join(timeout)
        if self.errors:
            raise self.errors[0]
        assert not self.thread.is_alive(), "the feeder did not finish"
        return self.expect


# --------------------------------------------------------------------------- observing


def db_now(engine: sa.Engine) -> dt.datetime:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()


def open_runs(engine: sa.Engine, scope: str) -> list[dict[str, Any]]:
    """Events started and not ended: jobs running now (or killed)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT job_id, queue, pid, started_at FROM qt_test_events"
                " WHERE scope = :s AND ended_at IS NULL ORDER BY started_at"
            ),
            {"s": scope},
        ).mappings()
        return [dict(r) for r in rows]


def leases(engine: sa.Engine, scope: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM queuetopia_leases WHERE scope = :s"), {"s": scope}
        ).mappings()
        return [dict(r) for r in rows]


def settle(engine: sa.Engine, scope: str, expected: int, *, timeout: float = 90) -> float:
    """Wait until ``expected`` jobs exist, none is open and no lease is held (or the
    deadline passes: the checker then names what is stuck). Returns seconds waited."""
    began = time.monotonic()
    query = sa.text(
        "SELECT (SELECT count(*) FROM queuetopia_jobs WHERE scope = :s),"
        " (SELECT count(*) FROM queuetopia_jobs WHERE scope = :s AND status IN ('pending', 'running')),"
        " (SELECT count(*) FROM queuetopia_leases WHERE scope = :s)"
    )
    while time.monotonic() - began < timeout:
        try:
            with engine.connect() as conn:
                total, open_, held = conn.execute(query, {"s": scope}).one()
        except sa.exc.OperationalError:
            total, open_, held = -1, -1, -1
        if total >= expected and open_ == 0 and held == 0:
            break
        time.sleep(0.2)
    return time.monotonic() - began


def fault_rows(engine: sa.Engine, scope: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT kind, pid, at FROM qt_test_faults WHERE scope = :s ORDER BY at"), {"s": scope}
        ).mappings()
        return [dict(r) for r in rows]


# --------------------------------------------------------------------------- checking


@dataclasses.dataclass
class Verdict:
    """What the checker found."""

    jobs: int = 0
    runs: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    repeated_side_effects: int = 0

    def summary(self, limit: int = 25) -> str:
        lines = [f"{len(self.violations)} invariant violations in {self.jobs} jobs / {self.runs} runs:"]
        lines += [f"  - {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join(lines)


def load(engine: sa.Engine, scope: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    with engine.connect() as conn:
        jobs = [
            dict(r)
            for r in conn.execute(
                sa.text(
                    "SELECT id, queue, sequence, scheduled_at, inserted_at, status, attempts, max_attempts"
                    " FROM queuetopia_jobs WHERE scope = :s"
                ),
                {"s": scope},
            ).mappings()
        ]
        events = [
            dict(r)
            for r in conn.execute(
                sa.text("SELECT * FROM qt_test_events WHERE scope = :s ORDER BY started_at, id"),
                {"s": scope},
            ).mappings()
        ]
        held = conn.execute(
            sa.text("SELECT count(*) FROM queuetopia_leases WHERE scope = :s"), {"s": scope}
        ).scalar_one()
    return jobs, events, int(held)


def check(
    engine: sa.Engine,
    scope: str,
    expect: dict[int, str] | None = None,
    *,
    crashes: bool,
    kills: dict[int, dt.datetime] | None = None,
    visible: dict[int, dt.datetime] | None = None,
) -> Verdict:
    """Check the five invariants for ``scope`` (see the module docstring).

    ``expect`` maps job ids to ``done``/``exhausted`` (jobs not in it must be done).
    ``crashes`` says whether the fault may crash a job mid-way (so that a success may
    have been lost and the job run again). ``kills`` maps killed pids to when they
    were killed (database clock): a run they left open ended then at the latest.
    """
    jobs, events, held = load(engine, scope)
    return judge(jobs, events, held, expect or {}, crashes=crashes, kills=kills or {}, visible=visible)


def judge(
    jobs: list[dict[str, Any]],
    events: list[dict[str, Any]],
    held_leases: int,
    expect: dict[int, str],
    *,
    crashes: bool,
    kills: dict[int, dt.datetime],
    visible: dict[int, dt.datetime] | None = None,
) -> Verdict:
    """The pure part of :func:`check`: judge rows already read.

    ``visible`` says when each job was known committed (by its producer); for other
    jobs, ``inserted_at`` + :data:`COMMIT_SLACK`. A job that comes earlier by
    (scheduled_at, sequence) but was committed after a later one started (it was
    created due in the past) does not count as overtaken."""
    visible = visible or {}
    verdict = Verdict(jobs=len(jobs), runs=len(events))
    bad = verdict.violations
    by_id = {job["id"]: job for job in jobs}

    # 1. every job ends as planned; none lost
    for job_id in sorted(set(expect) - set(by_id)):
        bad.append(f"[1] job {job_id} was created but is gone from the table")
    for job in jobs:
        wanted = expect.get(job["id"], "done")
        if job["status"] != wanted:
            bad.append(
                f"[1] job {job['id']} (queue {job['queue']}, seq {job['sequence']}) ended "
                f"{job['status']} after {job['attempts']} attempts, expected {wanted}"
            )

    # 2. no overlap within a queue
    runs_by_queue: dict[str, list[tuple[dt.datetime, dt.datetime, dict[str, Any]]]] = defaultdict(list)
    # A prefork child runs one job at a time: a run it left open (its end was never
    # recorded: killed, or the database was down) ended before its next run began.
    starts_by_pid: dict[int, list[dt.datetime]] = defaultdict(list)
    for ev in events:
        starts_by_pid[ev["pid"]].append(ev["started_at"])
    for ev in events:
        end = ev["ended_at"]
        if end is None:
            killed = kills.get(ev["pid"])
            end = killed if killed is not None and killed > ev["started_at"] else ev["started_at"]
            later = [start for start in starts_by_pid[ev["pid"]] if start > ev["started_at"]]
            if later:
                end = min(end, *later)
        runs_by_queue[ev["queue"]].append((ev["started_at"], end, ev))
    for queue, runs in runs_by_queue.items():
        runs.sort(key=lambda r: (r[0], r[1]))
        latest_end, latest = None, None
        for start, end, ev in runs:
            if latest_end is not None and start < latest_end and latest is not None:
                bad.append(
                    f"[2] queue {queue}: job {ev['job_id']} (attempt {ev['attempt']}, pid {ev['pid']}) "
                    f"started while job {latest['job_id']} (attempt {latest['attempt']}, "
                    f"pid {latest['pid']}) still ran"
                )
            if latest_end is None or end > latest_end:
                latest_end, latest = end, ev

    # 4. attempts start once; success once; never past max_attempts
    events_by_job: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        events_by_job[ev["job_id"]].append(ev)
    finals: dict[str, list[tuple[dt.datetime, dt.datetime, dict[str, Any]]]] = defaultdict(list)
    for job_id, evs in events_by_job.items():
        job = by_id.get(job_id)
        if job is None:
            bad.append(f"[4] job {job_id} ran but is not in the table")
            continue
        seen: dict[int, int] = defaultdict(int)
        for ev in evs:
            seen[ev["attempt"]] += 1
        for attempt, count in seen.items():
            if count > 1:
                bad.append(f"[4] job {job_id}: attempt {attempt} started {count} times")
            if attempt > job["max_attempts"] or attempt > job["attempts"]:
                bad.append(
                    f"[4] job {job_id}: ran attempt {attempt}, recorded {job['attempts']}"
                    f" of max {job['max_attempts']}"
                )
        succeeded = [ev for ev in evs if ev["kind"] == "succeeded"]
        final = [ev for ev in succeeded if job["status"] == "done" and ev["attempt"] == job["attempts"]]
        if job["status"] == "done":
            if len(final) != 1:
                bad.append(f"[4] job {job_id} is done but {len(final)} runs of its last attempt succeeded")
            else:
                finals[job["queue"]].append((final[0]["ended_at"], final[0]["started_at"], job))
        repeats = len(succeeded) - len(final)
        if repeats:
            verdict.repeated_side_effects += repeats
            if not crashes:
                bad.append(f"[4] job {job_id} succeeded {len(succeeded)} times without a crash")
    for job in jobs:
        if job["attempts"] > job["max_attempts"]:
            bad.append(f"[4] job {job['id']}: {job['attempts']} attempts > max {job['max_attempts']}")
        if job["status"] == "done" and job["id"] not in events_by_job:
            bad.append(f"[4] job {job['id']} is done but never ran")

    # 3. completions in (scheduled_at, sequence) order within each queue
    for queue, done in finals.items():
        done.sort(key=lambda item: item[0])
        for i, (_, started, earlier) in enumerate(done):
            key = (earlier["scheduled_at"], earlier["sequence"])
            for _, _, job in done[i + 1 :]:
                seen = visible.get(job["id"], job["inserted_at"] + COMMIT_SLACK)
                if (job["scheduled_at"], job["sequence"]) < key and seen < started:
                    bad.append(
                        f"[3] queue {queue}: job {job['id']} (seq {job['sequence']}) completed after "
                        f"job {earlier['id']} (seq {earlier['sequence']}) that comes later"
                    )

    # 5. nothing left held or blocked
    if held_leases:
        bad.append(f"[5] {held_leases} leases left behind")
    return verdict


def recovery_seconds(
    snapshot: Iterable[dict[str, Any]], events: Iterable[dict[str, Any]], taken_at: dt.datetime
) -> float | None:
    """Longest wait, over the leases in ``snapshot`` (taken at ``taken_at``) that had
    to expire, from the lease's expiry to the next start of its job (None when none
    expired). A lease expired when its job did not start again before the expiry but
    did after it (a lost message re-sent, a dead worker's attempt retried)."""
    starts: dict[int, list[dt.datetime]] = defaultdict(list)
    for ev in events:
        if ev["started_at"] > taken_at:
            starts[ev["job_id"]].append(ev["started_at"])
    worst: float | None = None
    for lease in snapshot:
        mine = starts.get(lease["job_id"], [])
        if mine and min(mine) > lease["expires_at"]:
            wait = (min(mine) - lease["expires_at"]).total_seconds()
            worst = wait if worst is None else max(worst, wait)
    return worst


def queues_back_seconds(
    jobs: Iterable[dict[str, Any]], events: Iterable[dict[str, Any]], fault_at: dt.datetime
) -> float | None:
    """Longest time from ``fault_at`` to the first start, after it, in each queue that
    had work left at that moment (a job visible before it whose last run ended after
    it, or that never ran before it). None when no queue had work left."""
    events = list(events)
    last_end: dict[int, dt.datetime] = {}
    for ev in events:
        end = ev["ended_at"] or ev["started_at"]
        last_end[ev["job_id"]] = max(end, last_end.get(ev["job_id"], end))
    affected = {
        job["queue"]
        for job in jobs
        if job["inserted_at"] < fault_at and last_end.get(job["id"], fault_at) >= fault_at
    }
    first_start: dict[str, dt.datetime] = {}
    for ev in events:
        if ev["queue"] in affected and ev["started_at"] > fault_at:
            first_start[ev["queue"]] = min(ev["started_at"], first_start.get(ev["queue"], ev["started_at"]))
    waits = [(first_start[q] - fault_at).total_seconds() for q in affected if q in first_start]
    return max(waits) if waits else None


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Record:
    """One line of the reliability report."""

    fault: str
    jobs: int
    faults: int
    recovery_s: float | None
    violations: int
    repeats: int
    settle_s: float
    notes: str = ""
    #: Longest time from a fault (the end of an outage) to every queue that had work
    #: left running again (see :func:`queues_back_seconds`).
    queues_back_s: float | None = None
    #: Perform messages published per job (every process of the scenario).
    messages_per_job: float | None = None
    #: "fast" (the suite's shortened timings) or "defaults" (the library's defaults,
    #: poll_interval aside).
    settings: str = "fast"

    def write(self) -> None:
        path = os.environ.get("QT_CHAOS_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(dataclasses.asdict(self)) + "\n")


# --------------------------------------------------------------------------- a private Redis


class RedisServer:
    """A redis-server of our own (no persistence), so that restarting it or letting it
    redeliver messages never disturbs anyone else's tests."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.restarts = 0

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()

    def up(self) -> bool:
        return self.cli("PING") == "PONG"

    def start(self) -> None:
        subprocess.run(
            [
                "redis-server",
                "--daemonize", "yes",
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
                "--pidfile", str(self.workdir / "redis.pid"),
            ],
            check=True,
            timeout=10,
        )  # fmt: skip
        _wait(self.up, 10, "redis-server to answer")

    def stop(self) -> None:
        """Shut down losing every message (SHUTDOWN NOSAVE)."""
        self.cli("SHUTDOWN", "NOSAVE")
        _wait(lambda: not self.up(), 10, "redis-server to stop")

    def purge(self, queue: str) -> None:
        """Lose the queue's messages."""
        self.cli("DEL", queue)

    def restart(self, down: float = 0.0) -> None:
        self.stop()
        try:
            time.sleep(down)  # the outage itself, not a wait for a result
        finally:
            self.start()
            self.restarts += 1


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- a private PostgreSQL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user(user: str, args: list[str]) -> list[str]:
    """Run ``args`` as ``user`` when we are root (initdb and rabbitmq refuse root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *args]
    return args


def _chown_to(user: str, path: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def postgres_bindir() -> Path:
    """The PostgreSQL server binaries: QT_TEST_PG_BINDIR, else the newest
    /usr/lib/postgresql/*/bin, else ``pg_config --bindir``."""
    if os.environ.get("QT_TEST_PG_BINDIR"):
        return Path(os.environ["QT_TEST_PG_BINDIR"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


class PostgresCluster:
    """A PostgreSQL cluster of our own (initdb into a temporary directory, a free port,
    trust authentication, no fsync), so that a test can restart it, stop it for a
    while or restart it in fast mode (every connection killed) without disturbing
    anyone else. The URLs carry a password, which trust ignores: error messages and
    logs must never show it."""

    PASSWORD = "chaos-pw-Zq81"  # a marker to look for in messages, not a secret
    USER = "postgres"

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="qt-chaos-pg-"))
        _chown_to(self.USER, self.workdir)
        self.data = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        self.restarts = 0

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _as_user(self.USER, [str(self.bindir / args[0]), *args[1:]]),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def init(self) -> None:
        done = self._run(
            "initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.workdir}'",
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{database}"

    def up(self) -> bool:
        done = self._run("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), timeout=10)
        return done.returncode == 0

    def start(self) -> None:
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        if done.returncode != 0 and not self.up():
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-2000:]}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every session killed, a clean shutdown; ``immediate``: a crash
        (recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast", down: float = 0.0) -> None:
        """Stop in ``mode``, stay down ``down`` seconds, start again."""
        if down <= 0 and mode == "fast":
            done = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart"
            )
            if done.returncode != 0:
                raise RuntimeError(f"pg_ctl restart failed: {done.stderr[-2000:]}\n{self.log_tail()}")
        else:
            self.stop(mode)
            try:
                time.sleep(down)  # the outage itself, not a wait for a result
            finally:
                self.start()
        self.restarts += 1

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- a private RabbitMQ


def rabbitmq_home() -> Path | None:
    """Where the RabbitMQ scripts live (the Debian package), or None."""
    for candidate in (os.environ.get("QT_TEST_RABBITMQ_BIN"), "/usr/lib/rabbitmq/bin"):
        if candidate and (Path(candidate) / "rabbitmq-server").exists():
            return Path(candidate)
    return None


class RabbitNode:
    """A RabbitMQ node of our own (its own node name, AMQP and distribution ports,
    data and log directories), so that stopping and starting it never disturbs the
    shared server. Restart is ``rabbitmqctl stop_app`` / ``start_app``: every
    connection dropped, durable queues and persistent messages kept."""

    USER = "rabbitmq"

    def __init__(self) -> None:
        home = rabbitmq_home()
        if home is None:
            raise RuntimeError("rabbitmq-server is not installed (QT_TEST_RABBITMQ_BIN)")
        self.bin = home
        self.port = free_port()
        dist = free_port()
        self.name = f"qtchaos{self.port}@localhost"
        self.workdir = Path(tempfile.mkdtemp(prefix="qt-chaos-rabbit-"))
        _chown_to(self.USER, self.workdir)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.workdir / "env.conf").write_text("")
        for name in ("enabled_plugins", "rabbitmq.conf", "env.conf"):
            _chown_to(self.USER, self.workdir / name)
        import pwd

        home_dir = pwd.getpwnam(self.USER).pw_dir if os.geteuid() == 0 else os.environ.get("HOME", "/")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home_dir,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "env.conf"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.restarts = 0

    def _env_prefix(self) -> list[str]:
        return ["env", *(f"{k}={v}" for k, v in self.env.items())]

    def _run(self, script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _as_user(self.USER, [*self._env_prefix(), str(self.bin / script), *args]),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self._run("rabbitmqctl", "-n", self.name, *args, timeout=timeout)

    def up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return sock.recv(8) != b""
        except OSError:
            return False

    def start(self) -> None:
        """Start the node in the foreground of a process of ours and wait until it
        accepts AMQP connections (only the application when the node runs)."""
        server = getattr(self, "server", None)
        if server is not None and server.poll() is None:
            self.start_app()
            return
        args = [*self._env_prefix(), str(self.bin / "rabbitmq-server")]
        with (self.workdir / "server.out").open("ab") as out:
            self.server = subprocess.Popen(
                _as_user(self.USER, args), cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while not self.up():
            if self.server.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the private RabbitMQ node did not start:\n{tail}")
            time.sleep(0.2)

    def cli(self, *args: str) -> str:
        return self.ctl(*args).stdout.strip()

    def stop_app(self) -> None:
        self.ctl("stop_app")
        _wait(lambda: not self.up(), 30, "RabbitMQ to stop")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60", timeout=70)
        _wait(self.up, 30, "RabbitMQ to answer")

    def restart(self, down: float = 0.0) -> None:
        self.stop_app()
        try:
            time.sleep(down)  # the outage itself
        finally:
            self.start_app()
            self.restarts += 1

    def purge(self, queue: str) -> None:
        """Lose the queue's messages (what a Redis ``DEL`` does)."""
        self.ctl("purge_queue", queue)

    def destroy(self) -> None:
        self.ctl("stop", timeout=60)
        server = getattr(self, "server", None)
        if server is not None:
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)
