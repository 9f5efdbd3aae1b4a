"""Tamper-evident audit log, provider usage counters, OAuth token versions.

- ``audit_events``: append-only, partitioned by month on ``occurred_at``. A
  BEFORE INSERT trigger (SECURITY DEFINER) numbers each tenant's events and
  chains them: it locks the tenant's row in ``audit_chain_heads``, sets ``seq``
  and ``prev_hash`` from it, computes ``hash = sha256(prev_hash, the row)`` and
  moves the head, so concurrent writers of a tenant queue on that row and the
  chain has no forks. UPDATE, DELETE and TRUNCATE are refused by triggers (on
  the parent and on every partition: a parent's TRUNCATE trigger does not fire
  for a partition truncated directly); retention drops whole partitions.
  Row-level security on the parent; the application role may INSERT and SELECT
  through the parent only — nothing is granted on partitions, where the
  parent's policies do not apply.
- ``audit_chain_heads``: each tenant's last seq and hash, and where retention
  cut the chain (first kept seq and the hash before it). No privileges for the
  application role: only the trigger writes it.
- ``email_provider_usage``: per-day sent/failed counters and last use per config.
- ``email_provider_tokens.version``: bumped on every store or refresh, so a
  refresh is a compare-and-swap.

Revision ID: 0008_audit_and_lifecycle
Revises: 0007_config_versions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from tenantvault.migration_support import (
    Blocker,
    MigrationOptions,
    audit_partitions_function,
    isolate_tenant_table,
    options,
    qualified,
    refuse_blocked,
    schema_qualified,
    tenant_policy_predicate,
)

revision = "0008_audit_and_lifecycle"
down_revision = "0007_config_versions"
branch_labels = None
depends_on = None

AUDIT = "audit_events"
HEADS = "audit_chain_heads"
USAGE = "email_provider_usage"
UTC_NOW = sa.text("timezone('utc', now())")
ACTIONS = (
    "config.created",
    "config.updated",
    "config.credentials_stored",
    "config.rolled_back",
    "config.default_set",
    "config.deactivated",
    "config.deleted",
    "config.restored",
    "config.purged",
    "credentials.revealed",
    "token.stored",
    "token.refreshed",
    "token.deleted",
    "dek.created",
    "dek.rotated",
    "dek.retired",
    "dek.destroyed",
    "kek.rewrapped",
)
MONTHS_AHEAD = 24


def _audit_table() -> None:
    opts = options()
    actions = ", ".join(f"'{a}'" for a in ACTIONS)
    op.execute(
        f"""
        CREATE TABLE {qualified(AUDIT)} (
          tenant_id text NOT NULL,
          seq bigint NOT NULL,
          occurred_at timestamp NOT NULL DEFAULT timezone('utc', clock_timestamp()),
          actor text,
          action text NOT NULL,
          target_type text,
          target_id text,
          details jsonb NOT NULL DEFAULT '{{}}'::jsonb,
          prev_hash text NOT NULL,
          hash text NOT NULL,
          CONSTRAINT audit_events_pkey PRIMARY KEY (tenant_id, seq, occurred_at),
          CONSTRAINT ck_audit_events_action CHECK (action IN ({actions})),
          CONSTRAINT ck_audit_events_details_is_object CHECK (jsonb_typeof(details) = 'object')
        ) PARTITION BY RANGE (occurred_at)
        """
    )
    comments = {
        None: "Audit log of sensitive operations: append-only, hash-chained per tenant, "
        "partitioned by month. Never holds a secret.",
        "tenant_id": "Tenant the event belongs to; the RLS key. No foreign key: the log "
        "outlives the tenant.",
        "seq": "Position in the tenant's chain: 1, 2, ... without gaps (set by the trigger).",
        "occurred_at": "When it was recorded (UTC clock time of the insert).",
        "actor": "Who did it, as the caller named it (user:42, rotate-keys).",
        "action": "What was done (config.created, dek.rotated, ...).",
        "target_type": "Kind of thing acted on (config, token, dek, kek).",
        "target_id": "Id of the thing acted on (a config id, a key version).",
        "details": "Non-secret facts of the event (versions, counts, changed field names).",
        "prev_hash": "hash of the tenant's previous event ('' for the first).",
        "hash": "sha256 over prev_hash and this row (tenantvault_audit_digest), hex.",
    }
    for column, text in comments.items():
        target = qualified(AUDIT) if column is None else f"{qualified(AUDIT)}.{column}"
        kind = "TABLE" if column is None else "COLUMN"
        quoted = text.replace("'", "''")
        op.execute(f"COMMENT ON {kind} {target} IS '{quoted}'")
    op.execute(f"ALTER TABLE {qualified(AUDIT)} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {qualified(AUDIT)} FORCE ROW LEVEL SECURITY")
    predicate = tenant_policy_predicate()
    # INSERT and SELECT only: the table accepts no UPDATE or DELETE from anyone.
    op.execute(
        f"CREATE POLICY tenant_isolation ON {qualified(AUDIT)} "
        f"USING ({predicate}) WITH CHECK ({predicate})"
    )
    op.execute(
        f'CREATE POLICY migrator_all_tenants ON {qualified(AUDIT)} TO "{opts.migrator_role}" '
        "USING (true) WITH CHECK (true)"
    )
    op.execute(
        f'GRANT SELECT, INSERT ON {qualified(AUDIT)} TO "{opts.app_role}", "{opts.migrator_role}"'
    )


def _heads_table() -> None:
    op.create_table(
        HEADS,
        sa.Column("tenant_id", sa.Text(), nullable=False, comment="The chain's tenant."),
        sa.Column(
            "seq", sa.BigInteger(), nullable=False, comment="seq of the tenant's last event."
        ),
        sa.Column("hash", sa.Text(), nullable=False, comment="hash of the tenant's last event."),
        sa.Column(
            "first_seq",
            sa.BigInteger(),
            server_default=sa.text("1"),
            nullable=False,
            comment="seq of the first event retention kept.",
        ),
        sa.Column(
            "anchor_hash",
            sa.Text(),
            server_default=sa.text("''::text"),
            nullable=False,
            comment="hash of the last event retention dropped ('' when none was).",
        ),
        sa.PrimaryKeyConstraint("tenant_id", name="audit_chain_heads_pkey"),
        schema=options().schema,
        comment="Head of each tenant's audit chain; written only by the audit trigger "
        "and the retention job.",
    )


def _functions() -> None:
    op.execute(
        f"""
        CREATE FUNCTION {qualified("tenantvault_audit_digest")}(
          prev_hash text, tenant_id text, seq bigint, occurred_at timestamp, actor text,
          action text, target_type text, target_id text, details jsonb
        ) RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE
        SET search_path = pg_catalog
        AS $$
          SELECT encode(sha256(convert_to(jsonb_build_array(
            prev_hash, tenant_id, seq, to_char(occurred_at, 'YYYY-MM-DD"T"HH24:MI:SS.US'),
            actor, action, target_type, target_id, details)::text, 'UTF8')), 'hex')
        $$
        """
    )
    op.execute(
        f"COMMENT ON FUNCTION {qualified('tenantvault_audit_digest')}(text, text, bigint, "
        "timestamp, text, text, text, text, jsonb) IS 'The audit chain hash: sha256 of the "
        "JSON array of prev_hash and the row''s fields, hex.'"
    )
    op.execute(
        f"""
        CREATE FUNCTION {qualified("tenantvault_audit_chain")}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog
        AS $$
        DECLARE
          head record;
        BEGIN
          INSERT INTO {qualified(HEADS)} (tenant_id, seq, hash) VALUES (NEW.tenant_id, 0, '')
            ON CONFLICT (tenant_id) DO NOTHING;
          SELECT h.seq, h.hash INTO head FROM {qualified(HEADS)} h
            WHERE h.tenant_id = NEW.tenant_id FOR UPDATE;
          -- The time is the database's: an event may not be backdated (or postdated)
          -- beyond a few minutes of clock skew between its default and this check.
          IF abs(extract(epoch FROM NEW.occurred_at - timezone('utc', clock_timestamp()))) > 300
          THEN
            RAISE EXCEPTION USING MESSAGE = 'audit_events.occurred_at is set by the database';
          END IF;
          NEW.seq := head.seq + 1;
          NEW.prev_hash := head.hash;
          NEW.hash := {qualified("tenantvault_audit_digest")}(NEW.prev_hash, NEW.tenant_id,
            NEW.seq, NEW.occurred_at, NEW.actor, NEW.action, NEW.target_type, NEW.target_id,
            NEW.details);
          UPDATE {qualified(HEADS)} SET seq = NEW.seq, hash = NEW.hash
            WHERE tenant_id = NEW.tenant_id;
          RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {qualified("tenantvault_audit_append_only")}() RETURNS trigger
        LANGUAGE plpgsql
        AS $$ BEGIN
          RAISE EXCEPTION USING
            MESSAGE = 'audit_events is append-only: ' || TG_OP || ' refused',
            HINT = 'Old events leave only with their whole month (tenantvault audit prune).';
        END $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {qualified('tenantvault_audit_chain')}() FROM PUBLIC")
    op.execute(
        f"CREATE TRIGGER trg_audit_events_chain BEFORE INSERT ON {qualified(AUDIT)} "
        f"FOR EACH ROW EXECUTE FUNCTION {qualified('tenantvault_audit_chain')}()"
    )
    op.execute(
        "CREATE TRIGGER trg_audit_events_append_only BEFORE UPDATE OR DELETE "
        f"ON {qualified(AUDIT)} "
        f"FOR EACH ROW EXECUTE FUNCTION {qualified('tenantvault_audit_append_only')}()"
    )
    op.execute(
        f"CREATE TRIGGER trg_audit_events_no_truncate BEFORE TRUNCATE ON {qualified(AUDIT)} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {qualified('tenantvault_audit_append_only')}()"
    )
    # Monthly partitions, each with its own TRUNCATE guard; `tenantvault audit
    # maintain` adds months ahead. Created in SQL so --sql renders it too.
    op.execute("CREATE " + audit_partitions_function(options().schema, AUDIT))
    op.execute(
        f"REVOKE ALL ON FUNCTION {qualified('tenantvault_audit_add_partitions')}(int) FROM PUBLIC"
    )
    op.execute(f"SELECT {qualified('tenantvault_audit_add_partitions')}({MONTHS_AHEAD})")


def _usage_table(schema: str) -> None:
    op.create_table(
        USAGE,
        sa.Column("tenant_id", sa.Text(), nullable=False, comment="Owning tenant; the RLS key."),
        sa.Column("config_id", sa.Text(), nullable=False, comment="The config that sent."),
        sa.Column("day", sa.Date(), nullable=False, comment="UTC day the counts are for."),
        sa.Column(
            "sent",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Messages sent that day.",
        ),
        sa.Column(
            "failed",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Sends that failed that day.",
        ),
        sa.Column(
            "last_used_at", sa.DateTime(), nullable=False, comment="Latest use that day (UTC)."
        ),
        sa.Column(
            "created_at",
            sa.DateTime(),
            server_default=UTC_NOW,
            nullable=False,
            comment="Creation time (UTC).",
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(),
            server_default=UTC_NOW,
            nullable=False,
            comment="Last change (UTC); maintained by a trigger.",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "config_id", "day", name="email_provider_usage_pkey"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "config_id"],
            [f"{schema}.email_provider_configs.tenant_id", f"{schema}.email_provider_configs.id"],
            name="fk_email_provider_usage_config",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "sent >= 0 AND failed >= 0", name=op.f(f"ck_{USAGE}_counts_not_negative")
        ),
        schema=schema,
        comment="Per-day usage counters of email provider configs.",
    )


def upgrade() -> None:
    opts = options()
    _audit_table()
    _heads_table()
    _functions()
    _usage_table(opts.schema)
    isolate_tenant_table(USAGE)
    op.execute(f'GRANT SELECT, INSERT, UPDATE ON {qualified(USAGE)} TO "{opts.app_role}"')
    op.execute(
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON {qualified(USAGE)} TO "{opts.migrator_role}"'
    )
    op.add_column(
        "email_provider_tokens",
        sa.Column(
            "version",
            sa.Integer(),
            server_default=sa.text("1"),
            nullable=False,
            comment="+1 on every store or refresh: a refresh is a compare-and-swap on it.",
        ),
        schema=opts.schema,
    )
    op.execute(f'GRANT SELECT ON {qualified(HEADS)} TO "{opts.migrator_role}"')


def blockers(opts: MigrationOptions) -> list[Blocker]:
    """What this downgrade would delete."""
    return [
        Blocker("audit events", f"FROM {schema_qualified(opts.schema, AUDIT)}"),
        Blocker("usage counters", f"FROM {schema_qualified(opts.schema, USAGE)}"),
    ]


def downgrade() -> None:
    opts = options()
    refuse_blocked(blockers(opts))
    op.drop_column("email_provider_tokens", "version", schema=opts.schema)
    op.drop_table(USAGE, schema=opts.schema)
    # Dropping the parent drops every partition with it.
    op.execute(f"DROP TABLE {qualified(AUDIT)}")
    op.drop_table(HEADS, schema=opts.schema)
    for function in (
        "tenantvault_audit_add_partitions(int)",
        "tenantvault_audit_append_only()",
        "tenantvault_audit_chain()",
        "tenantvault_audit_digest(text, text, bigint, timestamp, text, text, text, text, jsonb)",
    ):
        op.execute(f"DROP FUNCTION {qualified(function.split('(')[0])}({function.split('(')[1]}")
    _ = postgresql  # JSONB comes from the SQL above
