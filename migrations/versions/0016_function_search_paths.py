"""Every tenantvault function resolves names in pg_catalog only.

Three functions made by earlier revisions ran with the caller's ``search_path``:
``tenantvault_new_id()`` (0002: every tenantvault table's id default),
``tenantvault_touch_updated_at()`` (0002: the ``updated_at`` trigger) and
``tenantvault_audit_append_only()`` (0008: the audit log's UPDATE, DELETE and
TRUNCATE guard). They are SECURITY INVOKER and call only built-ins
(``gen_random_uuid``, ``replace``, ``timezone``, ``now``), but unqualified: a role
that may create objects in a schema early on a writer's ``search_path`` could put a
function of the same name there (``now()`` returning a fixed time, a
``gen_random_uuid()`` that repeats), and the writer's session would call it. Every
other function tenantvault makes already fixes ``search_path = pg_catalog``; this
gives the three the same, in place (their bodies are unchanged, and ``pg_catalog``
is where every name they use lives).

Downgrade: the three are reset to the caller's ``search_path``, as they were.

Revision ID: 0016_function_search_paths
Revises: 0015_replay_guards_and_claims
"""

from __future__ import annotations

from alembic import op

from tenantvault.migration_support import qualified

revision = "0016_function_search_paths"
down_revision = "0015_replay_guards_and_claims"
branch_labels = None
depends_on = None

FUNCTIONS = (
    "tenantvault_new_id()",
    "tenantvault_touch_updated_at()",
    "tenantvault_audit_append_only()",
)


def upgrade() -> None:
    for function in FUNCTIONS:
        name, arguments = function.split("(", 1)
        # ALTER FUNCTION takes only a brief lock on the function's catalog row.
        op.execute(f"ALTER FUNCTION {qualified(name)}({arguments} SET search_path = pg_catalog")


def downgrade() -> None:
    for function in FUNCTIONS:
        name, arguments = function.split("(", 1)
        op.execute(f"ALTER FUNCTION {qualified(name)}({arguments} RESET search_path")
