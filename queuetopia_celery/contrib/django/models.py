"""Read-only Django models over the queuetopia tables (for the admin). Unmanaged: the
tables belong to the schema steps (see ``operations.py``), never to Django."""

from __future__ import annotations

from typing import Any

from django.db import models

from queuetopia_celery.jobs import HELD_UNTIL, JobState, state_of, utcnow


class JSONValue(models.JSONField):  # type: ignore[misc]
    """A ``json`` column, which psycopg already decodes (Django's JSONField expects text)."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if isinstance(value, str):
            return super().from_db_value(value, expression, connection)
        return value


class Job(models.Model):  # type: ignore[misc]
    id = models.BigAutoField(primary_key=True)
    scope = models.CharField(max_length=255)
    queue = models.CharField(max_length=255)
    action = models.CharField(max_length=255)
    params = JSONValue()
    result = JSONValue(null=True)
    sequence = models.BigIntegerField()
    timeout = models.FloatField()
    max_backoff = models.FloatField()
    max_attempts = models.IntegerField()
    scheduled_at = models.DateTimeField()
    status = models.CharField(max_length=16)
    attempts = models.IntegerField()
    attempted_at = models.DateTimeField(null=True)
    attempted_by = models.CharField(max_length=255, null=True)
    next_attempt_at = models.DateTimeField(null=True)
    done_at = models.DateTimeField(null=True)
    error = models.TextField(null=True)
    inserted_at = models.DateTimeField()
    on_exhausted = models.CharField(max_length=8)
    abort_reason = models.TextField(null=True)
    aborted_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "queuetopia_jobs"
        ordering = ("-id",)
        verbose_name = "job"

    def __str__(self) -> str:
        return f"job {self.id} ({self.queue} #{self.sequence}, {self.action})"

    @property
    def state(self) -> JobState:
        held = self.next_attempt_at is not None and self.next_attempt_at >= HELD_UNTIL
        return state_of(self.status, self.attempts, self.scheduled_at, utcnow(), held=held)
