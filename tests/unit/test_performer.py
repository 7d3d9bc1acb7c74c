"""Performers and their registry: lookup by action, hooks, checked backoff."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from celery.exceptions import WorkerShutdown, WorkerTerminate

from queuetopia_celery import ConfigurationError, DuplicatePerformerError, Job, NoPerformerError, Performer
from queuetopia_celery.jobs import STATUS_PENDING
from queuetopia_celery.performer import FunctionPerformer, Registry, is_stop_signal, safe_backoff

UTC = dt.timezone.utc


def make_job(**changes: object) -> Job:
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(
        id=1,
        scope="s",
        queue="q",
        action="a",
        params={},
        result=None,
        sequence=1,
        timeout=60,
        max_backoff=100,
        max_attempts=20,
        scheduled_at=now,
        attempts=1,
        attempted_at=now,
        attempted_by="host/1",
        next_attempt_at=None,
        done_at=None,
        error=None,
        inserted_at=now,
        status=STATUS_PENDING,
    )
    return dataclasses.replace(job, **changes)  # type: ignore[arg-type]


def test_registry_finds_function_performers_by_action():
    registry = Registry("s")
    registry.register("a", lambda job: "A")
    registry.register("b", lambda job: "B")
    assert registry.resolve("a").perform(make_job()) == "A"
    assert registry.resolve("b").perform(make_job()) == "B"
    assert registry.actions == ["a", "b"]


def test_unknown_action_raises_a_clear_error():
    registry = Registry("scope1")
    with pytest.raises(NoPerformerError) as info:
        registry.resolve("missing")
    assert (info.value.scope, info.value.action) == ("scope1", "missing")
    assert "missing" in str(info.value) and "scope1" in str(info.value)


def test_a_second_performer_for_one_action_is_refused():
    registry = Registry("s")
    registry.register("a", lambda job: None)
    with pytest.raises(DuplicatePerformerError):
        registry.register("a", lambda job: None)


def test_registry_refuses_bad_names_and_non_callables():
    registry = Registry("s")
    with pytest.raises(ValueError):
        registry.register("", lambda job: None)
    with pytest.raises(ConfigurationError):
        registry.register("a", "not callable")  # type: ignore[arg-type]


def test_class_performer_is_the_fallback_for_unregistered_actions():
    class Mine(Performer):
        def perform(self, job: Job) -> object:
            return job.action

    registry = Registry("s", Mine())
    registry.register("special", lambda job: "special!")
    assert registry.resolve("anything").perform(make_job(action="anything")) == "anything"
    assert registry.resolve("special").perform(make_job()) == "special!"


def test_an_object_without_the_performer_methods_is_refused():
    with pytest.raises(ConfigurationError):
        Registry("s", object())  # type: ignore[arg-type]


def test_base_performer_defaults():
    performer = Performer()
    with pytest.raises(NotImplementedError):
        performer.perform(make_job())
    assert performer.backoff(make_job(attempts=3)) == 5
    assert performer.handle_failed_job(make_job()) is None


def test_function_performer_hooks():
    failed: list[Job] = []
    performer = FunctionPerformer(lambda job: 1, lambda job: 7.5, failed.append)
    assert performer.backoff(make_job()) == 7.5
    performer.handle_failed_job(make_job(id=9))
    assert [job.id for job in failed] == [9]
    assert FunctionPerformer(lambda job: 1).backoff(make_job(attempts=2)) == 3


def test_safe_backoff_caps_at_max_backoff():
    performer = FunctionPerformer(lambda job: None, lambda job: 10_000)
    assert safe_backoff(performer, make_job(max_backoff=50)) == (50, None)


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", None, True])
def test_safe_backoff_falls_back_to_the_default_on_nonsense(bad):
    performer = FunctionPerformer(lambda job: None, lambda job: bad)
    seconds, problem = safe_backoff(performer, make_job(attempts=2))
    assert seconds == 3
    assert problem is not None and "default backoff" in problem


def test_safe_backoff_reports_a_raising_hook():
    def boom(job: Job) -> float:
        raise KeyError("nope")

    seconds, problem = safe_backoff(FunctionPerformer(lambda job: None, boom), make_job(attempts=4))
    assert seconds == 9
    assert problem is not None and "KeyError" in problem


def test_safe_backoff_without_performer_is_the_default():
    assert safe_backoff(None, make_job(attempts=5)) == (17, None)


# --------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize(
    ("exc", "stop"),
    [
        (SystemExit(1), False),
        (SystemExit(0), False),
        (SystemExit("bye"), False),
        (GeneratorExit(), False),
        (RuntimeError("boom"), False),
        (KeyboardInterrupt(), True),
        (WorkerShutdown(0), True),
        (WorkerTerminate(1), True),
    ],
)
def test_only_requests_to_stop_the_process_are_stop_signals(exc, stop):
    assert is_stop_signal(exc) is stop


def test_anything_raised_after_billiards_terminate_handler_ran_is_a_stop_signal(monkeypatch):
    """A prefork child's SIGTERM handler (hard time limit, cold shutdown) raises
    SystemExit in whatever runs; billiard says when its handler fired."""
    import billiard.common

    if hasattr(billiard.common, "terminate_handler_fired"):
        monkeypatch.setattr(billiard.common, "terminate_handler_fired", lambda: True)
    else:
        monkeypatch.setattr(billiard.common, "_should_have_exited", [True])
    assert is_stop_signal(SystemExit(-241))
    # Whoever raised it, the process is on its way out (billiard's rule too): a
    # performer's cleanup that fails on a database call cut in half replaces the
    # SystemExit with its own error.
    assert is_stop_signal(SystemExit(1))
    assert is_stop_signal(RuntimeError("another command is already in progress"))


def test_a_backoff_hook_calling_sys_exit_falls_back_to_the_default_backoff():
    def backoff(job: Job) -> float:
        raise SystemExit(4)

    seconds, problem = safe_backoff(FunctionPerformer(lambda job: None, backoff), make_job(attempts=3))
    assert seconds == 5
    assert problem == "backoff hook raised SystemExit: 4; used the default backoff"


def test_a_backoff_hook_asked_to_stop_the_process_stops_it():
    def backoff(job: Job) -> float:
        raise WorkerShutdown(0)

    with pytest.raises(WorkerShutdown):
        safe_backoff(FunctionPerformer(lambda job: None, backoff), make_job(attempts=3))
