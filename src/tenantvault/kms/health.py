"""The KMS part of ``tenantvault status`` (never raises): for transit, whether the
server answers, has its engine mounted, and which versions of the transit key can
unwrap; another provider reports its own (:func:`tenantvault.kms.factory.provider_status`)."""

from __future__ import annotations

from functools import partial

import hvac
from requests.exceptions import RequestException

from tenantvault.errors import TenantVaultError
from tenantvault.kms.diagnose import TOKEN_REFUSED, token_refused, unresolved_host
from tenantvault.kms.factory import provider_status, transit_client
from tenantvault.kms.provider import KmsStatus
from tenantvault.settings import Settings

# Transit's status: the key versions are the transit key's (None when it does not
# exist or the token may not read it, and key_detail says which).
TransitStatus = partial(KmsStatus, "transit", key_label="the transit key")


def kms_status(settings: Settings) -> KmsStatus:
    """The configured KMS's status (never raises)."""
    return provider_status(settings) or transit_status(settings)


def transit_status(settings: Settings) -> KmsStatus:
    """Whether transit answers and has its engine mounted (never raises)."""
    if settings.vault_addr is None:
        return TransitStatus(None, False, False, "VAULT_ADDR is not set")
    address = str(settings.vault_addr)
    try:
        # The same client the key provider uses: token or AppRole, TLS settings.
        client = transit_client(settings)
    except TenantVaultError as exc:
        return TransitStatus(address, False, False, str(exc))
    try:
        mounts = client.sys.list_mounted_secrets_engines()["data"]
    except hvac.exceptions.Forbidden:
        refused = (
            TOKEN_REFUSED
            if token_refused(client)
            else "not checked: the token may not list the secrets engines (read sys/mounts)"
        )
        return TransitStatus(address, False, False, refused)
    except hvac.exceptions.VaultDown:
        return TransitStatus(
            address, False, False, "the server (OpenBao or Vault) is sealed or not initialised"
        )
    except RequestException as exc:
        host = unresolved_host(exc, address)
        if host is not None:
            return TransitStatus(
                address, False, False, f"not found: the host name {host} does not resolve"
            )
        return TransitStatus(address, False, False, "unreachable (no connection)")
    except hvac.exceptions.VaultError as exc:
        refused = f"the request was refused ({type(exc).__name__})"
        return TransitStatus(address, False, False, refused)
    mount = f"{settings.transit_mount.strip('/')}/"
    mounted = mount in mounts
    versions, detail = (
        _key_versions(client, settings)
        if mounted
        else (None, f"missing: no transit engine mounted at {mount}")
    )
    return TransitStatus(
        address,
        True,
        mounted,
        key_versions=versions,
        key_detail=detail,
        summary="engine mounted" if mounted else "engine NOT mounted",
    )


def _key_versions(client: hvac.Client, settings: Settings) -> tuple[tuple[int, int] | None, str]:
    name = f"{settings.transit_mount.strip('/')}/{settings.transit_key}"
    try:
        data = client.secrets.transit.read_key(
            name=settings.transit_key, mount_point=settings.transit_mount
        )["data"]
    except hvac.exceptions.InvalidPath:
        return None, f"missing: no transit key {name}"
    except hvac.exceptions.Forbidden:
        return None, f"not checked: the token may not read {name} (a least-privilege token)"
    except (RequestException, hvac.exceptions.VaultError) as exc:
        return None, f"not checked: reading {name} failed ({type(exc).__name__})"
    return (int(data["min_decryption_version"]), int(data["latest_version"])), ""
