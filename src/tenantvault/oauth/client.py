"""The OAuth 2 conversations with a provider's endpoints, on authlib's OAuth 2 client
(``authlib.integrations.requests_client.OAuth2Session``): the authorization URL
with PKCE, the authorization-code exchange and the refresh-token grant. No
token-endpoint request is written here by hand, and this module does not know
where an endpoint comes from: the vault builds an :class:`OAuthClient` from a
verified config only (:mod:`tenantvault.vault.endpoints`).

Every call here blocks on the network: the vault runs them through its core's
``blocking`` (``AsyncVault``: in a worker thread, the task suspended).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from pydantic import SecretStr

from tenantvault.errors import OAuthProviderError, OAuthProviderUnavailable

HTTP_TIMEOUT_SECONDS = 10.0
ATTEMPTS = 3
"""A transient failure (a timeout, a refused connection, a 5xx or 429) is retried
this many times in all, after 0.5 s, then 1 s: the lock on the token row is held
meanwhile, so the wait stays short."""


@dataclass(frozen=True)
class OAuthClient:
    """What talking to a config's token endpoint needs, all from one verified config."""

    token_url: str
    authorize_url: str
    client_id: str
    client_secret: SecretStr = field(repr=False)
    scopes: tuple[str, ...]
    authorize_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenAnswer:
    """A token endpoint's answer, its tokens plain (only for sealing them at once)."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    token_type: str
    expires_at: datetime | None
    scopes: tuple[str, ...] | None


class GrantRevoked(Exception):  # noqa: N818 - an internal signal, never raised to callers
    """The token endpoint answered ``invalid_grant``: the refresh token is dead."""


def _session(client: OAuthClient, **options: Any) -> OAuth2Session:
    return OAuth2Session(
        client.client_id,
        client.client_secret.get_secret_value(),
        scope=" ".join(client.scopes),
        # RFC 6749's HTTP Basic: both Microsoft's v2.0 and Google's endpoints take it.
        token_endpoint_auth_method="client_secret_basic",  # noqa: S106 - a method name
        **options,
    )


def authorization_url(
    client: OAuthClient, *, redirect_uri: str, state: str, code_verifier: str
) -> str:
    """The provider's consent URL: the code flow with PKCE (S256) and ``state``."""
    with _session(client, code_challenge_method="S256") as session:
        url, _ = session.create_authorization_url(
            client.authorize_url,
            state=state,
            code_verifier=code_verifier,
            redirect_uri=redirect_uri,
            **client.authorize_parameters,
        )
    return str(url)


def exchange_code(
    client: OAuthClient,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> TokenAnswer:
    """The tokens of an authorization code (its PKCE verifier with it).

    Raises:
        OAuthProviderError: the provider refused the code (its error code named).
        OAuthProviderUnavailable: it did not answer usefully, after retries.
    """

    def call(session: OAuth2Session) -> Mapping[str, Any]:
        token: Mapping[str, Any] = session.fetch_token(
            client.token_url,
            grant_type="authorization_code",
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
            timeout=HTTP_TIMEOUT_SECONDS,
        )
        return token

    try:
        answer = _with_retries(client, call, sleep)
    except GrantRevoked:
        raise OAuthProviderError(
            "the provider refused the authorization code (invalid_grant): used, expired, "
            "or issued for another redirect_uri"
        ) from None
    return _answer(answer, now(), previous_refresh=None)


def refresh(
    client: OAuthClient,
    refresh_token: str,
    *,
    granted: tuple[str, ...] = (),
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> TokenAnswer:
    """The refresh-token grant: new tokens (a new refresh token when the provider
    rotates it, else ``refresh_token`` None). It asks for the scopes ``granted`` (those
    of the stored token; a refresh may not ask for more than the grant has), or none.

    Raises:
        GrantRevoked: ``invalid_grant``: the grant is gone until the user consents again.
        OAuthProviderError: another refusal (``invalid_client``, ...), named.
        OAuthProviderUnavailable: no useful answer, after retries.
    """

    def call(session: OAuth2Session) -> Mapping[str, Any]:
        token: Mapping[str, Any] = session.refresh_token(
            client.token_url,
            refresh_token=refresh_token,
            scope=" ".join(granted) if granted else None,
            timeout=HTTP_TIMEOUT_SECONDS,
        )
        return token

    return _answer(_with_retries(client, call, sleep), now(), previous_refresh=refresh_token)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status >= 500 or status == 429
    return isinstance(exc, requests.Timeout | requests.ConnectionError)


def _with_retries(
    client: OAuthClient,
    call: Callable[[OAuth2Session], Mapping[str, Any]],
    sleep: Callable[[float], None],
) -> Mapping[str, Any]:
    for attempt in range(ATTEMPTS):
        try:
            with _session(client) as session:
                return call(session)
        except OAuthError as exc:
            if exc.error == "invalid_grant":
                raise GrantRevoked from None
            # The error code only: a description may quote what was sent.
            raise OAuthProviderError(
                f"the token endpoint refused the request: {exc.error}"
            ) from None
        except (requests.RequestException, ValueError) as exc:
            if not _transient(exc) or attempt == ATTEMPTS - 1:
                kind = type(exc).__name__
                raise OAuthProviderUnavailable(
                    f"the token endpoint gave no usable answer ({kind}) after "
                    f"{attempt + 1} attempt(s)"
                ) from None
            sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _answer(
    token: Mapping[str, Any], moment: datetime, *, previous_refresh: str | None
) -> TokenAnswer:
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthProviderError("the token endpoint answered without an access_token")
    expires_in = token.get("expires_in")
    expires_at = None
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        expires_at = moment + timedelta(seconds=float(expires_in))
    refresh_token = token.get("refresh_token")
    if not isinstance(refresh_token, str) or refresh_token == previous_refresh:
        refresh_token = None  # kept as it is: the provider did not rotate it
    scope = token.get("scope")
    scopes = tuple(scope.split()) if isinstance(scope, str) and scope.strip() else None
    token_type = token.get("token_type")
    return TokenAnswer(
        access_token=access,
        refresh_token=refresh_token,
        token_type=token_type if isinstance(token_type, str) and token_type else "Bearer",
        expires_at=expires_at,
        scopes=scopes,
    )
