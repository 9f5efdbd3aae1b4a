"""A user's consent and the token endpoint, done by tenantvault: the authorization
URL, the code exchange, and the managed refresh's client.

Design of the state: ``authorization_url`` returns a ``state`` that is a sealed
value (AEAD under the tenant's data key, bound to the tenant, the config and the
config's content) holding a nonce, the PKCE (S256) verifier, the redirect URI, the
time it was issued and the grant it replaces (the token row and its version, or
none). Nothing is kept server-side: the verifier travels sealed inside the state,
which only this tenant's key opens, and the provider echoes it back.
``complete_authorization`` opens it beside the config (a state of another tenant or
config, a forged or altered one, does not open), checks the redirect URI and its
age (:data:`STATE_MAX_AGE`), and refuses it unless the config's token is still the
grant it was issued against: storing the new grant moves the token to its next
version, so the same state (a replay) is refused. One consent at a time per config:
a token refreshed or stored between the two calls also makes the state stale, and
the user starts again.

Every endpoint comes from the config as ``open_config`` verifies it
(:func:`tenantvault.vault.opening.open_verified`): a config changed outside
tenantvault does not open, and no request leaves.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Generic, NoReturn

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.orm import Session

from tenantvault.crypto.envelope import SealContext
from tenantvault.db.models import EmailProviderToken
from tenantvault.errors import DecryptionError, InvalidInputError, OAuthProviderUnavailable
from tenantvault.keys.sealed import config_digest
from tenantvault.oauth.client import (
    GrantRevoked,
    OAuthClient,
    authorization_url,
    exchange_code,
    refresh,
)
from tenantvault.vault.core import CallerSession, VaultCore
from tenantvault.vault.endpoints import oauth_client
from tenantvault.vault.methods import FacadeMethods, Runs
from tenantvault.vault.opening import OpenedConfig, open_verified
from tenantvault.vault.providers import Endpoint
from tenantvault.vault.tokenevents import TokenEvent
from tenantvault.vault.tokens import OAuthToken, RefreshedToken, load_token_in, store_token_in

STATE_MAX_AGE = timedelta(minutes=15)
"""How long a state from ``authorization_url`` is accepted: the user's consent."""
_TEXT_MAX = 4096


@dataclass(frozen=True)
class AuthorizationRequest:
    """Where to send the user to consent: ``url`` (the provider's, with ``state`` and
    the PKCE challenge in it). ``state`` is sealed (it holds the PKCE verifier): keep
    nothing; ``complete_authorization`` takes it back from the redirect."""

    url: str
    state: str

    def __reduce__(self) -> NoReturn:
        raise TypeError("AuthorizationRequest refuses to be pickled")


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > _TEXT_MAX:
        raise InvalidInputError(f"{name}: must be a non-empty string of at most {_TEXT_MAX}")
    if not value.isprintable():
        raise InvalidInputError(f"{name}: must be printable")
    return value


_ENDPOINT = TypeAdapter(Endpoint)


def _redirect_uri(value: object) -> str:
    text = _text("redirect_uri", value)
    try:
        _ENDPOINT.validate_python(text)  # the rule of the config's endpoints
    except ValueError:
        raise InvalidInputError(
            "redirect_uri: must be an https URL (http only on loopback)"
        ) from None
    return text


def _state_place(tenant_id: str, config_id: str, config: dict[str, Any]) -> SealContext:
    # No column holds it: the place names what it is, the binding the config's content.
    return SealContext(
        tenant_id,
        EmailProviderToken.__tablename__,
        "oauth_state",
        config_id,
        b"oauth-state:" + config_digest(config),
    )


def _grant_of(s: Session, tenant_id: str, config_id: str) -> str:
    """The config's grant as a state names it: its token row and version, or ''."""
    row = s.execute(
        sa.select(EmailProviderToken.id, EmailProviderToken.version).where(
            EmailProviderToken.tenant_id == tenant_id,
            EmailProviderToken.config_id == config_id,
        )
    ).one_or_none()
    return "" if row is None else f"{row.id}:{row.version}"


def _client(
    core: VaultCore[Any], s: Session, tenant_id: str, config_id: str
) -> tuple[OAuthClient, OpenedConfig]:
    """The config's OAuth client, from the config as ``open_config`` verifies it."""
    opened = open_verified(core, s, tenant_id, config_id)
    return oauth_client(opened.config.config, opened.credentials), opened


def managed_refresher(
    core: VaultCore[Any], s: Session, tenant_id: str, config_id: str
) -> Callable[[OAuthToken], RefreshedToken]:
    """The refresher ``refresh_oauth_token`` runs without the caller's: the refresh-token
    grant at the config's token endpoint, its client read now from the verified config,
    in the refresh's transaction, under its locks."""
    client, _ = _client(core, s, tenant_id, config_id)
    metrics = core.metrics

    def call(current: OAuthToken) -> RefreshedToken:
        assert current.refresh_token is not None
        token = current.refresh_token.get_secret_value()
        try:
            answer = core.blocking(partial(refresh, client, token, granted=current.scopes))
        except GrantRevoked:
            metrics.oauth_refreshed("reconsent_required")
            raise
        except OAuthProviderUnavailable:
            metrics.oauth_refreshed("unavailable")
            raise
        except Exception:
            metrics.oauth_refreshed("failed")
            raise
        metrics.oauth_refreshed("refreshed")
        return RefreshedToken(
            access_token=answer.access_token,
            expires_at=answer.expires_at,
            refresh_token=answer.refresh_token,
            scopes=answer.scopes,
            token_type=answer.token_type,
        )

    return call


class OAuthService(Generic[CallerSession]):
    """Consent (``authorization_url``, ``complete_authorization``) and the refresher
    ``refresh_oauth_token`` runs without one of the caller's."""

    def __init__(self, core: VaultCore[CallerSession]) -> None:
        self._core = core

    def authorization_url(
        self,
        tenant_id: str,
        config_id: str,
        *,
        redirect_uri: str,
        state: str | None = None,
        now: datetime | None = None,
    ) -> AuthorizationRequest:
        """Where to send the user to grant the config access (the code flow, PKCE S256).

        ``state``: a nonce of the application's own (e.g. tied to the user's browser
        session), sealed into the state; a random one when None. The returned
        ``state`` is accepted by :meth:`complete_authorization` for
        :data:`STATE_MAX_AGE`, once.

        Raises:
            InvalidInputError: a malformed ``redirect_uri`` or ``state``, or a config that
                does not use a user's grant (named).
            NotFoundError: no such live config, or it holds no client secret.
            DecryptionError: the config was changed outside tenantvault.
        """
        redirect = _redirect_uri(redirect_uri)
        nonce = secrets.token_urlsafe(16) if state is None else _text("state", state)
        moment = now or datetime.now(UTC)
        verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 asks 43 to 128
        with self._core.scope(tenant_id, None) as s:
            client, opened = _client(self._core, s, tenant_id, config_id)
            payload = {
                "n": nonce,
                "v": verifier,
                "r": redirect,
                "t": int(moment.timestamp()),
                "g": _grant_of(s, tenant_id, config_id),
            }
            sealer = self._core.sealer(s, tenant_id)
            place = _state_place(tenant_id, config_id, _stored(opened))
            sealed = sealer.seal(json.dumps(payload).encode(), place)
            sealer.record_seals()
        url = authorization_url(client, redirect_uri=redirect, state=sealed, code_verifier=verifier)
        return AuthorizationRequest(url=url, state=sealed)

    def complete_authorization(
        self,
        tenant_id: str,
        config_id: str,
        *,
        code: str,
        state: str,
        redirect_uri: str,
        now: datetime | None = None,
        actor: str | None = None,
    ) -> OAuthToken:
        """Exchange the provider's ``code`` (with the config's client credentials and
        the PKCE verifier sealed in ``state``) and store the token pair; a mark for
        re-consent is cleared (``on_token_event`` hears ``recovered``).

        Raises:
            InvalidInputError: ``state`` is not one this config issued, is older than
                :data:`STATE_MAX_AGE`, was issued for another ``redirect_uri``, or was
                used already (its grant was replaced since); or a malformed argument.
            OAuthProviderError: the provider refused the code (its error code named).
            NotFoundError, DecryptionError: as :meth:`authorization_url`.
        """
        _text("code", code)
        _text("state", state)
        redirect = _redirect_uri(redirect_uri)
        moment = now or datetime.now(UTC)
        with self._core.scope(tenant_id, None) as s:
            self._core.live(s, tenant_id, config_id)  # every token writer's lock first
            client, opened = _client(self._core, s, tenant_id, config_id)
            sealer = self._core.sealer(s, tenant_id)
            refused = InvalidInputError(
                "state: not issued for this config and redirect_uri, expired, or used already"
            )
            try:
                payload = json.loads(
                    sealer.open(state, _state_place(tenant_id, config_id, _stored(opened)))
                )
            except DecryptionError:
                raise refused from None
            issued = datetime.fromtimestamp(payload["t"], UTC)
            if (
                payload["r"] != redirect
                or not timedelta(0) <= moment - issued <= STATE_MAX_AGE + timedelta(seconds=1)
                or payload["g"] != _grant_of(s, tenant_id, config_id)
            ):
                raise refused
            answer = self._core.blocking(
                partial(
                    exchange_code,
                    client,
                    code=code,
                    redirect_uri=redirect,
                    code_verifier=payload["v"],
                )
            )
            scopes = answer.scopes if answer.scopes is not None else client.scopes
            _, recovered = store_token_in(
                self._core,
                s,
                tenant_id,
                config_id,
                access_token=answer.access_token,
                refresh_token=answer.refresh_token,
                token_type=answer.token_type,
                expires_at=answer.expires_at,
                scopes=scopes,
                actor=actor,
            )
            stored = load_token_in(self._core, s, tenant_id, config_id)
        if recovered:
            self._core.token_events.emit(TokenEvent(tenant_id, config_id, "recovered"))
        return stored


def _stored(opened: OpenedConfig) -> dict[str, Any]:
    """The config as stored (what its digest is taken of)."""
    stored: dict[str, Any] = opened.config.config.model_dump(mode="json", exclude_none=True)
    return stored


class OAuthMethods(FacadeMethods[CallerSession]):
    """OAuthService's methods on both facades (:mod:`tenantvault.vault.methods`)."""

    authorization_url = Runs(OAuthService[CallerSession].authorization_url)
    complete_authorization = Runs(OAuthService[CallerSession].complete_authorization)
