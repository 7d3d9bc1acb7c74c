"""The wake-up policy, in one place: which backend operation takes the leases of
queues to wake (a plain kick, a kick after the producers' commits, the scan, or the
same under a limit on queues running at once), with the dispatch grace and scan limit,
and the sending of the leases taken through the publish function it is given.
Nothing here imports Celery."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

from .backends.base import Backend, Lease

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WakeUp:
    backend: Backend
    #: Longest wait of an unstarted lease for its start before its message is re-sent.
    grace: float
    #: Most leases one scan statement takes.
    scan_limit: int
    #: Most queues of the scope running at once (None: no limit).
    max_concurrent: int | None
    #: Sends one perform message per lease (giving the leases back when it cannot).
    send: Callable[[Sequence[Lease]], None]

    def kick(self, queues: Sequence[str]) -> int:
        """Wake queues whose jobs were just committed; under a concurrency limit only
        while slots are free. Returns the leases sent."""
        return self._sent(self._take(queues))

    def kick_after_producers(self, queues: Sequence[str]) -> int:
        """:meth:`kick` once the producers that named these queues have committed."""
        if self.max_concurrent is not None:
            taken = self.backend.fill_slots(
                queues, grace=self.grace, max_concurrent=self.max_concurrent, wait_for_producers=True
            )
            return self._sent(taken)
        return self._sent(self.backend.kick_after_producers(queues, grace=self.grace))

    def released(self, queue: str) -> int:
        """A worker released ``queue``'s lease: a job committed meanwhile may have
        missed it, so look again; under a concurrency limit, give the freed slot to the
        due queues (this one included) now rather than at the next scan."""
        return self._sent(self._take([queue] if self.max_concurrent is None else None))

    def scan(self) -> int:
        """Take and send the leases of due queues until fewer than a scan's worth are
        left. Returns how many were sent."""
        total = 0
        while True:
            taken = self._take(None, limit=self.scan_limit)
            self.send(taken)
            total += len(taken)
            if len(taken) < self.scan_limit:
                return total

    def take(self, queues: Sequence[str]) -> list[Lease]:
        """:meth:`kick` without sending: the leases taken, for the caller to send."""
        return self._take(queues)

    def _take(self, queues: Sequence[str] | None, *, limit: int = 1000) -> list[Lease]:
        backend = self.backend
        if self.max_concurrent is not None:
            return backend.fill_slots(
                queues, grace=self.grace, max_concurrent=self.max_concurrent, limit=limit
            )
        if queues is None:
            return backend.scan(grace=self.grace, limit=limit)
        return backend.kick(queues, grace=self.grace, limit=limit)

    def _sent(self, leases: Sequence[Lease]) -> int:
        self.send(leases)
        return len(leases)


#: How long the interpreter's exit waits for wake-ups still to be sent.
EXIT_FLUSH_SECONDS = 5.0


class AfterCommit:
    """Publishes the perform messages of leases taken for committed jobs from a
    background thread, off the producer's path: ``create_job`` returns once its insert
    (and, for a queue the insert could not decide, the kick) has committed and the
    leases are taken; their messages go out from here, merged with the ones pending
    meanwhile into one call of ``publish(leases)``.

    Nothing is lost when this thread never gets to them (the process killed right
    after the commit, the broker down): each lease is unstarted, and the scan re-sends
    its message once ``resend_after`` has passed, as for any lost message (a lease
    whose publish failed is given back by ``publish`` for the next scan). The database
    holds the same rows when ``create_job`` returns as with an inline publish; only the
    message is later. ``publish`` catches and logs its own errors.

    The thread is started at the first :meth:`submit` (a forked child starts its own;
    the parent's pending messages stay the parent's), and the interpreter's exit waits
    up to :data:`EXIT_FLUSH_SECONDS` for what is pending."""

    def __init__(
        self, publish: Callable[[Sequence[Lease]], None], *, name: str = "queuetopia-wake-ups"
    ) -> None:
        self.publish = publish
        self.name = name
        self._start()
        _SENDERS.add(self)

    def _start(self) -> None:
        """Fresh state for this process (never the lock a forked parent's thread held)."""
        self._cond = threading.Condition(threading.Lock())
        self._leases: list[Lease] = []
        #: Leases submitted and not yet published (or failed and logged).
        self._unsent = 0
        self._thread: threading.Thread | None = None

    def submit(self, leases: Sequence[Lease]) -> None:
        """Publish the perform messages of ``leases`` soon."""
        if not leases:
            return
        with self._cond:
            self._leases.extend(leases)
            self._unsent += len(leases)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every lease submitted so far has been published (or failed and
        been logged). Returns False if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._unsent == 0, timeout)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                cond.wait_for(lambda: bool(self._leases))
                leases, self._leases = self._leases, []
            try:
                self.publish(leases)
            except BaseException:  # never let the thread die: the scan is the safety net
                logger.exception(
                    "could not send the perform messages of queues %s; the next scan will",
                    sorted({lease.queue for lease in leases}),
                )
            with cond:
                self._unsent -= len(leases)
                cond.notify_all()


#: The senders of this process: flushed when the interpreter exits, started afresh
#: in a forked child (which has no thread and must not wait on a lock that one of the
#: parent's threads held at the fork).
_SENDERS: weakref.WeakSet[AfterCommit] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_SECONDS
    for sender in list(_SENDERS):
        sender.flush(max(deadline - time.monotonic(), 0.0))


def _reset_in_child() -> None:
    for sender in list(_SENDERS):
        sender._start()


os.register_at_fork(after_in_child=_reset_in_child)
