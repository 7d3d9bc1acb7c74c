"""Prometheus metrics of queuetopia (the ``metrics`` extra: ``prometheus_client``).

Two sources, served together:

* **Gauges read from the database at scrape time** (:class:`QueuetopiaCollector`): per
  scope, open jobs by state, queues with open jobs, blocked and paused queues, the age
  of the oldest due job and the longest blocked time; per queue only for the
  ``top_queues`` busiest and longest blocked queues (none by default: queues are
  dynamic and can be millions). The database knows these exactly, whichever process
  serves them: prefork pools and restarts change nothing.
* **The workers' counters of attempts** (:mod:`queuetopia_celery.attempt_metrics`),
  gathered from prometheus_client's multiprocess directory when
  ``PROMETHEUS_MULTIPROC_DIR`` is set (in the workers and here).

Ways to serve them: ``queuetopia-celery metrics --port 9808`` (:func:`serve`), mounted in
an ASGI app (:func:`make_asgi_app`) or a WSGI app (:func:`make_wsgi_app`), or in Django
(``queuetopia_celery.contrib.django.metrics.metrics_view``). See docs/operations.md,
"Metrics and tracing", for what each metric means.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client import make_asgi_app as _make_asgi_app
from prometheus_client import make_wsgi_app as _make_wsgi_app
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .backends.base import ScopeGauges
from .backends.sql_metrics import OPEN_STATES
from .errors import QueuetopiaError

logger = logging.getLogger(__name__)

#: The port ``queuetopia-celery metrics`` listens on by default.
DEFAULT_PORT = 9808
#: The most per-queue series a scrape may ask for (``top_queues``) per scope.
MAX_TOP_QUEUES = 1000


class GaugeSource(Protocol):
    """What the collector reads: a Queuetopia's backend (or a Queuetopia, through its
    ``backend``)."""

    scope: str

    def scope_gauges(self, *, top_queues: int = 0) -> ScopeGauges: ...


def _source(item: Any) -> GaugeSource:
    backend = getattr(item, "backend", item)
    if not callable(getattr(backend, "scope_gauges", None)):
        raise TypeError(f"expected a Queuetopia or its backend, got {type(item).__name__}")
    return backend  # type: ignore[no-any-return]


def _top(top_queues: int) -> int:
    if isinstance(top_queues, bool) or not isinstance(top_queues, int):
        raise ValueError(f"top_queues must be an int from 0 to {MAX_TOP_QUEUES}, got {top_queues!r}")
    if not 0 <= top_queues <= MAX_TOP_QUEUES:
        raise ValueError(f"top_queues must be an int from 0 to {MAX_TOP_QUEUES}, got {top_queues!r}")
    return top_queues


class QueuetopiaCollector(Collector):
    """Reads the gauges of each Queuetopia (its scope) from the database at every
    scrape. ``queuetopias``: Queuetopias or their backends, or a function returning
    them (asked at each scrape). A scope whose read fails reports
    ``queuetopia_database_up 0`` and no other gauge; the failure is logged."""

    def __init__(
        self,
        queuetopias: Iterable[Any] | Callable[[], Iterable[Any]],
        *,
        top_queues: int = 0,
    ) -> None:
        self._given = queuetopias if callable(queuetopias) else list(queuetopias)
        if not callable(self._given):
            for item in self._given:
                _source(item)
        self.top_queues = _top(top_queues)
        #: The error of the last failed read, by scope (None when the last read worked).
        self.errors: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def sources(self) -> list[GaugeSource]:
        given = self._given() if callable(self._given) else self._given
        return [_source(item) for item in given]

    def describe(self) -> Iterator[Metric]:
        # The families without samples: registering never reads the database.
        yield from _Families(self.top_queues > 0).all()

    def collect(self) -> Iterator[Metric]:
        families = _Families(self.top_queues > 0)
        for source in self.sources():
            began = time.perf_counter()
            try:
                gauges = source.scope_gauges(top_queues=self.top_queues)
            except QueuetopiaError as exc:
                self._failed(source.scope, str(exc))
                families.up.add_metric([source.scope], 0)
                continue
            except Exception as exc:
                self._failed(source.scope, f"{type(exc).__name__}: {exc}")
                families.up.add_metric([source.scope], 0)
                continue
            with self._lock:
                self.errors[source.scope] = None
            families.up.add_metric([source.scope], 1)
            families.read.add_metric([source.scope], time.perf_counter() - began)
            families.add(gauges)
        yield from families.all()

    def _failed(self, scope: str, error: str) -> None:
        with self._lock:
            first = self.errors.get(scope) is None
            self.errors[scope] = error
        # Once per failure streak at WARNING (a scrape every 15 s would flood the log).
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "could not read the queuetopia gauges of scope %r: %s",
            scope,
            error,
            extra={"scope": scope},
        )


class _Families:
    """The gauge families of one scrape."""

    def __init__(self, per_queue: bool) -> None:
        scope = ["scope"]
        self.per_queue = per_queue
        self.up = GaugeMetricFamily(
            "queuetopia_database_up",
            "1 when this scrape read the scope's gauges from the database",
            labels=scope,
        )
        self.read = GaugeMetricFamily(
            "queuetopia_gauges_read_seconds", "How long reading the scope's gauges took", labels=scope
        )
        self.open_jobs = GaugeMetricFamily(
            "queuetopia_open_jobs",
            "Jobs still in their queue (not done, exhausted nor aborted), by state "
            "(available, scheduled, running, retrying, held)",
            labels=["scope", "state"],
        )
        self.queues_open = GaugeMetricFamily(
            "queuetopia_queues_open", "Queues with at least one open job", labels=scope
        )
        self.queues_blocked = GaugeMetricFamily(
            "queuetopia_queues_blocked",
            "Queues whose head job has failed and not succeeded since (retrying or held)",
            labels=scope,
        )
        self.queues_paused = GaugeMetricFamily(
            "queuetopia_queues_paused", "Queues an operator paused", labels=scope
        )
        self.oldest_due = GaugeMetricFamily(
            "queuetopia_oldest_due_job_age_seconds",
            "How long the pending job that has been due longest has waited since it became due (0: none)",
            labels=scope,
        )
        self.longest_blocked = GaugeMetricFamily(
            "queuetopia_longest_blocked_seconds",
            "How long the longest blocked queue has been blocked (0: none)",
            labels=scope,
        )
        self.queue_open = GaugeMetricFamily(
            "queuetopia_queue_open_jobs",
            "Open jobs of one of the queues with the most open jobs (top_queues)",
            labels=["scope", "queue"],
        )
        self.queue_blocked = GaugeMetricFamily(
            "queuetopia_queue_blocked_seconds",
            "How long one of the longest blocked queues (top_queues) has been blocked",
            labels=["scope", "queue"],
        )

    def add(self, gauges: ScopeGauges) -> None:
        scope = gauges.scope
        for state in OPEN_STATES:
            self.open_jobs.add_metric([scope, state.value], gauges.open_jobs.get(state.value, 0))
        self.queues_open.add_metric([scope], gauges.queues_open)
        self.queues_blocked.add_metric([scope], gauges.queues_blocked)
        self.queues_paused.add_metric([scope], gauges.queues_paused)
        self.oldest_due.add_metric([scope], gauges.oldest_due_age)
        self.longest_blocked.add_metric([scope], gauges.longest_blocked)
        for queue, count in gauges.top_open:
            self.queue_open.add_metric([scope, queue], count)
        for queue, seconds in gauges.top_blocked:
            self.queue_blocked.add_metric([scope, queue], seconds)

    def all(self) -> list[Metric]:
        families: list[Metric] = [
            self.up,
            self.read,
            self.open_jobs,
            self.queues_open,
            self.queues_blocked,
            self.queues_paused,
            self.oldest_due,
            self.longest_blocked,
        ]
        if self.per_queue:
            families += [self.queue_open, self.queue_blocked]
        return families


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``), if set."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def make_registry(*queuetopias: Any, top_queues: int = 0) -> CollectorRegistry:
    """A registry with the database gauges of ``queuetopias`` and, when
    ``PROMETHEUS_MULTIPROC_DIR`` is set, every process's counters from that directory
    (the workers' attempts). Without it, add ``prometheus_client.REGISTRY``'s metrics
    yourself if this process runs jobs (a solo or threads worker)."""
    return registry_of(QueuetopiaCollector(queuetopias, top_queues=top_queues))


def registry_of(collector: QueuetopiaCollector) -> CollectorRegistry:
    """A registry with ``collector`` and, when ``PROMETHEUS_MULTIPROC_DIR`` is set,
    every process's counters from that directory."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def make_asgi_app(*queuetopias: Any, top_queues: int = 0) -> Callable[..., Any]:
    """An ASGI app serving the metrics (:func:`make_registry`), to mount in FastAPI or
    Starlette: ``app.mount("/metrics", make_asgi_app(qt))``."""
    return _make_asgi_app(make_registry(*queuetopias, top_queues=top_queues))


def make_wsgi_app(*queuetopias: Any, top_queues: int = 0) -> Callable[..., Any]:
    """A WSGI app serving the metrics (:func:`make_registry`), for Flask and friends."""
    return _make_wsgi_app(make_registry(*queuetopias, top_queues=top_queues))


def serve(
    queuetopias: Sequence[Any], *, port: int = DEFAULT_PORT, host: str = "0.0.0.0", top_queues: int = 0
) -> tuple[Any, threading.Thread]:
    """Serve the metrics on ``http://host:port/`` (any path) from a daemon thread;
    returns the server (``server.shutdown()`` stops it, ``server.server_close()``
    closes its socket) and the thread."""
    registry = make_registry(*queuetopias, top_queues=top_queues)
    server, thread = _start_http_server(port, host, registry=registry)
    return server, thread
