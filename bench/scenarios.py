"""The scenarios of issue 5. Each returns a JSON-able dict of results."""

from __future__ import annotations

import collections
import multiprocessing
import time
from typing import Any

import redis
import sqlalchemy as sa

from queuetopia_celery.jobs import new_job

from . import qtapp
from .env import ENQUEUE_MODES, REDIS_URL, Env, percentile, rss_kb, summary, wait_for
from .systems import Ours, PlainCelery, Procrastinate, dispatch_all, open_count, seed

Config = dict[str, Any]


def log(*args: Any) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------- 1 + 2: throughput


def throughput(env: Env, cfg: Config) -> dict[str, Any]:
    """Jobs/s for each (queues x jobs per queue) shape, the three systems back to back
    for each run. The (1 x N) shape is the hot queue (with gaps between starts)."""
    systems = [Ours(env), PlainCelery(env), Procrastinate(env)]
    out: dict[str, Any] = {}
    try:
        for queues, per_queue in cfg["shapes"]:
            key = f"{queues}x{per_queue}"
            out[key] = {}
            raw: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
            for run in range(cfg["runs"]):
                for system in systems:
                    result = system.run(queues, per_queue)
                    raw[system.name].append(result)
                    log(f"  {key} run {run + 1} {system.name}: {result['rate']:.0f} jobs/s")
            for name, results in raw.items():
                entry: dict[str, Any] = {"rate": summary([r["rate"] for r in results])}
                gaps = [g for r in results for g in r.get("gaps_ms", [])]
                if gaps and queues == 1:
                    entry["gap_ms"] = {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99)}
                out[key][name] = entry
    finally:
        for system in systems:
            system.close()
    return out


# ---------------------------------------------------------------- 3: latency


def latency_samples(env: Env, ours: Ours, samples: int) -> list[float]:
    """``samples`` latencies (ms) of ``create_job`` to the performer's first line on
    ``ours``'s idle worker, after 5 warm-up jobs."""
    r = redis.Redis.from_url(REDIS_URL)
    key = env.unique("lat")
    lat: list[float] = []
    for i in range(samples + 5):
        ours.qt.create_job(f"lat-{i % 10}", "stamp", {"key": key, "sent": time.time()})
        _, value = r.blpop([key], timeout=30)  # type: ignore[misc]
        if i >= 5:  # warm-up
            lat.append(float(value) * 1000)
        time.sleep(0.02)
    r.delete(key)
    return lat


def latency(env: Env, cfg: Config) -> dict[str, Any]:
    """create_job -> performer start on an idle worker, vs Celery delay() -> start."""
    samples = cfg["latency_samples"]
    ours = Ours(env)
    celery = PlainCelery(env)
    out: dict[str, Any] = {}
    try:
        # Both systems' performers push their start latency to a Redis list that the
        # driver waits on (BLPOP): no polling competes with the worker for the CPU.
        r = redis.Redis.from_url(REDIS_URL)
        lat = latency_samples(env, ours, samples)
        out["queuetopia-celery"] = {p: percentile(lat, int(p[1:])) for p in ("p50", "p95", "p99")}
        # Celery: delay() to the task's start, on a worker consuming the idle queue.
        key = env.unique("lat")
        stamp = celery.app.tasks["bench.stamp"]
        lat = []
        for i in range(samples + 5):
            stamp.apply_async(args=(key, time.time()), queue=celery.idle)
            _, value = r.blpop([key], timeout=30)  # type: ignore[misc]
            if i >= 5:
                lat.append(float(value) * 1000)
            time.sleep(0.02)
        r.delete(key)
        out["celery"] = {p: percentile(lat, int(p[1:])) for p in ("p50", "p95", "p99")}
    finally:
        ours.close()
        celery.close()
    return out


# ---------------------------------------------------------------- 4: enqueue


def _producer(args: tuple[str, str, str, str, int, int, int, Any]) -> tuple[float, float]:
    system, mode, database_url, celery_queue, n, index, n_queues, barrier = args
    if system == "queuetopia-celery":
        _, qt = qtapp.build(
            celery_queue, database_url=database_url, broker_url=REDIS_URL, celery_queue=celery_queue
        )
        names = [f"p{index}-q{i % n_queues}" for i in range(n)]
        qt.create_job("warm", "noop")
        barrier.wait()
        t0 = time.time()
        if mode == "one":
            for name in names:
                qt.create_job(name, "noop")
        else:
            # bulk_ids: the jobs are not read back, where the revision can (issue 13).
            quiet = {"returning": "ids"} if mode == "bulk_ids" and _knows_returning(qt) else {}
            for start in range(0, n, 1000):
                qt.create_jobs([new_job(name, "noop", {}) for name in names[start : start + 1000]], **quiet)
        t1 = time.time()
        qt.engine.dispose()
        return t0, t1
    if system == "celery":
        from .celeryapp import app

        noop = app.tasks["bench.noop"]
        noop.apply_async(queue=celery_queue)
        barrier.wait()
        t0 = time.time()
        for _ in range(n):
            noop.apply_async(queue=celery_queue)
        return t0, time.time()
    import os

    os.environ["BENCH_PROC_DSN"] = database_url
    from . import procapp

    names = [f"p{index}-q{i % n_queues}" for i in range(n)]
    with procapp.app.open():
        procapp.noop.defer()
        barrier.wait()
        t0 = time.time()
        if mode == "one":
            for name in names:
                procapp.noop.configure(lock=name).defer()
        else:
            # procrastinate's batch_defer takes one lock per call: group by queue.
            groups: dict[str, int] = {}
            for name in names:
                groups[name] = groups.get(name, 0) + 1
            for name, count in groups.items():
                procapp.noop.configure(lock=name).batch_defer(*[{} for _ in range(count)])
        t1 = time.time()
    return t0, t1


def _knows_returning(qt: Any) -> bool:
    import inspect

    return "returning" in inspect.signature(qt.create_jobs).parameters


def enqueue_once(env: Env, system: str, *, mode: str, procs: int, target: str, n_total: int) -> float:
    """One enqueue measurement (jobs/s): ``n_total`` jobs created by ``procs`` producer
    processes, one by one (``mode`` "one") or in batches of 1,000 ("bulk"), to many
    queues or to one ("one_queue")."""
    if system == "queuetopia-celery":
        env.vacuum()
    ctx = multiprocessing.get_context("spawn")
    cq = env.unique("enq")
    db = env.proc_dsn if system == "procrastinate" else env.database_url
    n = n_total // procs
    # One by one: a new queue per job (each kick sends a message).
    # Bulk: 100 queues per producer (each batch kicks them).
    n_queues = (n if mode == "one" else 100) if target == "many" else 1
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        with ctx.Pool(procs) as pool:
            spans = pool.map(
                _producer,
                [(system, mode, db, cq, n, i, n_queues, barrier) for i in range(procs)],
            )
    redis.Redis.from_url(REDIS_URL).delete(cq)
    return n * procs / (max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans))


def enqueue(env: Env, cfg: Config) -> dict[str, Any]:
    """Jobs/s created one by one (create_job, with its kick) and in bulk (create_jobs
    of 1,000; bulk_ids: ``returning="ids"``, the jobs not read back), from 1 and 4
    producer processes, to many queues and to one queue. No worker runs: the perform
    messages pile up in Redis and are deleted afterwards."""
    env.proc_schema()
    out: dict[str, Any] = {}
    for mode in ENQUEUE_MODES:
        n_total = cfg["enqueue_one"] if mode == "one" else cfg["enqueue_bulk"]
        for procs in (1, 4):
            for target in ("many", "one_queue"):
                key = f"{mode}/{procs}p/{target}"
                out[key] = {}
                systems = ["queuetopia-celery", "procrastinate"] + (["celery"] if mode == "one" else [])
                rates: dict[str, list[float]] = {s: [] for s in systems}
                for _run in range(cfg["runs"]):
                    for system in systems:
                        if target == "one_queue" and system == "celery":
                            continue
                        rate = enqueue_once(
                            env, system, mode=mode, procs=procs, target=target, n_total=n_total
                        )
                        rates[system].append(rate)
                        log(f"  enqueue {key} {system}: {rate:.0f} jobs/s")
                out[key] = {s: {"rate": summary(v)} for s, v in rates.items() if v}
    return out


# ---------------------------------------------------------------- 5: scan scaling


def _seed_scan(env: Env, scope: str, n_queues: int, jobs_per_queue: int, due_fraction: float) -> None:
    """Queues with 10 pending jobs each; a fraction of them due now, the rest tomorrow."""
    due_every = max(int(1 / due_fraction), 1)
    with env.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_queues (scope, queue, last_sequence, due_at)"
                " SELECT :s, 'q' || g, :k,"
                " CASE WHEN g % :every = 0 THEN now() - interval '1 s' ELSE now() + interval '1 day' END"
                " FROM generate_series(1, :n) g"
            ),
            {"s": scope, "n": n_queues, "k": jobs_per_queue, "every": due_every},
        )
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_jobs (scope, queue, action, params, sequence, timeout, max_backoff,"
                " max_attempts, scheduled_at, status, attempts, inserted_at)"
                " SELECT :s, 'q' || g, 'noop', '{}', k, 60, 86400, 20,"
                " CASE WHEN g % :every = 0 THEN now() - interval '1 s' ELSE now() + interval '1 day' END,"
                " 'pending', 0, now()"
                " FROM generate_series(1, :n) g, generate_series(1, :k) k"
            ),
            {"s": scope, "n": n_queues, "k": jobs_per_queue, "every": due_every},
        )
        conn.execute(sa.text("ANALYZE queuetopia_jobs"))
        conn.execute(sa.text("ANALYZE queuetopia_queues"))


def _due_only(env: Env, scope: str, due: int) -> None:
    """Keep only the first ``due`` due queues of the scope due (the others: tomorrow)."""
    with env.engine.begin() as conn:
        later = sa.text("now() + interval '1 day'")
        keep = sa.text(
            "SELECT queue FROM queuetopia_queues WHERE scope = :s AND due_at <= now() ORDER BY queue LIMIT :n"
        )
        kept = list(conn.execute(keep, {"s": scope, "n": due}).scalars())
        params = {"s": scope, "kept": kept}
        for table, column in (("queuetopia_queues", "due_at"), ("queuetopia_jobs", "scheduled_at")):
            conn.execute(
                sa.text(
                    f"UPDATE {table} SET {column} = {later} WHERE scope = :s AND {column} <= now()"
                    " AND NOT (queue = ANY(CAST(:kept AS text[])))"
                ),
                params,
            )
        conn.execute(sa.text("ANALYZE queuetopia_jobs"))
        conn.execute(sa.text("ANALYZE queuetopia_queues"))


def _seed_done(env: Env, scope: str, n: int) -> None:
    with env.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO queuetopia_jobs (scope, queue, action, params, sequence, timeout, max_backoff,"
                " max_attempts, scheduled_at, status, attempts, inserted_at, done_at)"
                " SELECT :s, 'q' || (g % 1000), 'noop', '{}', 1000000 + g, 60, 86400, 20,"
                " now() - interval '1 day', 'done', 1, now() - interval '1 day', now() - interval '1 hour'"
                " FROM generate_series(1, :n) g"
            ),
            {"s": scope, "n": n},
        )
        conn.execute(sa.text("ANALYZE queuetopia_jobs"))


def _time_scan(env: Env, scope: str, repeats: int) -> dict[str, Any]:
    """One scan = recover expired leases + take the leases of every due queue (up to the
    scan limit), the database part of the beat task (publishing is not counted)."""
    _, qt = qtapp.build(scope, database_url=env.database_url, broker_url=REDIS_URL, celery_queue="bench-none")
    times, taken = [], 0
    for _ in range(repeats + 1):
        with env.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM queuetopia_leases WHERE scope = :s"), {"s": scope})
        env.vacuum()
        t0 = time.perf_counter()
        qt.backend.recover(limit=qt.scan_limit)
        got = qt.backend.scan(grace=60, limit=qt.scan_limit)
        times.append((time.perf_counter() - t0) * 1000)
        taken = len(got)
    qt.engine.dispose()
    return {"ms": summary(times[1:]), "leases_taken": taken}


def scan(env: Env, cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n_queues in cfg["scan_queues"]:
        scope = env.unique("scan")
        t0 = time.perf_counter()
        _seed_scan(env, scope, n_queues, 10, 0.01)
        log(f"  seeded {n_queues} queues x 10 jobs in {time.perf_counter() - t0:.1f} s")
        due = max(n_queues // 100, 1)
        label = f"{n_queues} queues, {due} due"
        out[label] = result = _time_scan(env, scope, cfg["scan_repeats"])
        log(f"  scan {label}: {result['ms']['median']:.1f} ms, {result['leases_taken']} leases")
        if due > 100:
            # The same table with only 100 queues due: what the size of the table costs,
            # apart from the leases taken.
            _due_only(env, scope, 100)
            due = 100
            label = f"{n_queues} queues, {due} due"
            out[label] = result = _time_scan(env, scope, cfg["scan_repeats"])
            log(f"  scan {label}: {result['ms']['median']:.1f} ms, {result['leases_taken']} leases")
        if n_queues == cfg["scan_done_at"]:
            t0 = time.perf_counter()
            _seed_done(env, scope, cfg["done_jobs"])
            log(f"  seeded {cfg['done_jobs']} done jobs in {time.perf_counter() - t0:.1f} s")
            label = f"{n_queues} queues, {due} due + {cfg['done_jobs']} done jobs"
            out[label] = result = _time_scan(env, scope, cfg["scan_repeats"])
            log(f"  scan {label}: {result['ms']['median']:.1f} ms")
        with env.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM queuetopia_jobs WHERE scope = :s"), {"s": scope})
            conn.execute(sa.text("DELETE FROM queuetopia_queues WHERE scope = :s"), {"s": scope})
            conn.execute(sa.text("DELETE FROM queuetopia_leases WHERE scope = :s"), {"s": scope})
    return out


# ---------------------------------------------------------------- 6: failure-heavy


def failures(env: Env, cfg: Config) -> dict[str, Any]:
    """Many one-job queues; in the second variant 1% of the heads always fail (retried
    every second by the scan). Throughput of the healthy queues must not drop."""
    ours = Ours(env, beat=True, poll=1.0)
    n = cfg["failure_queues"]
    out: dict[str, Any] = {}
    try:
        rates: dict[str, list[float]] = {"0% failing": [], "1% failing": []}
        for _run in range(cfg["runs"]):
            for variant, values in rates.items():
                prefix = env.unique("f")
                healthy = [f"{prefix}-ok-{i}" for i in range(n if variant.startswith("0") else n - n // 100)]
                failing = [] if variant.startswith("0") else [f"{prefix}-bad-{i}" for i in range(n // 100)]
                seed(ours.qt, failing, 1, action="fail", max_attempts=1000)
                seed(ours.qt, healthy, 1)
                env.vacuum()
                names = sorted(healthy + failing)
                t0 = time.perf_counter()
                dispatch_all(ours.qt, names)
                wait_for(lambda p=prefix: open_count(ours.qt, p + "-ok") == 0, timeout=300, interval=0.01)
                rate = len(healthy) / (time.perf_counter() - t0)
                values.append(rate)
                log(f"  failures {variant}: {rate:.0f} healthy jobs/s")
                # Stop the failing ones from retrying forever (they would load later runs).
                with env.engine.begin() as conn:
                    conn.execute(
                        sa.text(
                            "UPDATE queuetopia_jobs SET status = 'exhausted'"
                            " WHERE scope = :s AND queue LIKE :p AND status IN ('pending', 'running')"
                        ),
                        {"s": ours.scope, "p": prefix + "-bad%"},
                    )
        out = {variant: {"rate": summary(v)} for variant, v in rates.items()}
    finally:
        ours.close()
    return out


# ---------------------------------------------------------------- 7: memory


def _open_jobs(qt: Any, prefix: str) -> int:
    with qt.engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM queuetopia_jobs WHERE scope = :s"
                    " AND status IN ('pending', 'running') AND queue LIKE :q"
                ),
                {"s": qt.scope, "q": prefix + "%"},
            ).scalar_one()
        )


def memory(env: Env, cfg: Config) -> dict[str, Any]:
    """RSS of the worker's children and of beat while they run many jobs."""
    ours = Ours(env, beat=True, poll=1.0)
    n = cfg["memory_jobs"]
    queues = 1000
    try:
        prefix = env.unique("m")
        names = [f"{prefix}-{i}" for i in range(queues)]
        seed(ours.qt, names, n // queues)
        assert ours.beat is not None
        samples: list[tuple[int, int, int]] = []  # (jobs done, max child RSS, beat RSS)
        t0 = time.perf_counter()
        dispatch_all(ours.qt, names)
        while True:
            left = _open_jobs(ours.qt, prefix)
            children = ours.worker.children()
            child_rss = max((rss_kb(pid)[0] for pid in children), default=0)
            samples.append((n - left, child_rss, rss_kb(ours.beat.pid)[0]))
            if left == 0:
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        peaks = [rss_kb(pid)[1] for pid in ours.worker.children()]
        tenth = next(s for s in samples if s[0] >= n // 10)
        out = {
            "jobs": n,
            "seconds": elapsed,
            "child_rss_kb_at_10pct": tenth[1],
            "child_rss_kb_at_end": samples[-1][1],
            "child_peak_kb": max(peaks, default=0),
            "beat_rss_kb_at_10pct": tenth[2],
            "beat_rss_kb_at_end": samples[-1][2],
            "beat_peak_kb": rss_kb(ours.beat.pid)[1],
        }
    finally:
        ours.close()
    return out


SCENARIOS = {
    "throughput": throughput,
    "latency": latency,
    "scan": scan,
    "enqueue": enqueue,
    "failures": failures,
    "memory": memory,
}


# ---------------------------------------------------------------- round trips


def _counting(qt: Any) -> collections.Counter[str]:
    """Count statements, pool checkouts, pings (a pooled connection idle for a while
    is pinged before use), transactions (BEGIN and COMMIT are a round trip each) and
    broker messages."""
    from sqlalchemy import event

    counts: collections.Counter[str] = collections.Counter()
    event.listen(qt.engine, "before_cursor_execute", lambda *a: counts.update(["statements"]))
    event.listen(qt.engine, "commit", lambda *a: counts.update(["transactions"]))
    event.listen(qt.engine.pool, "checkout", lambda *a: counts.update(["checkouts"]))
    ping = qt.engine.dialect.do_ping

    def counted_ping(dbapi_connection: Any) -> bool:
        counts.update(["pings"])
        return ping(dbapi_connection)

    qt.engine.dialect.do_ping = counted_ping
    from queuetopia_celery.backends import postgres as store_module

    raw = store_module.raw_all  # the hot path's statements bypass SQLAlchemy's events

    def counted_raw(*args: Any) -> Any:
        counts.update(["statements"])
        return raw(*args)

    store_module.raw_all = counted_raw  # type: ignore[assignment]
    send = qt.send

    def counted_send(dispatches: Any) -> None:
        counts.update({"messages": len(dispatches)})
        send(dispatches)

    qt.send = counted_send
    return counts


def _per_job(
    counts: collections.Counter[str], n: int, seconds: float, cpu: float | None = None
) -> dict[str, float]:
    db = counts["statements"] + counts["pings"] + 2 * counts["transactions"]
    keys = ("statements", "checkouts", "pings", "transactions", "messages")
    out = {k: round(counts[k] / n, 3) for k in keys}
    out["db_round_trips"] = round(db / n, 3)
    out["ms_per_job"] = round(seconds / n * 1000, 3)
    if cpu is not None:
        # This process's CPU (user + system): the client's share of a job, which
        # load elsewhere on the machine disturbs less than the elapsed time.
        out["cpu_ms_per_job"] = round(cpu / n * 1000, 3)
    return out


def roundtrips(env: Env, cfg: Config) -> dict[str, Any]:
    """Database round trips and broker messages per job, counted in-process on the real
    code paths: a hot queue run by Runner.perform with the default burst (50 jobs or
    0.25 s), many queues of 5 jobs run the same way (a burst per queue, then its
    release), create_job one by one (with its kick), create_jobs in bulk."""
    from queuetopia_celery.worker import Runner

    n = cfg["roundtrip_jobs"]
    out: dict[str, Any] = {}
    scope = env.unique("rt")
    _, qt = qtapp.build(scope, database_url=env.database_url, broker_url=REDIS_URL, celery_queue=scope)
    seed(qt, ["hot"], n)
    counts = _counting(qt)
    runner = Runner(qt)
    pending = qt.backend.kick(["hot"], grace=60)
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    r = redis.Redis.from_url(REDIS_URL)
    while pending:
        d = pending.pop()
        before = counts["messages"]
        done += runner.perform(d.queue, d.job_id, d.token, hostname="bench", time_limit=None)
        if counts["messages"] > before:
            # The hand-back went through the broker: take it from the store instead.
            r.delete(scope)
            lease = qt.backend.lease_of("hot")
            if lease is not None:
                from queuetopia_celery.backends import Lease as Dispatch

                pending.append(Dispatch("hot", lease["job_id"], lease["token"], 60.0))
    out["hot queue, Runner.perform (burst 50 / 0.25 s)"] = _per_job(
        counts, done, time.perf_counter() - t0, time.process_time() - c0
    )
    many = [f"many-{i}" for i in range(n // 5)]
    seed(qt, many, 5)
    counts.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for lease in qt.backend.kick(many, grace=60):
        done += runner.perform(lease.queue, lease.job_id, lease.token, hostname="bench", time_limit=300.0)
    out[f"{len(many)} queues x 5, Runner.perform (one burst each)"] = _per_job(
        counts, done, time.perf_counter() - t0, time.process_time() - c0
    )
    counts.clear()
    t0 = time.perf_counter()
    for i in range(n // 4):
        qt.create_job(f"one-{i}", "noop")
    out["create_job one by one (with kick)"] = _per_job(counts, n // 4, time.perf_counter() - t0)
    counts.clear()
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        qt.create_jobs([new_job(f"bulk-{i % 100}", "noop", {}) for i in range(start, min(start + 1000, n))])
    out["create_jobs bulk of 1,000 over 100 queues (with kicks)"] = _per_job(
        counts, n, time.perf_counter() - t0
    )
    r.delete(scope)
    qt.engine.dispose()
    for key, value in out.items():
        log(f"  {key}: {value}")
    return out


SCENARIOS["roundtrips"] = roundtrips


# ---------------------------------------------------------------- the floor


def floor(env: Env, cfg: Config) -> dict[str, Any]:
    """What the services cost on this machine, one client, no library of ours: the
    round trip of ``SELECT 1``, a one-row autocommit INSERT (a commit, so a WAL flush),
    a Redis PING, and a Celery ``apply_async`` of a no-op (publish only). Medians of
    2,000 (500 for the publish) calls, in ms."""
    import psycopg

    from .celeryapp import app

    def median_ms(call: Any, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
        return percentile(times, 50)

    dsn = env.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_floor (id bigserial PRIMARY KEY, v int)")
        out["postgresql SELECT 1"] = median_ms(lambda: conn.execute("SELECT 1").fetchone(), 2000)
        out["postgresql one-row INSERT, autocommit"] = median_ms(
            lambda: conn.execute("INSERT INTO bench_floor (v) VALUES (1)"), 2000
        )
        conn.execute("DROP TABLE bench_floor")
    r = redis.Redis.from_url(REDIS_URL)
    out["redis PING"] = median_ms(r.ping, 2000)
    queue = env.unique("floor")
    noop = app.tasks["bench.noop"]
    noop.apply_async(queue=queue)
    out["celery apply_async (publish)"] = median_ms(lambda: noop.apply_async(queue=queue), 500)
    r.delete(queue)
    for key, value in out.items():
        log(f"  {key}: {value:.3f} ms")
    return out


SCENARIOS["floor"] = floor


# ---------------------------------------------------------------- the Prometheus scrape (issue 15)

# Imported when run: ``--compare`` loads this module beside an older revision's package,
# which may have no metrics module.


def scrape(env: Env, cfg: Config) -> dict[str, Any]:
    from .scrape import scrape as run

    return run(env, cfg)


def instruments(env: Env, cfg: Config) -> dict[str, Any]:
    from .scrape import instruments as run

    return run(env, cfg)


SCENARIOS["scrape"] = scrape
SCENARIOS["instruments"] = instruments
