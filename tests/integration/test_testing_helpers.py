"""queuetopia_celery.testing, and the switches a user's test suite relies on
(``disabled=True``, ``drain``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from queuetopia_celery import Job, JobState, Queuetopia
from queuetopia_celery.testing import assert_job_created, jobs_created, refute_job_created
from tests.conftest import REDIS_URL


@pytest.fixture
def tqt(database_url: str, scope: str) -> Iterator[Queuetopia]:
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker=REDIS_URL)
    qt = Queuetopia(scope, app=app, database_url=database_url, disabled=True)
    yield qt
    qt.engine.dispose()


def test_jobs_created_filters_by_attributes_and_params_subset(tqt):
    a = tqt.create_job("mail-1", "send", {"to": "a", "meta": {"lang": "fr", "n": 1}})
    b = tqt.create_job("mail-1", "send", {"to": "b"})
    tqt.create_job("mail-2", "notify", {"to": "a"})
    assert jobs_created(tqt, queue="mail-1") == [a, b]
    assert jobs_created(tqt, params={"to": "a"}, action="send") == [a]
    assert jobs_created(tqt, params={"meta": {"lang": "fr"}}) == [a]
    assert jobs_created(tqt, params={"meta": {"lang": "en"}}) == []
    assert jobs_created(tqt, state=JobState.AVAILABLE, max_attempts=20) == jobs_created(tqt)
    assert len(jobs_created(tqt)) == 3


def test_assert_job_created_passes_with_the_right_count_and_returns_the_jobs(tqt):
    job = tqt.create_job("mail-1", "send", {"to": "a", "body": "hi"})
    assert assert_job_created(tqt, queue="mail-1", action="send", params={"to": "a"}) == [job]
    tqt.create_job("mail-1", "send", {"to": "a"})
    assert len(assert_job_created(tqt, count=2, params={"to": "a"})) == 2
    assert len(assert_job_created(tqt, count=None, queue="mail-1")) == 2


def test_assert_job_created_failure_says_what_was_expected_and_what_was_found(tqt):
    tqt.create_job("mail-1", "send", {"to": "b"})
    with pytest.raises(AssertionError) as info:
        assert_job_created(tqt, queue="mail-1", action="send", params={"to": "a"})
    message = str(info.value)
    assert "Expected 1 job matching queue='mail-1', action='send', params containing {'to': 'a'}" in message
    assert "found 0" in message
    assert "params={'to': 'b'}" in message
    assert "differs: params['to'] is 'b', not 'a'" in message


def test_assert_job_created_reports_a_wrong_count_and_an_empty_scope(tqt):
    with pytest.raises(AssertionError, match="No job was created in this scope"):
        assert_job_created(tqt)
    tqt.create_job("q", "send", {})
    tqt.create_job("q", "send", {})
    with pytest.raises(AssertionError) as info:
        assert_job_created(tqt, action="send")
    assert "Expected 1 job matching action='send'" in str(info.value)
    assert "found 2" in str(info.value)
    assert "Matching jobs, oldest first" in str(info.value)


def test_refute_job_created(tqt):
    refute_job_created(tqt)
    tqt.create_job("q", "send", {"to": "a"})
    refute_job_created(tqt, params={"to": "b"})
    refute_job_created(tqt, queue="other")
    with pytest.raises(AssertionError) as info:
        refute_job_created(tqt, params={"to": "a"})
    assert "Expected no job matching params containing {'to': 'a'}" in str(info.value)
    assert "found 1" in str(info.value)


def test_unknown_attribute_is_a_type_error(tqt):
    with pytest.raises(TypeError, match="unknown job attribute"):
        jobs_created(tqt, queu="typo")


def test_drain_runs_a_performer_with_only_a_database(tqt):
    seen: list[Any] = []

    @tqt.performer("send")
    def send(job: Job) -> Any:
        seen.append((job.id, job.attempts, job.idempotency_key))
        return {"sent": job.params["to"]}

    job = tqt.create_job("mail-1", "send", {"to": "a"})
    result = tqt.drain()
    assert (result.succeeded, result.failed, result.exhausted) == (1, 0, 0)
    assert seen == [(job.id, 1, job.idempotency_key)]
    done = tqt.get_job(job.id)
    assert done is not None and done.state is JobState.DONE and done.result == {"sent": "a"}
    assert done.attempted_by is not None and done.attempted_by.startswith("drain/")
    assert tqt.drain().attempted == 0


def test_drain_of_one_queue_leaves_the_others(tqt):
    @tqt.performer("send")
    def send(job: Job) -> None:
        return None

    tqt.create_job("a", "send")
    other = tqt.create_job("b", "send")
    assert tqt.drain("a").succeeded == 1
    assert tqt.get_job(other.id).state is JobState.AVAILABLE


def test_drain_counts_a_missing_performer_as_a_failed_attempt(tqt):
    job = tqt.create_job("a", "nobody-performs-this", max_attempts=2)
    assert tqt.drain().failed == 1
    assert "no performer registered" in (tqt.get_job(job.id).error or "")


def test_disabled_queuetopia_has_no_beat_entry_and_never_wakes_workers(database_url, scope):
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker=REDIS_URL)
    qt = Queuetopia(scope, app=app, database_url=database_url, disabled=True, cleanup_interval=60)
    try:
        assert app.conf.beat_schedule == {}
        qt.create_job("q", "send", {})
        # A kick would have taken the queue's lease; a disabled Queuetopia leaves it free.
        assert qt.backend.lease_of("q") is None
        assert qt.cleanup_task is None
    finally:
        qt.engine.dispose()


def test_enabled_queuetopia_has_its_scan_in_the_beat_schedule(database_url, scope):
    app = Celery(f"t-{uuid.uuid4().hex[:6]}", broker=REDIS_URL)
    qt = Queuetopia(scope, app=app, database_url=database_url, celery_queue=f"qt-{scope}")
    try:
        assert f"queuetopia.{scope}.scan" in app.conf.beat_schedule
        assert f"queuetopia.{scope}.cleanup" not in app.conf.beat_schedule
    finally:
        qt.engine.dispose()
