"""sweeps: hyperparameter searches whose trials are jobs; Optuna's own schema on PostgreSQL

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12 09:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Optuna creates and versions its own tables, with its own Alembic and its own `alembic_version`; on PostgreSQL
# they live in this schema (app.studies), never beside ours. SQLite keeps them in a sibling file instead.
OPTUNA_SCHEMA = 'optuna'


def upgrade() -> None:
    op.create_table(
        'sweeps',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('request', sa.JSON(), nullable=False),
        sa.Column('max_trials', sa.Integer(), nullable=False),
        sa.Column('max_parallel', sa.Integer(), nullable=False),
        sa.Column('metric', sa.String(length=40), nullable=False),
        sa.Column('trials_started', sa.Integer(), nullable=False),
        sa.Column('best_job_id', sa.String(length=40), nullable=True),
        sa.Column('best_params', sa.JSON(), nullable=True),
        sa.Column('best_value', sa.Float(), nullable=True),
        sa.Column('error_code', sa.String(length=100), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('idempotency_key', sa.String(length=200), nullable=True),
        sa.Column('request_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('advanced_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('tenant_id', 'idempotency_key', name='uq_sweeps_tenant_idempotency_key'),
    )
    op.create_index('ix_sweeps_tenant_created', 'sweeps', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_index('ix_sweeps_status', 'sweeps', ['status'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sweep_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('sweep_trial', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_jobs_sweep_id', 'sweeps', ['sweep_id'], ['id'], ondelete='SET NULL')
        batch_op.create_index('uq_jobs_sweep_trial', ['sweep_id', 'sweep_trial'], unique=True)

    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        # the studies belong to the sweeps dropped below
        op.execute(f'DROP SCHEMA IF EXISTS {OPTUNA_SCHEMA} CASCADE')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_sweep_trial')
        batch_op.drop_constraint('fk_jobs_sweep_id', type_='foreignkey')
        batch_op.drop_column('sweep_trial')
        batch_op.drop_column('sweep_id')

    op.drop_index('ix_sweeps_status', table_name='sweeps')
    op.drop_index('ix_sweeps_tenant_created', table_name='sweeps')
    op.drop_table('sweeps')
