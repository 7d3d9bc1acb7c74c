"""Integrations with frameworks: :mod:`queuetopia_celery.contrib.django`."""
