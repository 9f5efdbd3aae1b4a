"""Every error tenantvault raises derives from :class:`TenantVaultError`.

Messages name settings, tables, tenants and row ids; they never carry a secret,
a key, or a value that was being validated.
"""

from __future__ import annotations

from collections.abc import Sequence


class TenantVaultError(Exception):
    """Base class of every tenantvault error."""


class ConfigurationError(TenantVaultError):
    """A setting is missing or malformed; the message names the variable."""


class MigrationError(TenantVaultError):
    """A schema migration could not run; the database was left as it was."""


class DevStackError(TenantVaultError):
    """The embedded development stack (PostgreSQL, OpenBao) could not start or stop."""


class DatabaseError(TenantVaultError):
    """The database failed a call; the message names the condition (and its SQLSTATE),
    never the statement or a value. The driver's error is chained as ``__cause__``."""


class DatabaseUnavailable(DatabaseError):  # noqa: N818 - the name the API promises
    """The database could not be reached, or dropped the connection, or cannot serve
    now (shutting down, out of connections): worth retrying later."""


class SchemaNotMigrated(DatabaseError):  # noqa: N818 - says what happened, as Unavailable
    """The database has no tenantvault schema of this version: run ``tenantvault migrate``
    (or check ``TENANTVAULT_SCHEMA_NAME``)."""


class DatabaseTimeout(DatabaseError):  # noqa: N818 - says what happened, as Unavailable
    """The database cancelled the statement: it ran past the statement timeout
    (``TENANTVAULT_STATEMENT_TIMEOUT_MS``), waited past a lock timeout, or was cancelled."""


class DecryptionError(TenantVaultError):
    """A sealed value could not be opened. Deliberately says nothing about why."""


class KeyProviderError(TenantVaultError):
    """The key provider (Vault transit or local) refused or failed a request."""


class KeyProviderUnavailable(KeyProviderError):  # noqa: N818 - the name the API promises
    """The key provider could not be reached within the configured timeout."""


class KeyProviderRefused(KeyProviderError):  # noqa: N818 - says what happened, as Unavailable
    """The key provider answered but refused the caller (Vault's 403: a token or policy
    that may not do it). Like an outage, it makes uncached keys back off."""


class TenantKeyUnavailable(KeyProviderError):  # noqa: N818 - the name the API promises
    """A tenant's own KEK (a customer-managed key) does not wrap or unwrap: revoked,
    disabled, deleted, or its KMS unreachable. Only that tenant's keys fail; the message
    names the tenant and the key reference, never key material."""

    def __init__(self, tenant_id: str, kek_ref: str, reason: str = "") -> None:
        self.tenant_id = tenant_id
        self.kek_ref = kek_ref
        detail = f": {reason}" if reason else ""
        super().__init__(f"the KEK {kek_ref} of tenant {tenant_id} is unavailable{detail}")


class KeyDestroyedError(TenantVaultError):
    """The tenant's data key was destroyed (crypto-shredded): its values are gone for good."""


class NotFoundError(TenantVaultError, LookupError):
    """No live row matched; the message names the tenant and the id, never content."""


class ConcurrentModification(TenantVaultError):  # noqa: N818 - the name the API promises
    """The row moved on since the caller read it (``expected_version`` did not match)."""


class RotationError(TenantVaultError):
    """A key rotation or shred could not proceed safely; nothing was half-written."""


class AuditError(TenantVaultError):
    """An audit-log job (prune) could not proceed safely; nothing was changed."""


class AuditChainBroken(AuditError):  # noqa: N818 - says what happened, as ConcurrentModification
    """``audit prune`` found a break in a chain it would cut (or at a head kept outside)
    and refused: nothing was dropped and no start marker signed. ``breaks`` holds the
    :class:`~tenantvault.audit.chain.ChainBreak` items (tenant ids, seqs, problems)."""

    def __init__(self, message: str, breaks: Sequence[object]) -> None:
        super().__init__(message)
        self.breaks = list(breaks)


class InvalidInputError(TenantVaultError, ValueError):
    """Caller input failed validation; the message names each field, never its value."""


class UnknownRevisionError(MigrationError, InvalidInputError):
    """A migration was asked for a revision no revision answers to; the message names
    the option it came from (``--revision``, ``--from``). Nothing was changed."""


class TenantNotSetError(InvalidInputError):
    """A tenant-scoped operation was given an empty or malformed tenant id.

    An :class:`InvalidInputError` like any other bad input; the message names the
    field, ``tenant_id``, never the value given."""


class ReconsentRequired(TenantVaultError):  # noqa: N818 - says what is needed, as the issue names it
    """The provider answered a refresh with ``invalid_grant`` (the user revoked the grant,
    or it lapsed): the token is marked, no refresh is sent for it again, and the user must
    consent anew (``Vault.authorization_url``, then ``complete_authorization``). Names the
    tenant and the config, never a token."""

    def __init__(self, tenant_id: str, config_id: str) -> None:
        self.tenant_id = tenant_id
        self.config_id = config_id
        super().__init__(
            f"the OAuth grant of config {config_id} of tenant {tenant_id} was refused "
            "(invalid_grant): the user must consent again"
        )


class OAuthProviderError(TenantVaultError):
    """A config's token endpoint refused a request for another reason than a revoked
    grant (``invalid_client``: a wrong or expired client secret, ...); the message names
    the OAuth error code only. Nothing stored changed."""


class OAuthProviderUnavailable(OAuthProviderError):  # noqa: N818 - as KeyProviderUnavailable
    """A config's token endpoint did not answer usefully (a timeout, a refused connection,
    a 5xx or 429) after retries: worth retrying later. Nothing stored changed."""
