"""Old module paths, from before the package was split into layers, still import.

``tenantvault.providers`` is ``tenantvault.vault.providers``, and so on: the same
module object, so attributes, ``isinstance`` and monkeypatching agree whichever
name was used. ``python -m tenantvault.erd`` still runs. Frozen Alembic revisions
import ``tenantvault.migration_support``; they must never need editing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

MOVED = {
    "tenantvault.auditlog": "tenantvault.audit.chain",
    "tenantvault.datakey": "tenantvault.crypto.datakey",
    "tenantvault.dekrotation": "tenantvault.rotation.dek",
    "tenantvault.demo": "tenantvault.dev.demo",
    "tenantvault.devstack": "tenantvault.dev.stack",
    "tenantvault.envelope": "tenantvault.crypto.envelope",
    "tenantvault.erd": "tenantvault.dev.erd",
    "tenantvault.ids": "tenantvault.db.ids",
    "tenantvault.kekrotation": "tenantvault.rotation.kek",
    "tenantvault.keycache": "tenantvault.keys.cache",
    "tenantvault.keyprovider": "tenantvault.kms.provider",
    "tenantvault.keyring": "tenantvault.keys.keyring",
    "tenantvault.keystatus": "tenantvault.rotation.status",
    "tenantvault.lifecycle": "tenantvault.ops.purge",
    "tenantvault.localkms": "tenantvault.kms.local",
    "tenantvault.migrate": "tenantvault.ops.migrate",
    "tenantvault.migration_support": "tenantvault.db.migration_support",
    "tenantvault.models": "tenantvault.db.models",
    "tenantvault.oauth_tokens": "tenantvault.vault.tokens",
    "tenantvault.operator_jobs": "tenantvault.ops.jobs",
    "tenantvault.operator_output": "tenantvault.cli.output",
    "tenantvault.operatordb": "tenantvault.db.operator",
    "tenantvault.providers": "tenantvault.vault.providers",
    "tenantvault.queries": "tenantvault.db.queries",
    "tenantvault.sealed": "tenantvault.keys.sealed",
    "tenantvault.shred": "tenantvault.rotation.shred",
    "tenantvault.status": "tenantvault.ops.health",
    "tenantvault.templates": "tenantvault.vault.templates",
    "tenantvault.transit": "tenantvault.kms.transit",
    "tenantvault.usage": "tenantvault.vault.usage",
}
"""Old path -> where the module lives now."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds an old path and answers it with the module at its new one."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path has run already."""

    def get_code(self, fullname: str) -> CodeType | None:
        # For ``python -m <old path>``: run the new module's code as ``__main__``.
        spec = importlib.util.find_spec(MOVED[fullname])
        assert spec is not None
        assert isinstance(spec.loader, importlib.abc.InspectLoader)
        return spec.loader.get_code(MOVED[fullname])

    def get_source(self, fullname: str) -> str | None:
        return None


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
