"""emulator fidelity and build info

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Two JSON columns on emulators: the fidelity figure measured at build time and how the emulator was built
(adapter placement, calibration).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("emulators", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fidelity", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("build_info", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("emulators", schema=None) as batch_op:
        batch_op.drop_column("build_info")
        batch_op.drop_column("fidelity")
