"""The Django project's Celery app (what a project's ``celery.py`` holds)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import django
from django.conf import settings

if not settings.configured:  # the worker (in pytest, pytest-django has set Django up)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djangoproject.settings")
    django.setup()

from celery import Celery, signals
from django.db import transaction

from queuetopia_celery.contrib.django import DjangoQueuetopia
from tests.djangoproject.shop.models import Order, Shipment

SCOPE = os.environ.setdefault("QT_DJANGO_SCOPE", f"shop-{os.getpid()}")
QUEUE = os.environ.setdefault("QT_DJANGO_CELERY_QUEUE", f"qt-django-{SCOPE}")

app = Celery("djangoproject", broker=os.environ.get("QT_TEST_BROKER_URL", "redis://127.0.0.1:6379/3"))
app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)

shop = DjangoQueuetopia(SCOPE, app=app, celery_queue=QUEUE, poll_interval=2)


@shop.task(queue="customer-{customer}")
def ship(customer: str, order_id: int) -> int:
    """Uses the ORM in the worker: the order must exist (it was committed with the job)."""
    order = Order.objects.get(id=order_id)
    with transaction.atomic():
        shipment = Shipment.objects.create(order=order, customer=customer)
    return shipment.id


@shop.task(queue="customer-{customer}", max_attempts=1)
def break_connection(customer: str) -> None:
    """Kills this worker's ORM connection from the server side, then fails: the next job
    must get a working connection (close_old_connections)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    path = os.environ.get("QT_TEST_READY_FILE")
    if path:
        Path(path).write_text(str(os.getpid()))
