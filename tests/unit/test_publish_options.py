"""The perform message's shown arguments (``argsrepr``/``kwargsrepr``), given to
Celery when ``repr`` writes what Celery's ``saferepr`` would: the message is Celery's
own either way."""

from __future__ import annotations

import random
import string

import pytest
from celery import Celery
from celery.utils.saferepr import saferepr

from queuetopia_celery.tasks import publish, shown_arguments

MAX = 1024
PLAIN = "".join(c for c in string.printable if c.isprintable() and c not in "'\\")


def celerys(args: tuple[str, int, str]) -> dict[str, str]:
    return {"argsrepr": saferepr(args, MAX), "kwargsrepr": saferepr({}, MAX)}


def test_plain_names_are_shown_as_celery_shows_them():
    rng = random.Random(13)
    for _ in range(2000):
        queue = "".join(rng.choice(PLAIN) for _ in range(rng.randint(1, 255)))
        args = (queue, rng.randint(1, 2**63 - 1), f"{rng.getrandbits(128):032x}")
        assert shown_arguments(args, MAX) == celerys(args)


@pytest.mark.parametrize("queue", ["it's", "back\\slash", "é", "tab\there", "new\nline", "\u2028"])
def test_other_names_are_left_to_celery(queue):
    args = (queue, 1, "token")
    assert shown_arguments(args, MAX) == {}


def test_long_arguments_are_left_to_celery():
    assert shown_arguments(("q" * 600, 1, "t"), MAX) == {}
    assert shown_arguments(("q" * 20, 1, "t"), 40) == {}


def test_published_message_carries_celerys_own_shown_arguments():
    app = Celery("shown", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "shown"

    @app.task(name="t.perform", typing=False)
    def perform(queue: str, job_id: int, token: str) -> None: ...

    sent: list[dict] = []

    class Host:
        burst_seconds = 0.0
        time_limit_grace = 10.0
        celery_queue = "shown"

    Host.app = app  # type: ignore[attr-defined]
    from celery import signals

    def grab(headers=None, **_):
        sent.append(headers)

    signals.before_task_publish.connect(grab, weak=False)
    try:
        from queuetopia_celery.backends.base import Lease

        publish(Host(), perform, [Lease("orders-42", 7, "tok-1", 60.0), Lease("it's", 8, "tok-2", 60.0)])  # type: ignore[arg-type]
    finally:
        signals.before_task_publish.disconnect(grab)
    assert [(h["argsrepr"], h["kwargsrepr"]) for h in sent] == [
        (saferepr(("orders-42", 7, "tok-1"), MAX), "{}"),
        (saferepr(("it's", 8, "tok-2"), MAX), "{}"),
    ]
    assert [list(h["timelimit"]) for h in sent] == [[70.0, None], [70.0, None]]
