"""staging files in /incoming as sealed parts

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('staging_parts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('organisation', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('part_no', sa.Integer(), nullable=False),
    sa.Column('vault_object', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['vault_object'], ['vault_objects.object_id'], name=op.f('fk_staging_parts_vault_object_vault_objects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_staging_parts')),
    sa.UniqueConstraint('owner', 'name', 'part_no', name=op.f('uq_staging_parts_owner'))
    )
    with op.batch_alter_table('staging_parts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_staging_parts_owner'), ['owner'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('staging_parts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_staging_parts_owner'))

    op.drop_table('staging_parts')
