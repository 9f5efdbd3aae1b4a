"""The KMS part of ``tenantvault status`` (never raises): for transit, whether the
server answers, has its engine mounted, and which versions of the transit key can
unwrap; another provider reports its own (:func:`tenantvault.kms.factory.provider_status`)."""

from __future__ import annotations

from dataclasses import replace
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


def node_states(settings: Settings) -> str:
    """Each listed node's state as OpenBao's ``sys/health`` tells it: "a active, b
    standby, c unreachable" (only for a cluster: TENANTVAULT_VAULT_ADDRS)."""
    if len(settings.vault_nodes) < 2:
        return ""
    states = []
    for node in settings.vault_nodes:
        client = hvac.Client(url=node, token="", timeout=settings.vault_timeout_seconds)
        try:
            code = client.sys.read_health_status(method="HEAD").status_code
        except RequestException:
            code = 0
        state = _NODE_STATES.get(code, "sealed or not initialised" if code else "unreachable")
        states.append(f"{node} {state}")
    return ", ".join(states)


# sys/health's answers: active, standby (and a performance standby: Vault Enterprise's).
_NODE_STATES = {200: "active", 429: "standby", 473: "standby"}


def transit_status(settings: Settings) -> KmsStatus:
    """Whether transit answers and has its engine mounted (never raises); for a cluster,
    each node's state too (in the summary, or the detail when none answers)."""
    status = _transit_status(settings)
    nodes = node_states(settings)
    if not nodes:
        return status
    if status.reachable:
        return replace(status, summary=f"{status.summary}; nodes: {nodes}")
    return replace(status, detail=f"{status.detail}; nodes: {nodes}")


def _transit_status(settings: Settings) -> KmsStatus:
    if not settings.vault_nodes:
        return TransitStatus(None, False, False, "VAULT_ADDR is not set")
    address = ", ".join(settings.vault_nodes) if settings.vault_addrs else str(settings.vault_addr)
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
