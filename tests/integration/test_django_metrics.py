"""The Django view of the metrics (tests/djangoproject routes it at ``/metrics``): the
gauges of the project's DjangoQueuetopias, read from Django's database."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_django_view_serves_the_gauges_of_the_projects_queuetopias() -> None:
    from tests.djangoproject.celery_app import shop

    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    action = sorted(shop.registry.actions)[0]
    # Scheduled far ahead: no worker of another test ever runs it.
    job = shop.create_job(queue, action, scheduled_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    try:
        response = Client().get("/metrics")
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain")
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.content.decode())
            for s in family.samples
        }
        assert found[("queuetopia_open_jobs", (("scope", shop.scope), ("state", "scheduled")))] >= 1
        assert found[("queuetopia_database_up", (("scope", shop.scope),))] == 1
        assert Client().post("/metrics").status_code == 405
    finally:
        shop.abort_job(job.id, "test over")
