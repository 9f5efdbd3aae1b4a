"""The load hot path through PgBouncer in transaction pooling mode, against its floor there.

On the embedded stack with the machine's PgBouncer (Debian's package, 1.18) in front
of PostgreSQL 18, one run, interleaved so machine noise falls on both alike:

floor   a primary-key SELECT of the same row through PgBouncer on a held connection
        (its cursor kept, autocommit), unprepared as every statement there must be:
        no pool, no RLS (the owner reads), no Python around it
load    Vault.load_credentials through the same PgBouncer, warm key cache (RLS on, the
        application role), with the settings docs/pgbouncer.md gives
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hvac
import psycopg

from tenantvault import Vault
from tenantvault.db import startup
from tenantvault.dev import stack as devstack
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import Settings, load_settings, parse_database_url

from ._harness import (
    APP_LOGIN,
    CONFIG_ROW,
    SMTP,
    line,
    measure_interleaved,
    migrated_with_app_login,
    throwaway_database,
    vault_token,
)

TENANTS = 100
ITERATIONS = 5000


@contextmanager
def behind_pgbouncer(url: str) -> Iterator[int]:
    """A PgBouncer in transaction mode in front of ``url``'s server; yields its port."""
    server = parse_database_url(url)
    assert server.host is not None
    assert server.port is not None
    with tempfile.TemporaryDirectory(prefix="tenantvault-bench-pgbouncer.") as state:
        try:
            record = devstack.pgbouncer_up(
                Path(state),
                server_host=server.host,
                server_port=server.port,
                logins=["postgres", APP_LOGIN],
            )
            yield record.port
        finally:
            devstack.reset(Path(state))


def pooled(settings: Settings, port: int) -> Settings:
    """``settings`` through PgBouncer, with what a PgBouncer deployment sets."""
    url = settings.sqlalchemy_url.set(drivername="postgresql", host="127.0.0.1", port=port)
    return load_settings(
        database_url=url.render_as_string(hide_password=False),
        VAULT_ADDR=str(settings.vault_addr),
        VAULT_TOKEN=vault_token(),
        server_prepared_statements=False,
        send_statement_timeout=False,
    )


def select_row(cursor: Any, config_id: str) -> Any:
    """The floor: one statement on a cursor already open."""
    cursor.execute(CONFIG_ROW, (config_id,))
    return cursor.fetchone()


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        settings, app_settings = migrated_with_app_login(url, vault_addr, TENANTS)
        # Not sent through PgBouncer: the database's own timeout, which connections check.
        with psycopg.connect(url, autocommit=True) as owner:
            database = owner.execute("SELECT current_database()").fetchone()
            assert database is not None
            owner.execute(
                f'ALTER DATABASE "{database[0]}" '
                f"SET statement_timeout = {app_settings.statement_timeout_ms}"
            )
        with behind_pgbouncer(url) as port:
            owner_settings, app_pooled = pooled(settings, port), pooled(app_settings, port)
            client = hvac.Client(url=vault_addr, token=vault_token(), timeout=5)
            provider = TransitKeyProvider(client, key_name="bench")
            vault = Vault.from_settings(app_pooled, key_provider=provider)
            ids = [
                vault.create_config(
                    f"t{i}", type="smtp", name="Relay", config=SMTP, credentials={"password": "pw"}
                ).id
                for i in range(1, TENANTS + 1)
            ]
            tenant, config_id = "t50", ids[49]
            floor = psycopg.connect(
                owner_settings.sqlalchemy_url.set(drivername="postgresql").render_as_string(
                    hide_password=False
                ),
                autocommit=True,
                **startup.connect_args(owner_settings),
            )
            floor_cursor = floor.cursor()
            timings = measure_interleaved(
                {
                    "floor: PK SELECT via PgBouncer, held conn": lambda: select_row(
                        floor_cursor, config_id
                    ),
                    "load_credentials via PgBouncer (warm)": lambda: vault.load_credentials(
                        tenant, config_id
                    ),
                },
                iterations=ITERATIONS,
            )
            floor.close()
            vault.dispose()

    baseline = timings["floor: PK SELECT via PgBouncer, held conn"]
    print(line(baseline, width=42))
    print(line(timings["load_credentials via PgBouncer (warm)"], baseline, width=42))


if __name__ == "__main__":
    main()
