"""Every import path a user may have written keeps working after the split into layers."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tenantvault
from tenantvault._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]

PUBLIC_NAMES = {
    "AsyncVault",
    "AuthorizationRequest",
    "OAuthProviderError",
    "OAuthProviderUnavailable",
    "ReconsentRequired",
    "TokenEvent",
    "OpenedConfig",
    "ConcurrentModification",
    "ConfigVersion",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "SchemaNotMigrated",
    "GoogleWorkspaceConfig",
    "GoogleWorkspaceCredentials",
    "MicrosoftGraphConfig",
    "MicrosoftGraphCredentials",
    "ProviderConfigModel",
    "SendGridConfig",
    "SendGridCredentials",
    "SmtpConfig",
    "SmtpCredentials",
    "CredentialsModel",
    "DecryptionError",
    "ExpiringToken",
    "InvalidInputError",
    "KeyDestroyedError",
    "TenantKeyUnavailable",
    "KeyProviderError",
    "KeyProviderUnavailable",
    "NotFoundError",
    "OAuthToken",
    "ProviderConfig",
    "ProviderType",
    "RefreshedToken",
    "RotationError",
    "TenantNotSetError",
    "TenantVaultError",
    "Vault",
    "async_load_credentials",
    "async_store_credentials",
    "default_async_vault",
    "default_vault",
    "load_credentials",
    "store_credentials",
}


def test_the_package_exports_the_same_names() -> None:
    assert set(tenantvault.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(tenantvault, name) is not None


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_module_path_is_the_module_at_its_new_path(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("tenantvault.errors", ["TenantVaultError", "DecryptionError"]),
        ("tenantvault.providers", ["SmtpConfig", "SmtpCredentials", "parse_config"]),
        ("tenantvault.templates", ["TEMPLATES", "template"]),
        ("tenantvault.vault", ["Vault", "AsyncVault", "ProviderConfig", "OAuthToken", "Usage"]),
        (
            "tenantvault.db",
            ["TENANT_SETTING", "tenant_session", "create_engine", "create_async_engine"],
        ),
        ("tenantvault.kms", ["key_provider_from_settings", "transit_client"]),
        ("tenantvault.audit", ["record", "record_many", "Event"]),
        # What the frozen Alembic revisions import: they must never need editing.
        ("tenantvault.migration_support", ["options", "qualified", "refuse_if_rows"]),
        # The operator functions a scheduler may call, and their options.
        (
            "tenantvault.ops",
            [
                "rotate_dek_job",
                "rotate_kek_job",
                "rotation_status",
                "shred_job",
                "audit_verify_job",
                "audit_prune_job",
                "audit_partitions_job",
                "purge_job",
                "upgrade",
                "downgrade",
                "status",
                "DekRotationOptions",
                "KekRotationOptions",
            ],
        ),
        ("tenantvault.operator_jobs", ["rotate_dek_job", "rotate_kek_job", "shred_job"]),
        ("tenantvault.cli", ["main", "EXIT_OK", "EXIT_UNHEALTHY"]),
    ],
)
def test_documented_names_import_from_their_documented_module(
    module: str, names: list[str]
) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert missing == []


def test_the_frozen_revisions_import_as_written() -> None:
    for path in sorted((ROOT / "migrations" / "versions").glob("0*.py")):
        spec = importlib.util.spec_from_file_location(f"revision_{path.stem}", path)
        assert spec is not None
        assert spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("module", ["tenantvault.erd", "tenantvault.dev.erd"])
def test_the_diagram_still_runs_as_a_module(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("```mermaid\nerDiagram\n")
    assert "tenant_data_keys {" in done.stdout


def test_the_command_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tenantvault.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "rotate-keys" in done.stdout
