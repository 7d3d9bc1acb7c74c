"""Re-sent wake-ups (resends on leases) and retried inserts (create_key on jobs).

Revision ID: 0004
Revises: 0003
"""

from queuetopia_celery.migrations import steps

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v4_upgrade()


def downgrade() -> None:
    steps.v4_downgrade()
