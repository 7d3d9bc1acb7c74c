"""Django migrations of the queuetopia app: ``manage.py migrate`` gives the schema that
``queuetopia-celery migrate`` (Alembic) gives, and they agree on the version."""

from __future__ import annotations

import io
import re
import subprocess

import pytest
import sqlalchemy as sa
from django.core.management import call_command
from django.db import connection, transaction
from django.db.transaction import TransactionManagementError

from queuetopia_celery import migrate

pytestmark = pytest.mark.django_db(transaction=True)


def _schema(dbname: str) -> str:
    """Our tables as pg_dump prints them, without comments and session settings."""
    out = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "--schema-only", "--no-owner",
         "-t", "queuetopia_*", dbname],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    lines = [
        line
        for line in out.splitlines()
        if line.strip() and not line.startswith(("--", "SET ", "SELECT pg_catalog", "\\"))
    ]
    assert any("CREATE TABLE public.queuetopia_jobs" in line for line in lines), out
    return "\n".join(lines)


def test_django_migrate_gives_the_alembic_schema_and_version(database_url: str) -> None:
    django_db = connection.settings_dict["NAME"]
    alembic_db = sa.engine.make_url(database_url).database
    assert alembic_db is not None
    # The Alembic database also holds the test apps' event table: compare ours only.
    assert _schema(django_db) == _schema(alembic_db)
    engine = sa.create_engine(database_url.replace(alembic_db, django_db))
    try:
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()


def test_every_alembic_revision_has_its_django_migration() -> None:
    from django.db.migrations.loader import MigrationLoader

    from queuetopia_celery.contrib.django.operations import AlembicUpgrade

    loader = MigrationLoader(connection)
    revisions = sorted(
        op.revision
        for key, mig in loader.disk_migrations.items()
        if key[0] == "queuetopia"
        for op in mig.operations
        if isinstance(op, AlembicUpgrade)
    )
    alembic = sorted(
        re.match(r"\d+", path.name).group(0)  # type: ignore[union-attr]
        for path in (migrate.MIGRATIONS / "versions").glob("[0-9]*.py")
    )
    assert revisions == alembic


def test_no_model_change_is_left_without_a_migration() -> None:
    out = io.StringIO()
    call_command("makemigrations", "queuetopia", "--check", "--dry-run", stdout=out)


def test_a_missing_migration_names_the_command_and_migrating_back_and_forth_works() -> None:
    from queuetopia_celery.contrib.django.queuetopia import MigrationsMissingError
    from tests.djangoproject.celery_app import ship
    from tests.djangoproject.shop.models import Order

    call_command("migrate", "queuetopia", "zero", verbosity=0)
    try:
        with pytest.raises(MigrationsMissingError, match=r"python manage.py migrate queuetopia"):
            ship.delay(customer="nobody", order_id=1)
        # Inside an atomic block the failed statement marks the block for rollback, as
        # Django does for its own queries: the next query says so clearly.
        with transaction.atomic():
            with pytest.raises(MigrationsMissingError):
                ship.delay(customer="nobody", order_id=1)
            assert transaction.get_rollback()
            with pytest.raises(TransactionManagementError):
                Order.objects.count()
    finally:
        call_command("migrate", "queuetopia", verbosity=0)
    assert ship.delay(customer="nobody", order_id=1).id > 0
