"""initial schema: library, uploads, held packages, vault objects, audit

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_entries',
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('entry', sa.LargeBinary(), nullable=False),
    sa.Column('leaf_hash', sa.LargeBinary(length=32), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_audit_entries'))
    )
    with op.batch_alter_table('audit_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_entries_time'), ['time'], unique=False)

    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('compact_range', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_head'))
    )
    op.create_table('checkpoints',
    sa.Column('tree_size', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tree_size', name=op.f('pk_checkpoints'))
    )
    op.create_table('device_models',
    sa.Column('manufacturer_id', sa.String(length=4), nullable=False),
    sa.Column('model_id', sa.String(length=4), nullable=False),
    sa.Column('hardware_version', sa.String(length=4), nullable=False),
    sa.Column('device_type', sa.String(length=8), nullable=False),
    sa.PrimaryKeyConstraint('manufacturer_id', 'model_id', 'hardware_version', name=op.f('pk_device_models'))
    )
    op.create_table('uploads',
    sa.Column('upload_id', sa.String(length=64), nullable=False),
    sa.Column('file_name', sa.String(length=128), nullable=False),
    sa.Column('uploader', sa.String(length=64), nullable=False),
    sa.Column('organisation', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('package_sha256', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('image_path', sa.Text(), nullable=True),
    sa.Column('audit_seq', sa.BigInteger(), nullable=False),
    sa.Column('receipt', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('upload_id', name=op.f('pk_uploads'))
    )
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_uploads_organisation'), ['organisation'], unique=False)
        batch_op.create_index(batch_op.f('ix_uploads_uploader'), ['uploader'], unique=False)

    op.create_table('vault_objects',
    sa.Column('object_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('wrapped_key', sa.Text(), nullable=False),
    sa.Column('kek_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('object_id', name=op.f('pk_vault_objects'))
    )
    with op.batch_alter_table('vault_objects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vault_objects_kek_id'), ['kek_id'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('device_type', sa.String(length=8), nullable=False),
    sa.Column('manufacturer_id', sa.String(length=4), nullable=False),
    sa.Column('model_id', sa.String(length=4), nullable=False),
    sa.Column('hardware_version', sa.String(length=4), nullable=False),
    sa.Column('firmware_version', sa.String(length=8), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('released', sa.String(length=10), nullable=False),
    sa.Column('image_name', sa.String(length=128), nullable=False),
    sa.Column('manifest', sa.LargeBinary(), nullable=False),
    sa.Column('signature', sa.LargeBinary(), nullable=False),
    sa.Column('release_notes_name', sa.String(length=128), nullable=True),
    sa.Column('release_notes_size', sa.BigInteger(), nullable=True),
    sa.Column('release_notes_sha256', sa.String(length=64), nullable=True),
    sa.Column('release_notes_object', sa.String(length=64), nullable=True),
    sa.Column('upload_id', sa.String(length=64), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('retired', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['release_notes_object'], ['vault_objects.object_id'], name=op.f('fk_images_release_notes_object_vault_objects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('sha256', name=op.f('uq_images_sha256'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('uq_images_current_version', ['manufacturer_id', 'model_id', 'hardware_version', 'firmware_version'], unique=True, sqlite_where=sa.text('retired = 0'), postgresql_where=sa.text('NOT retired'))

    op.create_table('held_packages',
    sa.Column('upload_id', sa.String(length=64), nullable=False),
    sa.Column('organisation', sa.String(length=64), nullable=False),
    sa.Column('file_name', sa.String(length=128), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('vault_object', sa.String(length=64), nullable=False),
    sa.Column('held_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_held_packages_image_id_images')),
    sa.ForeignKeyConstraint(['upload_id'], ['uploads.upload_id'], name=op.f('fk_held_packages_upload_id_uploads')),
    sa.ForeignKeyConstraint(['vault_object'], ['vault_objects.object_id'], name=op.f('fk_held_packages_vault_object_vault_objects')),
    sa.PrimaryKeyConstraint('upload_id', name=op.f('pk_held_packages'))
    )
    with op.batch_alter_table('held_packages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_held_packages_organisation'), ['organisation'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('held_packages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_held_packages_organisation'))

    op.drop_table('held_packages')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('uq_images_current_version', sqlite_where=sa.text('retired = 0'), postgresql_where=sa.text('NOT retired'))

    op.drop_table('images')
    with op.batch_alter_table('vault_objects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_vault_objects_kek_id'))

    op.drop_table('vault_objects')
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_uploads_uploader'))
        batch_op.drop_index(batch_op.f('ix_uploads_organisation'))

    op.drop_table('uploads')
    op.drop_table('device_models')
    op.drop_table('checkpoints')
    op.drop_table('audit_head')
    with op.batch_alter_table('audit_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_entries_time'))

    op.drop_table('audit_entries')
