"""The Django migration operation that runs queuetopia-celery's own schema steps.

Each Django migration of this app is one :class:`AlembicUpgrade` to one revision of
:mod:`queuetopia_celery.migrations` (the steps in ``migrations/steps.py``), run on Django's
connection inside Django's migration transaction. Alembic's version table is kept too,
so ``queuetopia-celery migrate`` and ``manage.py migrate`` agree on where a database
stands and either can take it further. Adding a schema step is one file here::

    # migrations/0007_<name>.py
    from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration

    class Migration(SchemaMigration):
        dependencies = [("queuetopia", "0006_create_messages")]
        operations = [AlembicUpgrade("0007", down_revision="0006")]
"""

from __future__ import annotations

from typing import Any

from alembic import command
from django.db import migrations

from queuetopia_celery import migrate

from .connection import sqlalchemy_connection


class AlembicUpgrade(migrations.operations.base.Operation):  # type: ignore[misc]
    """Upgrade the tables to Alembic revision ``revision`` (backwards: to the revision
    before it)."""

    reduces_to_sql = False
    reversible = True

    def __init__(self, revision: str, down_revision: str | None = None) -> None:
        self.revision = revision
        self.down_revision = down_revision

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        kwargs = {"down_revision": self.down_revision} if self.down_revision else {}
        return self.__class__.__qualname__, [self.revision], kwargs

    def state_forwards(self, app_label: str, state: Any) -> None:
        pass

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        self._run(schema_editor, "upgrade", self.revision)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        self._run(schema_editor, "downgrade", self.down_revision or "base")

    def describe(self) -> str:
        return f"queuetopia-celery schema step {self.revision}"

    @property
    def migration_name_fragment(self) -> str:
        return f"queuetopia_{self.revision}"

    def _run(self, schema_editor: Any, direction: str, revision: str) -> None:
        connection = schema_editor.connection
        if connection.vendor != "postgresql":
            raise RuntimeError("queuetopia_celery.contrib.django needs PostgreSQL")
        with sqlalchemy_connection(connection.alias) as conn:
            getattr(command, direction)(migrate.config(conn), revision)


class SchemaMigration(migrations.Migration):  # type: ignore[misc]
    """A migration of this app (PostgreSQL only, like the app)."""
