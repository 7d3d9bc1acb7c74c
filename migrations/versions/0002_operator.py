"""Operator tools: on_exhausted per job, abort reason and time.

Revision ID: 0002
Revises: 0001
"""

from queuetopia_celery.migrations import steps

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v2_upgrade()


def downgrade() -> None:
    steps.v2_downgrade()
