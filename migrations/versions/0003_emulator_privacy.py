"""emulator privacy audit

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

One JSON column on emulators: the latest privacy audit (a recovery attack run by the model owner on the
emulator file: attacker quality, plug-in quality, residual gap, budget), shown before a download is granted.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("emulators", schema=None) as batch_op:
        batch_op.add_column(sa.Column("privacy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("emulators", schema=None) as batch_op:
        batch_op.drop_column("privacy")
