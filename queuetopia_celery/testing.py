"""Helpers for your own test suite: assertions on created jobs.

Use them with a Queuetopia built with ``disabled=True`` (no beat entry, no wake-ups)
and run the jobs with :meth:`Queuetopia.drain`::

    from queuetopia_celery.testing import assert_job_created, refute_job_created

    def test_signup_sends_a_welcome_mail(mail):
        signup("a@example.com")
        assert_job_created(mail, queue="mail-a@example.com", action="send_mail",
                           params={"template": "welcome"})
        assert mail.drain().succeeded == 1

Matching: ``params`` matches when it is a subset of the job's params (nested dicts
are compared as subsets too); every other attribute (``queue``, ``action``, ``state``,
``max_attempts``, ...) must be equal. Failure messages say what was expected and list
the jobs that were found, with how each differs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .jobs import Job, JobState

if TYPE_CHECKING:
    from .app import Queuetopia

__all__ = ["assert_job_created", "jobs_created", "refute_job_created"]

#: Jobs shown in a failure message at most.
SHOWN = 10

_FIELDS = {field.name for field in dataclasses.fields(Job)} | {"state"}


def jobs_created(qt: Queuetopia, **attrs: Any) -> list[Job]:
    """The jobs of ``qt``'s scope matching ``attrs``, oldest first."""
    expected = _expected(attrs)
    return [job for job in _all_jobs(qt, expected) if not _mismatches(job, expected)]


def assert_job_created(qt: Queuetopia, count: int | None = 1, **attrs: Any) -> list[Job]:
    """Assert that exactly ``count`` jobs of ``qt``'s scope match ``attrs`` (at least
    one with ``count=None``). Returns the matching jobs, oldest first."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise TypeError(f"count must be None or an int >= 0, got {count!r}")
    expected = _expected(attrs)
    scope_jobs = _all_jobs(qt, expected)
    found = [job for job in scope_jobs if not _mismatches(job, expected)]
    if (count is None and found) or len(found) == count:
        return found
    wanted = "at least 1 job" if count is None else f"{count} job{'s' if count != 1 else ''}"
    message = f"Expected {wanted} matching {_describe(expected)} in scope {qt.scope!r}, found {len(found)}."
    raise AssertionError(message + "\n" + _listing(found if found else scope_jobs, expected, bool(found)))


def refute_job_created(qt: Queuetopia, **attrs: Any) -> None:
    """Assert that no job of ``qt``'s scope matches ``attrs``."""
    expected = _expected(attrs)
    found = [job for job in _all_jobs(qt, expected) if not _mismatches(job, expected)]
    if found:
        raise AssertionError(
            f"Expected no job matching {_describe(expected)} in scope {qt.scope!r}, found {len(found)}.\n"
            + _listing(found, expected, True)
        )


# ---------------------------------------------------------------------------- internals


def _expected(attrs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(attrs) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown job attribute(s) {unknown}; use some of {sorted(_FIELDS)}")
    expected = dict(attrs)
    if "state" in expected and expected["state"] is not None:
        expected["state"] = JobState(expected["state"])
    if "params" in expected and not isinstance(expected["params"], dict):
        raise TypeError("params must be a dict (matched as a subset of each job's params)")
    return expected


def _all_jobs(qt: Queuetopia, expected: dict[str, Any]) -> list[Job]:
    """The scope's jobs, narrowed in the database by queue and action when given."""
    jobs = qt.backend.list_jobs(queue=expected.get("queue"), action=expected.get("action"))
    if not jobs and ("queue" in expected or "action" in expected):
        jobs = qt.backend.list_jobs()  # to show what was created instead
    return sorted(jobs, key=lambda job: job.id)


def _mismatches(job: Job, expected: dict[str, Any]) -> list[str]:
    out = []
    for name, want in expected.items():
        got = job.state if name == "state" else getattr(job, name)
        if name == "params":
            out.extend(_subset_mismatches(want, got, "params"))
        elif got != want:
            out.append(f"{name} is {_show(got)}, not {_show(want)}")
    return out


def _subset_mismatches(want: Any, got: Any, path: str) -> list[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path} is {got!r}, not a dict"]
        out = []
        for key, value in want.items():
            if key not in got:
                out.append(f"{path}[{key!r}] is missing")
            else:
                out.extend(_subset_mismatches(value, got[key], f"{path}[{key!r}]"))
        return out
    return [] if want == got else [f"{path} is {got!r}, not {want!r}"]


def _show(value: Any) -> str:
    return repr(value.value) if isinstance(value, JobState) else repr(value)


def _describe(expected: dict[str, Any]) -> str:
    if not expected:
        return "anything"
    parts = []
    for name, value in expected.items():
        if name == "params":
            parts.append(f"params containing {value!r}")
        else:
            parts.append(f"{name}={_show(value)}")
    return ", ".join(parts)


def _listing(jobs: list[Job], expected: dict[str, Any], matching: bool) -> str:
    if not jobs:
        return "No job was created in this scope."
    title = "Matching jobs" if matching else "Jobs found (none matches)"
    lines = [f"{title}, oldest first:"]
    for job in jobs[:SHOWN]:
        line = (
            f"  #{job.id} queue={job.queue!r} action={job.action!r} params={job.params!r} "
            f"state={job.state.value!r}"
        )
        why = _mismatches(job, expected)
        if why and not matching:
            line += "\n      differs: " + "; ".join(why)
        lines.append(line)
    if len(jobs) > SHOWN:
        lines.append(f"  ... and {len(jobs) - SHOWN} more")
    return "\n".join(lines)
