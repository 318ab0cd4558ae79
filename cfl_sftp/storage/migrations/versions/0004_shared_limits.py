"""shared limits: bans, failed logins and open sessions of every node

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bans',
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('banned_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('failed_logins', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('address', name=op.f('pk_bans'))
    )
    with op.batch_alter_table('bans', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bans_until'), ['until'], unique=False)

    op.create_table('failed_logins',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_failed_logins'))
    )
    with op.batch_alter_table('failed_logins', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_failed_logins_address'), ['address'], unique=False)
        batch_op.create_index(batch_op.f('ix_failed_logins_at'), ['at'], unique=False)

    op.create_table('open_sessions',
    sa.Column('session_id', sa.String(length=32), nullable=False),
    sa.Column('node_id', sa.String(length=128), nullable=False),
    sa.Column('endpoint', sa.String(length=255), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('peer', sa.String(length=128), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('session_id', name=op.f('pk_open_sessions'))
    )
    with op.batch_alter_table('open_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_open_sessions_endpoint'), ['endpoint'], unique=False)
        batch_op.create_index(batch_op.f('ix_open_sessions_node_id'), ['node_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_open_sessions_user'), ['user'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('open_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_open_sessions_user'))
        batch_op.drop_index(batch_op.f('ix_open_sessions_node_id'))
        batch_op.drop_index(batch_op.f('ix_open_sessions_endpoint'))

    op.drop_table('open_sessions')
    with op.batch_alter_table('failed_logins', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_failed_logins_at'))
        batch_op.drop_index(batch_op.f('ix_failed_logins_address'))

    op.drop_table('failed_logins')
    with op.batch_alter_table('bans', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bans_until'))

    op.drop_table('bans')
