"""create_job against real PostgreSQL: validation writes nothing, the caller's
transaction is joined, and sequence follows the commit order of producers."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from queuetopia_celery import InvalidJobError, JobState, UnknownActionError
from queuetopia_celery.backends import postgres as store_module
from queuetopia_celery.jobs import new_job
from tests.conftest import wait_for

UTC = dt.timezone.utc


def counts(engine: sa.Engine, scope: str) -> tuple[int, int, int]:
    """Rows of this scope in the jobs, queues and leases tables."""
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE scope = :s"), {"s": scope}).scalar_one()
            for table in ("queuetopia_jobs", "queuetopia_queues", "queuetopia_leases")
        )


BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({"params": {"when": dt.datetime.now(UTC)}}, "params"),
    ({"params": {"set": {1}}}, "params"),
    ({"params": {1: "int key"}}, "params"),
    ({"params": {"nan": float("nan")}}, "params"),
    ({"params": "x" * (9 * 1024 * 1024)}, "params"),
    ({"queue": ""}, "queue"),
    ({"queue": "q" * 256}, "queue"),
    ({"action": ""}, "action"),
    ({"action": "a" * 256}, "action"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": 0}, "timeout"),
    ({"max_backoff": -1}, "max_backoff"),
    ({"timeout": dt.timedelta(seconds=-1)}, "timeout"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"max_attempts": -1}, "max_attempts"),
    ({"scheduled_at": dt.datetime(2030, 1, 1)}, "scheduled_at"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_INPUT, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_INPUT)])
def test_bad_input_raises_a_clear_error_and_writes_nothing(qt, engine, scope, bad, field):
    qt.create_job("q", "work", {"ok": 1})
    before = counts(engine, scope)
    args = {"queue": "q", "action": "work", "params": {}, **bad}
    with pytest.raises(InvalidJobError) as info:
        qt.create_job(args.pop("queue"), args.pop("action"), args.pop("params"), **args)
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid {field}: ")
    assert counts(engine, scope) == before


def test_an_unknown_keyword_raises_and_writes_nothing(qt, engine, scope):
    with pytest.raises(TypeError, match="priority"):
        qt.create_job("q", "work", {}, priority=1)
    with pytest.raises(InvalidJobError, match="priority"):
        qt.create_jobs([{"queue": "q", "action": "work", "priority": 1}])
    assert counts(engine, scope) == (0, 0, 0)


def test_one_bad_job_in_a_bulk_creation_writes_nothing(qt, engine, scope):
    with pytest.raises(InvalidJobError):
        qt.create_jobs(
            [
                {"queue": "q1", "action": "work", "params": {"n": 1}},
                {"queue": "q2", "action": "work", "params": {"n": 2}},
                {"queue": "q3", "action": "work", "params": {"n": object()}},
            ]
        )
    assert counts(engine, scope) == (0, 0, 0)


def test_a_new_job_has_the_documented_fields(qt):
    job = qt.create_job("q", "work", {"to": "a@b.c"})
    assert (job.scope, job.queue, job.action, job.params) == (qt.scope, "q", "work", {"to": "a@b.c"})
    assert (job.timeout, job.max_backoff, job.max_attempts, job.attempts) == (60, 86400, 20, 0)
    assert job.result is job.error is job.attempted_at is job.attempted_by is job.next_attempt_at is None
    assert job.scheduled_at.tzinfo is not None and job.inserted_at.tzinfo is not None
    assert job.scheduled_at == job.inserted_at
    assert job.state is JobState.AVAILABLE
    assert qt.get_job(job.id) == job
    later = qt.create_job("q", "work", None, scheduled_at=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    assert later.state is JobState.SCHEDULED
    assert later.params == {}
    assert later.sequence == job.sequence + 1


# --------------------------------------------------------------------------- the caller's transaction


def test_a_job_created_on_the_callers_connection_commits_and_rolls_back_with_it(qt, engine, scope):
    with engine.connect() as conn:
        with conn.begin() as trans:
            conn.execute(sa.text("SELECT 1"))
            rolled = qt.create_job("tx", "work", {"n": 1}, connection=conn)
            trans.rollback()
        assert qt.get_job(rolled.id) is None
        assert counts(engine, scope) == (0, 0, 0)
        with conn.begin():
            kept = qt.create_job("tx", "work", {"n": 2}, connection=conn)
            assert qt.get_job(kept.id) is None, "visible before the commit"
            assert (
                conn.execute(
                    sa.text("SELECT count(*) FROM queuetopia_jobs WHERE id = :i"), {"i": kept.id}
                ).scalar_one()
                == 1
            )
    assert qt.get_job(kept.id) is not None


def test_a_job_created_in_the_callers_session_commits_and_rolls_back_with_it(qt, engine, scope):
    with Session(engine) as session:
        rolled = qt.create_job("tx", "work", {"n": 1}, connection=session)
        session.rollback()
        assert qt.get_job(rolled.id) is None
        assert counts(engine, scope) == (0, 0, 0)
        kept = qt.create_job("tx", "work", {"n": 2}, connection=session)
        assert qt.get_job(kept.id) is None, "visible before the commit"
        session.commit()
    assert qt.get_job(kept.id) is not None
    # After the commit the queue was dispatched at once (the kick): its lease is taken.
    lease = qt.backend.lease_of("tx")
    assert lease is not None and lease["job_id"] == kept.id


def test_a_long_lived_session_kicks_after_every_commit_without_piling_up_listeners(qt, engine):
    with Session(engine) as session:
        for i in range(6):
            job = qt.create_job(f"s{i}", "work", {}, connection=session)
            if i % 3 == 2:
                session.rollback()
                assert qt.get_job(job.id) is None
                assert qt.backend.lease_of(f"s{i}") is None
                continue
            session.commit()
            lease = qt.backend.lease_of(f"s{i}")
            assert lease is not None and lease["job_id"] == job.id, f"commit {i} was not kicked"
        assert len(session.dispatch.after_commit) == 1
        assert len(session.dispatch.after_rollback) == 1
    with engine.connect() as conn:
        for i in range(4):
            with conn.begin():
                qt.create_job("c", "work", {"i": i}, connection=conn)
        assert len(conn.dispatch.commit) == 1
        assert len(conn.dispatch.rollback) == 1


# --------------------------------------------------------------------------- commit order


class Producer(threading.Thread):
    """Creates one job in its own transaction, on its own connection, step by step."""

    def __init__(self, qt: Any, engine: sa.Engine, queue: str, name: str) -> None:
        super().__init__(daemon=True)
        self.qt, self.engine, self.queue, self.label = qt, engine, queue, name
        self.began = threading.Event()
        self.go_create = threading.Event()
        self.created = threading.Event()
        self.go_commit = threading.Event()
        self.committed = threading.Event()
        self.backend_pid = 0
        self.job: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.engine.connect() as conn, conn.begin():
                self.backend_pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                self.began.set()
                self.go_create.wait(30)
                self.job = self.qt.create_job(self.queue, "work", {"by": self.label}, connection=conn)
                self.created.set()
                self.go_commit.wait(30)
            self.committed.set()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
            self.created.set()
            self.committed.set()


def waiting_on_a_lock(engine: sa.Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
            ).scalar()
        )


def test_sequence_follows_commit_order_not_start_order(qt, engine):
    early, late = Producer(qt, engine, "ordered", "early"), Producer(qt, engine, "ordered", "late")
    early.start()
    early.began.wait(10)
    late.start()
    late.began.wait(10)
    # The later transaction creates its job first; the earlier one then waits for it.
    late.go_create.set()
    assert late.created.wait(10)
    early.go_create.set()
    wait_for(lambda: waiting_on_a_lock(engine, early.backend_pid), message="the early producer to wait")
    assert not early.created.is_set()
    late.go_commit.set()
    assert late.committed.wait(10)
    assert early.created.wait(10)
    early.go_commit.set()
    assert early.committed.wait(10)
    early.join(10)
    late.join(10)
    assert early.error is None and late.error is None
    # Committed first, numbered first, and run first: jobs run by (scheduled_at, sequence).
    assert late.job.sequence < early.job.sequence
    assert (late.job.scheduled_at, late.job.sequence) < (early.job.scheduled_at, early.job.sequence)
    assert [j.params["by"] for j in qt.list_jobs(queue="ordered")] == ["early", "late"]


def test_producers_of_different_queues_do_not_wait_for_each_other(qt, engine):
    holder, other = Producer(qt, engine, "held", "holder"), Producer(qt, engine, "free", "other")
    holder.start()
    holder.go_create.set()
    assert holder.created.wait(10)
    other.start()
    other.go_create.set()
    other.go_commit.set()
    # The other queue's producer commits while the first transaction is still open.
    assert other.committed.wait(10)
    assert not holder.committed.is_set()
    holder.go_commit.set()
    assert holder.committed.wait(10)
    holder.join(10)
    other.join(10)
    assert holder.error is None and other.error is None


def test_many_concurrent_producers_of_one_queue_get_gapless_sequences_in_commit_order(qt, engine):
    committed: list[int] = []
    lock = threading.Lock()

    def produce(n: int) -> None:
        for _ in range(5):
            with engine.connect() as conn, conn.begin():
                job = qt.create_job("busy", "work", {"n": n}, connection=conn)
                time.sleep(0.002)
            with lock:
                committed.append(job.sequence)

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(committed) == list(range(1, 21))


def test_bulk_creation_numbers_each_queue_and_wakes_each_queue_once(qt):
    created = qt.create_jobs(
        [{"queue": f"b{i % 3}", "action": "work", "params": {"i": i}} for i in range(30)]
    )
    for q in range(3):
        mine = [j for j in created if j.queue == f"b{q}"]
        assert [j.sequence for j in mine] == list(range(1, 11))
        assert [j.params["i"] for j in mine] == list(range(q, 30, 3))
        lease = qt.backend.lease_of(f"b{q}")
        assert lease is not None and lease["job_id"] == mine[0].id


# --------------------------------------------------------------------------- the kick in the insert


def statements_of(qt: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the statements ``qt`` sends from now on (through SQLAlchemy, and on the
    driver directly)."""
    sent: list[str] = []
    sa.event.listen(qt.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: sent.append(sql))
    raw = store_module.raw_all

    def counted(conn: Any, sql: str, params: Any) -> Any:
        sent.append(sql)
        return raw(conn, sql, params)

    monkeypatch.setattr(store_module, "raw_all", counted)
    return sent


def test_create_job_takes_the_lease_of_an_idle_queue_in_its_insert(qt, monkeypatch):
    sent = statements_of(qt, monkeypatch)
    job = qt.create_job("idle", "work", {})
    assert len(sent) == 1, sent  # the insert took the lease: no second statement
    lease = qt.backend.lease_of("idle")
    assert lease is not None and lease["job_id"] == job.id
    # A held queue is left as it is, and dispatched after the commit as before.
    del sent[:]
    qt.create_job("idle", "work", {})
    assert len(sent) == 2, sent
    assert qt.backend.lease_of("idle")["token"] == lease["token"]


def test_the_lease_taken_by_the_insert_goes_to_the_queues_head(qt):
    (older,) = qt.backend.create_jobs([new_job("behind", "work", {})])  # no kick: no lease yet
    qt.create_job("behind", "work", {})
    assert qt.backend.lease_of("behind")["job_id"] == older.id


def test_the_insert_takes_no_lease_behind_a_head_waiting_for_its_retry(qt, engine):
    (head,) = qt.backend.create_jobs([new_job("retrying", "work", {})])
    with engine.begin() as conn:  # as after a failed attempt with an hour of backoff
        conn.execute(
            sa.text(
                "UPDATE queuetopia_jobs SET attempts = 1, next_attempt_at = now() + interval '1 hour'"
                " WHERE id = :i"
            ),
            {"i": head.id},
        )
    qt.create_job("retrying", "work", {})
    assert qt.backend.lease_of("retrying") is None


def test_a_producer_blind_to_a_concurrent_commit_does_not_lease_its_own_job(qt, engine):
    """The insert's snapshot predates a job another producer committed while the insert
    waited for the queue row: the insert must not take the lease for its own job (which
    comes second), and the queue's head gets it."""
    first = Producer(qt, engine, "race", "first")
    first.start()
    first.go_create.set()
    assert first.created.wait(10)
    second: dict[str, Any] = {}
    racer = threading.Thread(target=lambda: second.update(job=qt.create_job("race", "work", {})), daemon=True)
    racer.start()
    wait_for(lambda: blocked_inserts(engine) > 0, message="the second producer to wait for the queue row")
    first.go_commit.set()
    assert first.committed.wait(10)
    racer.join(10)
    assert first.error is None and "job" in second
    assert second["job"].sequence == first.job.sequence + 1
    lease = qt.backend.lease_of("race")
    assert lease is not None and lease["job_id"] == first.job.id


def blocked_inserts(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%INSERT INTO queuetopia_queues%'"
                )
            ).scalar_one()
        )


# ----------------------------------------------------------------------- unknown actions


def test_an_action_no_performer_handles_is_refused_and_nothing_is_written(qt, engine, scope):
    qt.create_job("q", "work", {})
    before = counts(engine, scope)
    with pytest.raises(UnknownActionError) as info:
        qt.create_job("q", "wrok", {})
    assert info.value.field == "action" and info.value.action == "wrok"
    assert "work" in info.value.known and "check_actions=False" in str(info.value)
    with pytest.raises(UnknownActionError):
        qt.create_jobs([{"queue": "q", "action": "work"}, {"queue": "other", "action": "wrok"}])
    assert isinstance(info.value, InvalidJobError)
    assert counts(engine, scope) == before


def test_a_producer_without_performers_or_with_check_actions_off_creates_any_action(database_url, scope):
    from celery import Celery

    from queuetopia_celery import Performer, Queuetopia

    class Everything(Performer):
        def perform(self, job: Any) -> Any:
            return None

    app = Celery("producers", broker="memory://")
    bare = Queuetopia(scope, app=app, database_url=database_url, disabled=True)
    unchecked = Queuetopia(
        scope + "-u", app=app, database_url=database_url, disabled=True, check_actions=False
    )
    classy = Queuetopia(
        scope + "-c", app=app, database_url=database_url, disabled=True, performer=Everything()
    )
    for producer in (unchecked, classy):
        producer.performer("work")(lambda job: None)
    try:
        for producer in (bare, unchecked, classy):
            assert producer.create_job("q", "handled-elsewhere", {}).action == "handled-elsewhere"
    finally:
        for producer in (bare, unchecked, classy):
            producer.engine.dispose()


# ----------------------------------------------------------------------- broker down at create_job


def test_a_wake_up_that_could_not_be_sent_leaves_the_queue_to_the_next_scan(
    database_url, scope, celery_queue, make_qt, caplog
):
    """The broker is down when the job is created: the lease its insert took is given
    back, so the next scan (not the end of dispatch_grace) sends the job."""
    from tests.apps import testapp

    _, down = testapp.build(
        scope,
        database_url=database_url,
        broker_url="redis://127.0.0.1:1/0",  # nothing listens there
        celery_queue=celery_queue,
        dispatch_grace=300,
    )
    try:
        with caplog.at_level("ERROR", logger="queuetopia_celery.app"):
            job = down.create_job("q", "work", {})
        assert "could not wake queues ['q']; the next scan will" in caplog.text
        assert down.backend.lease_of("q") is None
        (row,) = down.queue_statuses()
        assert row.locked_until is None and row.locked_by is None
        # The next scan (of a process whose broker works) takes the queue at once.
        assert make_qt().scan() == 1
        lease = down.backend.lease_of("q")
        assert lease is not None and lease["job_id"] == job.id
    finally:
        down.engine.dispose()
