"""OAuth tokens of configs: store, load, delete, find expiring ones, and refresh them once.

One token row per config; ``version`` goes up on every store and refresh. A
refresh runs the caller's refresher while holding the token row's lock
(``SELECT ... FOR UPDATE``) and writes with a compare-and-swap on ``version``:
across threads and processes exactly one refresh runs per expiry, and every
other caller, having waited for the lock, finds the new token and returns it.
Some providers' refresh tokens are single-use; a second refresh with the same
one would lock the tenant out. A refresher that raises leaves the old tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Generic, NamedTuple, NoReturn, Protocol

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from tenantvault import audit
from tenantvault.crypto.envelope import SealContext
from tenantvault.db import queries
from tenantvault.db.ids import new_id
from tenantvault.db.models import AuditAction, EmailProviderConfig, EmailProviderToken
from tenantvault.db.session import check_tenant_id
from tenantvault.errors import (
    ConcurrentModification,
    InvalidInputError,
    NotFoundError,
    OAuthProviderError,
    OAuthProviderUnavailable,
    ReconsentRequired,
)
from tenantvault.keys.keyring import Keyring, Sealer
from tenantvault.keys.sealed import (
    ACCESS_TOKEN,
    REFRESH_TOKEN,
    config_digest,
    stored_config_digest,
)
from tenantvault.oauth.client import GrantRevoked
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.methods import FacadeMethods, Runs
from tenantvault.vault.providers import SCOPES_MAX_ITEMS, secret_problem
from tenantvault.vault.tokenevents import TokenEvent

ManagedRefresher = Callable[[Session, str, str], Callable[["OAuthToken"], "RefreshedToken"]]
"""(session, tenant id, config id) -> the refresher tenantvault runs for that config."""

TOKEN_TYPE_MAX_LENGTH = 64
SCOPE_MAX_LENGTH = 512


@dataclass(frozen=True)
class OAuthToken:
    """A config's OAuth tokens, opened. The tokens are ``SecretStr``."""

    config_id: str
    access_token: SecretStr | None
    refresh_token: SecretStr | None
    token_type: str
    expires_at: datetime | None
    scopes: tuple[str, ...]
    version: int = 1

    def __reduce__(self) -> NoReturn:
        raise TypeError("OAuthToken refuses to be pickled")


@dataclass(frozen=True)
class ExpiringToken:
    """A token the refresher should renew (no secret in it)."""

    config_id: str
    expires_at: datetime
    refreshable: bool


@dataclass(frozen=True)
class RefreshedToken:
    """What a refresher returns. ``None`` keeps the current refresh token, scopes or
    type (most providers return a new refresh token only sometimes)."""

    access_token: str
    expires_at: datetime | None
    refresh_token: str | None = None
    scopes: Sequence[str] | None = None
    token_type: str | None = None

    def __repr__(self) -> str:
        return f"RefreshedToken(expires_at={self.expires_at!r}, access_token=<hidden>)"

    def __reduce__(self) -> NoReturn:
        # Unlike OAuthToken's, these tokens are plain strings: nothing else would hide them.
        raise TypeError("RefreshedToken refuses to be pickled")


def _check_token_fields(
    access_token: object,
    refresh_token: object,
    token_type: object,
    expires_at: datetime | None,
    scopes: Sequence[object],
) -> None:
    if not isinstance(access_token, str) or not access_token:
        raise InvalidInputError("access_token: required")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
        raise InvalidInputError("refresh_token: must be a non-empty string or None")
    for name, token in (("access_token", access_token), ("refresh_token", refresh_token)):
        problem = None if token is None else secret_problem(token)
        if problem is not None:
            raise InvalidInputError(f"{name}: {problem}")
    if expires_at is not None and (
        not isinstance(expires_at, datetime) or expires_at.tzinfo is None
    ):
        raise InvalidInputError("expires_at: must be a timezone-aware datetime")
    # token_type and scopes are stored as text: printable, so no NUL the database refuses.
    if not isinstance(token_type, str) or not token_type.isprintable() or not token_type:
        raise InvalidInputError("token_type: must be a non-empty printable string")
    if len(token_type) > TOKEN_TYPE_MAX_LENGTH:
        raise InvalidInputError(f"token_type: must be at most {TOKEN_TYPE_MAX_LENGTH} characters")
    if isinstance(scopes, str) or any(
        not isinstance(x, str) or not x or not x.isprintable() for x in scopes
    ):
        raise InvalidInputError("scopes: each scope must be a non-empty printable string")
    if len(scopes) > SCOPES_MAX_ITEMS or any(len(str(x)) > SCOPE_MAX_LENGTH for x in scopes):
        raise InvalidInputError(
            f"scopes: at most {SCOPES_MAX_ITEMS}, each at most {SCOPE_MAX_LENGTH} characters"
        )


class TokenService(Generic[CallerSession]):
    """OAuth tokens of a tenant's configs."""

    def __init__(self, core: VaultCore[CallerSession], managed: ManagedRefresher) -> None:
        """``managed``: the refresher of a config's verified OAuth client, made in a
        transaction holding the config's and the token's locks (``OAuthService``)."""
        self._core = core
        self._managed = managed

    # --- helpers ---

    def _token_view(
        self, session: Session, row: EmailProviderToken, config: EmailProviderConfig
    ) -> OAuthToken:
        opened = opened_token(
            self._core.sealer(session, row.tenant_id).open,
            row.tenant_id,
            row,
            config.type,
            config_digest(config.config),
        )
        assert opened is not None  # a sealer opens or raises
        return opened

    @staticmethod
    def _token_row(
        session: Session, tenant_id: str, config_id: str, *, lock: bool = False
    ) -> EmailProviderToken:
        statement = queries.token_of_config(tenant_id, config_id)
        row = session.scalars(statement.with_for_update() if lock else statement).one_or_none()
        if row is None:
            raise _no_token(tenant_id, config_id)
        return row

    @staticmethod
    def _audit_token(
        session: Session,
        tenant_id: str,
        config_id: str,
        action: AuditAction,
        actor: str | None,
        version: int | None,
    ) -> None:
        audit.record(
            session.connection(),
            tenant_id,
            action,
            actor=actor,
            target_type="token",
            target_id=config_id,
            details={} if version is None else {"version": version},
        )

    # --- the API ---

    def store_oauth_token(
        self,
        tenant_id: str,
        config_id: str,
        *,
        access_token: str,
        refresh_token: str | None = None,
        token_type: str = "Bearer",  # noqa: S107 - a token type, not a token
        expires_at: datetime | None = None,
        scopes: Sequence[str] = (),
        actor: str | None = None,
        session: CallerSession | None = None,
    ) -> int:
        """Seal and upsert a config's tokens (a new grant); returns the token version.
        A token marked for re-consent is cleared (``on_token_event`` hears ``recovered``,
        unless the call joins the caller's ``session``, whose commit is the caller's)."""
        _check_token_fields(access_token, refresh_token, token_type, expires_at, scopes)
        with self._core.scope(tenant_id, session) as s:
            version, recovered = store_token_in(
                self._core,
                s,
                tenant_id,
                config_id,
                access_token=access_token,
                refresh_token=refresh_token,
                token_type=token_type,
                expires_at=expires_at,
                scopes=scopes,
                actor=actor,
            )
        if recovered and session is None:
            self._core.token_events.emit(TokenEvent(tenant_id, config_id, "recovered"))
        return version

    def load_oauth_token(
        self, tenant_id: str, config_id: str, *, session: CallerSession | None = None
    ) -> OAuthToken:
        """A config's tokens, opened. Raises NotFoundError when it has none.

        One round trip when the tenant's key is cached (migration 0011's function, on
        a held connection or in the caller's transaction), as ``load_credentials``."""
        ran, row = self._core.one_statement(
            self._core.token_sql, (check_tenant_id(tenant_id), config_id), session
        )
        if ran:
            loaded = finish_hot_token(self._core.keyring, tenant_id, config_id, row)
            if loaded is not None:
                return loaded
        with self._core.scope(tenant_id, session) as s:
            config = self._core.live(s, tenant_id, config_id, lock=False)
            return self._token_view(s, self._token_row(s, tenant_id, config_id), config)

    def delete_oauth_token(
        self,
        tenant_id: str,
        config_id: str,
        *,
        actor: str | None = None,
        session: CallerSession | None = None,
    ) -> bool:
        """Remove a config's tokens; True if there were any."""
        with self._core.scope(tenant_id, session) as s:
            deleted = s.execute(queries.delete_tokens_of_config(tenant_id, config_id))
            gone = bool(getattr(deleted, "rowcount", 0))
            if gone:
                self._audit_token(s, tenant_id, config_id, AuditAction.TOKEN_DELETED, actor, None)
            return gone

    def tokens_expiring(
        self,
        tenant_id: str,
        *,
        within: timedelta,
        now: datetime | None = None,
        session: CallerSession | None = None,
    ) -> list[ExpiringToken]:
        """The tenant's tokens whose access token expires within ``within`` of ``now``
        (the expiry scan the refresher runs; served by the tokens' unique index)."""
        moment = now or datetime.now(UTC)
        with self._core.scope(tenant_id, session) as s:
            rows = s.scalars(queries.tokens_expiring(tenant_id, moment + within)).all()
            return [
                ExpiringToken(r.config_id, r.expires_at, r.encrypted_refresh_token is not None)
                for r in rows
                if r.expires_at is not None
            ]

    def refresh_oauth_token(
        self,
        tenant_id: str,
        config_id: str,
        refresher: Callable[[OAuthToken], RefreshedToken] | None = None,
        *,
        min_validity: timedelta = timedelta(minutes=5),
        now: datetime | None = None,
        actor: str | None = None,
    ) -> OAuthToken:
        """A token valid for at least ``min_validity``: the stored one, or a refreshed one.

        Without ``refresher`` tenantvault refreshes it: the refresh-token grant at the
        token endpoint of the config as ``open_config`` verifies it, with the config's
        client credentials (``microsoft_graph`` delegated, ``google_workspace`` oauth2).
        A rotated refresh token in the answer replaces the old one in the same
        transaction. ``refresher``, when given, gets the current token (its refresh
        token included) and calls the provider itself.

        Either runs at most once per expiry across threads and processes: callers
        queue on the token row's lock, and those after the first find the token
        already fresh. It runs in its own transaction (a lock must not wait inside
        the caller's).

        Raises:
            NotFoundError: the config has no token.
            ReconsentRequired: the provider answered ``invalid_grant`` (now or before):
                the token is marked, no request is sent until a new grant is stored.
            InvalidInputError: the token needs a refresh but has no refresh token, the
                config does not use a user's grant, or the refresher returned malformed
                fields (named).
            DecryptionError: the config was changed outside tenantvault (its token
                endpoint with it): nothing is sent.
            OAuthProviderError: the token endpoint refused the client (its error code
                named); ``OAuthProviderUnavailable`` when it did not answer usefully
                after retries. The stored tokens stay as they were.
            Exception: whatever ``refresher`` raises; the stored tokens stay as they were.
        """
        moment = now or datetime.now(UTC)

        def fresh(token: OAuthToken) -> bool:
            return token.expires_at is None or token.expires_at - moment > min_validity

        current = self.load_oauth_token(tenant_id, config_id)
        if fresh(current):
            return current
        failure: OAuthProviderError | None = None
        with self._core.scope(tenant_id, None) as s:
            # The config's lock first, as every token writer takes them: a config change
            # re-seals the tokens and must not interleave with a refresh.
            config = self._core.live(s, tenant_id, config_id)
            row = self._token_row(s, tenant_id, config_id, lock=True)
            if row.reconsent_required_at is not None:
                raise ReconsentRequired(tenant_id, config_id)
            current = self._token_view(s, row, config)
            if fresh(current):
                return current  # refreshed by someone else while we waited
            if current.refresh_token is None:
                raise InvalidInputError(
                    f"refresh_token: config {config_id} of tenant {tenant_id} has none; "
                    "a new grant is needed"
                )
            try:
                new = (refresher or self._managed(s, tenant_id, config_id))(current)
            except GrantRevoked:
                self._mark_reconsent(s, row, moment, actor)
            except OAuthProviderUnavailable:
                raise
            except OAuthProviderError as exc:
                if refresher is not None:
                    raise
                failure = exc
            else:
                return self._write_refreshed(s, row, config, current, new, actor)
        # Committed: the mark and its audit event (a revoked grant), or nothing.
        if failure is not None:
            self._core.token_events.emit(TokenEvent(tenant_id, config_id, "failed", str(failure)))
            raise failure
        self._core.token_events.emit(
            TokenEvent(tenant_id, config_id, "reconsent_required", "invalid_grant")
        )
        raise ReconsentRequired(tenant_id, config_id)

    def _mark_reconsent(
        self, s: Session, row: EmailProviderToken, moment: datetime, actor: str | None
    ) -> None:
        """Mark the token revoked (its version and sealed values unchanged), audited."""
        s.execute(
            sa.update(EmailProviderToken)
            .where(EmailProviderToken.id == row.id)
            .values(reconsent_required_at=moment)
            .execution_options(synchronize_session=False)
        )
        self._audit_token(
            s,
            row.tenant_id,
            row.config_id,
            AuditAction.TOKEN_RECONSENT_REQUIRED,
            actor,
            row.version,
        )

    def _write_refreshed(
        self,
        s: Session,
        row: EmailProviderToken,
        config: EmailProviderConfig,
        current: OAuthToken,
        new: RefreshedToken,
        actor: str | None,
    ) -> OAuthToken:
        """Seal and write a refresh's answer over ``current`` (compare-and-swap)."""
        tenant_id, config_id = row.tenant_id, row.config_id
        if not isinstance(new, RefreshedToken):
            raise InvalidInputError("refresher: must return a RefreshedToken")
        token_type = new.token_type or row.token_type
        scopes = list(row.scopes if new.scopes is None else new.scopes)
        _check_token_fields(new.access_token, new.refresh_token, token_type, new.expires_at, scopes)
        assert current.refresh_token is not None
        refresh_plain = (
            new.refresh_token
            if new.refresh_token is not None
            else current.refresh_token.get_secret_value()
        )
        access, refresh = seal_tokens(
            self._core.sealer(s, tenant_id),
            config,
            row.id,
            current.version + 1,
            new.access_token,
            refresh_plain,
        )
        # A compare-and-swap on the version read: under the row lock it cannot
        # miss, and if it ever did, nothing would be written silently.
        swapped = s.execute(
            sa.update(EmailProviderToken)
            .where(
                EmailProviderToken.tenant_id == tenant_id,
                EmailProviderToken.config_id == config_id,
                EmailProviderToken.version == current.version,
            )
            .values(
                encrypted_access_token=access,
                encrypted_refresh_token=refresh,
                token_type=token_type,
                expires_at=new.expires_at,
                scopes=scopes,
                version=current.version + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if getattr(swapped, "rowcount", 0) != 1:
            raise ConcurrentModification(
                f"token of config {config_id} of tenant {tenant_id} moved on during refresh"
            )
        self._audit_token(
            s, tenant_id, config_id, AuditAction.TOKEN_REFRESHED, actor, current.version + 1
        )
        s.expire(row)
        return self._token_view(s, self._token_row(s, tenant_id, config_id), config)


class TokenMethods(FacadeMethods[CallerSession]):
    """TokenService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    store_oauth_token = Runs(TokenService[CallerSession].store_oauth_token)
    load_oauth_token = Runs(TokenService[CallerSession].load_oauth_token)
    delete_oauth_token = Runs(TokenService[CallerSession].delete_oauth_token)
    tokens_expiring = Runs(TokenService[CallerSession].tokens_expiring)
    refresh_oauth_token = Runs(TokenService[CallerSession].refresh_oauth_token)


# --- storing a grant; sealing a config's tokens: a grant, a refresh, a config change ---


def load_token_in(core: VaultCore[Any], s: Session, tenant_id: str, config_id: str) -> OAuthToken:
    """A config's token opened in ``s``'s transaction (the full path of a load)."""
    config = core.live(s, tenant_id, config_id, lock=False)
    row = TokenService._token_row(s, tenant_id, config_id)
    opened = opened_token(
        core.sealer(s, tenant_id).open, tenant_id, row, config.type, config_digest(config.config)
    )
    assert opened is not None  # a sealer opens or raises
    return opened


def store_token_in(
    core: VaultCore[Any],
    s: Session,
    tenant_id: str,
    config_id: str,
    *,
    access_token: str,
    refresh_token: str | None,
    token_type: str,
    expires_at: datetime | None,
    scopes: Sequence[str],
    actor: str | None,
) -> tuple[int, bool]:
    """``store_oauth_token`` in ``s``'s transaction (a new grant, stored by the caller
    or by ``complete_authorization``): the version stored, and whether the token had
    been marked for re-consent (the mark is cleared)."""
    _check_token_fields(access_token, refresh_token, token_type, expires_at, scopes)
    # The config row's lock orders the token writers of this config; the
    # token row's lock waits for a refresh in flight. The version is known
    # before sealing, so the tokens are bound to it.
    config = core.live(s, tenant_id, config_id)
    current = s.execute(
        sa.select(
            EmailProviderToken.id,
            EmailProviderToken.version,
            EmailProviderToken.reconsent_required_at,
        )
        .where(
            EmailProviderToken.tenant_id == tenant_id,
            EmailProviderToken.config_id == config_id,
        )
        .with_for_update()
    ).one_or_none()
    # A new row (a first grant, or one after a delete) gets a fresh id: tokens of
    # an earlier row never open in it, whatever its version.
    row_id, version = (new_id(), 1) if current is None else (current.id, current.version + 1)
    access, refresh = seal_tokens(
        core.sealer(s, tenant_id),
        config,
        row_id,
        version,
        access_token,
        refresh_token,
    )
    values: dict[str, Any] = {
        "encrypted_access_token": access,
        "encrypted_refresh_token": refresh,
        "token_type": token_type,
        "expires_at": expires_at,
        "scopes": list(scopes),
        "version": version,
        "reconsent_required_at": None,  # a new grant: refreshes may run again
    }
    s.execute(
        pg_insert(EmailProviderToken)
        .values(id=row_id, tenant_id=tenant_id, config_id=config_id, **values)
        .on_conflict_do_update(
            index_elements=[EmailProviderToken.tenant_id, EmailProviderToken.config_id],
            set_=values,
        )
    )
    TokenService._audit_token(s, tenant_id, config_id, AuditAction.TOKEN_STORED, actor, version)
    recovered = current is not None and current.reconsent_required_at is not None
    return int(version), recovered


def seal_tokens(
    sealer: Sealer,
    config: EmailProviderConfig,
    row_id: str,
    version: int,
    access: str,
    refresh: str | None,
) -> tuple[str, str | None]:
    """Both tokens sealed for the token row ``row_id`` at ``version`` and for ``config``
    as it is (bound to all of them: a token of an older version or an earlier grant
    put back does not open, nor one served beside a rewritten or retyped config)."""
    tenant_id = sealer.tenant_id
    bound, digest = (row_id, version, config.type), config_digest(config.config)
    access_sealed = sealer.seal(
        access.encode(), ACCESS_TOKEN.place_digest(tenant_id, config.id, bound=bound, digest=digest)
    )
    refresh_sealed = None
    if refresh is not None:
        refresh_sealed = sealer.seal(
            refresh.encode(),
            REFRESH_TOKEN.place_digest(tenant_id, config.id, bound=bound, digest=digest),
        )
    sealer.record_seals()
    return access_sealed, refresh_sealed


def reseal_tokens_for_config(
    session: Session, sealer: Sealer, before: EmailProviderConfig, digest_before: bytes
) -> None:
    """Re-seal the tokens of ``before``'s config for the config it holds now (its
    ``config`` already changed in this transaction, ``digest_before`` the digest of
    what it held): a legitimate change of the config keeps its tokens, in the same
    transaction, at the token row's next version (a sealed value changes only with a
    new version: migration 0015). The caller holds the config row's lock.

    Raises:
        DecryptionError: the stored tokens do not open beside the config as it was
            (changed outside tenantvault): nothing is written.
    """
    row = session.scalars(
        queries.token_of_config(before.tenant_id, before.id).with_for_update()
    ).one_or_none()
    if row is None or row.encrypted_access_token is None:
        return
    opened = opened_token(sealer.open, before.tenant_id, row, before.type, digest_before)
    assert opened is not None  # a sealer opens or raises
    assert opened.access_token is not None
    refresh = None if opened.refresh_token is None else opened.refresh_token.get_secret_value()
    version = row.version + 1
    row.encrypted_access_token, row.encrypted_refresh_token = seal_tokens(
        sealer, before, row.id, version, opened.access_token.get_secret_value(), refresh
    )
    row.version = version


# --- opening a token row, shared by the full path (ORM rows) and the hot path ---


class TokenRow(Protocol):
    """What opening a token needs: an ORM row, or the hot path's :class:`HotToken`."""

    @property
    def config_id(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def token_type(self) -> str: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def scopes(self) -> Sequence[str]: ...
    @property
    def encrypted_access_token(self) -> str | None: ...
    @property
    def encrypted_refresh_token(self) -> str | None: ...


class HotToken(NamedTuple):
    """A token row of a hot-path function (``tenantvault_load_oauth_token``,
    ``tenantvault_open_config``), with the config it was asked for, and the tenant's
    oldest usable data key version (the statement's last column)."""

    config_id: str
    id: str
    version: int
    token_type: str
    expires_at: datetime | None
    scopes: Sequence[str]
    encrypted_access_token: str | None
    encrypted_refresh_token: str | None
    oldest_usable_key: int | None

    @classmethod
    def of(cls, config_id: str, row: Sequence[Any]) -> HotToken:
        """From the statement's row, its ``timestamp`` (UTC) made aware, as the ORM does."""
        id_, version, token_type, expires_at, scopes, access, refresh, oldest = row
        aware = None if expires_at is None else expires_at.replace(tzinfo=UTC)
        return cls(config_id, id_, version, token_type, aware, scopes, access, refresh, oldest)


def opened_token(
    open_: Callable[[str, SealContext], bytes | None],
    tenant_id: str,
    row: TokenRow,
    kind: object,
    digest: bytes,
) -> OAuthToken | None:
    """The token of ``row``, its values opened by ``open_`` (a sealer's, or the key
    cache's, which gives None when the key is not cached: then so does this), beside
    its config of type ``kind`` whose config has ``digest``.

    Raises:
        NotFoundError: the row holds no access token.
        DecryptionError: a value does not open (tampered, or copied from elsewhere).
    """
    if row.encrypted_access_token is None:
        raise _no_token(tenant_id, row.config_id)
    bound = (row.id, row.version, kind)  # both values are bound alike
    access = open_(
        row.encrypted_access_token,
        ACCESS_TOKEN.place_digest(tenant_id, row.config_id, bound=bound, digest=digest),
    )
    if access is None:
        return None
    refresh = None
    if row.encrypted_refresh_token is not None:
        refresh = open_(
            row.encrypted_refresh_token,
            REFRESH_TOKEN.place_digest(tenant_id, row.config_id, bound=bound, digest=digest),
        )
        if refresh is None:
            return None
    return OAuthToken(
        config_id=row.config_id,
        access_token=SecretStr(access.decode()),
        refresh_token=None if refresh is None else SecretStr(refresh.decode()),
        token_type=row.token_type,
        expires_at=row.expires_at,
        scopes=tuple(row.scopes),
        version=row.version,
    )


# --- the token hot path's rules, shared by Vault (above) and AsyncVault ---


def finish_hot_token(
    keyring: Keyring, tenant_id: str, config_id: str, row: Sequence[Any] | None
) -> OAuthToken | None:
    """What the token hot path's row becomes: the opened token, or None when the
    tenant's key is not cached, a value names a key older than the tenant's oldest
    usable one, or a value is in an older format (the caller then takes the full path,
    which refuses a retired key and asks the database about an older value).

    Raises:
        NotFoundError: the config has no token.
        DecryptionError: a stored token does not open here.
    """
    if row is None:
        raise _no_token(tenant_id, config_id)
    kind, config_json, *token = row
    hot = HotToken.of(config_id, token)
    return opened_token(
        partial(keyring.open_cached, tenant_id, oldest_usable_version=hot.oldest_usable_key),
        tenant_id,
        hot,
        kind,
        stored_config_digest(config_json),
    )


def _no_token(tenant_id: str, config_id: str) -> NotFoundError:
    return NotFoundError(f"config {config_id} of tenant {tenant_id} has no OAuth token")
