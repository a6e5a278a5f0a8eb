"""quotas and fair scheduling

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

`token_charges`: the tokens each generation made for an organization, summed over the last hour for the
token quota (SCALEOT_QUOTA_GENERATED_TOKENS_PER_HOUR). The other quotas count rows that already exist
(jobs, adapters); the request-rate buckets live in the server process.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "token_charges",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_token_charges_org_created", "token_charges", ["org_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_token_charges_org_created", table_name="token_charges")
    op.drop_table("token_charges")
