"""A load served by a hot standby against its floor, and the primary's pair beside it.

On the embedded stack (PostgreSQL 18 over loopback TCP, OpenBao) with a streaming
replica of it (``pg_basebackup -R``, tenantvault.dev.standby), one run, interleaved:

standby floor    a prepared primary-key SELECT of the row on a held connection to the
                 standby (its cursor kept, autocommit), no pool, no RLS, no Python
standby load     Vault.load_credentials with TENANTVAULT_READ_DATABASE_URLS naming the
                 standby, warm key cache: the standby serves (checked), the probes of
                 the primary's and the standby's positions included as they come
primary floor    the same SELECT on the primary
primary load     Vault.load_credentials without standbys
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import psycopg

from tenantvault import Vault
from tenantvault.db.standbys import PRIMARY_POSITION, StandbyReads
from tenantvault.dev.standby import make_standby, remove_standby
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import load_settings, parse_database_url

from ._harness import (
    CONFIG_ROW,
    SMTP,
    line,
    measure_interleaved,
    migrated_with_app_login,
    throwaway_database,
    vault_token,
)

ITERATIONS = 5000


def on_port(url: str, port: int) -> str:
    moved = parse_database_url(url).set(drivername="postgresql", port=port)
    return moved.render_as_string(hide_password=False)


def caught_up(primary_url: str, standby_url: str) -> None:
    with psycopg.connect(primary_url, autocommit=True) as primary:
        row = primary.execute(PRIMARY_POSITION).fetchone()
    assert row is not None
    replayed = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 >= %s"
    with psycopg.connect(standby_url, autocommit=True) as standby:
        while not (standby.execute(replayed, (row[0],)).fetchone() or (False,))[0]:
            time.sleep(0.01)


def main() -> None:
    import hvac

    with throwaway_database() as (url, vault_addr), tempfile.TemporaryDirectory() as state:
        _, app_settings = migrated_with_app_login(url, vault_addr, 1)
        client = hvac.Client(url=vault_addr, token=vault_token(), timeout=5)
        provider = TransitKeyProvider(client, key_name="bench")
        primary_port = parse_database_url(url).port or 5432
        started = time.perf_counter()
        standby = make_standby(Path(state), primary_port)
        try:
            standby_url = on_port(url, standby.port)
            caught_up(url, standby_url)
            made_in = time.perf_counter() - started
            primary_vault = Vault.from_settings(app_settings, key_provider=provider)
            config_id = primary_vault.create_config(
                "t1", type="smtp", name="Relay", config=SMTP, credentials={"password": "pw"}
            ).id
            caught_up(url, standby_url)
            app_url = app_settings.database_url.get_secret_value()
            standby_settings = load_settings(
                database_url=app_url,
                read_database_urls=on_port(app_url, standby.port),
                VAULT_ADDR=vault_addr,
                VAULT_TOKEN=vault_token(),
            )
            standby_vault = Vault.from_settings(standby_settings, key_provider=provider)
            standby_vault.load_credentials("t1", config_id)  # its key cached
            reads = standby_vault._core.held  # the bench checks who serves
            assert isinstance(reads, StandbyReads)
            assert reads.standby() == 0, "the standby does not serve"

            floors = {
                name: psycopg.connect(target, autocommit=True)
                for name, target in (("standby", standby_url), ("primary", url))
            }
            cursors = {name: connection.cursor() for name, connection in floors.items()}

            def floor(name: str) -> object:
                return cursors[name].execute(CONFIG_ROW, (config_id,), prepare=True).fetchone()

            timings = measure_interleaved(
                {
                    "standby floor: prepared PK SELECT": lambda: floor("standby"),
                    "standby load_credentials (warm)": lambda: standby_vault.load_credentials(
                        "t1", config_id
                    ),
                    "primary floor: prepared PK SELECT": lambda: floor("primary"),
                    "primary load_credentials (warm)": lambda: primary_vault.load_credentials(
                        "t1", config_id
                    ),
                },
                iterations=ITERATIONS,
            )
            assert reads.standby() == 0, "the standby stopped serving during the run"
            for connection in floors.values():
                connection.close()
            standby_vault.dispose()
            primary_vault.dispose()
        finally:
            remove_standby(standby)
    print(f"standby made (pg_basebackup -R), started and caught up in {made_in:.1f} s")
    width = 36
    for server in ("standby", "primary"):
        base = timings[f"{server} floor: prepared PK SELECT"]
        print(line(base, width=width))
        print(line(timings[f"{server} load_credentials (warm)"], base, width=width))


if __name__ == "__main__":
    main()
