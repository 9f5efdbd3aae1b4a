"""What row-level security costs a primary-key read, measured against a bare SELECT.

baseline   bare primary-key SELECT of one config row (owner, no RLS applied)
scoped     the same SELECT as the application role, in a transaction that sets the
           tenant first: BEGIN, set_config, SELECT, COMMIT as separate round trips
pipelined  the same four statements sent in one psycopg pipeline
one query  set_config and the SELECT in one simple-query message: PostgreSQL runs
           them as one implicit transaction, in one round trip (client-side binding)
"""

from __future__ import annotations

import psycopg

from tenantvault.ops import migrate
from tenantvault.settings import load_settings

from ._harness import measure, throwaway_database

ITERATIONS = 5000
APP_LOGIN = "tenantvault_bench_app"
SELECT = (
    "SELECT id, config, encrypted_credentials FROM dripiq_app.email_provider_configs WHERE id = %s"
)


def main() -> None:
    with throwaway_database() as (url, _):
        migrate.upgrade(load_settings(database_url=url))
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN}') "
                f"THEN CREATE ROLE {APP_LOGIN} LOGIN; END IF; END $$"
            )
            owner.execute(f"GRANT tenantvault_app TO {APP_LOGIN}")
            owner.execute(
                "INSERT INTO dripiq_app.tenants (id, name) SELECT 't' || i, 'T' FROM generate_series(1, 1000) i;"
                "INSERT INTO dripiq_app.email_provider_configs (id, tenant_id, type, name, config, encrypted_credentials) "
                "SELECT 'c' || i, 't' || i, 'smtp', 'Relay', '{\"host\": \"smtp.example.test\"}', 'tv3.1.' || repeat('x', 114) "
                "FROM generate_series(1, 1000) i; ANALYZE"
            )
        app_url = url.replace("postgres@", f"{APP_LOGIN}@")
        with (
            psycopg.connect(url, autocommit=True) as owner,
            psycopg.connect(app_url) as app,
            psycopg.connect(
                app_url, autocommit=True, cursor_factory=psycopg.ClientCursor
            ) as single,
        ):

            def bare() -> object:
                return owner.execute(SELECT, ("c500",), prepare=True).fetchone()

            def scoped() -> object:
                with app.transaction():
                    app.execute(
                        "SELECT set_config('tenantvault.tenant_id', %s, true)",
                        ("t500",),
                        prepare=True,
                    )
                    row = app.execute(SELECT, ("c500",), prepare=True).fetchone()
                assert row is not None
                return row

            def pipelined() -> object:
                with app.pipeline(), app.transaction():
                    app.execute(
                        "SELECT set_config('tenantvault.tenant_id', %s, true)",
                        ("t500",),
                        prepare=True,
                    )
                    cursor = app.execute(SELECT, ("c500",), prepare=True)
                row = cursor.fetchone()
                assert row is not None
                return row

            def one_query() -> object:
                cursor = single.execute(
                    "SELECT set_config('tenantvault.tenant_id', %s, true); " + SELECT,
                    ("t500", "c500"),
                )
                assert cursor.nextset()
                row = cursor.fetchone()
                assert row is not None
                return row

            baseline = measure("bare PK SELECT", bare, iterations=ITERATIONS)
            results = [
                measure("RLS-scoped, 4 round trips", scoped, iterations=ITERATIONS),
                measure("RLS-scoped, pipelined", pipelined, iterations=ITERATIONS),
                measure("RLS-scoped, one query", one_query, iterations=ITERATIONS),
            ]
    print(
        f"{baseline.name:<28} p50 {baseline.p50_us:7.1f} us  p99 {baseline.p99_us:7.1f} us  (baseline)"
    )
    for result in results:
        print(
            f"{result.name:<28} p50 {result.p50_us:7.1f} us  p99 {result.p99_us:7.1f} us  "
            f"({result.ratio_to(baseline)})"
        )


if __name__ == "__main__":
    main()
