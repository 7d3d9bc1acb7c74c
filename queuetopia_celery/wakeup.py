"""The wake-up policy, in one place: which backend operation takes the leases of
queues to wake (a plain kick, a kick after the producers' commits, the scan, or the
same under a limit on queues running at once), with the dispatch grace and scan limit,
and the sending of the leases taken through the publish function it is given.
Nothing here imports Celery."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .backends.base import Backend, Lease


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
