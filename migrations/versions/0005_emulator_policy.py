"""per-model emulator policy

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

`base_models.emulator_policy`: the model owner's bounds on the emulators data owners may get for this model
(minimum alpha and beta, maximum N_a and share of layers kept, dtypes, who may build, privacy audit).
NULL means the server's default policy (SCALEOT_EMULATOR_POLICY).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("emulator_policy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.drop_column("emulator_policy")
