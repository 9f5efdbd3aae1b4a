"""Every change of a config is a new kept version: the write, its guards, its errors.

A write seals the credentials into the config row (when they are new) and keeps
the row's new version in the history, with the credentials sealed again for
that history row; versions past the retention bound lose their secret.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tenantvault.db.models import ConfigChange, EmailProviderConfig, EmailProviderConfigVersion
from tenantvault.errors import ConcurrentModification, InvalidInputError
from tenantvault.keys.keyring import Sealer
from tenantvault.keys.sealed import CONFIG_CREDENTIALS, VERSION_CREDENTIALS
from tenantvault.vault.providers import CredentialsModel, credentials_to_json


def checked_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidInputError("name: must be 1-200 characters, not blank")
    if not name.isprintable():  # a NUL the database would refuse, a newline in listings
        raise InvalidInputError("name: must be printable text")
    return name.strip()


def checked_note(field: str, value: str | None) -> str | None:
    """An actor or reason: free text kept in history, so bounded and printable."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 500:
        raise InvalidInputError(f"{field}: must be 1-500 characters, not blank")
    if not value.isprintable():
        raise InvalidInputError(f"{field}: must be printable text")
    return value.strip()


def check_expected_version(row: EmailProviderConfig, expected_version: int | None) -> None:
    if expected_version is not None and row.version != expected_version:
        raise ConcurrentModification(
            f"config {row.id} of tenant {row.tenant_id} is at version {row.version}, "
            f"not {expected_version}: read it again and retry"
        )


def _plaintext(credentials: CredentialsModel) -> bytes:
    return json.dumps(credentials_to_json(credentials), separators=(",", ":")).encode()


def write_version(
    session: Session,
    sealer: Sealer,
    row: EmailProviderConfig,
    change: ConfigChange,
    secret: CredentialsModel | None,
    *,
    credentials_kept: int,
    actor: str | None,
    reason: str | None,
) -> None:
    """Seal ``secret`` into the row, bound to its new version and config, and keep
    that version, with ``secret`` sealed again for the history row; prune the
    secrets of versions older than the newest ``credentials_kept``. Every new
    version re-seals: the credentials are bound to the version."""
    sealed_history = None
    row.encrypted_credentials = None
    if secret is not None:
        plaintext = _plaintext(secret)
        bound, config = (row.type, row.version), row.config
        row.encrypted_credentials = sealer.seal(
            plaintext, CONFIG_CREDENTIALS.place(row.tenant_id, row.id, bound=bound, config=config)
        )
        sealed_history = sealer.seal(
            plaintext,
            VERSION_CREDENTIALS.place(
                row.tenant_id, row.id, row.version, bound=bound, config=config
            ),
        )
        sealer.record_seals()
    session.add(
        EmailProviderConfigVersion(
            tenant_id=row.tenant_id,
            config_id=row.id,
            version=row.version,
            change=change,
            name=row.name,
            config=row.config,
            encrypted_credentials=sealed_history,
            actor=actor,
            reason=reason,
        )
    )
    oldest_kept = row.version - credentials_kept + 1
    if oldest_kept > 1:
        # Not flushed here: the caller flushes the row inside its IntegrityError guard.
        with session.no_autoflush:
            session.execute(
                sa.update(EmailProviderConfigVersion)
                .where(
                    EmailProviderConfigVersion.tenant_id == row.tenant_id,
                    EmailProviderConfigVersion.config_id == row.id,
                    EmailProviderConfigVersion.version < oldest_kept,
                    EmailProviderConfigVersion.encrypted_credentials.is_not(None),
                )
                .values(encrypted_credentials=None)
            )


@contextmanager
def changes(
    session: Session, tenant_id: str, name: str, *, joined: bool, restoring: bool = False
) -> Iterator[None]:
    """Flush the block's changes, turning a constraint they break into a clear error.

    In a caller's transaction (``joined``) the changes go in a savepoint, so that
    transaction stays usable after a refusal; opening one flushes what is pending,
    so changes belong inside the block. Our own transaction needs no savepoint: a
    refusal rolls all of it back."""
    try:
        if joined:
            with session.begin_nested():
                yield
                session.flush()
        else:
            yield
            session.flush()
    except IntegrityError as exc:
        raise _integrity(exc, tenant_id, name, restoring=restoring) from None


# The foreign keys to the application's tenants table a config write can break: the
# config row's own, and its tenant's first data key's (made by the first seal, so
# with credentials it is the first to refuse). Named in migrations 0002 and 0005.
_TENANT_FOREIGN_KEYS = (
    "fk_email_provider_configs_tenant_id_tenants",
    "fk_tenant_data_keys_tenant_id_tenants",
)


def _integrity(
    exc: IntegrityError, tenant_id: str, name: str, *, restoring: bool = False
) -> Exception:
    text = str(exc.orig)
    if "uq_email_provider_configs_tenant_id_name_live" in text:
        hint = "; restore it under another name with name=" if restoring else ""
        return InvalidInputError(
            f"name: tenant {tenant_id} already has a live config named {name!r}{hint}"
        )
    if any(constraint in text for constraint in _TENANT_FOREIGN_KEYS):
        return InvalidInputError(
            f"tenant_id: tenant {tenant_id} does not exist (no row in the tenants table)"
        )
    return InvalidInputError("the row breaks a database constraint")
