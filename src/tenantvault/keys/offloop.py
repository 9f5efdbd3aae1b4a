"""A key provider whose calls never block the event loop: the keyring of ``AsyncVault``.

It wraps the sync provider (transit with its timeouts, retries and AppRole
renewal, or the local one) unchanged and runs each call in a thread pool of its
own, the calling task suspended meanwhile (:func:`tenantvault.db.bridge.off_loop`).
One implementation of the provider serves both facades; only where it runs
differs. Its own pool bounds how many transit requests one process has in
flight, and keeps them from starving the application's ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tenantvault.db.bridge import off_loop
from tenantvault.kms.provider import KeyProvider, RewrapResult, UnwrapResult, WrappedKey


class OffLoopKeyProvider:
    """``inner``'s methods, each run in a worker thread; call inside the bridge's greenlet."""

    def __init__(
        self,
        inner: KeyProvider,
        *,
        max_workers: int = 8,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """Wrap ``inner``; at most ``max_workers`` of its calls run at once (in
        ``executor`` when given: the pool of the provider it shares with)."""
        self.inner = inner
        self._executor = executor or ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="tenantvault-kms"
        )

    def sharing(self, inner: KeyProvider) -> OffLoopKeyProvider:
        """``inner`` (a tenant's KEK) run in this provider's worker threads."""
        return OffLoopKeyProvider(inner, executor=self._executor)

    def __repr__(self) -> str:
        return f"OffLoopKeyProvider({self.inner!r})"

    def close(self) -> None:
        """Let the worker threads end once their calls are done."""
        self._executor.shutdown(wait=False)

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def ref(self) -> str:
        return self.inner.ref

    def wrap(self, tenant_id: str, plaintext: bytes) -> WrappedKey:
        return off_loop(self._executor, self.inner.wrap, tenant_id, plaintext)

    def check_usable(self) -> None:
        off_loop(self._executor, self.inner.check_usable)

    def generate_data_key(self, tenant_id: str) -> tuple[bytes, WrappedKey]:
        return off_loop(self._executor, self.inner.generate_data_key, tenant_id)

    def unwrap(self, tenant_id: str, wrapped: str) -> bytes:
        return off_loop(self._executor, self.inner.unwrap, tenant_id, wrapped)

    def unwrap_many(self, items: Sequence[tuple[str, str]]) -> list[UnwrapResult]:
        return off_loop(self._executor, self.inner.unwrap_many, items)

    def rewrap(self, items: Sequence[tuple[str, str]]) -> list[RewrapResult]:
        return off_loop(self._executor, self.inner.rewrap, items)

    def rotate_kek(self) -> int:
        return off_loop(self._executor, self.inner.rotate_kek)

    def kek_version(self) -> int:
        return off_loop(self._executor, self.inner.kek_version)

    def min_decryption_version(self) -> int:
        return off_loop(self._executor, self.inner.min_decryption_version)

    def set_min_decryption_version(self, version: int) -> None:
        off_loop(self._executor, self.inner.set_min_decryption_version, version)

    def mac(self, message: bytes) -> str:
        return off_loop(self._executor, self.inner.mac, message)

    def verify_mac(self, message: bytes, mac: str) -> bool:
        return off_loop(self._executor, self.inner.verify_mac, message, mac)
