"""Messages of the send_task path (queuetopia.<scope>.create): one row per message id.

Revision ID: 0006
Revises: 0005
"""

from queuetopia_celery.migrations import steps

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v6_upgrade()


def downgrade() -> None:
    steps.v6_downgrade()
