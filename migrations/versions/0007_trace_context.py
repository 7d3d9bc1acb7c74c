"""The trace context of the code that created a job (OpenTelemetry), continued when it runs.

Revision ID: 0007
Revises: 0006
"""

from queuetopia_celery.migrations import steps

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    steps.v7_upgrade()


def downgrade() -> None:
    steps.v7_downgrade()
