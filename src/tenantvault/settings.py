"""Runtime settings, read from ``TENANTVAULT_*`` variables (and Vault's own ``VAULT_*``)."""

from __future__ import annotations

import ipaddress
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from tenantvault.errors import ConfigurationError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DRIVERS = {"postgres", "postgresql", "postgresql+psycopg"}
ENV_PREFIX = "TENANTVAULT_"
ENV_FILE_VARIABLE = "TENANTVAULT_ENV_FILE"


def _sql_identifier(value: str) -> str:
    # These names are interpolated into DDL (schema, role names), so only plain
    # lower-case identifiers are accepted: nothing that needs quoting.
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError("must be a lower-case SQL identifier (a-z, 0-9, _; at most 63 chars)")
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine."""
    if host.strip("[]").lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_database_url(raw: str) -> URL:
    """Parse a PostgreSQL URL and pin the psycopg 3 driver.

    Raises:
        ValueError: the URL is not a PostgreSQL URL (the message never repeats it).
    """
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ValueError("is not a valid database URL") from None
    if url.drivername not in _DRIVERS:
        raise ValueError("must be a postgresql:// URL")
    return url.set(drivername="postgresql+psycopg")


class Settings(BaseSettings):
    """Everything tenantvault reads from the environment (and, only when
    ``TENANTVAULT_ENV_FILE`` names one, from a dotenv file)."""

    # No implicit .env: a file in whatever directory the process starts in could
    # otherwise switch the key provider or point VAULT_ADDR elsewhere.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="ignore", frozen=True
    )

    database_url: SecretStr = Field(
        description="PostgreSQL URL of the application's database (may hold a password)."
    )
    # Hot standbys of that database (streaming replicas) the load hot path reads from:
    # comma-separated PostgreSQL URLs, each checked as database_url is. None: every load
    # reads the primary. Writes, and whatever must be current, always go to the primary.
    read_database_urls: SecretStr | None = Field(
        None, description="Comma-separated PostgreSQL URLs of hot standbys (may hold passwords)."
    )
    # A standby serves loads only while it is known to hold every commit older than this
    # (db/standbys.py); one further behind, or down, is skipped for the primary.
    read_max_lag_ms: int = Field(1000, ge=1, le=3_600_000)
    schema_name: str = Field("dripiq_app", description="Schema holding the tables.")
    app_role: str = Field("tenantvault_app", description="Role the application connects as.")
    migrator_role: str = Field(
        "tenantvault_migrator", description="Role data migrations run as (crosses tenants)."
    )
    migration_lock_timeout_ms: int = Field(5000, ge=1, le=600_000)
    statement_timeout_ms: int = Field(30_000, ge=0)
    connect_timeout_seconds: int = Field(10, ge=1, le=600)
    # The load hot path holds up to this many connections of its own (per Vault, or
    # per loop's AsyncVault; one statement at a time each), beside the engine's pool.
    hot_path_connections: int = Field(6, ge=1, le=100)
    # psycopg prepares a statement on the server after its fifth run on a connection. A
    # pooler in transaction mode hands each transaction a different server connection,
    # where the statement does not exist (PgBouncer 1.18): off, nothing is prepared.
    server_prepared_statements: bool = True
    # The statement timeout travels as a startup option (-c statement_timeout), which
    # PgBouncer refuses. Off, the server's own statement_timeout (set on the login role
    # or the database) applies, and each new connection checks it is the one above.
    send_statement_timeout: bool = True

    key_provider: Literal["vault", "local", "awskms"] = "vault"
    transit_mount: str = Field("transit", min_length=1, pattern=r"^[A-Za-z0-9_./-]+$")
    transit_key: str = Field("tenantvault", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # The transit key that authenticates the audit log's retention markers (operators only;
    # not derived, never used for data keys).
    audit_transit_key: str = Field("tenantvault-audit", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    vault_timeout_seconds: float = Field(5.0, gt=0, le=300)
    dek_cache_max_age_seconds: float = Field(300.0, gt=0)
    dek_cache_max_entries: int = Field(1024, ge=1)
    dek_cache_max_uses: int = Field(1_000_000, ge=1)
    # After transit failed an unwrap (unreachable, or refusing the token), uncached keys fail
    # at once for a window: this long at first, doubling per failure in a row up to the
    # maximum, jittered; then one call probes (keys/backoff.py).
    transit_backoff_initial_seconds: float = Field(1.0, gt=0, le=3600)
    transit_backoff_max_seconds: float = Field(30.0, gt=0, le=3600)

    # OpenBao refuses a request of more than 1,000 JSON strings: 249 rewrap items (two
    # strings and two keys each) pass, 250 do not. A refused batch is halved and retried.
    transit_batch_size: int = Field(200, ge=1, le=400)
    # How many of a config's newest versions keep their sealed credentials; older
    # versions keep their non-secret config (and history) but lose the secret.
    config_history_credentials_kept: int = Field(10, ge=1, le=10_000)
    # An audit event for every load of credentials: off, since loads are the hot path.
    audit_loads: bool = False
    # Open values sealed in the old format (1), which bound a value to its place only.
    # False: this process refuses format-1 values even while the database's switch
    # (keys/legacy.py) still lets recorded ones open. It narrows, never widens, it.
    open_legacy_format: bool = True
    vault_approle_mount: str = Field("approle", min_length=1)
    vault_approle_role_id: str | None = None
    vault_approle_secret_id: SecretStr | None = None
    local_master_key: SecretStr | None = Field(
        None, description="base64 of 32 bytes; only with TENANTVAULT_KEY_PROVIDER=local"
    )
    # The local provider keeps its master key beside the data: it must be acknowledged.
    local_key_provider_is_for_development: bool = False
    # AWS KMS (TENANTVAULT_KEY_PROVIDER=awskms): the symmetric key that wraps data keys
    # (id, ARN or alias) and the HMAC_256 key of the audit markers. Region, credentials
    # and endpoint are boto3's own settings (AWS_REGION, AWS_ACCESS_KEY_ID, a profile or
    # role, AWS_ENDPOINT_URL); the timeout is TENANTVAULT_VAULT_TIMEOUT_SECONDS.
    awskms_key_id: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9:/_.-]+$")
    awskms_audit_key_id: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9:/_.-]+$")
    # Decrypt and ReEncrypt take one key a request: this many run at once in a batch.
    awskms_concurrency: int = Field(8, ge=1, le=64)
    # Plain http to a KMS on another host sends tokens and data keys in clear (VAULT_ADDR,
    # and the AWS KMS endpoint boto3 is given).
    allow_plain_http_vault: bool = False
    # The nodes of a Vault/OpenBao cluster, comma-separated: each request goes to one
    # that answers (kms/failover.py). Set, it takes the place of VAULT_ADDR.
    vault_addrs: Annotated[tuple[AnyHttpUrl, ...], NoDecode] = ()

    vault_addr: AnyHttpUrl | None = Field(None, validation_alias="VAULT_ADDR")
    vault_token: SecretStr | None = Field(None, validation_alias="VAULT_TOKEN")
    vault_namespace: str | None = Field(None, validation_alias="VAULT_NAMESPACE")
    vault_cacert: str | None = Field(None, validation_alias="VAULT_CACERT")
    vault_skip_verify: bool = Field(False, validation_alias="VAULT_SKIP_VERIFY")

    @field_validator("schema_name", "app_role", "migrator_role")
    @classmethod
    def _identifiers(cls, value: str) -> str:
        return _sql_identifier(value)

    @field_validator("vault_addrs", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("vault_addr")
    @classmethod
    def _tls_off_loopback(cls, value: AnyHttpUrl | None, info: ValidationInfo) -> AnyHttpUrl | None:
        if value is not None:
            _check_plain_http(value, info)
        return value

    @field_validator("vault_addrs")
    @classmethod
    def _nodes_tls_off_loopback(
        cls, value: tuple[AnyHttpUrl, ...], info: ValidationInfo
    ) -> tuple[AnyHttpUrl, ...]:
        for node in value:
            _check_plain_http(node, info)
        return value

    @property
    def vault_nodes(self) -> tuple[str, ...]:
        """The transit server's addresses: TENANTVAULT_VAULT_ADDRS, else VAULT_ADDR."""
        if self.vault_addrs:
            return tuple(str(node).rstrip("/") for node in self.vault_addrs)
        return () if self.vault_addr is None else (str(self.vault_addr).rstrip("/"),)

    @field_validator("transit_backoff_max_seconds")
    @classmethod
    def _backoff_grows(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("transit_backoff_initial_seconds")
        if initial is not None and value < initial:
            raise ValueError("must be at least TENANTVAULT_TRANSIT_BACKOFF_INITIAL_SECONDS")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        parse_database_url(value.get_secret_value())
        return value

    @field_validator("read_database_urls")
    @classmethod
    def _standby_urls(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        urls = value.get_secret_value().split(",")
        for position, raw in enumerate(urls, start=1):
            if not raw.strip():
                raise ValueError(f"URL {position} is empty")
            try:
                parse_database_url(raw.strip())
            except ValueError as exc:
                raise ValueError(f"URL {position} {exc}") from None
        return value

    @cached_property
    def read_urls(self) -> tuple[URL, ...]:
        """The standbys' URLs for SQLAlchemy (psycopg 3 driver), in the order given."""
        if self.read_database_urls is None:
            return ()
        raw = self.read_database_urls.get_secret_value().split(",")
        return tuple(parse_database_url(url.strip()) for url in raw)

    @property
    def default_kek_ref(self) -> str:
        """The deployment's KEK as a key reference (kms/refs.py): what wraps the data
        keys of every tenant that has no KEK of its own."""
        if self.key_provider == "local":
            return "local:default"
        if self.key_provider == "awskms":
            return f"awskms:{self.awskms_key_id}"
        return f"transit:{self.transit_key}"

    @cached_property
    def sqlalchemy_url(self) -> URL:
        """The database URL for SQLAlchemy (psycopg 3 driver); its repr hides the password."""
        return parse_database_url(self.database_url.get_secret_value())

    def database_url_for_display(self) -> str:
        """The database URL with any password masked, for logs and terminal output."""
        return self.sqlalchemy_url.render_as_string(hide_password=True)


def _check_plain_http(address: AnyHttpUrl, info: ValidationInfo) -> None:
    if address.scheme != "http" or info.data.get("allow_plain_http_vault"):
        return
    if not is_loopback(address.host or ""):
        raise ValueError(
            "is plain http to another host (tokens and data keys would cross the network "
            "in clear): use https, or set TENANTVAULT_ALLOW_PLAIN_HTTP_VAULT=true"
        )


_ALIASES = {
    "vault_addr": "VAULT_ADDR",
    "vault_token": "VAULT_TOKEN",
    "vault_namespace": "VAULT_NAMESPACE",
    "vault_cacert": "VAULT_CACERT",
    "vault_skip_verify": "VAULT_SKIP_VERIFY",
}


def env_var_name(field: str) -> str:
    """The environment variable that sets ``field`` (given by name or by its alias)."""
    if field in _ALIASES.values():
        return field
    return _ALIASES.get(field, ENV_PREFIX + field.upper())


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning validation failures into one :class:`ConfigurationError`.

    The message names each offending variable and what is wrong with it, never
    the value (a URL or token may be secret). A dotenv file is read only when
    ``TENANTVAULT_ENV_FILE`` names it (the environment wins over the file).
    """
    env_file = os.environ.get(ENV_FILE_VARIABLE)
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigurationError(f"{ENV_FILE_VARIABLE} names a file that does not exist")
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = str(error["loc"][0]) if error["loc"] else "?"
            message = "is required" if error["type"] == "missing" else error["msg"]
            message = message.removeprefix("Value error, ")
            problems.append(f"{env_var_name(field)} {message}")
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None
