"""Where a config's OAuth endpoints are, from the config itself: the only source of
the URL a client secret and a refresh token are sent to.

``microsoft_graph`` (delegated) derives them from ``azure_tenant_id`` (Microsoft
identity platform v2.0, under ``authority_url`` when set); ``google_workspace``
(oauth2) uses Google's; ``token_url`` / ``authorize_url`` in the config override
either. The config given here must come from a verified read (``open_config``'s:
:func:`tenantvault.vault.opening.open_verified`), where the credentials and the
tokens opened beside that very config, so a config rewritten outside tenantvault
never gets this far.
"""

from __future__ import annotations

from tenantvault.errors import InvalidInputError, NotFoundError
from tenantvault.oauth.client import OAuthClient
from tenantvault.vault.providers import (
    CredentialsModel,
    GoogleWorkspaceConfig,
    GoogleWorkspaceCredentials,
    MicrosoftGraphConfig,
    MicrosoftGraphCredentials,
    ProviderConfigModel,
)

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
GOOGLE_AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"


def oauth_client(config: ProviderConfigModel, credentials: CredentialsModel | None) -> OAuthClient:
    """The OAuth client of a verified config and its credentials.

    Raises:
        InvalidInputError: the config does not use OAuth tokens of a user's grant
            (named: its type or ``config.auth_type``).
        NotFoundError: it holds no client secret.
    """
    if isinstance(config, MicrosoftGraphConfig):
        if config.auth_type != "delegated":
            raise InvalidInputError("config.auth_type: must be delegated for a user's grant")
        base = str(config.authority_url or MICROSOFT_AUTHORITY).rstrip("/")
        root = f"{base}/{config.azure_tenant_id}/oauth2/v2.0"
        # offline_access: without it Microsoft issues no refresh token.
        scopes = tuple(dict.fromkeys([*config.scopes, "offline_access"]))
        token_url, authorize_url = f"{root}/token", f"{root}/authorize"
        extra: dict[str, str] = {}
        secret = (
            credentials.client_secret
            if isinstance(credentials, MicrosoftGraphCredentials)
            else None
        )
        client_id = config.client_id
    elif isinstance(config, GoogleWorkspaceConfig):
        if config.auth_type != "oauth2" or config.client_id is None:
            raise InvalidInputError("config.auth_type: must be oauth2 for a user's grant")
        scopes, token_url, authorize_url = (
            tuple(config.scopes),
            GOOGLE_TOKEN_URL,
            (GOOGLE_AUTHORIZE_URL),
        )
        # Google issues a refresh token only for offline access, and again only on consent.
        extra = {"access_type": "offline", "prompt": "consent"}
        secret = (
            credentials.client_secret
            if isinstance(credentials, GoogleWorkspaceCredentials)
            else None
        )
        client_id = config.client_id
    else:
        raise InvalidInputError("type: only microsoft_graph and google_workspace use OAuth grants")
    if secret is None:
        raise NotFoundError("credentials.client_secret: the config holds none")
    return OAuthClient(
        token_url=str(config.token_url) if config.token_url else token_url,
        authorize_url=str(config.authorize_url) if config.authorize_url else authorize_url,
        client_id=client_id,
        client_secret=secret,
        scopes=scopes,
        authorize_parameters=extra,
    )
