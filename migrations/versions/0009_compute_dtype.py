"""per-model compute dtype

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

`base_models.compute_dtype`: the dtype the server's jobs and serving load and compute the model in (float32,
bfloat16, float16), or `auto`: the checkpoint's own on a GPU, float32 on CPU. Existing rows get `auto`, which
on the CPU workers they ran on so far is the float32 they were computed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("compute_dtype", sa.String(length=20), nullable=False, server_default="auto"))


def downgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.drop_column("compute_dtype")
