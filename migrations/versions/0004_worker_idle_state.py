"""workers: the job each runs now and since when it is idle

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 08:30:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows that exist already read as busy (no idle_since) until their worker's next beat.
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('current_job_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('idle_since', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('idle_since')
        batch_op.drop_column('current_job_id')
