"""Jobs, per-queue counters and leases.

Revision ID: 0001
Revises:
"""

from queuetopia_celery.migrations import steps

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v1_upgrade()


def downgrade() -> None:
    steps.v1_downgrade()
