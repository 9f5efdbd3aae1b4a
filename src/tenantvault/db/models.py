"""SQLAlchemy models: the tables tenantvault owns and the application tables it links to.

Tables carry no schema here; :func:`tenantvault.db.create_engine` maps them into
the configured schema (``dripiq_app`` by default) with ``schema_translate_map``,
so every statement is schema-qualified and nothing depends on ``search_path``.
The migrations in ``migrations/versions`` create exactly these tables; a test
(``test_model_definitions_match_ddl``) fails if the two drift.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar, TypedDict

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    FetchedValue,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, foreign, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from tenantvault.crypto.envelope import SQL_PATTERN as SEALED_PATTERN
from tenantvault.db.ids import new_id

KEK_REF_PATTERN = r"^[a-z][a-z0-9]*:[^[:space:]]+$"
"""A KEK reference as stored: the provider, a colon, and the provider's name of the
key (``transit:tenantvault``, ``awskms:arn:aws:kms:...``); kms/refs.py parses it."""

NAMING_CONVENTION = {
    "pk": "%(table_name)s_pkey",  # PostgreSQL's own default, as the deployed tables have
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
}


class ProviderType(enum.StrEnum):
    """The email providers a config can describe."""

    SENDGRID = "sendgrid"
    SMTP = "smtp"
    MICROSOFT_GRAPH = "microsoft_graph"
    GOOGLE_WORKSPACE = "google_workspace"


class ValidationStatus(enum.StrEnum):
    """Sender identity validation states, as the application writes them."""

    PENDING = "pending"
    VERIFIED = "verified"
    FAILED = "failed"


class UTCDateTime(TypeDecorator[datetime]):
    """``timestamp without time zone`` holding UTC, as the deployed schema does.

    Python sees aware UTC datetimes; a naive datetime is refused rather than
    guessed at, since a local time stored as UTC is silently wrong.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware datetime (UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class StrEnumText(TypeDecorator[enum.StrEnum]):
    """A ``text`` column read back as a Python ``StrEnum`` (the CHECK lives in the DDL)."""

    impl = Text
    cache_ok = True

    def __init__(self, enum_type: type[enum.StrEnum]) -> None:
        super().__init__()
        self.enum_type = enum_type

    def process_bind_param(self, value: enum.StrEnum | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_type(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> enum.StrEnum | None:
        return None if value is None else self.enum_type(value)


# The database keeps these current (a trigger on every tenantvault table); the
# ORM defaults only matter for objects not yet flushed.
UTC_NOW = text("timezone('utc', now())")
TextId = Annotated[str, mapped_column(Text, primary_key=True, default=new_id)]
CreatedAt = Annotated[datetime, mapped_column(UTCDateTime, server_default=UTC_NOW)]
UpdatedAt = Annotated[datetime, mapped_column(UTCDateTime, server_default=UTC_NOW)]


def _sealed_check(column: str) -> CheckConstraint:
    """NULL or a sealed value: plaintext or garbage written by SQL is refused (0009)."""
    return CheckConstraint(
        f"{column} IS NULL OR {column} ~ '{SEALED_PATTERN}'", name=f"{column}_sealed"
    )


class Base(DeclarativeBase):
    """The one declarative base; its metadata is what Alembic compares against."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSONB,
        str: Text,
    }


# --- Application tables (owned by the app; tenantvault reads them and adds columns) ---


class Tenant(Base):
    """A tenant of the SaaS. The application has more columns; tenantvault needs these."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("now()"))

    provider_configs: Mapped[list[EmailProviderConfig]] = relationship(
        back_populates="tenant", passive_deletes=True
    )


class User(Base):
    """An application user (owner of sender identities)."""

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("supabase_id", name="users_supabase_id_unique"),
        UniqueConstraint("email", name="users_email_unique"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    supabase_id: Mapped[str]
    email: Mapped[str]
    name: Mapped[str | None]
    avatar: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("now()"))


class EmailSenderIdentity(Base):
    """A verified "from" address of a tenant; the app owns it, tenantvault links it to a config."""

    __tablename__ = "email_sender_identities"
    __table_args__ = (
        UniqueConstraint("tenant_id", "from_email", name="tenant_email_unique"),
        # Composite so a sender can only point at a config of its own tenant.
        # ON DELETE SET NULL (provider_config_id) clears just the link, never tenant_id.
        ForeignKeyConstraint(
            ["tenant_id", "provider_config_id"],
            ["email_provider_configs.tenant_id", "email_provider_configs.id"],
            ondelete="SET NULL (provider_config_id)",
            name="fk_email_sender_identities_provider_config",
        ),
        # Serves "the senders of a config" and the FK's ON DELETE lookups.
        Index(
            "ix_email_sender_identities_tenant_id_provider_config_id",
            "tenant_id",
            "provider_config_id",
        ),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey(
            "tenants.id", ondelete="CASCADE", name="email_sender_identities_tenant_id_tenants_id_fk"
        )
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey(
            "users.id", ondelete="CASCADE", name="email_sender_identities_user_id_users_id_fk"
        )
    )
    from_email: Mapped[str]
    from_name: Mapped[str]
    domain: Mapped[str]
    sendgrid_sender_id: Mapped[str | None]
    validation_status: Mapped[str] = mapped_column(server_default=text("'pending'::text"))
    last_validated_at: Mapped[datetime | None]
    dedicated_ip_pool: Mapped[str | None]
    email_signature: Mapped[str | None]
    is_default: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("now()"))
    provider_config_id: Mapped[str | None] = mapped_column(
        comment="The email provider config this sender sends through (NULL: legacy SendGrid path)."
    )
    provider_validation_data: Mapped[dict[str, Any] | None] = mapped_column(
        comment="Provider-specific validation data (identity id, verification URLs, ...); "
        "not secret."
    )

    provider_config: Mapped[EmailProviderConfig | None] = relationship(
        # Only provider_config_id is written through this link: tenant_id is the
        # sender's own and must never be nulled or changed by (un)linking.
        primaryjoin=lambda: (
            (EmailProviderConfig.tenant_id == EmailSenderIdentity.tenant_id)
            & (EmailProviderConfig.id == foreign(EmailSenderIdentity.provider_config_id))
        ),
    )


# --- tenantvault's tables ---


class EmailProviderConfig(Base):
    """One email provider configuration of a tenant; its secrets are sealed, never plaintext."""

    __tablename__ = "email_provider_configs"
    # The trigger's updated_at (and created_at's default) come back with RETURNING on
    # the write itself, not with a SELECT after it.
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 - SQLAlchemy reads it as is
    __table_args__ = (
        # The target of the composite foreign keys that keep references inside a tenant;
        # its tenant_id prefix also serves every per-tenant listing.
        UniqueConstraint("tenant_id", "id", name="uq_email_provider_configs_tenant_id_id"),
        # Names are unique among live configs only, so a deleted config frees its name.
        Index(
            "uq_email_provider_configs_tenant_id_name_live",
            "tenant_id",
            "name",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
        ),
        # At most one default per tenant (a CHECK makes a default live and active).
        Index(
            "uq_email_provider_configs_tenant_id_default",
            "tenant_id",
            unique=True,
            postgresql_where=text("is_default"),
        ),
        CheckConstraint(
            "type IN ('sendgrid', 'smtp', 'microsoft_graph', 'google_workspace')", name="type"
        ),
        CheckConstraint("btrim(name) <> ''", name="name_not_blank"),
        CheckConstraint("jsonb_typeof(config) = 'object'", name="config_is_object"),
        _sealed_check("encrypted_credentials"),
        # A default is always usable: deactivating or deleting it clears is_default first.
        CheckConstraint(
            "NOT is_default OR (is_active AND deleted_at IS NULL)", name="default_is_live"
        ),
        CheckConstraint("version >= 1", name="version_positive"),
        {"comment": "Email provider configurations of tenants; credentials are sealed (AEAD)."},
    )

    id: Mapped[TextId] = mapped_column(comment="Row id ('tv' + 32 hex digits).")
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey(
            "tenants.id", ondelete="CASCADE", name="fk_email_provider_configs_tenant_id_tenants"
        ),
        comment="Owning tenant; row-level security admits only the transaction's tenant.",
    )
    type: Mapped[ProviderType] = mapped_column(
        StrEnumText(ProviderType),
        comment="Provider: sendgrid, smtp, microsoft_graph or google_workspace.",
    )
    name: Mapped[str] = mapped_column(
        comment="Display name, unique among the tenant's live configs."
    )
    config: Mapped[dict[str, Any]] = mapped_column(
        comment="Provider-specific non-secret configuration (JSON object)."
    )
    encrypted_credentials: Mapped[str | None] = mapped_column(
        comment="Sealed secret credentials (AEAD, bound to tenant, column and row); "
        "never plaintext."
    )
    is_default: Mapped[bool] = mapped_column(
        server_default=text("false"), comment="The tenant's default config (at most one, live)."
    )
    is_active: Mapped[bool] = mapped_column(
        server_default=text("true"), comment="False when deactivated: kept, but not used to send."
    )
    created_at: Mapped[CreatedAt] = mapped_column(comment="Creation time (UTC).")
    updated_at: Mapped[UpdatedAt] = mapped_column(
        server_onupdate=FetchedValue(), comment="Last change (UTC); maintained by a trigger."
    )
    deleted_at: Mapped[datetime | None] = mapped_column(
        comment="Soft-delete time (UTC); NULL while the config is live."
    )
    version: Mapped[int] = mapped_column(
        Integer,
        server_default=text("1"),
        comment="Change counter: +1 on every change; each version is kept in "
        "email_provider_config_versions.",
    )

    tenant: Mapped[Tenant] = relationship(back_populates="provider_configs")
    tokens: Mapped[list[EmailProviderToken]] = relationship(
        back_populates="config", passive_deletes=True
    )
    sender_identities: Mapped[list[EmailSenderIdentity]] = relationship(
        primaryjoin=lambda: (
            (EmailProviderConfig.tenant_id == EmailSenderIdentity.tenant_id)
            & (EmailProviderConfig.id == foreign(EmailSenderIdentity.provider_config_id))
        ),
        viewonly=True,
    )


class EmailProviderToken(Base):
    """The OAuth tokens of one config (at most one row per config), sealed."""

    __tablename__ = "email_provider_tokens"
    __table_args__ = (
        # One token row per config: it is upserted on every grant and refresh.
        UniqueConstraint(
            "tenant_id", "config_id", name="uq_email_provider_tokens_tenant_id_config_id"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "config_id"],
            ["email_provider_configs.tenant_id", "email_provider_configs.id"],
            ondelete="CASCADE",
            name="fk_email_provider_tokens_config",
        ),
        _sealed_check("encrypted_access_token"),
        _sealed_check("encrypted_refresh_token"),
        {"comment": "OAuth tokens of email provider configs; tokens are sealed (AEAD)."},
    )

    id: Mapped[TextId] = mapped_column(comment="Row id ('tv' + 32 hex digits).")
    tenant_id: Mapped[str] = mapped_column(
        comment="Owning tenant (the config's); row-level security admits only the "
        "transaction's tenant."
    )
    config_id: Mapped[str] = mapped_column(comment="The config these tokens authorize.")
    encrypted_access_token: Mapped[str | None] = mapped_column(
        comment="Sealed OAuth access token; never plaintext."
    )
    encrypted_refresh_token: Mapped[str | None] = mapped_column(
        comment="Sealed OAuth refresh token; never plaintext."
    )
    token_type: Mapped[str] = mapped_column(
        server_default=text("'Bearer'::text"), comment="OAuth token type (normally Bearer)."
    )
    expires_at: Mapped[datetime | None] = mapped_column(
        comment="Access token expiry (UTC); queryable for the refresher."
    )
    scopes: Mapped[list[str]] = mapped_column(
        ARRAY(Text), server_default=text("'{}'::text[]"), comment="Granted OAuth scopes."
    )
    version: Mapped[int] = mapped_column(
        Integer,
        server_default=text("1"),
        comment="+1 on every store or refresh: a refresh is a compare-and-swap on it.",
    )
    # Set on an invalid_grant answer (0019): the refresh job skips the row, and the
    # status command lists it, until a new grant is stored.
    reconsent_required_at: Mapped[datetime | None] = mapped_column(
        comment="When the provider refused a refresh with invalid_grant (UTC): no refresh "
        "is sent until a new grant is stored; NULL otherwise.",
    )
    created_at: Mapped[CreatedAt] = mapped_column(comment="Creation time (UTC).")
    updated_at: Mapped[UpdatedAt] = mapped_column(
        comment="Last change (UTC); maintained by a trigger."
    )

    config: Mapped[EmailProviderConfig] = relationship(back_populates="tokens")


class ConfigChange(enum.StrEnum):
    """What a config version changed."""

    CREATED = "created"
    UPDATED = "updated"  # name and/or non-secret config (maybe credentials too)
    CREDENTIALS = "credentials"  # only the secret credentials (credential rotation)
    ROLLBACK = "rollback"  # a copy of an older version
    BASELINE = "baseline"  # the state found when versioning was installed


class EmailProviderConfigVersion(Base):
    """One version of a config, kept for history and rollback; credentials sealed again here."""

    __tablename__ = "email_provider_config_versions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "config_id"],
            ["email_provider_configs.tenant_id", "email_provider_configs.id"],
            ondelete="CASCADE",
            name="fk_email_provider_config_versions_config",
        ),
        CheckConstraint(
            "change IN ('created', 'updated', 'credentials', 'rollback', 'baseline')",
            name="change",
        ),
        CheckConstraint("version >= 1", name="version_positive"),
        _sealed_check("encrypted_credentials"),
        # Retention's lookup: only the versions that still hold a secret.
        Index(
            "ix_email_provider_config_versions_with_credentials",
            "tenant_id",
            "config_id",
            "version",
            postgresql_where=text("encrypted_credentials IS NOT NULL"),
        ),
        {
            "comment": "Every version of every email provider config: non-secret config, "
            "sealed credentials, actor, reason, time."
        },
    )

    tenant_id: Mapped[str] = mapped_column(
        Text, primary_key=True, comment="Owning tenant; the RLS key."
    )
    config_id: Mapped[str] = mapped_column(
        Text, primary_key=True, comment="The config this is a version of."
    )
    version: Mapped[int] = mapped_column(
        Integer, primary_key=True, comment="The config's version number."
    )
    change: Mapped[ConfigChange] = mapped_column(
        StrEnumText(ConfigChange),
        comment="What this version changed: created, updated, credentials, rollback, "
        "or baseline (recorded when versioning was installed).",
    )
    name: Mapped[str] = mapped_column(comment="The config's name at this version.")
    config: Mapped[dict[str, Any]] = mapped_column(
        comment="The non-secret configuration at this version."
    )
    encrypted_credentials: Mapped[str | None] = mapped_column(
        comment="Sealed credentials of this version (bound to this row); NULL when "
        "there were none, or pruned by retention."
    )
    actor: Mapped[str | None] = mapped_column(
        comment="Who made the change (as the caller named it, e.g. user:42)."
    )
    reason: Mapped[str | None] = mapped_column(comment="Why, as the caller gave it.")
    created_at: Mapped[CreatedAt] = mapped_column(comment="When this version was written (UTC).")
    updated_at: Mapped[UpdatedAt] = mapped_column(
        comment="Last change (re-sealed or pruned; UTC); maintained by a trigger."
    )


class DataKeyState(enum.StrEnum):
    """Lifecycle of a tenant data key."""

    ACTIVE = "active"  # seals new values
    DRAINING = "draining"  # superseded; DEK rotation is re-sealing what it still protects
    RETIRED = "retired"  # nothing named it when it retired: opens nothing (kept for audit)
    DESTROYED = "destroyed"  # crypto-shredded: its values can never be opened

    @property
    def sql(self) -> str:
        """The state as an SQL string literal (the schema's constraints name them)."""
        return f"'{self.value}'"


class TenantDataKey(Base):
    """A version of a tenant's data key, stored only wrapped by the transit KEK."""

    __tablename__ = "tenant_data_keys"
    __table_args__ = (
        # Exactly one active key per tenant; two processes racing to make the first
        # one collide on the primary key (tenant_id, 1) and one of them wins.
        Index(
            "uq_tenant_data_keys_tenant_id_active",
            "tenant_id",
            unique=True,
            postgresql_where=text(f"state = {DataKeyState.ACTIVE.sql}"),
        ),
        CheckConstraint(
            f"state IN ({', '.join(state.sql for state in DataKeyState)})", name="state"
        ),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint(
            f"(state = {DataKeyState.DESTROYED.sql}) = (wrapped_key IS NULL)",
            name="destroyed_has_no_key",
        ),
        # The KEK version is the one the wrapped key names (vault:vN:...), so counts of
        # keys behind a KEK version cannot be fooled by a row that lies about it.
        CheckConstraint(
            r"wrapped_key IS NULL OR wrapped_key ~ ('^[a-z]+\:v' || kek_version || '\:')",
            name="kek_version_matches",
        ),
        CheckConstraint(f"kek_ref ~ '{KEK_REF_PATTERN}'", name="kek_ref_format"),
        {"comment": "Tenant data keys (DEKs), wrapped by a KEK; never plaintext."},
    )

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE", name="fk_tenant_data_keys_tenant_id_tenants"),
        primary_key=True,
        comment="Owning tenant; the RLS key.",
    )
    version: Mapped[int] = mapped_column(
        Integer, primary_key=True, comment="DEK version, from 1 per tenant."
    )
    wrapped_key: Mapped[str | None] = mapped_column(
        comment="The DEK encrypted by the KEK kek_ref for this tenant; NULL once destroyed."
    )
    kek_version: Mapped[int] = mapped_column(
        Integer, comment="Version of the KEK that wrapped wrapped_key."
    )
    # Random 96-bit nonces bound one key to about 2**32 seals (NIST SP 800-38D): the
    # count lets rotate-keys status warn long before.
    seals: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("0"),
        comment="Values sealed under this key so far (its AES-GCM nonce budget).",
    )
    state: Mapped[DataKeyState] = mapped_column(
        StrEnumText(DataKeyState),
        server_default=text(f"{DataKeyState.ACTIVE.sql}::text"),
        comment="active (new values), draining (superseded, being re-sealed), retired "
        "(read only), destroyed (shredded).",
    )
    created_at: Mapped[CreatedAt] = mapped_column(comment="Creation time (UTC).")
    updated_at: Mapped[UpdatedAt] = mapped_column(
        comment="Last change (UTC); maintained by a trigger."
    )
    # The default is the deployment's KEK when migration 0018 ran: the KEK of every row
    # written before it, and of a row a process older than 0018 inserts meanwhile.
    kek_ref: Mapped[str] = mapped_column(
        Text,
        comment="The KEK that wrapped wrapped_key: transit:<key> or awskms:<key id or ARN>.",
    )


class TenantKek(Base):
    """The KEK a tenant chose for its data keys (a customer-managed key); a tenant
    without a row uses the deployment's KEK. Written by operators only."""

    __tablename__ = "tenant_keks"
    __table_args__ = (
        CheckConstraint(f"kek_ref ~ '{KEK_REF_PATTERN}'", name="kek_ref_format"),
        CheckConstraint(
            "cache_max_age_seconds IS NULL OR cache_max_age_seconds > 0",
            name="cache_max_age_positive",
        ),
        {"comment": "Per-tenant KEKs (customer-managed keys); operators write, the app reads."},
    )

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE", name="fk_tenant_keks_tenant_id_tenants"),
        primary_key=True,
        comment="The tenant; the RLS key.",
    )
    kek_ref: Mapped[str] = mapped_column(
        Text, comment="The tenant's KEK: transit:<key> or awskms:<key id or ARN>."
    )
    cache_max_age_seconds: Mapped[int | None] = mapped_column(
        Integer,
        comment="How long an unwrapped data key of this tenant is cached at most (the "
        "revocation delay); NULL: the deployment's TENANTVAULT_DEK_CACHE_MAX_AGE_SECONDS.",
    )
    created_at: Mapped[CreatedAt] = mapped_column(comment="Creation time (UTC).")
    updated_at: Mapped[UpdatedAt] = mapped_column(
        comment="Last change (UTC); maintained by a trigger."
    )


class EmailProviderUsage(Base):
    """Per-day usage counters of one config (the ticket's "provider usage statistics")."""

    __tablename__ = "email_provider_usage"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "config_id"],
            ["email_provider_configs.tenant_id", "email_provider_configs.id"],
            ondelete="CASCADE",
            name="fk_email_provider_usage_config",
        ),
        CheckConstraint("sent >= 0 AND failed >= 0", name="counts_not_negative"),
        {"comment": "Per-day usage counters of email provider configs."},
    )

    tenant_id: Mapped[str] = mapped_column(
        Text, primary_key=True, comment="Owning tenant; the RLS key."
    )
    config_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="The config that sent.")
    day: Mapped[date] = mapped_column(Date, primary_key=True, comment="UTC day the counts are for.")
    sent: Mapped[int] = mapped_column(
        BigInteger, server_default=text("0"), comment="Messages sent that day."
    )
    failed: Mapped[int] = mapped_column(
        BigInteger, server_default=text("0"), comment="Sends that failed that day."
    )
    last_used_at: Mapped[datetime] = mapped_column(comment="Latest use that day (UTC).")
    created_at: Mapped[CreatedAt] = mapped_column(comment="Creation time (UTC).")
    updated_at: Mapped[UpdatedAt] = mapped_column(
        comment="Last change (UTC); maintained by a trigger."
    )


class AuditAction(enum.StrEnum):
    """What an audit event records. Loads are audited only when the setting asks."""

    CONFIG_CREATED = "config.created"
    CONFIG_UPDATED = "config.updated"
    CREDENTIALS_STORED = "config.credentials_stored"
    CONFIG_ROLLED_BACK = "config.rolled_back"
    DEFAULT_SET = "config.default_set"
    CONFIG_DEACTIVATED = "config.deactivated"
    CONFIG_DELETED = "config.deleted"
    CONFIG_RESTORED = "config.restored"
    CONFIG_PURGED = "config.purged"
    CREDENTIALS_REVEALED = "credentials.revealed"
    TOKEN_STORED = "token.stored"  # noqa: S105 - an action name
    TOKEN_REFRESHED = "token.refreshed"  # noqa: S105 - an action name
    TOKEN_DELETED = "token.deleted"  # noqa: S105 - an action name
    DEK_CREATED = "dek.created"
    DEK_ROTATED = "dek.rotated"
    DEK_RETIRED = "dek.retired"
    DEK_DESTROYED = "dek.destroyed"
    KEK_REWRAPPED = "kek.rewrapped"
    TENANT_KEK_SET = "kek.tenant_set"
    TOKEN_RECONSENT_REQUIRED = "token.reconsent_required"  # noqa: S105 - an action name


class AuditEvent(Base):
    """One audited operation: append-only, chained per tenant by ``hash``, partitioned
    by month on ``occurred_at``. Never holds a secret. The trigger sets ``seq``,
    ``prev_hash`` and ``hash``; callers give the rest."""

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint(
            "action IN (" + ", ".join(f"'{a.value}'" for a in AuditAction) + ")", name="action"
        ),
        CheckConstraint("jsonb_typeof(details) = 'object'", name="details_is_object"),
        {
            "postgresql_partition_by": "RANGE (occurred_at)",
            "comment": "Audit log of sensitive operations: append-only, hash-chained per "
            "tenant, partitioned by month. Never holds a secret.",
        },
    )

    tenant_id: Mapped[str] = mapped_column(
        Text,
        primary_key=True,
        comment="Tenant the event belongs to; the RLS key. No foreign key: the log "
        "outlives the tenant.",
    )
    # seq, prev_hash and hash are the trigger's to set (FetchedValue: never from Python).
    seq: Mapped[int] = mapped_column(
        BigInteger,
        primary_key=True,
        server_default=FetchedValue(),
        comment="Position in the tenant's chain: 1, 2, ... without gaps (set by the trigger).",
    )
    occurred_at: Mapped[datetime] = mapped_column(
        UTCDateTime,
        primary_key=True,
        server_default=text("timezone('utc', clock_timestamp())"),
        comment="When it was recorded (UTC clock time of the insert).",
    )
    actor: Mapped[str | None] = mapped_column(
        comment="Who did it, as the caller named it (user:42, rotate-keys)."
    )
    action: Mapped[str] = mapped_column(comment="What was done (config.created, dek.rotated, ...).")
    target_type: Mapped[str | None] = mapped_column(
        comment="Kind of thing acted on (config, token, dek, kek)."
    )
    target_id: Mapped[str | None] = mapped_column(
        comment="Id of the thing acted on (a config id, a key version)."
    )
    details: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("'{}'::jsonb"),
        comment="Non-secret facts of the event (versions, counts, changed field names).",
    )
    prev_hash: Mapped[str] = mapped_column(
        server_default=FetchedValue(),
        comment="hash of the tenant's previous event ('' for the first).",
    )
    hash: Mapped[str] = mapped_column(
        server_default=FetchedValue(),
        comment="sha256 over prev_hash and this row (tenantvault_audit_digest), hex.",
    )


class AuditChainHead(Base):
    """Where each tenant's audit chain ends, and where retention cut its start."""

    __tablename__ = "audit_chain_heads"
    __table_args__ = (
        {
            "comment": "Head of each tenant's audit chain; written only by the audit trigger "
            "and the retention job."
        },
    )

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="The chain's tenant.")
    seq: Mapped[int] = mapped_column(BigInteger, comment="seq of the tenant's last event.")
    hash: Mapped[str] = mapped_column(comment="hash of the tenant's last event.")
    first_seq: Mapped[int] = mapped_column(
        BigInteger, server_default=text("1"), comment="seq of the first event retention kept."
    )
    anchor_hash: Mapped[str] = mapped_column(
        server_default=text("''::text"),
        comment="hash of the last event retention dropped ('' when none was).",
    )
    anchor_mac: Mapped[str | None] = mapped_column(
        comment="The key provider's MAC of (tenant, first_seq, anchor_hash), made by "
        "retention: the database owner cannot move the chain's start unnoticed.",
    )


# The ticket's TypeScript aliases, as Python types: the row types are the models
# themselves; the insert shapes list what a caller provides.
class NewEmailProviderConfig(TypedDict, total=False):
    """Insert shape of ``email_provider_configs`` (``$inferInsert`` in the ticket)."""

    id: str
    tenant_id: str
    type: ProviderType
    name: str
    config: dict[str, Any]
    encrypted_credentials: str | None
    is_default: bool
    is_active: bool


class NewEmailProviderToken(TypedDict, total=False):
    """Insert shape of ``email_provider_tokens`` (``$inferInsert`` in the ticket)."""

    id: str
    tenant_id: str
    config_id: str
    encrypted_access_token: str | None
    encrypted_refresh_token: str | None
    token_type: str
    expires_at: datetime | None
    scopes: list[str]


TENANTVAULT_TABLES = (
    EmailProviderConfig.__tablename__,
    EmailProviderToken.__tablename__,
    EmailProviderConfigVersion.__tablename__,
    EmailProviderUsage.__tablename__,
    AuditEvent.__tablename__,
    TenantDataKey.__tablename__,
)
"""Tables tenantvault owns: each has row-level security, forced, on ``tenant_id``."""
