"""Unique jobs (unique_key on jobs, a partial unique index) and paused queues.

Revision ID: 0005
Revises: 0004
"""

from queuetopia_celery.migrations import steps

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v5_upgrade()


def downgrade() -> None:
    steps.v5_downgrade()
