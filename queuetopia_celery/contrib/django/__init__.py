"""Django integration: jobs that join Django's transactions, Django migrations, a
management command and the admin.

Add ``"queuetopia_celery.contrib.django"`` to ``INSTALLED_APPS``, run ``python manage.py
migrate``, and build your Queuetopias with :class:`DjangoQueuetopia` in your project's
``celery.py``. See the README, "With Django".
"""

from .connection import sqlalchemy_connection
from .queuetopia import DjangoQueuetopia, MigrationsMissingError, database_url

__all__ = ["DjangoQueuetopia", "MigrationsMissingError", "database_url", "sqlalchemy_connection"]
