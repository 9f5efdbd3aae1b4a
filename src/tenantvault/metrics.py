"""tenantvault's metrics, through the OpenTelemetry metrics API (the ``tenantvault`` meter).

Only ``opentelemetry-api`` is a dependency: without an SDK in the application every
instrument is a no-op. An application that configures a ``MeterProvider`` reads them
through it: the global one by default (:func:`default_metrics`, which follows a
provider set after tenantvault was imported), or one handed to
``Vault.from_settings(meter_provider=...)``.

Every attribute value comes from a small fixed set named below: never a tenant id
(tenants are many; one series each would swamp the backend), a config id, a key
or any part of a secret. The README's "Metrics" section lists the instruments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Literal, TypeVar, get_args

from opentelemetry import metrics as otel
from opentelemetry.metrics import MeterProvider

from tenantvault.errors import KeyProviderRefused, KeyProviderUnavailable

T = TypeVar("T")

EvictionReason = Literal[
    "max_age", "max_uses", "max_entries", "wrapping_changed", "tenant_evicted", "cleared"
]
"""Why the key cache dropped a key: its age, its uses, room for another key, a row
stored under another wrapping since, ``evict_tenant`` (a shred), ``clear``."""

LoadPath = Literal["hot", "full"]
"""``hot``: one statement and the cached key; ``full``: the transaction that may ask
the key provider (a key not cached, ``session=``, load auditing)."""

RotationKind = Literal["dek", "kek"]

# From a few microseconds (a cached load) to the key provider's timeout: the SDK's
# default boundaries (0, 5, 10, ... 10000) are made for milliseconds and would put
# every load in the first bucket.
DURATION_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Attribute sets built once: a measurement on the hot path allocates none.
_HOT: Final = {"path": "hot"}
_FULL: Final = {"path": "full"}
_REASONS: Final[Mapping[str, Mapping[str, str]]] = {
    reason: {"reason": reason} for reason in get_args(EvictionReason)
}


def _outcome(exc: BaseException | None) -> str:
    """A provider call's outcome: ``ok``, ``unavailable`` (unreachable, sealed, timed
    out), ``refused`` (the token may not) or ``error`` (anything else, such as a
    wrapping that does not open)."""
    if exc is None:
        return "ok"
    if isinstance(exc, KeyProviderUnavailable):
        return "unavailable"
    if isinstance(exc, KeyProviderRefused):
        return "refused"
    return "error"


def _version() -> str:
    try:
        return version("tenantvault")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return ""


class Metrics:
    """The instruments of one meter provider, and the measurements tenantvault takes."""

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        """Instruments on ``meter_provider``'s ``tenantvault`` meter; the global
        provider's when None (a proxy until the application sets one)."""
        meter = otel.get_meter("tenantvault", _version(), meter_provider=meter_provider)
        self.key_cache_hits = meter.create_counter(
            "tenantvault.key_cache.hits",
            unit="{hit}",
            description="Data key lookups the key cache served.",
        )
        self.key_cache_misses = meter.create_counter(
            "tenantvault.key_cache.misses",
            unit="{miss}",
            description="Data keys the key cache did not hold and loaded "
            "(concurrent callers for one key share one load and one miss).",
        )
        self.key_cache_evictions = meter.create_counter(
            "tenantvault.key_cache.evictions",
            unit="{eviction}",
            description="Data keys the key cache dropped, by reason.",
        )
        self.provider_calls = meter.create_counter(
            "tenantvault.key_provider.calls",
            unit="{call}",
            description="Calls to the key provider (Vault transit), by operation and outcome.",
        )
        self.provider_duration = meter.create_histogram(
            "tenantvault.key_provider.duration",
            unit="s",
            description="Duration of key provider calls, retries included.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.load_duration = meter.create_histogram(
            "tenantvault.credentials.load.duration",
            unit="s",
            description="Duration of successful credential loads, by path.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.store_duration = meter.create_histogram(
            "tenantvault.credentials.store.duration",
            unit="s",
            description="Duration of successful credential stores.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.rotation_progress = meter.create_counter(
            "tenantvault.rotation.progress",
            unit="{item}",
            description="Rotation work committed: sealed values re-sealed (dek), "
            "wrapped data keys rewrapped (kek).",
        )
        self.rotation_tenants = meter.create_counter(
            "tenantvault.rotation.tenants",
            unit="{tenant}",
            description="Tenants a data key rotation finished with, by outcome.",
        )
        self._dek: Final = {"kind": "dek"}
        self._kek: Final = {"kind": "kek"}

    # --- the key cache ---

    def cache_hit(self) -> None:
        self.key_cache_hits.add(1)

    def cache_miss(self) -> None:
        self.key_cache_misses.add(1)

    def cache_evicted(self, reason: EvictionReason, count: int = 1) -> None:
        if count:
            self.key_cache_evictions.add(count, _REASONS[reason])

    # --- the key provider ---

    def provider_call(self, operation: str, call: Callable[[], T]) -> T:
        """``call()``, counted and timed as ``operation`` of the key provider."""
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return call()
        except BaseException as exc:
            failure = exc
            raise
        finally:
            attributes = {"operation": operation, "outcome": _outcome(failure)}
            self.provider_duration.record(time.perf_counter() - started, attributes)
            self.provider_calls.add(1, attributes)

    # --- loads and stores ---

    def loaded(self, started: float, path: LoadPath) -> None:
        """A load that began at ``started`` (``time.perf_counter()``) succeeded."""
        self.load_duration.record(time.perf_counter() - started, _HOT if path == "hot" else _FULL)

    @contextmanager
    def timed_store(self) -> Iterator[None]:
        """Time the block as a credential store (recorded when it succeeds)."""
        started = time.perf_counter()
        yield
        self.store_duration.record(time.perf_counter() - started)

    # --- rotation ---

    def rotated(self, kind: RotationKind, items: int) -> None:
        """``items`` values re-sealed (dek) or keys rewrapped (kek) were committed."""
        if items:
            self.rotation_progress.add(items, self._dek if kind == "dek" else self._kek)

    def rotation_tenant_done(self, outcome: str) -> None:
        """A data key rotation finished a tenant (``TenantRotation.outcome``)."""
        self.rotation_tenants.add(1, {"outcome": outcome})


_default: Metrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> Metrics:
    """The instruments on the global meter provider, made on first use.

    The API's global provider is a proxy until the application sets one; the proxy's
    instruments then forward to the real provider's, so a provider set after this
    call (or after tenantvault was imported) still gets every measurement."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Metrics()
    return _default
