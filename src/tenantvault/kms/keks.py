"""KEKs by reference: the deployment's and any tenant's own (a customer-managed key).

A key reference names a KEK as ``<provider>:<the provider's name of the key>``:
``transit:tenantvault`` (a key on the configured transit mount), ``awskms:<key id or
ARN>``. Every data key row records the reference of the KEK that wrapped it, so
unwrapping never guesses, and a tenant's KEK can change while older keys still open.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from tenantvault.errors import InvalidInputError, KeyProviderError
from tenantvault.kms.provider import KeyProvider

# As the database's CHECK (db/models.KEK_REF_PATTERN); no whitespace, no control bytes.
_REF = re.compile(r"^([a-z][a-z0-9]*):([\x21-\x7e]{1,2048})$")


def split_ref(ref: str, *, field: str = "key") -> tuple[str, str]:
    """``(provider, key)`` of a key reference.

    Raises:
        InvalidInputError: not ``<provider>:<key>`` (names ``field``, not the value).
    """
    match = _REF.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise InvalidInputError(
            f"{field} must be a key reference: transit:<key name> or awskms:<key id or ARN>"
        )
    return match.group(1), match.group(2)


Resolve = Callable[[str], KeyProvider]
"""Builds the provider of a KEK reference other than the deployment's."""


class Keks:
    """The KEKs a keyring unwraps and wraps with, each built once on first use."""

    def __init__(self, default: KeyProvider, resolve: Resolve | None = None) -> None:
        """``default``: the deployment's KEK; ``resolve``: the provider of any other
        reference (None: only the default is known, as with a key provider an
        application built itself)."""
        self.default = default
        self.default_ref = default.ref
        self._resolve = resolve
        self._providers: dict[str, KeyProvider] = {self.default_ref: default}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Keks(default={self.default_ref!r}, known={len(self._providers)})"

    def is_default(self, ref: str) -> bool:
        return ref == self.default_ref

    def provider(self, ref: str) -> KeyProvider:
        """The provider of ``ref``.

        Raises:
            KeyProviderError: no provider of this deployment serves ``ref``.
        """
        found = self._providers.get(ref)
        if found is not None:
            return found
        split_ref(ref)
        if self._resolve is None:
            raise KeyProviderError(
                f"no key provider for KEK {ref}: this keyring knows only {self.default_ref}"
            )
        with self._lock:
            found = self._providers.get(ref)
            if found is None:
                found = self._providers[ref] = self._resolve(ref)
        return found
