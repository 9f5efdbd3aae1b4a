"""The database: engines and the tenant-scoped session, the operator's door, the
models, the application's queries, row ids, and what the Alembic revisions share."""

from tenantvault.db.session import (
    TENANT_SETTING,
    check_tenant_id,
    create_async_engine,
    create_engine,
    set_tenant,
    tenant_session,
)

__all__ = [
    "TENANT_SETTING",
    "check_tenant_id",
    "create_async_engine",
    "create_engine",
    "set_tenant",
    "tenant_session",
]
