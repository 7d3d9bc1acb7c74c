"""Messages of the send_task path (queuetopia.<scope>.create): one row per message id.

Revision ID: 0005
Revises: 0003 (0004 once the faults-engine branch's migration is merged: set
down_revision to "0004" then)
"""

from queuetopia_celery.migrations import steps

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v5_upgrade()


def downgrade() -> None:
    steps.v5_downgrade()
