"""Vault / OpenBao transit as the key provider (through an injected ``hvac.Client``).

One transit key, created with ``derived=true``; the tenant id is the derivation
context, so Vault derives a distinct KEK per tenant and a wrapped data key copied
to another tenant does not unwrap. Only transient failures (connection errors,
5xx) are retried, with backoff, inside the configured timeout.
"""

from __future__ import annotations

import base64
import copy
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import hvac
import requests

from tenantvault.errors import (
    DecryptionError,
    KeyProviderError,
    KeyProviderRefused,
    KeyProviderUnavailable,
)
from tenantvault.kms.diagnose import TOKEN_REFUSED, token_refused, unanswered
from tenantvault.kms.provider import (
    PROBE_TENANTS,
    CheckedKeyProvider,
    RewrapResult,
    UnwrapResult,
    WrappedKey,
    kek_version_of,
)

T = TypeVar("T")
_TRANSIENT = (
    requests.exceptions.ConnectionError,
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
)


class _PermissionDeniedError(KeyProviderRefused):
    pass


_NOT_UNWRAPPED = "cannot unwrap data key"


def _item_results(refusal: hvac.exceptions.InvalidRequest) -> list[dict[str, Any]] | None:
    """The per-item results a refused batch request carries, or None when the request
    was refused as a whole. Transit answers 400 when any item fails, with every item's
    result; a request over the server's JSON limits gets an error and no results."""
    body = refusal.json if isinstance(refusal.json, dict) else {}
    data = body.get("data")
    answered = data.get("batch_results") if isinstance(data, dict) else None
    return answered if isinstance(answered, list) else None


def _context(tenant_id: str) -> str:
    return base64.b64encode(tenant_id.encode()).decode()


class TransitKeyProvider(CheckedKeyProvider):
    """Data keys generated, unwrapped and rewrapped by a transit key in Vault/OpenBao."""

    def __init__(
        self,
        client: hvac.Client,
        *,
        key_name: str,
        mount_point: str = "transit",
        timeout_seconds: float = 5.0,
        batch_size: int = 200,
        create_key: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        login: Callable[[hvac.Client], float] | None = None,
        mac_key: str = "tenantvault-audit",
    ) -> None:
        """Args:
        client: an hvac client, already holding a token (or to be logged in by ``login``).
        mac_key: the transit key that MACs the audit log's markers (not derived; made
            on first use where the token may).
        login: logs ``client`` in (AppRole) and returns how many seconds the token is
            valid; called again before two thirds of that have passed, and once when
            the server refuses a token that expired early (revoked, or a TTL cut).
        """
        if not 1 <= batch_size <= 400:
            raise ValueError("batch_size must be 1..400 (OpenBao refuses 500-item batches)")
        self._client = client
        self._transit = client.secrets.transit
        self.key_name = key_name
        self.mount_point = mount_point
        self.timeout_seconds = timeout_seconds
        self.batch_size = batch_size
        self._create_key = create_key
        self._sleep = sleep
        self._key_checked = False
        self._lock = threading.Lock()
        self._login = login
        self.mac_key = mac_key
        self._mac_key_checked = False
        self._login_lock = threading.Lock()
        self._renew_at = 0.0
        # Whose login keeps the shared client's token fresh: this provider's, or that of
        # the provider it was made from (for_key).
        self._logins = self
        if login is not None:
            self._log_in()

    def __repr__(self) -> str:
        return f"TransitKeyProvider(key={self.mount_point}/{self.key_name})"

    @property
    def ref(self) -> str:
        return f"transit:{self.key_name}"

    def for_key(self, key_name: str) -> TransitKeyProvider:
        """A provider for another transit key on the same mount, sharing this one's
        client and login; it never creates the key (a tenant's KEK is made by its owner)."""
        sibling = copy.copy(self)
        sibling.key_name = key_name
        sibling._create_key = False
        sibling._key_checked = False
        sibling._lock = threading.Lock()
        sibling._logins = self._logins
        return sibling

    def _log_in(self) -> None:
        assert self._login is not None
        valid_for = self._login(self._client)
        self._renew_at = time.monotonic() + valid_for * 2 / 3

    def _fresh_token(self, *, refused: bool = False) -> bool:
        """Log in again when the token is due (or was just refused); True if it did."""
        logins = self._logins
        if logins._login is None:
            return False
        with logins._login_lock:
            if refused or time.monotonic() >= logins._renew_at:
                logins._log_in()
                return True
        return False

    @property
    def _address(self) -> str:
        # A cluster's adapter has tried every node before a failure reaches here.
        nodes = getattr(self._client.adapter, "nodes", ())
        if len(nodes) > 1:
            return f"{', '.join(nodes)} (every node)"
        return str(self._client.url).rstrip("/")

    def _call(self, what: str, request: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.timeout_seconds
        delay = 0.05
        self._fresh_token()
        relogged = False
        while True:
            try:
                return request()
            except requests.exceptions.Timeout:
                raise KeyProviderUnavailable(
                    f"could not {what}: transit at {self._address} did not answer "
                    f"within {self.timeout_seconds:g}s"
                ) from None
            except _TRANSIENT as exc:
                if time.monotonic() + delay >= deadline:
                    raise KeyProviderUnavailable(
                        f"could not {what}: transit at {self._address} "
                        f"{unanswered(exc, self._address)}"
                    ) from None
                self._sleep(delay)
                delay *= 2
            except hvac.exceptions.Forbidden:
                if not relogged and self._fresh_token(refused=True):
                    relogged = True
                    continue
                if token_refused(self._client):
                    # Not "may not <do it>": no request of this token would pass.
                    raise KeyProviderRefused(
                        f"could not {what}: transit at {self._address}: {TOKEN_REFUSED}"
                    ) from None
                raise _PermissionDeniedError(
                    f"the transit token may not {what} with transit key "
                    f"{self.mount_point}/{self.key_name}"
                ) from None

    def ensure_key(self) -> None:
        """Check (once) that the transit key exists and is derived; create it if allowed."""
        if self._key_checked:
            return
        with self._lock:
            if self._key_checked:
                return
            try:
                info = self._call(
                    "read the transit key",
                    lambda: self._transit.read_key(
                        name=self.key_name, mount_point=self.mount_point
                    ),
                )
            except hvac.exceptions.InvalidPath:
                info = None
            except _PermissionDeniedError:
                # A least-privilege token (datakey, decrypt) may not read the key's
                # settings: prove with what it may do that the key is derived.
                self._probe_derived()
                self._key_checked = True
                return
            if info is None:
                if not self._create_key:
                    raise KeyProviderError(self._missing_key_message())
                try:
                    self._call(
                        "create the transit key",
                        lambda: self._transit.create_key(
                            name=self.key_name,
                            derived=True,
                            key_type="aes256-gcm96",
                            mount_point=self.mount_point,
                        ),
                    )
                except KeyProviderError:
                    raise KeyProviderError(self._missing_key_message()) from None
                info = self._call(
                    "read the transit key",
                    lambda: self._transit.read_key(
                        name=self.key_name, mount_point=self.mount_point
                    ),
                )
            if not info["data"].get("derived"):
                raise self._not_derived()
            self._key_checked = True

    def _not_derived(self) -> KeyProviderError:
        return KeyProviderError(
            f"transit key {self.mount_point}/{self.key_name} is not derived: "
            "tenant isolation needs a key created with derived=true"
        )

    def _probe_derived(self) -> None:
        """Fail closed unless a key wrapped for one context refuses to unwrap for another.

        A key made without ``derived=true`` ignores the context, and then one tenant's
        wrapped key unwraps as any other tenant's. Two calls, once per provider."""
        try:
            made: dict[str, Any] = self._call(
                "generate a data key",
                lambda: self._transit.generate_data_key(
                    name=self.key_name,
                    key_type="plaintext",  # the one the application's policy allows
                    context=_context(PROBE_TENANTS[0]),
                    bits=256,
                    mount_point=self.mount_point,
                ),
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            raise KeyProviderError(self._missing_key_message()) from None
        ciphertext = made["data"]["ciphertext"]
        try:
            self._call(
                "unwrap a data key",
                lambda: self._transit.decrypt_data(
                    name=self.key_name,
                    ciphertext=ciphertext,
                    context=_context(PROBE_TENANTS[1]),
                    mount_point=self.mount_point,
                ),
            )
        except hvac.exceptions.InvalidRequest:
            return  # refused under another context: derived
        raise self._not_derived()

    def _missing_key_message(self) -> str:
        return (
            f"transit key {self.mount_point}/{self.key_name} does not exist and this token may "
            "not create it: run "
            f"`bao write -f {self.mount_point}/keys/{self.key_name} derived=true`"
        )

    def _generate(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        self.ensure_key()
        try:
            response: dict[str, Any] = self._call(
                "generate a data key",
                lambda: self._transit.generate_data_key(
                    name=self.key_name,
                    key_type="plaintext",
                    context=_context(tenant_id),
                    bits=256,
                    mount_point=self.mount_point,
                ),
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            raise KeyProviderError(self._missing_key_message()) from None
        ciphertext = response["data"]["ciphertext"]
        plaintext = base64.b64decode(response["data"]["plaintext"])
        return plaintext, WrappedKey(ciphertext, kek_version_of(ciphertext))

    def _wrap_key(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        self.ensure_key()
        try:
            response: dict[str, Any] = self._call(
                "wrap a data key",
                lambda: self._transit.encrypt_data(
                    name=self.key_name,
                    plaintext=base64.b64encode(plaintext).decode(),
                    context=_context(tenant_id),
                    mount_point=self.mount_point,
                ),
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            raise KeyProviderError(self._missing_key_message()) from None
        ciphertext = response["data"]["ciphertext"]
        return WrappedKey(ciphertext, kek_version_of(ciphertext))

    def _unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        self.ensure_key()  # a key that is not derived would unwrap for any tenant
        try:
            response: dict[str, Any] = self._call(
                "unwrap a data key",
                lambda: self._transit.decrypt_data(
                    name=self.key_name,
                    ciphertext=wrapped,
                    context=_context(tenant_id),
                    mount_point=self.mount_point,
                ),
            )
        except hvac.exceptions.InvalidRequest:
            # Wrong tenant (derivation context), tampered or foreign ciphertext.
            raise DecryptionError(_NOT_UNWRAPPED) from None
        return base64.b64decode(response["data"]["plaintext"])

    def _unwrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        if not batch:
            return []
        self.ensure_key()  # a key that is not derived would unwrap for any tenant
        items = [{"ciphertext": wrapped, "context": _context(tenant)} for tenant, wrapped in batch]
        try:
            response: dict[str, Any] = self._call(
                "unwrap data keys",
                lambda: self._transit.decrypt_data(
                    name=self.key_name,
                    ciphertext="",
                    batch_input=items,
                    mount_point=self.mount_point,
                ),
            )
            answered = response["data"]["batch_results"]
        except hvac.exceptions.InvalidRequest as refusal:
            found = _item_results(refusal)
            if found is None:
                # Too large for the server's JSON limits (OpenBao counts every string:
                # 249 items pass, 250 do not): halve until it passes.
                if len(batch) == 1:
                    return [UnwrapResult(batch[0][0], error=_NOT_UNWRAPPED)]
                middle = len(batch) // 2
                return self._unwrap_batch(batch[:middle]) + self._unwrap_batch(batch[middle:])
            answered = found
        if len(answered) != len(batch):
            raise KeyProviderError("key provider answered an unwrap batch with the wrong count")
        return [
            # An item's error is its own: wrong tenant (context), tampered or foreign.
            UnwrapResult(tenant, error=_NOT_UNWRAPPED)
            if item.get("error")
            else UnwrapResult(tenant, base64.b64decode(item["plaintext"]))
            for (tenant, _), item in zip(batch, answered, strict=True)
        ]

    def _rewrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        self.ensure_key()
        items = [{"ciphertext": wrapped, "context": _context(tenant)} for tenant, wrapped in batch]
        try:
            response: dict[str, Any] = self._call(
                "rewrap data keys",
                lambda: self._transit.rewrap_data(
                    name=self.key_name,
                    ciphertext="",
                    batch_input=items,
                    mount_point=self.mount_point,
                ),
            )
            answered = response["data"]["batch_results"]
        except hvac.exceptions.InvalidRequest:
            # The whole request was refused: too large for the server's JSON limits
            # (OpenBao counts every string: 249 items pass, 250 do not), or one item
            # broke it. Halve until it passes; a single item reports its own refusal.
            if len(batch) == 1:
                return [self._rewrap_one(*batch[0])]
            middle = len(batch) // 2
            return self._rewrap_batch(batch[:middle]) + self._rewrap_batch(batch[middle:])
        results = []
        for (tenant, _), item in zip(batch, answered, strict=True):
            if item.get("error"):
                results.append(RewrapResult(tenant, None, "rewrap refused by transit"))
            else:
                ciphertext = item["ciphertext"]
                results.append(
                    RewrapResult(tenant, WrappedKey(ciphertext, kek_version_of(ciphertext)))
                )
        return results

    def _rewrap_one(self, tenant: str, wrapped: str) -> RewrapResult:
        try:
            response: dict[str, Any] = self._call(
                "rewrap a data key",
                lambda: self._transit.rewrap_data(
                    name=self.key_name,
                    ciphertext=wrapped,
                    context=_context(tenant),
                    mount_point=self.mount_point,
                ),
            )
        except hvac.exceptions.InvalidRequest:
            return RewrapResult(tenant, None, "rewrap refused by transit")
        ciphertext = response["data"]["ciphertext"]
        return RewrapResult(tenant, WrappedKey(ciphertext, kek_version_of(ciphertext)))

    def _ensure_mac_key(self) -> None:
        if self._mac_key_checked or not self._create_key:
            return
        try:
            self._call(
                "read the audit key",
                lambda: self._transit.read_key(name=self.mac_key, mount_point=self.mount_point),
            )
        except hvac.exceptions.InvalidPath:
            self._call(
                "create the audit key",
                lambda: self._transit.create_key(
                    name=self.mac_key, key_type="aes256-gcm96", mount_point=self.mount_point
                ),
            )
        except _PermissionDeniedError:
            pass  # the operator made it; a missing key fails clearly on use
        self._mac_key_checked = True

    def _mac(self, message: bytes) -> str:
        self._ensure_mac_key()
        answer: dict[str, Any] = self._call(
            "MAC with the audit key",
            lambda: self._transit.generate_hmac(
                name=self.mac_key,
                hash_input=base64.b64encode(message).decode(),
                algorithm="sha2-256",
                mount_point=self.mount_point,
            ),
        )
        return str(answer["data"]["hmac"])

    def _verify_mac(self, message: bytes, mac: str) -> bool:
        try:
            answer: dict[str, Any] = self._call(
                "verify with the audit key",
                lambda: self._transit.verify_signed_data(
                    name=self.mac_key,
                    hash_input=base64.b64encode(message).decode(),
                    hmac=mac,
                    hash_algorithm="sha2-256",
                    mount_point=self.mount_point,
                ),
            )
        except hvac.exceptions.InvalidRequest:
            return False  # not even a MAC of this key
        return bool(answer["data"]["valid"])

    def _rotate(self) -> int:
        self.ensure_key()
        self._call(
            "rotate the transit key",
            lambda: self._transit.rotate_key(name=self.key_name, mount_point=self.mount_point),
        )
        return self._latest_version()

    def _key_info(self) -> dict[str, Any]:
        self.ensure_key()
        info: dict[str, Any] = self._call(
            "read the transit key",
            lambda: self._transit.read_key(name=self.key_name, mount_point=self.mount_point),
        )
        return info["data"]  # type: ignore[no-any-return]

    def _latest_version(self) -> int:
        return int(self._key_info()["latest_version"])

    def _min_version(self) -> int:
        return int(self._key_info()["min_decryption_version"])

    def _set_min_version(self, version: int) -> None:
        self.ensure_key()
        self._call(
            "set the key's min_decryption_version",
            lambda: self._transit.update_key_configuration(
                name=self.key_name, min_decryption_version=version, mount_point=self.mount_point
            ),
        )
