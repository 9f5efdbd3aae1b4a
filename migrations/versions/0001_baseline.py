"""Baseline: the application tables as deployed before tenantvault.

An existing database adopts tenantvault with ``tenantvault migrate --adopt``
(``alembic stamp 0001_baseline`` then ``upgrade head``): this revision is never
run there. It exists so that a fresh database gets exactly the deployed shape
(docs/migration-guide.md). Only the columns tenantvault relies on are here; the
application's other columns and tables may exist beside them.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantvault.migration_support import options, qualified, refuse_if_rows

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

# timestamp without time zone, default now(), as the application's ORM made them.
NOW = sa.text("now()")


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(), server_default=NOW, nullable=False),
    ]


def upgrade() -> None:
    schema = options().schema
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="tenants_pkey"),
        schema=schema,
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("supabase_id", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("avatar", sa.Text(), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="users_pkey"),
        sa.UniqueConstraint("supabase_id", name="users_supabase_id_unique"),
        sa.UniqueConstraint("email", name="users_email_unique"),
        schema=schema,
    )
    op.create_table(
        "email_sender_identities",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("from_email", sa.Text(), nullable=False),
        sa.Column("from_name", sa.Text(), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        # Already nullable in the deployed database (the ticket's DROP NOT NULL is a no-op).
        sa.Column("sendgrid_sender_id", sa.Text(), nullable=True),
        sa.Column(
            "validation_status",
            sa.Text(),
            server_default=sa.text("'pending'::text"),
            nullable=False,
        ),
        sa.Column("last_validated_at", sa.DateTime(), nullable=True),
        sa.Column("dedicated_ip_pool", sa.Text(), nullable=True),
        sa.Column("email_signature", sa.Text(), nullable=True),
        sa.Column("is_default", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="email_sender_identities_pkey"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            [f"{schema}.tenants.id"],
            name="email_sender_identities_tenant_id_tenants_id_fk",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            [f"{schema}.users.id"],
            name="email_sender_identities_user_id_users_id_fk",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("tenant_id", "from_email", name="tenant_email_unique"),
        schema=schema,
    )


def downgrade() -> None:
    # On an adopted database these are the application's tables: never drop rows silently.
    for table, what in [
        ("email_sender_identities", "the application's sender identities"),
        ("users", "the application's users"),
        ("tenants", "the application's tenants"),
    ]:
        refuse_if_rows(f"SELECT 1 FROM {qualified(table)}", f"{what} ({table})")
    schema = options().schema
    op.drop_table("email_sender_identities", schema=schema)
    op.drop_table("users", schema=schema)
    op.drop_table("tenants", schema=schema)
