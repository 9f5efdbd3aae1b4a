"""Key rotation throughput and memory, each against a baseline measured in the same run.

All on the embedded stack (PostgreSQL 18 over loopback TCP, OpenBao dev):

dek rotation   100k and 1M sealed credentials (1,000 per tenant) rotated by
               rotate_data_keys in a fresh process, against a bare bulk UPDATE that
               rewrites the same rows (per tenant, one statement, no reading, no
               crypto) on the same table; ratio = rotation rows/s / UPDATE rows/s
memory         peak RSS of the rotating process at 1M against 100k values
kek rewrap     10,000 tenants' wrapped DEKs: rotate_kek (batched; 1 and 2 workers) against a
               one-at-a-time rewrap (one transit call and one UPDATE per key)

``python -m bench.rotation`` runs all of it; ``python -m bench.rotation kek`` (or
``dek``) only that part, while working on it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid

import hvac
import psycopg

from tenantvault.crypto.datakey import DataKey
from tenantvault.crypto.envelope import seal
from tenantvault.db.ids import new_id
from tenantvault.db.operator import OperatorDatabase
from tenantvault.keys.sealed import CONFIG_CREDENTIALS
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.ops import migrate
from tenantvault.rotation.kek import rotate_kek
from tenantvault.rotation.options import KekRotationOptions
from tenantvault.settings import Settings, load_settings

from ._harness import copy_rows, throwaway_database, vault_token

PER_TENANT = 1000
SIZES = (100_000, 1_000_000)
KEK_TENANTS = 10_000
TRANSIT_KEY = "bench-rotation"
KEK_REF = f"transit:{TRANSIT_KEY}"
CREDENTIALS = b'{"api_key":"SG.benchmarkid.benchmarksecretbenchmarksecret00"}'


def _settings(url: str, vault_addr: str) -> Settings:
    return load_settings(
        database_url=url,
        VAULT_ADDR=vault_addr,
        VAULT_TOKEN=vault_token(),
        transit_key=TRANSIT_KEY,
    )


def _provider(settings: Settings) -> TransitKeyProvider:
    token = settings.vault_token.get_secret_value() if settings.vault_token else ""
    client = hvac.Client(url=str(settings.vault_addr), token=token, timeout=30)
    return TransitKeyProvider(client, key_name=TRANSIT_KEY, timeout_seconds=30)


def _new_database(any_url: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(any_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return any_url.rsplit("/", 1)[0] + "/" + name


def _seed_values(settings: Settings, values: int) -> None:
    """values / 1000 tenants, each with a DEK from transit and 1,000 sealed credentials."""
    provider = _provider(settings)
    tenants = [f"t{n:06d}" for n in range(values // PER_TENANT)]
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as connection:
        copy_rows(connection, "tenants", "id, name", [(t, t) for t in tenants])
        keys = []
        for tenant in tenants:
            plaintext, wrapped = provider.generate_data_key(tenant)
            keys.append((tenant, 1, wrapped.ciphertext, wrapped.kek_version, KEK_REF))
            rows = []
            key = DataKey(tenant, 1, plaintext)
            for n in range(PER_TENANT):
                config_id = new_id()
                place = CONFIG_CREDENTIALS.place(
                    tenant, config_id, bound=("sendgrid", 1), config={}
                )
                sealed = seal(key, CREDENTIALS, place)
                rows.append((config_id, tenant, "sendgrid", f"c{n}", "{}", sealed))
            copy_rows(
                connection,
                "email_provider_configs",
                "id, tenant_id, type, name, config, encrypted_credentials",
                rows,
            )
        copy_rows(
            connection,
            "tenant_data_keys",
            "tenant_id, version, wrapped_key, kek_version, kek_ref",
            keys,
        )
        connection.commit()
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE")


def _bare_bulk_update(settings: Settings) -> float:
    """Seconds to rewrite every sealed credential once, tenant by tenant, in SQL alone."""
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as connection:
        tenants = [
            r[0] for r in connection.execute("SELECT id FROM dripiq_app.tenants ORDER BY id")
        ]
        connection.commit()
        started = time.perf_counter()
        for tenant in tenants:
            connection.execute(
                "UPDATE dripiq_app.email_provider_configs SET encrypted_credentials = encrypted_credentials "
                "WHERE tenant_id = %s",
                (tenant,),
            )
            connection.commit()
        elapsed = time.perf_counter() - started
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE")
    return elapsed


# The rotating process: imports, then reports its resident size before and at peak.
CHILD = """
import json, resource, sys, time
from tenantvault.ops.jobs import rotate_dek_job
from tenantvault.rotation.options import DekRotationOptions
from tenantvault.settings import load_settings
def rss_kib():
    return int(open('/proc/self/statm').read().split()[1]) * 4
settings = load_settings()
before = rss_kib()
started = time.perf_counter()
report = rotate_dek_job(settings, None, DekRotationOptions(batch_size=int(sys.argv[1]), workers=int(sys.argv[2])))
elapsed = time.perf_counter() - started
assert report.ok, report.stopped
print(json.dumps({"seconds": elapsed, "resealed": report.resealed, "rss_before_kib": before,
                  "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _vacuum(settings: Settings) -> None:
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


def _rotate_in_child(settings: Settings, workers: int, batch_size: int = 2000) -> dict[str, float]:
    environment = {
        **os.environ,
        "TENANTVAULT_DATABASE_URL": settings.database_url.get_secret_value(),
        "VAULT_ADDR": str(settings.vault_addr),
        "VAULT_TOKEN": vault_token(),
        "TENANTVAULT_TRANSIT_KEY": TRANSIT_KEY,
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(batch_size), str(workers)],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _seed_keys(settings: Settings) -> None:
    """10,000 tenants with one wrapped DEK each (wrapped with transit's batch encrypt)."""
    provider = _provider(settings)
    provider.ensure_key()
    client = provider._client
    tenants = [f"k{n:05d}" for n in range(KEK_TENANTS)]
    keys = []
    for start in range(0, len(tenants), 200):
        batch = tenants[start : start + 200]
        items = [
            {
                "plaintext": base64.b64encode(os.urandom(32)).decode(),
                "context": base64.b64encode(t.encode()).decode(),
            }
            for t in batch
        ]
        answered = client.secrets.transit.encrypt_data(
            name=TRANSIT_KEY, plaintext="", batch_input=items, mount_point="transit"
        )["data"]["batch_results"]
        for tenant, item in zip(batch, answered, strict=True):
            version = int(item["ciphertext"].split(":")[1][1:])
            keys.append((tenant, 1, item["ciphertext"], version, KEK_REF))
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as connection:
        copy_rows(connection, "tenants", "id, name", [(t, t) for t in tenants])
        copy_rows(
            connection,
            "tenant_data_keys",
            "tenant_id, version, wrapped_key, kek_version, kek_ref",
            keys,
        )


def _one_at_a_time(settings: Settings) -> float:
    """The naive peer: each key rewrapped by its own transit call and its own UPDATE."""
    provider = _provider(settings)
    provider.rotate_kek()
    url = settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT tenant_id, version, wrapped_key FROM dripiq_app.tenant_data_keys"
        ).fetchall()
        connection.commit()
        started = time.perf_counter()
        for tenant, version, wrapped in rows:
            result = provider._rewrap_one(tenant, wrapped)
            assert result.wrapped is not None
            connection.execute(
                "UPDATE dripiq_app.tenant_data_keys SET wrapped_key = %s, kek_version = %s "
                "WHERE tenant_id = %s AND version = %s",
                (result.wrapped.ciphertext, result.wrapped.kek_version, tenant, version),
            )
            connection.commit()
        return time.perf_counter() - started


def main() -> None:
    parts = set(sys.argv[1:]) or {"dek", "kek"}
    if parts - {"dek", "kek"}:
        raise SystemExit("usage: python -m bench.rotation [dek] [kek]")
    lines: list[str] = []
    with throwaway_database() as (first_url, vault_addr):
        if "dek" in parts:
            _dek_rotation(first_url, vault_addr, lines)
        if "kek" in parts:
            _kek_rewrap(first_url, vault_addr, lines)
    print("\n".join(lines))


def _dek_rotation(first_url: str, vault_addr: str, lines: list[str]) -> None:
    """DEK rotation at each size, 1 and 2 workers, against the bare bulk UPDATE; memory."""
    results = {}
    for size in SIZES:
        url = first_url if size == SIZES[0] else _new_database(first_url)
        settings = _settings(url, vault_addr)
        migrate.upgrade(settings)
        _seed_values(settings, size)
        bare_rate = size / _bare_bulk_update(settings)
        for workers in (1, 2):
            rotated = _rotate_in_child(settings, workers)
            _vacuum(settings)
            assert rotated["resealed"] == size
            if workers == 1:
                results[size] = rotated
            rate = size / rotated["seconds"]
            lines.append(
                f"dek rotation {size:>9,} values, {workers} worker(s): {rate:9,.0f} values/s vs "
                f"bare bulk UPDATE {bare_rate:9,.0f} rows/s = {rate / bare_rate:.2f}x "
                "(target >= 0.5x with 1 worker at 1M)"
            )
    small, large = (results[s] for s in SIZES)
    lines.append(
        f"peak RSS: {large['rss_peak_kib'] / 1024:.1f} MiB at 1M vs {small['rss_peak_kib'] / 1024:.1f} MiB "
        f"at 100k = {large['rss_peak_kib'] / small['rss_peak_kib']:.2f}x (target <= 1.5x); "
        f"growth over start-up {(large['rss_peak_kib'] - large['rss_before_kib']) / 1024:.1f} vs "
        f"{(small['rss_peak_kib'] - small['rss_before_kib']) / 1024:.1f} MiB"
    )


def _kek_rewrap(first_url: str, vault_addr: str, lines: list[str]) -> None:
    """10,000 wrapped DEKs rewrapped one at a time, then by rotate_kek with 1 and 2
    workers (each run rotates the transit key again, so every key is rewrapped)."""
    settings = _settings(_new_database(first_url), vault_addr)
    migrate.upgrade(settings)
    _seed_keys(settings)
    naive = _one_at_a_time(settings)
    db = OperatorDatabase.from_settings(settings)
    for workers in (1, 2):
        started = time.perf_counter()
        report = rotate_kek(
            db, _provider(settings), KekRotationOptions(batch_size=1000, workers=workers)
        )
        batched = time.perf_counter() - started
        assert report.ok, report
        assert report.rewrapped == KEK_TENANTS, report
        lines.append(
            f"kek rewrap {KEK_TENANTS:,} DEKs, {workers} worker(s): batched {batched:.2f} s "
            f"({KEK_TENANTS / batched:,.0f}/s) vs one at a time {naive:.2f} s "
            f"({KEK_TENANTS / naive:,.0f}/s) = {naive / batched:.1f}x faster (target >= 20x)"
        )
    db.dispose()


if __name__ == "__main__":
    main()
