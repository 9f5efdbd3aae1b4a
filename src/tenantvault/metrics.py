"""tenantvault's metrics, through the OpenTelemetry metrics API (the ``tenantvault`` meter).

Only ``opentelemetry-api`` is a dependency: without an SDK in the application every
instrument is a no-op. An application that configures a ``MeterProvider`` reads them
through it: the global one by default (:func:`default_metrics`, which follows a
provider set after tenantvault was imported), or one handed to
``Vault.from_settings(meter_provider=...)``.

Every attribute value comes from a small fixed set named below: never a tenant id
(tenants are many; one series each would swamp the backend), a config id, a key
or any part of a secret. The README's "Metrics" section lists the instruments.

The hot path pays for one measurement: a load's duration. A synchronous
measurement through the SDK costs microseconds (a load costs about a hundred), so
what happens on every load besides it, the key cache's hits and misses, is
counted in plain integers under the cache's own lock and read by observable
counters when the SDK collects.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Literal, TypeVar, get_args

from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from tenantvault.errors import KeyProviderRefused, KeyProviderUnavailable

T = TypeVar("T")

EvictionReason = Literal[
    "max_age",
    "max_uses",
    "max_entries",
    "wrapping_changed",
    "retired",
    "tenant_evicted",
    "cleared",
]
"""Why the key cache dropped a key: its age, its uses, room for another key, a row
stored under another wrapping since, the key retired or destroyed since (another
process rotated or shredded the tenant), ``evict_tenant`` (a shred), ``clear``."""

RotationKind = Literal["dek", "kek"]
OAuthOutcome = Literal["refreshed", "reconsent_required", "failed", "unavailable"]
TokenEventOutcome = Literal["reconsent_required", "failed", "recovered"]

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

EVICTION_REASONS: Final[tuple[EvictionReason, ...]] = get_args(EvictionReason)


@dataclass
class CacheCounts:
    """One key cache's counts since it was made: kept by the cache under its lock,
    read when the SDK collects. Never reset, so the sums stay monotonic."""

    hits: int = 0
    misses: int = 0
    evictions: dict[EvictionReason, int] = field(
        default_factory=lambda: dict.fromkeys(EVICTION_REASONS, 0)
    )


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
        # Every cache made on these instruments, alive or not: a cache's counts stay
        # part of the sums after it is gone (a counter that shrank would read as a reset).
        self._caches: list[CacheCounts] = []
        self._caches_lock = threading.Lock()
        meter.create_observable_counter(
            "tenantvault.key_cache.hits",
            [self._observe_hits],
            unit="{hit}",
            description="Data key lookups the key cache served.",
        )
        meter.create_observable_counter(
            "tenantvault.key_cache.misses",
            [self._observe_misses],
            unit="{miss}",
            description="Data keys the key cache did not hold and loaded "
            "(concurrent callers for one key share one load and one miss).",
        )
        meter.create_observable_counter(
            "tenantvault.key_cache.evictions",
            [self._observe_evictions],
            unit="{eviction}",
            description="Data keys the key cache dropped, by reason.",
        )
        self.provider_calls = meter.create_counter(
            "tenantvault.key_provider.calls",
            unit="{call}",
            description="Calls to the key provider (transit), by operation and outcome.",
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
            description="Duration of successful credential loads.",
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
        self.oauth_refreshes = meter.create_counter(
            "tenantvault.oauth.refreshes",
            unit="{refresh}",
            description="Managed OAuth token refreshes, by outcome (refreshed, "
            "reconsent_required, failed, unavailable).",
        )
        self.oauth_events = meter.create_counter(
            "tenantvault.oauth.events",
            unit="{event}",
            description="OAuth grant events handed to on_token_event, by outcome "
            "(reconsent_required, failed, recovered).",
        )
        self._dek: Final = {"kind": "dek"}
        self._kek: Final = {"kind": "kek"}

    # --- the key cache ---

    def cache_counts(self) -> CacheCounts:
        """New counts for a key cache to keep, summed into the key cache counters."""
        counts = CacheCounts()
        with self._caches_lock:
            self._caches.append(counts)
        return counts

    def _counted(self) -> list[CacheCounts]:
        with self._caches_lock:
            return list(self._caches)

    def _observe_hits(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(sum(c.hits for c in self._counted()))]

    def _observe_misses(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(sum(c.misses for c in self._counted()))]

    def _observe_evictions(self, _: CallbackOptions) -> Iterable[Observation]:
        caches = self._counted()
        return [
            Observation(sum(c.evictions[reason] for c in caches), {"reason": reason})
            for reason in EVICTION_REASONS
        ]

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

    def loaded(self, started: float) -> None:
        """A load that began at ``started`` (``time.perf_counter()``) succeeded. No
        attribute: on the hot path an attribute set costs as much again as the record."""
        self.load_duration.record(time.perf_counter() - started)

    @contextmanager
    def timed_store(self) -> Iterator[None]:
        """Time the block as a credential store (recorded when it succeeds)."""
        started = time.perf_counter()
        yield
        self.store_duration.record(time.perf_counter() - started)

    # --- OAuth ---

    def oauth_refreshed(self, outcome: OAuthOutcome) -> None:
        """A managed refresh ended with ``outcome`` (it sent a request)."""
        self.oauth_refreshes.add(1, {"outcome": outcome})

    def oauth_event(self, outcome: TokenEventOutcome) -> None:
        """A grant failed for good, or recovered (what ``on_token_event`` is told)."""
        self.oauth_events.add(1, {"outcome": outcome})

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


_by_provider: weakref.WeakKeyDictionary[MeterProvider, Metrics] = weakref.WeakKeyDictionary()


def metrics_on(meter_provider: MeterProvider | None) -> Metrics:
    """The instruments on ``meter_provider`` (the global one's when None), one set per
    provider: the SDK hands a second registration of an instrument name the first
    one's instrument, so a second set's observable callbacks would never be read."""
    if meter_provider is None:
        return default_metrics()
    with _default_lock:
        found = _by_provider.get(meter_provider)
        if found is None:
            found = _by_provider[meter_provider] = Metrics(meter_provider)
        return found
