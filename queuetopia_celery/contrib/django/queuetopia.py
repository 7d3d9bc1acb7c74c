"""A Queuetopia on Django's database whose jobs join Django's transaction."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from django.conf import settings
from django.db import close_old_connections, connections, transaction

from queuetopia_celery.app import Queuetopia, make_engine
from queuetopia_celery.backends import Executor
from queuetopia_celery.errors import ConfigurationError, SchemaMissingError
from queuetopia_celery.jobs import Job
from queuetopia_celery.performer import PerformerProtocol, Registry

from .connection import sqlalchemy_connection

#: Every DjangoQueuetopia built in this process, by scope (the admin and the management
#: command find them here).
registry: weakref.WeakValueDictionary[str, DjangoQueuetopia] = weakref.WeakValueDictionary()


def setting(name: str, default: Any = None) -> Any:
    """``settings.QUEUETOPIA[name]``, else ``settings.QUEUETOPIA_<name>``, else ``default``."""
    options = getattr(settings, "QUEUETOPIA", None) or {}
    if not isinstance(options, dict):
        raise ConfigurationError("settings.QUEUETOPIA must be a dict")
    if name in options:
        return options[name]
    return getattr(settings, f"QUEUETOPIA_{name}", default)


def database_alias() -> str:
    alias = setting("DATABASE", "default")
    if alias not in settings.DATABASES:
        raise ConfigurationError(f"QUEUETOPIA['DATABASE'] = {alias!r} is not in settings.DATABASES")
    return str(alias)


def load_queuetopias() -> dict[str, DjangoQueuetopia]:
    """Import ``QUEUETOPIA['CELERY_APP']`` (the module that builds the project's
    DjangoQueuetopias, e.g. ``"proj.celery.app"``) and return them by scope."""
    path = setting("CELERY_APP")
    if path:
        from django.utils.module_loading import import_string

        import_string(path)
    return dict(registry)


def default_scope() -> str:
    """``QUEUETOPIA['SCOPE']``, else the scope of the only DjangoQueuetopia built."""
    scope = setting("SCOPE")
    if scope:
        return str(scope)
    built = load_queuetopias()
    if len(built) == 1:
        return next(iter(built))
    found = ", ".join(sorted(built)) or "none"
    raise ConfigurationError(
        f"give --scope (Queuetopias built: {found}); set QUEUETOPIA['CELERY_APP'] to the module "
        "that builds them, or QUEUETOPIA['SCOPE']"
    )


def database_url(alias: str | None = None) -> str:
    """The SQLAlchemy URL (psycopg 3) of Django's database ``alias`` (default: the
    ``QUEUETOPIA['DATABASE']`` setting, else ``"default"``), for the workers' own
    connections."""
    alias = alias or database_alias()
    db = connections[alias].settings_dict
    if connections[alias].vendor != "postgresql":
        raise ConfigurationError(f"queuetopia_celery.contrib.django needs PostgreSQL; {alias!r} is not")
    options = db.get("OPTIONS") or {}
    query = {
        key: str(value)
        for key, value in options.items()
        if key in ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "options")
        # None behind PgBouncer in transaction mode (see docs/scaling.md).
        or key == "prepare_threshold"
    }
    url = sa.engine.URL.create(
        "postgresql+psycopg",
        username=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=int(db["PORT"]) if db.get("PORT") else None,
        database=db.get("NAME") or None,
        query=query,
    )
    return url.render_as_string(hide_password=False)


class MigrationsMissingError(SchemaMissingError):
    """The queuetopia tables are missing or out of date in Django's database."""

    def __init__(self, alias: str) -> None:
        self.database = alias
        self.connection_lost = False
        Exception.__init__(
            self,
            f"the queuetopia tables are missing or out of date in Django's database {alias!r}: "
            f"run `python manage.py migrate queuetopia --database {alias}`",
        )


class _CloseOldConnections:
    """A performer run as Django runs a request: ``close_old_connections()`` before and
    after each job, so that a job never gets a connection broken by an earlier one (or
    older than ``CONN_MAX_AGE``), and the ORM's connection of a failed job is not left in
    an aborted transaction."""

    def __init__(self, inner: PerformerProtocol) -> None:
        self.inner = inner

    def perform(self, job: Job) -> Any:
        close_old_connections()
        try:
            return self.inner.perform(job)
        finally:
            close_old_connections()

    def backoff(self, job: Job) -> float:
        return self.inner.backoff(job)

    def handle_failed_job(self, job: Job) -> None:
        self.inner.handle_failed_job(job)


class _DjangoRegistry(Registry):
    def resolve(self, action: str) -> PerformerProtocol:
        return _CloseOldConnections(super().resolve(action))


class DjangoQueuetopia(Queuetopia):
    """A :class:`~queuetopia_celery.Queuetopia` on Django's database (``using``, default
    ``QUEUETOPIA['DATABASE']`` or ``"default"``).

    ``create_job``/``create_jobs`` (and ``@qt.task`` callers' ``delay``) without
    ``connection=`` write on Django's own connection of that alias: inside
    ``transaction.atomic()`` the jobs commit or roll back with the block, and workers
    are woken by ``transaction.on_commit``; outside it they commit at once. An explicit
    ``connection=`` (SQLAlchemy) works as on :class:`~queuetopia_celery.Queuetopia`.
    Workers (``perform``) use their own pooled connections, built from the same
    settings.
    """

    def __init__(self, scope: str, *, app: Any, using: str | None = None, **options: Any) -> None:
        self.using = using or database_alias()
        if "database_url" not in options and "engine" not in options:
            options["engine"] = make_engine(database_url(self.using))
        super().__init__(scope, app=app, **options)
        # Nothing is registered yet: the same registry, resolving through the wrapper.
        self.registry = _DjangoRegistry(self.scope, options.get("performer"))
        registry[self.scope] = self

    @contextlib.contextmanager
    def _new_jobs_connection(self, queues: Sequence[str]) -> Iterator[Executor | None]:
        """Django's connection of ``using``: the jobs join its transaction (or commit
        at once outside an atomic block), and ``queues`` are woken by
        ``transaction.on_commit``, which runs at once when no block is open."""
        try:
            with sqlalchemy_connection(self.using) as conn:
                yield conn
        except SchemaMissingError as exc:
            raise MigrationsMissingError(self.using) from exc
        if not self.disabled:
            transaction.on_commit(functools.partial(self.wake_after_commit, list(queues)), using=self.using)
