"""The lookups the application makes, as SQLAlchemy statements: this module is the list.

Repositories run these and nothing else against the tenant tables, and the
indexes exist for exactly these: ``tests/db/test_queries.py`` loads a realistic
volume and checks with EXPLAIN that each one is served by an index. Every
statement names the tenant explicitly even though row-level security already
restricts rows to it: the explicit predicate is what the indexes are built on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Delete, Select, delete, select

from tenantvault.db.models import (
    EmailProviderConfig,
    EmailProviderConfigVersion,
    EmailProviderToken,
    EmailSenderIdentity,
    ProviderType,
)

Config = EmailProviderConfig
Version = EmailProviderConfigVersion
Token = EmailProviderToken
Sender = EmailSenderIdentity


def _live(tenant_id: str) -> Select[EmailProviderConfig]:
    return select(Config).where(Config.tenant_id == tenant_id, Config.deleted_at.is_(None))


def config_by_id(tenant_id: str, config_id: str) -> Select[EmailProviderConfig]:
    return _live(tenant_id).where(Config.id == config_id)


def deleted_config(tenant_id: str, config_id: str) -> Select[EmailProviderConfig]:
    """A soft-deleted config (for restore)."""
    return select(Config).where(
        Config.tenant_id == tenant_id, Config.id == config_id, Config.deleted_at.is_not(None)
    )


def configs_by_ids(tenant_id: str, config_ids: Sequence[str]) -> Select[EmailProviderConfig]:
    """Many configs of one tenant at once (their credentials open with one key fetch)."""
    return _live(tenant_id).where(Config.id.in_(config_ids)).order_by(Config.id)


def default_config(tenant_id: str) -> Select[EmailProviderConfig]:
    # A CHECK makes every default live and active, so is_default alone suffices.
    return select(Config).where(Config.tenant_id == tenant_id, Config.is_default)


def config_by_name(tenant_id: str, name: str) -> Select[EmailProviderConfig]:
    return _live(tenant_id).where(Config.name == name)


def active_configs(tenant_id: str) -> Select[EmailProviderConfig]:
    return _live(tenant_id).where(Config.is_active).order_by(Config.name)


def configs_of_type(tenant_id: str, provider: ProviderType) -> Select[EmailProviderConfig]:
    return _live(tenant_id).where(Config.type == provider).order_by(Config.name)


def config_for_sender(tenant_id: str, sender_id: str) -> Select[EmailProviderConfig]:
    """The config a sender identity sends through."""
    return (
        _live(tenant_id)
        .join(
            Sender,
            (Sender.tenant_id == Config.tenant_id) & (Sender.provider_config_id == Config.id),
        )
        .where(Sender.tenant_id == tenant_id, Sender.id == sender_id)
    )


def senders_of_config(tenant_id: str, config_id: str) -> Select[str]:
    return select(Sender.id).where(
        Sender.tenant_id == tenant_id, Sender.provider_config_id == config_id
    )


def token_of_config(tenant_id: str, config_id: str) -> Select[EmailProviderToken]:
    return select(Token).where(Token.tenant_id == tenant_id, Token.config_id == config_id)


def tokens_expiring(tenant_id: str, before: datetime) -> Select[EmailProviderToken]:
    """Tokens whose access token expires before ``before`` (for the refresher)."""
    return (
        select(Token)
        .where(Token.tenant_id == tenant_id, Token.expires_at < before)
        .order_by(Token.expires_at)
    )


def delete_unrefreshable_expired_tokens(tenant_id: str, now: datetime) -> Delete:
    """Expired tokens with no refresh token can never be used again."""
    return delete(Token).where(
        Token.tenant_id == tenant_id,
        Token.expires_at < now,
        Token.encrypted_refresh_token.is_(None),
    )


def delete_tokens_of_config(tenant_id: str, config_id: str) -> Delete:
    return delete(Token).where(Token.tenant_id == tenant_id, Token.config_id == config_id)


def config_versions(tenant_id: str, config_id: str) -> Select[EmailProviderConfigVersion]:
    """A config's history, oldest first (its primary key serves it)."""
    return (
        select(Version)
        .where(Version.tenant_id == tenant_id, Version.config_id == config_id)
        .order_by(Version.version)
    )


def config_version(
    tenant_id: str, config_id: str, version: int
) -> Select[EmailProviderConfigVersion]:
    return select(Version).where(
        Version.tenant_id == tenant_id, Version.config_id == config_id, Version.version == version
    )


_GRANT_COLUMNS = (
    "token_id, token_version, token_type, expires_at, scopes, encrypted_access_token, "
    "encrypted_refresh_token"
)


def hot_token_sql(schema: str) -> str:
    """The token load's one statement (DB-API, ``%s`` parameters: tenant, config):
    migration 0017's function scopes the tenant and returns the live config's type and
    config (what the tokens are bound to) with its token row, and the tenant's oldest
    usable data key version (a cached key older than that was retired or destroyed by
    another process: it opens nothing)."""
    return (
        f"SELECT type, config::text, {_GRANT_COLUMNS}, oldest_usable_key "
        f'FROM "{schema}".tenantvault_load_oauth_token(%s, %s)'
    )


def hot_open_sql(schema: str) -> str:
    """``open_config``'s one statement (DB-API, ``%s`` parameters: tenant, config):
    migration 0017's function scopes the tenant and returns the live config row and
    its token row (NULLs without one), read in one snapshot; then as :func:`hot_token_sql`."""
    return (
        "SELECT type, name, config::text, is_default, is_active, created_at, updated_at, "
        f"version, encrypted_credentials, {_GRANT_COLUMNS}, oldest_usable_key "
        f'FROM "{schema}".tenantvault_open_config(%s, %s)'
    )


def hot_load_sql(schema: str) -> str:
    """The load hot path's one statement (DB-API, ``%s`` parameters: tenant, config):
    migration 0017's function scopes the tenant for this statement only and returns
    what opening the credentials needs, then the tenant's oldest usable key version.

    None of the three asks the database whether an older-format value may open: the
    hot paths open format 3 only (:meth:`tenantvault.keys.keyring.Keyring.open_cached`),
    and the full path asks (:mod:`tenantvault.keys.legacy`)."""
    # The config as the database prints it: its binding's digest is cached by that text
    # (keys/sealed.stored_config_digest), so it is never decoded on the hot path.
    return (
        "SELECT type, version, config::text, encrypted_credentials, oldest_usable_key "
        f'FROM "{schema}".tenantvault_load_credentials(%s, %s)'
    )
