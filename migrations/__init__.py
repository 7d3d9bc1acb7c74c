"""Alembic migrations of queuetopia-celery (``env.py`` and ``versions/``).

To run them from your own Alembic history instead of ``Queuetopia.migrate()``, call
the steps in :mod:`queuetopia_celery.migrations.steps` from your revisions::

    from queuetopia_celery.migrations import steps

    def upgrade():
        steps.v1_upgrade()

    def downgrade():
        steps.v1_downgrade()
"""
