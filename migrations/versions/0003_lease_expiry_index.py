"""The lease expiry index on expires_at alone, so lease lookups use the primary key.

Revision ID: 0003
Revises: 0002
"""

from queuetopia_celery.migrations import steps

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v3_upgrade()


def downgrade() -> None:
    steps.v3_downgrade()
