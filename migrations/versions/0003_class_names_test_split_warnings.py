"""teacher class names, dataset test split, job warnings

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 10:12:41.518204
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows that exist already get the server defaults: no names, no test split, no warnings.
    with op.batch_alter_table('teachers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('classes', sa.JSON(), nullable=True))

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('num_test', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch_op.add_column(sa.Column('test_source', sa.String(length=20), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('warnings', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('warnings')

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('test_source')
        batch_op.drop_column('num_test')

    with op.batch_alter_table('teachers', schema=None) as batch_op:
        batch_op.drop_column('classes')
