"""API key lifecycle: expiry, names, last use; console sessions tied to their key, idle timeout

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

`api_keys` gains `name`, `expires_at` and `last_used_at`. A console session now records the API key it was
signed in with (`api_key_id`: revoking or expiring the key ends the session) and when it was last used
(`last_seen_at`: the idle timeout). Sessions from before this migration name no key, so they are dropped:
their users sign in again once.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(sa.text("DELETE FROM console_sessions"))
    # recreate="always": SQLite cannot add a NOT NULL column in place (the table is empty now).
    with op.batch_alter_table("console_sessions", schema=None, recreate="always") as batch_op:
        batch_op.add_column(sa.Column("api_key_id", sa.String(length=40), nullable=False))
        batch_op.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False))
        batch_op.create_foreign_key(
            "fk_console_sessions_api_key_id", "api_keys", ["api_key_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_index("ix_console_sessions_api_key_id", ["api_key_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("console_sessions", schema=None, recreate="always") as batch_op:
        batch_op.drop_index("ix_console_sessions_api_key_id")
        batch_op.drop_constraint("fk_console_sessions_api_key_id", type_="foreignkey")
        batch_op.drop_column("last_seen_at")
        batch_op.drop_column("api_key_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("name")
