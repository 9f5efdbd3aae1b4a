"""Every statement on ``tenant_data_keys``: the one owner of the data-key states.

::

    (none) --create--> active --switch--> draining --retire--> retired
                       any state but destroyed --destroy--> destroyed (wrapped key erased)

Also the transit side of a key: finding keys wrapped under an older KEK version
and storing their rewrapped form. Each state change writes its audit event in
the same transaction. Statements run on the caller's connection: the
application's (scoped to one tenant by row-level security) or the operator's
(as the migrator role, every tenant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from tenantvault import audit
from tenantvault.db.models import AuditAction, DataKeyState, TenantDataKey, TenantKek
from tenantvault.db.session import function_name
from tenantvault.errors import RotationError
from tenantvault.kms.provider import WrappedKey

Key = TenantDataKey
ACTIVE, DRAINING, RETIRED, DESTROYED = (
    DataKeyState.ACTIVE,
    DataKeyState.DRAINING,
    DataKeyState.RETIRED,
    DataKeyState.DESTROYED,
)

TENANT_KEYS_LOCK = 1_953_916_001
"""Advisory lock class of a tenant's keys (the other half is ``hashtext(tenant_id)``)."""

_LOCK_SHARED = sa.text("SELECT pg_advisory_xact_lock_shared(:cls, hashtext(:tenant_id))")
_LOCK_EXCLUSIVE = sa.text("SELECT pg_advisory_xact_lock(:cls, hashtext(:tenant_id))")


def lock_tenant_keys(connection: sa.Connection, tenant_id: str, *, exclusive: bool) -> None:
    """Hold the tenant's key lock until the transaction ends (shared: sealing; exclusive:
    switching, retiring or destroying keys)."""
    statement = _LOCK_EXCLUSIVE if exclusive else _LOCK_SHARED
    connection.execute(statement, {"cls": TENANT_KEYS_LOCK, "tenant_id": tenant_id})


@dataclass(frozen=True)
class KeyStates:
    """A tenant's key versions by state."""

    active: int | None
    draining: list[int]
    destroyed: list[int]


@dataclass(frozen=True)
class KeyRow:
    tenant_id: str
    version: int
    state: DataKeyState
    kek_version: int
    seals: int
    kek_ref: str


# Whether this transaction made the row: such a key may still roll back, so it must not
# outlive the transaction in a cache. created_at defaults to the transaction's start
# (now()), which no other transaction shares but by a microsecond's coincidence (then
# a key merely skips the cache); unlike xmin, it holds inside savepoints too.
_OURS = (Key.created_at == sa.func.timezone("utc", sa.func.now())).label("ours")
# With each key, its KEK and how long its tenant lets it be cached (tenant_keks).
_KEK = (Key.kek_ref, TenantKek.cache_max_age_seconds)
_WITH_TENANT_KEK = sa.outerjoin(Key, TenantKek, TenantKek.tenant_id == Key.tenant_id)
_ACTIVE = (
    sa.select(Key.version, Key.wrapped_key, _OURS, *_KEK)
    .select_from(_WITH_TENANT_KEK)
    .where(Key.tenant_id == sa.bindparam("tenant_id"), Key.state == ACTIVE)
)
_VERSION = (
    sa.select(Key.wrapped_key, Key.state, _OURS, *_KEK)
    .select_from(_WITH_TENANT_KEK)
    .where(Key.tenant_id == sa.bindparam("tenant_id"), Key.version == sa.bindparam("version"))
)


@dataclass(frozen=True)
class StoredKey:
    """A key's wrapped form as stored, whether this transaction wrote it (uncommitted:
    it may yet roll back), and its state."""

    version: int
    wrapped: str
    uncommitted: bool
    kek_ref: str
    max_age_seconds: float | None = None
    state: DataKeyState = ACTIVE


def active(connection: sa.Connection, tenant_id: str) -> StoredKey | None:
    """The tenant's active key, or None when it has none."""
    row = connection.execute(_ACTIVE, {"tenant_id": tenant_id}).one_or_none()
    if row is None:
        return None
    assert row.wrapped_key is not None  # an active key always has its wrapped form (CHECK)
    return StoredKey(
        row.version, row.wrapped_key, bool(row.ours), row.kek_ref, row.cache_max_age_seconds
    )


def wrapped(connection: sa.Connection, tenant_id: str, version: int) -> StoredKey | None:
    """One key version as stored, with its state; None when it was destroyed. A retired
    key is returned too (the caller refuses to open with it: see ``Keyring._key``).

    Raises:
        LookupError: the tenant never had that version.
    """
    row = connection.execute(_VERSION, {"tenant_id": tenant_id, "version": version}).one_or_none()
    if row is None:
        raise LookupError(version)
    if row.state == DESTROYED or row.wrapped_key is None:
        return None
    return StoredKey(
        version,
        row.wrapped_key,
        bool(row.ours),
        row.kek_ref,
        row.cache_max_age_seconds,
        DataKeyState(row.state),
    )


@dataclass(frozen=True)
class TenantKey:
    """One tenant's usable key, wrapped as stored, with its KEK and how long the tenant
    lets it be cached (None: the deployment's setting)."""

    tenant_id: str
    version: int
    wrapped: str
    kek_ref: str
    max_age_seconds: float | None = None


def usable_keys(connection: sa.Connection, tenant_ids: Sequence[str]) -> list[TenantKey]:
    """The active and draining keys of each of ``tenant_ids``, tenant by tenant in their
    order, in one statement: migration 0012's function scopes the transaction to each
    tenant in turn, so row-level security admits each read, and clears the setting at
    the end. The app role's read; the ids are checked by the caller."""
    function = function_name(connection, "tenantvault_usable_data_keys")
    rows = connection.execute(
        sa.text(
            "SELECT tenant_id, version, wrapped_key, kek_ref, cache_max_age_seconds "
            f"FROM {function}(CAST(:tenant_ids AS text[]))"
        ),
        {"tenant_ids": list(tenant_ids)},
    )
    return [TenantKey(*row) for row in rows]


def usable_keys_of_any(connection: sa.Connection, tenant_ids: Sequence[str]) -> list[TenantKey]:
    """The active and draining keys of ``tenant_ids``, in one statement: the migrator's
    read (its row-level-security policy admits every tenant), for a rotation warming
    the keys of the tenants it is about to re-seal."""
    rows = connection.execute(
        sa.select(Key.tenant_id, Key.version, Key.wrapped_key, *_KEK)
        .select_from(_WITH_TENANT_KEK)
        .where(Key.tenant_id.in_(list(tenant_ids)), Key.state.in_([ACTIVE, DRAINING]))
        .order_by(Key.tenant_id, Key.version)
    )
    # An active or draining key always has its wrapped form (CHECK); the test is for the type.
    return [
        TenantKey(tenant, version, wrapped, ref, max_age)
        for tenant, version, wrapped, ref, max_age in rows
        if wrapped
    ]


def _insert_next(
    connection: sa.Connection, tenant_id: str, key: WrappedKey, kek_ref: str
) -> int | None:
    """Insert the tenant's next key version, active; None if another transaction took it.

    The one place a version number is chosen: one past the highest the tenant ever had
    (destroyed versions included, so a sealed value never names two keys)."""
    # The state is left to its default, active: the application role may insert only
    # these five columns (migrations 0009 and 0018).
    next_version = sa.select(
        sa.literal(tenant_id, sa.Text),
        sa.func.coalesce(sa.func.max(Key.version), 0) + 1,
        sa.literal(key.ciphertext, sa.Text),
        sa.literal(key.kek_version, sa.Integer),
        sa.literal(kek_ref, sa.Text),
    ).where(Key.tenant_id == tenant_id)
    insert = (
        pg_insert(Key)
        .from_select(
            ["tenant_id", "version", "wrapped_key", "kek_version", "kek_ref"], next_version
        )
        .on_conflict_do_nothing()
        .returning(Key.version)
    )
    return connection.execute(insert).scalar_one_or_none()


def create_first(
    connection: sa.Connection, tenant_id: str, key: WrappedKey, kek_ref: str
) -> int | None:
    """Store a tenant's first key, wrapped by ``kek_ref``; None when another process
    made one first (the primary key lets exactly one in)."""
    version = _insert_next(connection, tenant_id, key, kek_ref)
    if version is not None:
        audit.record(
            connection,
            tenant_id,
            AuditAction.DEK_CREATED,
            target_type="dek",
            target_id=str(version),
            details={"kek_version": key.kek_version, "kek_ref": kek_ref},
        )
    return version


class OlderKekVersionError(RotationError):
    """A new key wrapped under an older KEK version than the key it would replace."""


class KekChangedError(RotationError):
    """A new key wrapped by another KEK than the one its tenant now has."""

    def __init__(self, tenant_id: str, kek_ref: str) -> None:
        super().__init__(f"the KEK of tenant {tenant_id} is now {kek_ref}")
        self.kek_ref = kek_ref


def switch(
    connection: sa.Connection,
    tenant_id: str,
    from_version: int,
    key: WrappedKey,
    kek_ref: str,
    *,
    default_ref: str,
    actor: str,
) -> int:
    """The active key ``from_version`` starts draining and ``key`` becomes active, under
    the tenant's exclusive key lock; returns the new version.

    Raises:
        RotationError: ``from_version`` is not the active key any more.
        OlderKekVersionError: ``key`` was made before a KEK rotation that has rewrapped the
            active key since: stored, it would escape that rotation's rewrap, and once
            ``min_decryption_version`` is raised it would no longer unwrap. Nothing is
            written; make a new key.
        KekChangedError: ``kek_ref`` is not the tenant's KEK (``default_ref`` when it
            has none of its own) any more; nothing is written: make a new key under it.
    """
    lock_tenant_keys(connection, tenant_id, exclusive=True)
    chosen = tenant_kek(connection, tenant_id) or default_ref
    if chosen != kek_ref:
        raise KekChangedError(tenant_id, chosen)
    drained = connection.execute(
        sa.update(Key)
        .where(Key.tenant_id == tenant_id, Key.state == ACTIVE, Key.version == from_version)
        .values(state=DRAINING)
        .returning(Key.kek_version, Key.kek_ref)
    ).one_or_none()
    if drained is not None and drained.kek_ref == kek_ref and key.kek_version < drained.kek_version:
        raise OlderKekVersionError(
            f"the new data key of tenant {tenant_id} is wrapped under KEK version "
            f"{key.kek_version}, older than its active key's {drained.kek_version}"
        )
    version = None if drained is None else _insert_next(connection, tenant_id, key, kek_ref)
    if version is None:
        # Cannot happen while the caller holds its claim on the tenant; stop rather than guess.
        raise RotationError(f"the active data key of tenant {tenant_id} moved meanwhile")
    audit.record(
        connection,
        tenant_id,
        AuditAction.DEK_ROTATED,
        actor=actor,
        target_type="dek",
        target_id=str(version),
        details={"from_version": from_version, "kek_version": key.kek_version, "kek_ref": kek_ref},
    )
    return version


def retire_draining(
    connection: sa.Connection, tenant_id: str, active_version: int, *, actor: str
) -> list[int]:
    """Every draining key of the tenant becomes retired; returns their versions. The
    caller holds the exclusive key lock and has counted nothing left under them."""
    retired = sorted(
        connection.execute(
            sa.update(Key)
            .where(Key.tenant_id == tenant_id, Key.state == DRAINING)
            .values(state=RETIRED)
            .returning(Key.version)
        ).scalars()
    )
    for version in retired:
        audit.record(
            connection,
            tenant_id,
            AuditAction.DEK_RETIRED,
            actor=actor,
            target_type="dek",
            target_id=str(version),
            details={"active_version": active_version},
        )
    return retired


def destroy_all(
    connection: sa.Connection, tenant_id: str, *, sealed_values: int, actor: str
) -> list[int]:
    """Erase every wrapped key of the tenant (state destroyed); returns the versions.
    The caller holds the exclusive key lock."""
    destroyed = sorted(
        connection.execute(
            sa.update(Key)
            .where(Key.tenant_id == tenant_id, Key.state != DESTROYED)
            .values(state=DESTROYED, wrapped_key=None)
            .returning(Key.version)
        ).scalars()
    )
    if destroyed:
        audit.record(
            connection,
            tenant_id,
            AuditAction.DEK_DESTROYED,
            actor=actor,
            target_type="dek",
            target_id=",".join(map(str, destroyed)),
            details={"versions": [str(v) for v in destroyed], "sealed_values": sealed_values},
        )
    return destroyed


def count_seals(connection: sa.Connection, tenant_id: str, version: int, seals: int) -> None:
    """Add ``seals`` to the values sealed under one key (its nonce budget). In the
    sealing transaction, the count never includes a seal that rolled back; it holds the
    key row's lock until commit, so callers do it after their other row locks."""
    if not seals:
        return
    connection.execute(
        sa.update(Key)
        .where(Key.tenant_id == tenant_id, Key.version == version)
        .values(seals=Key.seals + seals)
    )


def live_versions(connection: sa.Connection, tenant_id: str) -> list[int]:
    """The tenant's key versions that were not destroyed."""
    return sorted(
        connection.execute(
            sa.select(Key.version).where(Key.tenant_id == tenant_id, Key.state != DESTROYED)
        ).scalars()
    )


def states(connection: sa.Connection, tenant_id: str) -> KeyStates:
    """The active key version, the draining ones, the destroyed ones."""
    rows = connection.execute(
        sa.select(Key.version, Key.state).where(Key.tenant_id == tenant_id)
    ).all()

    def of(wanted: DataKeyState) -> list[int]:
        return sorted(version for version, state in rows if state == wanted)

    return KeyStates(next(iter(of(ACTIVE)), None), of(DRAINING), of(DESTROYED))


def tenants_with_keys(connection: sa.Connection) -> list[str]:
    """Every tenant that has a key that was not destroyed, in id order."""
    return list(
        connection.execute(
            sa.select(Key.tenant_id)
            .where(Key.state != DESTROYED)
            .distinct()
            .order_by(Key.tenant_id)
        ).scalars()
    )


def keys_of(connection: sa.Connection, tenants: Sequence[str] | None) -> list[KeyRow]:
    """Every key of ``tenants`` (of every tenant when None), by tenant and version."""
    statement = sa.select(
        Key.tenant_id, Key.version, Key.state, Key.kek_version, Key.seals, Key.kek_ref
    ).order_by(Key.tenant_id, Key.version)
    if tenants is not None:
        statement = statement.where(Key.tenant_id.in_(list(tenants)))
    return [KeyRow(*row) for row in connection.execute(statement)]


# --- the KMS side: wrapped keys behind the latest version of their KEK ---


def _behind(kek_ref: str, latest: int) -> sa.ColumnElement[bool]:
    return sa.and_(Key.state != DESTROYED, Key.kek_ref == kek_ref, Key.kek_version < latest)


def kek_versions_in_use(connection: sa.Connection, kek_ref: str) -> tuple[int, int] | None:
    """The lowest and highest version of KEK ``kek_ref`` a live (not destroyed) data key
    is wrapped under; None when it wraps no live key."""
    low, high = connection.execute(
        sa.select(sa.func.min(Key.kek_version), sa.func.max(Key.kek_version)).where(
            Key.state != DESTROYED, Key.kek_ref == kek_ref
        )
    ).one()
    return None if low is None else (int(low), int(high))


def count_behind_kek(connection: sa.Connection, kek_ref: str, latest: int) -> int:
    """Wrapped keys (not destroyed) under a version of ``kek_ref`` older than ``latest``."""
    return int(
        connection.execute(sa.select(sa.func.count()).where(_behind(kek_ref, latest))).scalar_one()
    )


def lock_behind_kek(
    connection: sa.Connection,
    kek_ref: str,
    latest: int,
    *,
    after: tuple[str, int],
    limit: int,
    skip_locked: bool,
) -> list[tuple[str, int, str]]:
    """The next ``limit`` keys behind ``latest`` after (tenant, version), and the rest of
    the last one's tenant, locked for the transaction: (tenant_id, version, wrapped_key).
    ``skip_locked`` passes over keys another transaction holds.

    A tenant's keys are never split between two batches: a rotation holds its next
    batch while it stores the one before, and a writer sealing for a tenant holds the
    tenant's audit chain while it waits for that tenant's key; were the tenant in both
    batches, the first would wait for the writer, the writer for the second, and the
    second for the first to be stored, a wait PostgreSQL cannot see as a deadlock."""

    def locked(where: sa.ColumnElement[bool], limit: int | None) -> list[tuple[str, int, str]]:
        rows = connection.execute(
            sa.select(Key.tenant_id, Key.version, Key.wrapped_key)
            .where(_behind(kek_ref, latest), where)
            .order_by(Key.tenant_id, Key.version)
            .limit(limit)
            .with_for_update(skip_locked=skip_locked)
        ).all()
        return [(tenant_id, version, str(wrapped_key)) for tenant_id, version, wrapped_key in rows]

    rows = locked(sa.tuple_(Key.tenant_id, Key.version) > sa.tuple_(*after), limit)
    if len(rows) == limit:
        tenant_id, version, _ = rows[-1]
        rows += locked(sa.and_(Key.tenant_id == tenant_id, Key.version > version), None)
    return rows


@dataclass(frozen=True)
class Rewrapped:
    """A key wrapped anew: by the latest version of its KEK, or by another KEK."""

    tenant_id: str
    version: int
    old: str
    new: WrappedKey
    kek_ref: str


def store_rewrapped(connection: sa.Connection, items: Sequence[Rewrapped], *, actor: str) -> int:
    """Store rewrapped keys, each only where the key is still the one that was read (a
    compare-and-swap), with a ``kek.rewrapped`` event for each key stored; returns how
    many were stored.

    One statement: the UPDATE's returned rows feed the events' INSERT, so a key whose
    compare-and-swap missed gets no event, and a batch costs one round trip instead of
    one per event (the events were most of a batch's time). They are inserted in
    (tenant, version) order, the order the batch's rows were locked in."""
    if not items:
        return 0
    columns: dict[str, list[Any]] = {
        "tenants": [i.tenant_id for i in items],
        "versions": [i.version for i in items],
        "old": [i.old for i in items],
        "new": [i.new.ciphertext for i in items],
        "keks": [i.new.kek_version for i in items],
        "refs": [i.kek_ref for i in items],
    }
    values = (
        sa.func.unnest(
            sa.cast(sa.bindparam("tenants"), sa.ARRAY(sa.Text)),
            sa.cast(sa.bindparam("versions"), sa.ARRAY(sa.Integer)),
            sa.cast(sa.bindparam("old"), sa.ARRAY(sa.Text)),
            sa.cast(sa.bindparam("new"), sa.ARRAY(sa.Text)),
            sa.cast(sa.bindparam("keks"), sa.ARRAY(sa.Integer)),
            sa.cast(sa.bindparam("refs"), sa.ARRAY(sa.Text)),
        )
        .table_valued("tenant_id", "version", "old_key", "new_key", "kek_version", "kek_ref")
        .render_derived(name="v")
    )
    stored = (
        sa.update(Key)
        .where(
            Key.tenant_id == values.c.tenant_id,
            Key.version == values.c.version,
            Key.wrapped_key == values.c.old_key,
        )
        .values(
            wrapped_key=values.c.new_key,
            kek_version=values.c.kek_version,
            kek_ref=values.c.kek_ref,
        )
        .returning(Key.tenant_id, Key.version, Key.kek_version, Key.kek_ref)
        .cte("stored")
    )
    events = audit.insert_per_row(
        sa.select(
            stored.c.tenant_id,
            sa.cast(stored.c.version, sa.Text),
            sa.func.jsonb_build_object(
                "kek_version", stored.c.kek_version, "kek_ref", stored.c.kek_ref
            ),
        ).order_by(stored.c.tenant_id, stored.c.version),
        AuditAction.KEK_REWRAPPED,
        actor=actor,
        target_type="dek",
    )
    # An INSERT's row count is kept only when asked for (SQLAlchemy counts UPDATEs and
    # DELETEs only): one event per stored key, so it counts the keys stored.
    counted = events.execution_options(preserve_rowcount=True)
    return int(connection.execute(counted, columns).rowcount)


# --- tenants' own KEKs (tenant_keks): the operator writes, the application reads ---


def tenant_kek(connection: sa.Connection, tenant_id: str) -> str | None:
    """The KEK ``tenant_id`` chose; None: the deployment's."""
    return connection.execute(
        sa.select(TenantKek.kek_ref).where(TenantKek.tenant_id == tenant_id)
    ).scalar_one_or_none()


def tenant_keks(connection: sa.Connection, tenants: Sequence[str] | None) -> dict[str, str]:
    """Each tenant's own KEK, for ``tenants`` (every tenant that has one when None)."""
    statement = sa.select(TenantKek.tenant_id, TenantKek.kek_ref)
    if tenants is not None:
        statement = statement.where(TenantKek.tenant_id.in_(list(tenants)))
    return {tenant: ref for tenant, ref in connection.execute(statement)}


def set_tenant_kek(
    connection: sa.Connection,
    tenant_id: str,
    kek_ref: str | None,
    *,
    cache_max_age_seconds: int | None,
    actor: str,
) -> None:
    """Record ``kek_ref`` as the tenant's KEK (None: back to the deployment's), under
    the tenant's exclusive key lock so no first key is made meanwhile under the old one."""
    lock_tenant_keys(connection, tenant_id, exclusive=True)
    if kek_ref is None:
        connection.execute(sa.delete(TenantKek).where(TenantKek.tenant_id == tenant_id))
    else:
        upsert = pg_insert(TenantKek).values(
            tenant_id=tenant_id, kek_ref=kek_ref, cache_max_age_seconds=cache_max_age_seconds
        )
        connection.execute(
            upsert.on_conflict_do_update(
                index_elements=[TenantKek.tenant_id],
                set_={
                    "kek_ref": upsert.excluded.kek_ref,
                    "cache_max_age_seconds": upsert.excluded.cache_max_age_seconds,
                },
            )
        )
    audit.record(
        connection,
        tenant_id,
        AuditAction.TENANT_KEK_SET,
        actor=actor,
        target_type="kek",
        target_id=kek_ref or "default",
        details={"cache_max_age_seconds": cache_max_age_seconds},
    )


def lock_not_under(
    connection: sa.Connection, tenant_id: str, kek_ref: str, *, limit: int
) -> list[tuple[int, str, str]]:
    """Up to ``limit`` live keys of the tenant not wrapped by ``kek_ref``, locked for the
    transaction: (version, wrapped_key, their kek_ref)."""
    rows = connection.execute(
        sa.select(Key.version, Key.wrapped_key, Key.kek_ref)
        .where(Key.tenant_id == tenant_id, Key.state != DESTROYED, Key.kek_ref != kek_ref)
        .order_by(Key.version)
        .limit(limit)
        .with_for_update()
    ).all()
    return [(version, str(wrapped), ref) for version, wrapped, ref in rows]


def count_not_under(
    connection: sa.Connection, default_ref: str, tenants: Sequence[str] | None
) -> dict[str, int]:
    """Per tenant, its live keys wrapped by a KEK other than the tenant's own (the
    deployment's, ``default_ref``, for a tenant without one): what a ``tenant-key set``
    or ``unset`` still has to move."""
    chosen = sa.func.coalesce(TenantKek.kek_ref, sa.literal(default_ref, sa.Text))
    statement = (
        sa.select(Key.tenant_id, sa.func.count())
        .select_from(_WITH_TENANT_KEK)
        .where(Key.state != DESTROYED, Key.kek_ref != chosen)
        .group_by(Key.tenant_id)
    )
    if tenants is not None:
        statement = statement.where(Key.tenant_id.in_(list(tenants)))
    return {tenant: int(count) for tenant, count in connection.execute(statement)}
