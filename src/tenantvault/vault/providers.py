"""What each provider's config and credentials hold: the models below are the list.

Per provider: a model of the non-secret ``config`` (stored as JSONB) and one of
the secret credentials (sealed). Unknown fields are refused, secrets are
``SecretStr``, and validation errors name the field but never echo its value.

Everything is bounded (README, "Limits"), so no caller can make a process hold or
hash megabytes per config (the hot path caches each config's binding): a config's
JSON at most :data:`CONFIG_MAX_BYTES`, each of its strings at most 1,024 characters
(scopes 512, at most :data:`SCOPES_MAX_ITEMS` of them), each secret non-empty and at
most :data:`SECRET_MAX_BYTES`. Numbers and flags are strict: ``True`` is no port, and
``1`` or ``"yes"`` no flag.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    HttpUrl,
    SecretStr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tenantvault.db.models import ProviderType
from tenantvault.errors import InvalidInputError
from tenantvault.keys.sealed import canonical_config

CONFIG_MAX_BYTES = 64 * 1024
"""A config's JSON (canonical: sorted keys, no spaces, UTF-8) at most this long."""
SECRET_MAX_BYTES = 16 * 1024
"""Each secret (a credentials field, an OAuth token) at most this long, in UTF-8."""
SCOPES_MAX_ITEMS = 64
"""A config's (or a token's) scopes: at most this many, each at most 512 characters."""

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_PEM_KEY = re.compile(
    r"^-----BEGIN (RSA |EC )?PRIVATE KEY-----\n[A-Za-z0-9+/=\n]+\n"
    r"-----END (RSA |EC )?PRIVATE KEY-----\n?$"
)


def _hostname(value: str) -> str:
    if not _HOSTNAME.fullmatch(value):
        raise ValueError("must be a host name")
    return value.lower()


def _guid_or_domain(value: str) -> str:
    if _GUID.fullmatch(value) or (_HOSTNAME.fullmatch(value) and "." in value):
        return value
    raise ValueError("must be a directory (tenant) GUID or a verified domain")


def _guid(value: str) -> str:
    if not _GUID.fullmatch(value):
        raise ValueError("must be a GUID")
    return value


def _endpoint(value: HttpUrl) -> HttpUrl:
    # The token endpoint receives the client secret and the refresh token: https only,
    # but for a provider on this machine's loopback (tests, a local proxy).
    loopback = value.host in {"localhost", "127.0.0.1", "[::1]", "::1"}
    if value.scheme != "https" and not (value.scheme == "http" and loopback):
        raise ValueError("must be an https URL (http only on loopback)")
    if value.username is not None or value.password is not None or value.fragment:
        raise ValueError("must not hold credentials or a fragment")
    return value


def secret_problem(text: str) -> str | None:
    """What is wrong with a secret's text (empty, or too long), or None."""
    if not text:
        return "must not be empty"
    # Characters never outnumber UTF-8 bytes: the cheap test first (a 10 MB value).
    if len(text) > SECRET_MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > (
        SECRET_MAX_BYTES
    ):
        return f"must be at most {SECRET_MAX_BYTES} bytes"
    return None


def _bounded_secret(value: SecretStr | None) -> SecretStr | None:
    problem = None if value is None else secret_problem(value.get_secret_value())
    if problem is not None:
        raise ValueError(problem)
    return value


Hostname = Annotated[str, Field(max_length=253), AfterValidator(_hostname)]
Scopes = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=512)]],
    Field(min_length=1, max_length=SCOPES_MAX_ITEMS),
]
NonEmpty = Annotated[str, Field(min_length=1, max_length=1024)]
Secret = Annotated[SecretStr, AfterValidator(_bounded_secret)]
Endpoint = Annotated[HttpUrl, Field(max_length=1024), AfterValidator(_endpoint)]
"""An OAuth endpoint overriding the provider's own: https, or http on loopback."""
"""A secret: not empty, at most :data:`SECRET_MAX_BYTES`."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class _Secret(_Model):
    def __reduce__(self) -> str:
        raise TypeError("credentials refuse to be pickled")


# --- SendGrid ---


class SendGridConfig(_Model):
    webhook_public_key: NonEmpty | None = None
    ip_pool_name: Annotated[str, Field(min_length=2, max_length=64)] | None = None
    # Set by the data migration on the configs it made for tenants that used the
    # application-wide SendGrid key before tenantvault; such configs hold no credentials.
    legacy: StrictBool = False


class SendGridCredentials(_Secret):
    api_key: Secret

    @field_validator("api_key")
    @classmethod
    def _shape(cls, value: SecretStr) -> SecretStr:
        if not re.fullmatch(r"SG\.[\w-]{8,}\.[\w-]{8,}", value.get_secret_value()):
            raise ValueError("must be a SendGrid API key (SG.<id>.<secret>)")
        return value


# --- SMTP ---


class SmtpTls(_Model):
    reject_unauthorized: StrictBool = True
    ciphers: NonEmpty | None = None


class SmtpConfig(_Model):
    host: Hostname
    port: Annotated[StrictInt, Field(ge=1, le=65535)]
    secure: StrictBool
    auth_type: Literal["login", "oauth2"]
    user: NonEmpty
    tls: SmtpTls = SmtpTls()

    @model_validator(mode="after")
    def _tls_mode_matches_port(self) -> SmtpConfig:
        # 465 is implicit TLS (secure=true); 25 and 587 start in clear and upgrade (STARTTLS).
        if self.port == 465 and not self.secure:
            raise ValueError("port 465 is implicit TLS: set secure to true")
        if self.port in (25, 587) and self.secure:
            raise ValueError(f"port {self.port} uses STARTTLS: set secure to false")
        return self


class SmtpCredentials(_Secret):
    # login: the password. oauth2: nothing here; the tokens are stored as OAuth tokens.
    password: Secret | None = None


# --- Microsoft Graph ---

GRAPH_DEFAULT_SCOPE = "https://graph.microsoft.com/.default"


class MicrosoftGraphConfig(_Model):
    azure_tenant_id: Annotated[str, AfterValidator(_guid_or_domain)]
    client_id: Annotated[str, AfterValidator(_guid)]
    scopes: Scopes
    authority_url: HttpUrl | None = None
    auth_type: Literal["client_credentials", "delegated"]
    # Override the endpoints derived from azure_tenant_id (and authority_url):
    # tenantvault sends the client secret and the refresh token to token_url.
    token_url: Endpoint | None = None
    authorize_url: Endpoint | None = None

    @field_validator("authority_url")
    @classmethod
    def _https(cls, value: HttpUrl | None) -> HttpUrl | None:
        if value is not None and value.scheme != "https":
            raise ValueError("must be an https URL")
        return value

    @model_validator(mode="after")
    def _scopes_match_flow(self) -> MicrosoftGraphConfig:
        # The client-credentials flow takes only the resource's .default scope;
        # delegated flows name permissions and may not use it.
        if self.auth_type == "client_credentials" and self.scopes != [GRAPH_DEFAULT_SCOPE]:
            raise ValueError(f"client_credentials needs scopes [{GRAPH_DEFAULT_SCOPE!r}]")
        if self.auth_type == "delegated" and any(s.endswith("/.default") for s in self.scopes):
            raise ValueError("delegated auth names permissions, not a /.default scope")
        return self


class MicrosoftGraphCredentials(_Secret):
    client_secret: Secret


# --- Google Workspace ---


class GoogleWorkspaceConfig(_Model):
    auth_type: Literal["service_account", "oauth2"]
    project_id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")]
    client_email: EmailStr | None = None
    delegated_user: EmailStr | None = None
    scopes: Scopes
    client_id: NonEmpty | None = None
    # Override Google's endpoints (tenantvault sends the client secret and the refresh
    # token to token_url).
    token_url: Endpoint | None = None
    authorize_url: Endpoint | None = None

    @field_validator("scopes")
    @classmethod
    def _google_scopes(cls, value: list[str]) -> list[str]:
        for scope in value:
            if not (scope.startswith("https://") or scope in {"openid", "email", "profile"}):
                raise ValueError("each scope must be an https:// scope URL")
        return value

    @model_validator(mode="after")
    def _fields_of_the_flow(self) -> GoogleWorkspaceConfig:
        if self.auth_type == "service_account" and self.client_email is None:
            raise ValueError("service_account needs client_email")
        if self.auth_type == "oauth2" and self.client_id is None:
            raise ValueError("oauth2 needs client_id")
        return self


def _pem(value: SecretStr | None) -> SecretStr | None:
    if value is None:
        return None
    text = value.get_secret_value()
    # Keys pasted from JSON often arrive with literal "\n"; PEM needs real newlines.
    if "\\n" in text and "\n" not in text:
        text = text.replace("\\n", "\n")
    text = text.replace("\r\n", "\n").strip() + "\n"
    if not _PEM_KEY.fullmatch(text):
        raise ValueError("must be a PEM private key")
    return SecretStr(text)


class GoogleWorkspaceCredentials(_Secret):
    private_key: Annotated[
        SecretStr | None, AfterValidator(_bounded_secret), AfterValidator(_pem)
    ] = None
    client_secret: Secret | None = None


CONFIG_MODELS: dict[ProviderType, type[_Model]] = {
    ProviderType.SENDGRID: SendGridConfig,
    ProviderType.SMTP: SmtpConfig,
    ProviderType.MICROSOFT_GRAPH: MicrosoftGraphConfig,
    ProviderType.GOOGLE_WORKSPACE: GoogleWorkspaceConfig,
}
CREDENTIAL_MODELS: dict[ProviderType, type[_Secret]] = {
    ProviderType.SENDGRID: SendGridCredentials,
    ProviderType.SMTP: SmtpCredentials,
    ProviderType.MICROSOFT_GRAPH: MicrosoftGraphCredentials,
    ProviderType.GOOGLE_WORKSPACE: GoogleWorkspaceCredentials,
}

ProviderConfigModel = SendGridConfig | SmtpConfig | MicrosoftGraphConfig | GoogleWorkspaceConfig
CredentialsModel = (
    SendGridCredentials | SmtpCredentials | MicrosoftGraphCredentials | GoogleWorkspaceCredentials
)


def _describe(exc: ValidationError, prefix: str) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(str(part) for part in error["loc"]) or "(model)"
        problems.append(f"{prefix}.{where}: {error['msg']}")
    return "; ".join(problems)


def provider_type(value: str | ProviderType) -> ProviderType:
    try:
        return ProviderType(value)
    except ValueError:
        allowed = ", ".join(t.value for t in ProviderType)
        raise InvalidInputError(f"type: must be one of {allowed}") from None


def _validated(model: type[_Model], value: Any, prefix: str) -> _Model:
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise InvalidInputError(_describe(exc, prefix)) from None


def parse_config(kind: ProviderType, value: Any) -> ProviderConfigModel:
    """Validate ``value`` as the config of a ``kind`` provider.

    Raises:
        InvalidInputError: naming each bad field (``config.<field>``), never a value.
    """
    parsed = _validated(CONFIG_MODELS[kind], value, "config")
    assert isinstance(parsed, ProviderConfigModel)
    stored = parsed.model_dump(mode="json", exclude_none=True)
    _refuse_nul(stored, "config")
    # Each field is bounded already; this bounds them together, as stored and hashed.
    if len(canonical_config(stored)) > CONFIG_MAX_BYTES:
        raise InvalidInputError(f"config: must be at most {CONFIG_MAX_BYTES} bytes as JSON")
    return parsed


def _refuse_nul(value: Any, where: str) -> None:
    """PostgreSQL's text and jsonb cannot hold a NUL character: refuse it here, named,
    rather than as the driver's error about the whole statement."""
    if isinstance(value, str) and "\x00" in value:
        raise InvalidInputError(f"{where}: must not contain a NUL character")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_nul(item, f"{where}.{index}")


def parse_credentials(
    kind: ProviderType, value: Any, config: ProviderConfigModel
) -> CredentialsModel:
    """Validate ``value`` as the credentials of a ``kind`` provider with ``config``.

    Raises:
        InvalidInputError: naming each bad field (``credentials.<field>``), never a value.
    """
    parsed = _validated(CREDENTIAL_MODELS[kind], value, "credentials")
    assert isinstance(parsed, CredentialsModel)
    _check_against_config(parsed, config)
    return parsed


def check_credentials_present(config: ProviderConfigModel, present: bool) -> None:
    """Refuse a config that cannot work without credentials when it has none (given
    now or stored).

    Raises:
        InvalidInputError: naming the missing field.
    """
    if not present and isinstance(config, SmtpConfig) and config.auth_type == "login":
        raise InvalidInputError("credentials.password: required for auth_type login")


def _check_against_config(credentials: CredentialsModel, config: ProviderConfigModel) -> None:
    if isinstance(credentials, SmtpCredentials) and isinstance(config, SmtpConfig):
        if config.auth_type == "login" and credentials.password is None:
            raise InvalidInputError("credentials.password: required for auth_type login")
        if config.auth_type == "oauth2" and credentials.password is not None:
            raise InvalidInputError(
                "credentials.password: not used with auth_type oauth2 (store OAuth tokens)"
            )
    if isinstance(credentials, GoogleWorkspaceCredentials) and isinstance(
        config, GoogleWorkspaceConfig
    ):
        if config.auth_type == "service_account" and credentials.private_key is None:
            raise InvalidInputError("credentials.private_key: required for service_account")
        if config.auth_type == "oauth2" and credentials.client_secret is None:
            raise InvalidInputError("credentials.client_secret: required for oauth2")


def _from_json(model: type[_Model], stored: str | bytes, prefix: str) -> _Model:
    try:
        return model.model_validate_json(stored)
    except ValidationError as exc:
        raise InvalidInputError(_describe(exc, prefix)) from None


def credentials_from_storage(kind: ProviderType, plaintext: bytes) -> CredentialsModel:
    """Rebuild credentials from their opened JSON (validated in full when stored)."""
    parsed = _from_json(CREDENTIAL_MODELS[kind], plaintext, "credentials")
    assert isinstance(parsed, CredentialsModel)
    return parsed


def config_from_storage(kind: ProviderType, config_json: str) -> ProviderConfigModel:
    """Rebuild a stored config from the text the database prints (validated in full
    when stored; its digest is what the secrets opened beside it were bound to)."""
    parsed = _from_json(CONFIG_MODELS[kind], config_json, "config")
    assert isinstance(parsed, ProviderConfigModel)
    return parsed


def credentials_to_json(credentials: CredentialsModel) -> dict[str, Any]:
    """The plaintext JSON object that gets sealed (secrets revealed: only for sealing)."""
    out: dict[str, Any] = {}
    for name, value in credentials:
        out[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return {k: v for k, v in out.items() if v is not None}
