"""The project's Celery app and its ordered queues (Celery's usual ``celery.py``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoshop.settings")

app = Celery("djangoshop", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"))

# Built on Django's database (settings.QUEUETOPIA["DATABASE"]): jobs created in a view
# join its transaction.atomic().
import django  # noqa: E402

django.setup()

from queuetopia_celery.contrib.django import DjangoQueuetopia  # noqa: E402

shipping = DjangoQueuetopia("shipping", app=app)

from shop import tasks  # noqa: E402,F401  (registers the performers)
