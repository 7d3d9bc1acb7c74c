"""The Prometheus metrics of the project's DjangoQueuetopias as a Django view (the
``metrics`` extra): route it in your ``urls.py``::

    from queuetopia_celery.contrib.django.metrics import metrics_view

    urlpatterns = [..., path("metrics", metrics_view)]

It serves the gauges of every DjangoQueuetopia built in the process (the module named by
``QUEUETOPIA["CELERY_APP"]`` is imported to build them), read from the database at each
request, and the workers' attempt counters when ``PROMETHEUS_MULTIPROC_DIR`` is set.
``QUEUETOPIA["METRICS_TOP_QUEUES"]`` (default 0) adds per-queue series for that many
busiest and longest blocked queues of each scope. The view has no access control of its
own: protect its URL as you protect the rest of your operations endpoints.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client.exposition import choose_encoder

from queuetopia_celery.metrics import QueuetopiaCollector, registry_of

from .queuetopia import load_queuetopias, setting


def _queuetopias() -> list[Any]:
    return [built for _, built in sorted(load_queuetopias().items())]


@require_GET  # type: ignore[untyped-decorator]
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics, in the format the scraper asks for (Prometheus text or OpenMetrics)."""
    top = int(setting("METRICS_TOP_QUEUES", 0) or 0)
    registry = registry_of(QueuetopiaCollector(_queuetopias, top_queues=top))
    encoder, content_type = choose_encoder(request.META.get("HTTP_ACCEPT", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
