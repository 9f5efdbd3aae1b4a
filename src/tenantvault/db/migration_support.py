"""Helpers the Alembic revisions share: options, qualified names, and downgrade guards.

Revisions emit plain SQL through these, so every one also renders in offline
(``--sql``) mode, where nothing can be read back from the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from alembic import op

from tenantvault.db.session import TENANT_SETTING
from tenantvault.settings import Settings

OPTIONS_KEY = "tenantvault_options"
ALLOW_DATA_LOSS_FLAG = "allow_data_loss"


@dataclass(frozen=True)
class MigrationOptions:
    """What the revisions need to know about the target database."""

    schema: str = "dripiq_app"
    app_role: str = "tenantvault_app"
    migrator_role: str = "tenantvault_migrator"
    lock_timeout_ms: int = 5000
    allow_data_loss: bool = False

    @classmethod
    def from_settings(
        cls, settings: Settings, *, allow_data_loss: bool = False
    ) -> MigrationOptions:
        return cls(
            schema=settings.schema_name,
            app_role=settings.app_role,
            migrator_role=settings.migrator_role,
            lock_timeout_ms=settings.migration_lock_timeout_ms,
            allow_data_loss=allow_data_loss,
        )


def options() -> MigrationOptions:
    """The options of the running migration (set by ``migrations/env.py``)."""
    opts = op.get_context().opts[OPTIONS_KEY]
    assert isinstance(opts, MigrationOptions)
    return opts


def qualified(name: str) -> str:
    """``name`` qualified with the target schema, quoted."""
    return f'"{options().schema}"."{name}"'


def tenant_policy_predicate() -> str:
    """The row-level-security predicate: this row's tenant is the transaction's tenant.

    ``current_setting(..., true)`` is NULL before the setting was ever made on a
    connection, but ``''`` after a transaction that made it ended; NULLIF turns
    both into NULL, which matches no row (fail closed).
    """
    return f"tenant_id = NULLIF(current_setting('{TENANT_SETTING}', true), '')"


@contextmanager
def as_migrator() -> Iterator[None]:
    """Run the enclosed statements as the migrator role, which row-level security lets
    see and write every tenant's rows (the owner is bound by FORCE ROW LEVEL SECURITY)."""
    op.execute(f'SET LOCAL ROLE "{options().migrator_role}"')
    yield
    op.execute("RESET ROLE")


def refuse_if_rows(exists_query: str, what: str) -> None:
    """Stop the downgrade when ``exists_query`` finds a row, unless the operator
    acknowledged the loss with ``-x allow_data_loss=true``.

    The check runs in the database (a DO block), so it also guards SQL rendered
    offline with ``--sql``.
    """
    if options().allow_data_loss:
        return
    message = f"tenantvault: downgrade refused: it would delete {what}".replace("'", "''")
    hint = (
        "Nothing was changed by this step. Back up the data, then rerun with "
        f"-x {ALLOW_DATA_LOSS_FLAG}=true to acknowledge the loss."
    )
    op.execute(
        "DO $$ BEGIN\n"
        f"  IF EXISTS ({exists_query}) THEN\n"
        f"    RAISE EXCEPTION USING MESSAGE = '{message}', HINT = '{hint}';\n"
        "  END IF;\n"
        "END $$"
    )


def set_lz4_compression(table: str, columns: list[str]) -> None:
    """Use lz4 for these columns where the server was built with it (pglz otherwise)."""
    alters = ", ".join(f'ALTER COLUMN "{column}" SET COMPRESSION lz4' for column in columns)
    op.execute(
        "DO $$ BEGIN\n"
        "  IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'\n"
        "             AND 'lz4' = ANY(enumvals)) THEN\n"
        f"    ALTER TABLE {qualified(table)} {alters};\n"
        "  END IF;\n"
        "END $$"
    )


def isolate_tenant_table(table: str) -> None:
    """Forced row-level security on ``tenant_id``, the migrator's policy, and the
    ``updated_at`` trigger: what every tenantvault table gets."""
    opts = options()
    name = qualified(table)
    op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
    predicate = tenant_policy_predicate()
    op.execute(
        f"CREATE POLICY tenant_isolation ON {name} USING ({predicate}) WITH CHECK ({predicate})"
    )
    op.execute(
        f'CREATE POLICY migrator_all_tenants ON {name} TO "{opts.migrator_role}" '
        "USING (true) WITH CHECK (true)"
    )
    op.execute(
        f"CREATE TRIGGER trg_{table}_touch_updated_at BEFORE UPDATE ON {name} "
        f"FOR EACH ROW EXECUTE FUNCTION {qualified('tenantvault_touch_updated_at')}()"
    )
