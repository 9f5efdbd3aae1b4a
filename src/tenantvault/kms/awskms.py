"""AWS KMS as the key provider (through an injected boto3 KMS client).

One symmetric KMS key wraps every data key: ``GenerateDataKey`` (AES_256) and
``Decrypt``, with the tenant id in the encryption context (``tenantvault:tenant``),
so a wrapped key moved to another tenant does not unwrap. The KEK rotation's rewrap
is ``ReEncrypt`` to the same key; ``rotate_kek`` is ``RotateKeyOnDemand``.

Wire format of a wrapped key (the text the database stores)::

    awskms:v<N>:<base64 of the CiphertextBlob>

The blob names its backing key version inside, opaquely; ``N`` is the KMS key's
version when the key was wrapped: 1 + the rotations ``ListKeyRotations`` lists,
read *before* the wrap, so a rotation racing it can only make ``N`` too low (an
extra rewrap later), never name a version that did not wrap it.

AWS keeps every backing key version able to decrypt: ``min_decryption_version`` is
always 1 and raising it is refused. ``Decrypt`` and ``ReEncrypt`` take one item a
request, so a batch is a bounded thread pool of single calls. Only transient
failures (no connection, 5xx, throttling) are retried, inside the configured
timeout; botocore's own retries are off so that the timeout holds.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from tenantvault.errors import (
    DecryptionError,
    KeyProviderError,
    KeyProviderRefused,
    KeyProviderUnavailable,
)
from tenantvault.kms.provider import (
    PROBE_TENANTS,
    CheckedKeyProvider,
    KmsStatus,
    RewrapResult,
    UnwrapResult,
    WrappedKey,
)

T = TypeVar("T")

TENANT_CONTEXT = "tenantvault:tenant"
"""The encryption-context key that binds a wrapped data key to its tenant."""

_PREFIX = "awskms"
_MAC_ALGORITHM = "HMAC_SHA_256"
_MAC_MESSAGE_LIMIT = 4096  # GenerateMac's limit on Message
# The caller is not allowed (key policy, IAM, grants) or not known (credentials).
_REFUSED = {
    "AccessDeniedException",
    "AccessDenied",  # what an IAM policy's denial answers
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
}
_INVALID_MAC = "KMSInvalidMacException"
# The request reached a KMS that refused this ciphertext or this key's state: the
# item's own failure. Which key state it was is said; never anything of the key.
_UNUSABLE = {
    "InvalidCiphertextException": "",
    "IncorrectKeyException": "",
    "DisabledException": "the AWS KMS key is disabled",
    "KMSInvalidStateException": "the AWS KMS key is not in a usable state (pending deletion?)",
    "NotFoundException": "the AWS KMS key does not exist",
    "KeyUnavailableException": "the AWS KMS key is unavailable",
    _INVALID_MAC: "",  # VerifyMac: not this key's MAC of this message
}
# Worth another try inside the timeout: the service, not the request, failed.
_TRANSIENT = {
    "KMSInternalException",
    "DependencyTimeoutException",
    "ThrottlingException",
    "ServiceUnavailable",
    "InternalFailure",
}
_NO_CONNECTION = (EndpointConnectionError, ConnectionClosedError)
_NOT_UNWRAPPED = "cannot unwrap data key"


class _UnusableError(KeyProviderError):
    """KMS refused one item (a ciphertext that does not open here, or the key's state)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "") or "")


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transient(error: ClientError) -> bool:
    return _code(error) in _TRANSIENT or _status(error) >= 500


def _item_error(code: str) -> str:
    """What a refused item says: the generic failure, plus the key's state if that was it."""
    state = _UNUSABLE.get(code, "")
    return f"{_NOT_UNWRAPPED}: {state} ({code})" if state else _NOT_UNWRAPPED


def _context(tenant_id: str) -> dict[str, str]:
    return {TENANT_CONTEXT: tenant_id}


class AwsKmsKeyProvider(CheckedKeyProvider):
    """Data keys generated, unwrapped and rewrapped by one symmetric key in AWS KMS."""

    def __init__(
        self,
        client: Any,
        *,
        key_id: str,
        mac_key_id: str | None = None,
        timeout_seconds: float = 5.0,
        batch_size: int = 200,
        concurrency: int = 8,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Args:
        client: a boto3 KMS client whose config sets no retries of its own and the
            connect and read timeouts (:func:`tenantvault.kms.factory.awskms_client`).
        key_id: the symmetric KMS key (id, ARN, or alias) that wraps data keys.
        mac_key_id: the HMAC_256 KMS key that MACs the audit log's markers (None:
            MACs are refused, naming the setting).
        concurrency: how many single Decrypt/ReEncrypt calls of a batch run at once.
        """
        if not key_id:
            raise ValueError("key_id is required")
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size must be 1..1000")
        if not 1 <= concurrency <= 64:
            raise ValueError("concurrency must be 1..64")
        self._client = client
        self.key_id = key_id
        self.mac_key_id = mac_key_id
        self.timeout_seconds = timeout_seconds
        self.batch_size = batch_size
        self.concurrency = concurrency
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"AwsKmsKeyProvider(key={self.key_id})"

    @property
    def ref(self) -> str:
        """This KEK as a key reference: ``awskms:<key id, ARN or alias>``."""
        return f"{_PREFIX}:{self.key_id}"

    def for_key(self, key_id: str) -> AwsKmsKeyProvider:
        """A provider for another KMS key (a tenant's own), sharing this one's client."""
        return AwsKmsKeyProvider(
            self._client,
            key_id=key_id,
            mac_key_id=self.mac_key_id,
            timeout_seconds=self.timeout_seconds,
            batch_size=self.batch_size,
            concurrency=self.concurrency,
            sleep=self._sleep,
        )

    @property
    def address(self) -> str:
        """Where the client sends its requests (the endpoint URL, region included)."""
        return str(getattr(self._client.meta, "endpoint_url", "") or "AWS KMS")

    def _call(
        self, what: str, request: Callable[[], T], *, stop: threading.Event | None = None
    ) -> T:
        """``request()``, retried on transient failures until the timeout has passed.

        Raises:
            KeyProviderUnavailable: no answer within the timeout (or ``stop`` was set).
            KeyProviderRefused: the caller may not (denied, unknown credentials).
            _UnusableError: the ciphertext or the key's state refused this request.
            KeyProviderError: any other refusal, named by its error code.
        """
        deadline = time.monotonic() + self.timeout_seconds
        delay = 0.05
        while True:
            try:
                return request()
            except (ConnectTimeoutError, ReadTimeoutError):
                raise KeyProviderUnavailable(
                    f"could not {what}: AWS KMS at {self.address} did not answer within "
                    f"{self.timeout_seconds:g}s"
                ) from None
            except _NO_CONNECTION:
                failure = "is unreachable (no connection)"
            except (NoCredentialsError, PartialCredentialsError):
                raise KeyProviderRefused(
                    f"could not {what}: no AWS credentials (boto3 found none: set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or a role)"
                ) from None
            except ClientError as exc:
                code = _code(exc)
                if not _transient(exc):
                    # A 401/403 refuses the caller whatever its body says (an IAM
                    # denial in front of KMS may not be KMS's JSON).
                    caller = _status(exc) in (401, 403)
                    raise self._refusal(what, code or str(_status(exc)), caller=caller) from None
                failure = f"answered with a server error ({code or 'HTTP 5xx'})"
            except BotoCoreError as exc:
                raise KeyProviderError(
                    f"could not {what}: the AWS client failed ({type(exc).__name__})"
                ) from None
            if (stop is not None and stop.is_set()) or time.monotonic() + delay >= deadline:
                raise KeyProviderUnavailable(
                    f"could not {what}: AWS KMS at {self.address} {failure}"
                )
            self._sleep(delay)
            delay *= 2

    def _refusal(self, what: str, code: str, *, caller: bool = False) -> KeyProviderError:
        if caller or code in _REFUSED:
            return KeyProviderRefused(
                f"could not {what}: AWS KMS refused this caller the key {self.key_id} ({code})"
            )
        if code in _UNUSABLE:
            state = _UNUSABLE[code] or "the ciphertext does not open with this key and context"
            return _UnusableError(f"could not {what}: {state} ({code})", code)
        return KeyProviderError(f"could not {what}: AWS KMS refused the request ({code})")

    def _each(
        self, what: str, batch: Sequence[tuple[str, str]], one: Callable[[str, str], T]
    ) -> list[T | _UnusableError | KeyProviderRefused]:
        """``one(tenant, wrapped)`` for every item, ``concurrency`` at a time, in order:
        its value, or the item's refusal. No answer (unavailable) stops the rest and is
        raised; a refusal of the caller is raised when no item was served (then it is
        the caller's, not an item's)."""
        stop = threading.Event()

        def run(item: tuple[str, str]) -> T | KeyProviderError:
            if stop.is_set():
                return KeyProviderUnavailable(f"could not {what}: stopped after another failed")
            try:
                return self._call(what, lambda: one(*item), stop=stop)
            except (_UnusableError, KeyProviderRefused) as exc:
                return exc
            except KeyProviderError as exc:
                stop.set()
                return exc

        if len(batch) <= 1 or self.concurrency == 1:
            answered = [run(item) for item in batch]
        else:
            workers = min(self.concurrency, len(batch))
            with ThreadPoolExecutor(workers, thread_name_prefix="awskms") as pool:
                answered = list(pool.map(run, batch))
        # The first failure that is no item's own: the KMS did not serve the batch.
        for result in answered:
            if isinstance(result, KeyProviderError) and not isinstance(
                result, (_UnusableError, KeyProviderRefused)
            ):
                raise result
        refused = [r for r in answered if isinstance(r, KeyProviderRefused)]
        if refused and len(refused) + _count_unusable(answered) == len(answered):
            raise refused[0]
        return answered  # type: ignore[return-value]

    def _blob(self, wrapped: str) -> bytes:
        """The CiphertextBlob inside ``wrapped``; a wrapping that is not AWS KMS's, or
        not base64, is that item's failure (no request is made for it)."""
        if not wrapped.startswith(f"{_PREFIX}:"):
            raise _UnusableError("wrapped key was not made by AWS KMS", "")
        try:
            return base64.b64decode(wrapped.split(":", 2)[2], validate=True)
        except (binascii.Error, ValueError):
            raise _UnusableError(_NOT_UNWRAPPED, "") from None

    def _wrapped(self, blob: bytes, version: int) -> WrappedKey:
        return WrappedKey(f"{_PREFIX}:v{version}:{base64.b64encode(blob).decode()}", version)

    def _generate(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        version = self._latest_version()  # before the wrap: never a version above its own
        answer: dict[str, Any] = self._call(
            "generate a data key",
            lambda: self._client.generate_data_key(
                KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=_context(tenant_id)
            ),
        )
        return bytes(answer["Plaintext"]), self._wrapped(answer["CiphertextBlob"], version)

    def _wrap_key(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        """A data key made elsewhere, wrapped by this key for ``tenant_id`` (Encrypt)."""
        version = self._latest_version()  # before the wrap, as in _generate
        answer: dict[str, Any] = self._call(
            "wrap a data key",
            lambda: self._client.encrypt(
                KeyId=self.key_id, Plaintext=plaintext, EncryptionContext=_context(tenant_id)
            ),
        )
        return self._wrapped(answer["CiphertextBlob"], version)

    def _decrypt(self, tenant_id: str, wrapped: str) -> bytes:
        blob = self._blob(wrapped)
        answer: dict[str, Any] = self._client.decrypt(
            CiphertextBlob=blob, KeyId=self.key_id, EncryptionContext=_context(tenant_id)
        )
        return bytes(answer["Plaintext"])

    def _unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        try:
            return self._call("unwrap a data key", lambda: self._decrypt(tenant_id, wrapped))
        except _UnusableError as exc:
            raise DecryptionError(_failure(exc)) from None

    def _unwrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        answered = self._each("unwrap data keys", batch, self._decrypt)
        return [
            UnwrapResult(tenant, error=_failure(result))
            if isinstance(result, Exception)
            else UnwrapResult(tenant, result)
            for (tenant, _), result in zip(batch, answered, strict=True)
        ]

    def _rewrap_batch(self, batch: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        version = self._latest_version()  # before the rewrap, as in _generate

        def reencrypt(tenant_id: str, wrapped: str) -> WrappedKey:
            answer: dict[str, Any] = self._client.re_encrypt(
                CiphertextBlob=self._blob(wrapped),
                SourceKeyId=self.key_id,
                SourceEncryptionContext=_context(tenant_id),
                DestinationKeyId=self.key_id,
                DestinationEncryptionContext=_context(tenant_id),
            )
            return self._wrapped(answer["CiphertextBlob"], version)

        answered = self._each("rewrap data keys", batch, reencrypt)
        return [
            RewrapResult(tenant, None, f"rewrap refused by AWS KMS ({_failure(result)})")
            if isinstance(result, Exception)
            else RewrapResult(tenant, result)
            for (tenant, _), result in zip(batch, answered, strict=True)
        ]

    def _rotate(self) -> int:
        before = self._latest_version()
        self._call(
            "rotate the AWS KMS key",
            lambda: self._client.rotate_key_on_demand(KeyId=self.key_id),
        )
        # The rotation finishes in the background; it is listed once it has.
        deadline = time.monotonic() + self.timeout_seconds
        while (latest := self._latest_version()) <= before:
            if time.monotonic() >= deadline:
                raise KeyProviderError(
                    f"AWS KMS began rotating key {self.key_id} but did not list the rotation "
                    f"within {self.timeout_seconds:g}s: once it does, run "
                    "`tenantvault rotate-keys kek --no-rotate`"
                )
            self._sleep(0.2)
        return latest

    def _latest_version(self) -> int:
        """1 + the rotations of the key (automatic and on demand) ``ListKeyRotations`` lists."""
        rotations = 0
        marker: dict[str, str] = {}
        while True:
            page: dict[str, Any] = self._call(
                "list the AWS KMS key's rotations",
                partial(self._client.list_key_rotations, KeyId=self.key_id, **marker),
            )
            rotations += len(page.get("Rotations", []))
            if not (page.get("Truncated") and page.get("NextMarker")):
                return 1 + rotations
            marker = {"Marker": page["NextMarker"]}

    def _min_version(self) -> int:
        return 1  # every backing key version of a KMS key decrypts for the key's life

    def _set_min_version(self, version: int) -> None:
        raise KeyProviderError(
            "AWS KMS keeps every version of a key able to decrypt: min_decryption_version "
            "stays 1 and cannot be raised (to retire old key material, move to a new KMS key)"
        )

    def _mac_key(self) -> str:
        if not self.mac_key_id:
            raise KeyProviderError(
                "TENANTVAULT_AWSKMS_AUDIT_KEY_ID is not set: the audit log's markers need "
                "an HMAC_256 key in AWS KMS"
            )
        return self.mac_key_id

    def _mac(self, message: bytes) -> str:
        if len(message) > _MAC_MESSAGE_LIMIT:
            raise KeyProviderError(f"AWS KMS MACs at most {_MAC_MESSAGE_LIMIT} bytes")
        key = self._mac_key()
        answer: dict[str, Any] = self._call(
            "MAC with the audit key",
            lambda: self._client.generate_mac(
                KeyId=key, Message=message, MacAlgorithm=_MAC_ALGORITHM
            ),
        )
        return f"{_PREFIX}:v1:" + base64.b64encode(answer["Mac"]).decode()

    def _verify_mac(self, message: bytes, mac: str) -> bool:
        if not mac.startswith(f"{_PREFIX}:v1:") or len(message) > _MAC_MESSAGE_LIMIT:
            return False
        try:
            raw = base64.b64decode(mac.removeprefix(f"{_PREFIX}:v1:"), validate=True)
        except (binascii.Error, ValueError):
            return False
        key = self._mac_key()
        try:
            answer: dict[str, Any] = self._call(
                "verify with the audit key",
                lambda: self._client.verify_mac(
                    KeyId=key, Message=message, Mac=raw, MacAlgorithm=_MAC_ALGORITHM
                ),
            )
        except _UnusableError as exc:
            if exc.code == _INVALID_MAC:
                return False
            raise
        return bool(answer.get("MacValid"))

    def status(self) -> KmsStatus:
        """Whether AWS KMS answers and the key is enabled, symmetric, and usable by this
        caller (a data key wrapped and unwrapped for a probe context). Never raises."""
        label = f"the AWS KMS key {self.key_id}"
        try:
            described: dict[str, Any] = self._call(
                "describe the AWS KMS key", lambda: self._client.describe_key(KeyId=self.key_id)
            )
        except KeyProviderUnavailable as exc:
            # "... AWS KMS at <address> is unreachable (no connection)": the phrase after it.
            why = str(exc).partition(f" at {self.address} ")[2].removeprefix("is ")
            return KmsStatus(_KIND, self.address, False, False, why or str(exc))
        except KeyProviderError as exc:  # it answered, and refused: not shown usable
            return KmsStatus(
                _KIND,
                self.address,
                True,
                False,
                summary="key NOT usable",
                key_label=label,
                key_detail=f"not checked: {exc}",
            )
        problem = _unusable_metadata(described["KeyMetadata"])
        if problem:
            return KmsStatus(
                _KIND,
                self.address,
                True,
                False,
                summary=f"key NOT usable: {problem}",
                key_label=label,
                key_detail=f"missing: {label} {problem}",
            )
        try:
            _, probe = self.generate_data_key(PROBE_TENANTS[0])
            self.unwrap(PROBE_TENANTS[0], probe.ciphertext)
            latest = self.kek_version()
        except (KeyProviderError, DecryptionError) as exc:
            return KmsStatus(
                _KIND,
                self.address,
                True,
                False,
                summary="key NOT usable by this caller",
                key_label=label,
                key_detail=f"not checked: {exc}",
            )
        return KmsStatus(
            _KIND,
            self.address,
            True,
            True,
            summary="key enabled, may wrap and unwrap",
            key_versions=(1, latest),
            key_label=label,
        )


_KIND = "aws kms"


def _unusable_metadata(metadata: dict[str, Any]) -> str:
    """Why DescribeKey's answer shows a key that cannot wrap data keys ("" if it can)."""
    state = metadata.get("KeyState", "")
    if state != "Enabled":
        return f"is {state or 'not enabled'}"
    if metadata.get("KeySpec", metadata.get("CustomerMasterKeySpec")) != "SYMMETRIC_DEFAULT":
        return "is not a symmetric key (SYMMETRIC_DEFAULT)"
    # AWS always answers KeyUsage; moto leaves it out for a key made without one.
    if metadata.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
        return "is not for ENCRYPT_DECRYPT"
    return ""


def _count_unusable(answered: Sequence[object]) -> int:
    return sum(isinstance(r, _UnusableError) for r in answered)


def _failure(error: Exception) -> str:
    """An item's error text: the key's state or the generic failure, never more."""
    if isinstance(error, _UnusableError):
        return _item_error(error.code) if error.code else str(error)
    return f"{_NOT_UNWRAPPED}: refused ({type(error).__name__})"
