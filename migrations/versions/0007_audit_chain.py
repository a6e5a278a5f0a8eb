"""hash-chained audit log

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

`audit_log` rows get `seq` (1, 2, ... without gaps), `prev_hash` and `row_hash` (sha256 over the previous hash
and the row's canonical JSON: model_owner_server/audit_log.py), and `audit_chain_head` holds the newest
(seq, hash) in one row. Existing rows are chained in the order they were written (created_at, then id).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from model_owner_server.audit_log import GENESIS, HEAD_ID, canonical, chain_hash

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

audit_log = sa.table(
    "audit_log",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("action", sa.String),
    sa.column("target_type", sa.String),
    sa.column("target_id", sa.String),
    sa.column("detail", sa.JSON),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("seq", sa.BigInteger),
    sa.column("prev_hash", sa.String),
    sa.column("row_hash", sa.String),
)


def upgrade() -> None:
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.created_at, audit_log.c.id)).all()
    prev, seq = GENESIS, 0
    for r in rows:
        seq += 1
        content = canonical(
            seq=seq,
            id=r.id,
            org_id=r.org_id,
            action=r.action,
            target_type=r.target_type,
            target_id=r.target_id,
            detail=r.detail,
            created_at=r.created_at,
        )
        row_hash = chain_hash(prev, content)
        conn.execute(
            sa.update(audit_log).where(audit_log.c.id == r.id).values(seq=seq, prev_hash=prev, row_hash=row_hash)
        )
        prev = row_hash
    op.bulk_insert(head, [{"id": HEAD_ID, "seq": seq, "hash": prev}])
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index("ix_audit_log_seq", ["seq"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_seq")
        batch_op.drop_column("row_hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
    op.drop_table("audit_chain_head")
