"""The tree is the architecture: the import graph keeps the layers of docs/architecture.md.

Walks every module's imports (as written, with ``ast``), so a new import that
breaks a layer fails here before review."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tenantvault"

# Bottom to top. A module may import its own layer and any layer below it; two
# layers on one rank (vault and rotation; db and kms) do not import each other.
RANKS: dict[str, int] = {
    "errors": 0,
    "settings": 1,
    "crypto": 2,
    "kms": 3,
    "db": 3,
    "audit": 4,
    "keys": 5,
    "vault": 6,
    "rotation": 6,
    "ops": 7,
    "dev": 8,
    "cli": 9,
    "tenantvault": 10,  # the package's face: the public names
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__main__.py"
}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "tenantvault"
    # Top-level private helpers (_moved) belong to the face.
    return "tenantvault" if parts[1].startswith("_") else parts[1]


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports (tenantvault's resolved to a module, others as named)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _edges() -> list[tuple[str, str]]:
    return [
        (source, target)
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] == "tenantvault"
    ]


def test_every_module_is_in_a_known_layer() -> None:
    assert {_layer(module) for module in MODULES} <= set(RANKS)


def test_nothing_imports_upward_or_sideways() -> None:
    broken = [
        f"{source} -> {target}"
        for source, target in _edges()
        if _layer(source) != _layer(target) and RANKS[_layer(target)] >= RANKS[_layer(source)]
    ]
    assert broken == []


@pytest.mark.parametrize("layer", ["crypto", "kms"])
def test_crypto_and_kms_know_no_sql(layer: str) -> None:
    sql = [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        if _layer(source) == layer
        for target in targets
        if target.split(".")[0] in {"sqlalchemy", "psycopg", "alembic"}
    ]
    assert sql == []


def test_crypto_imports_nothing_of_tenantvault_but_errors() -> None:
    outside = [
        f"{source} -> {target}"
        for source, target in _edges()
        if _layer(source) == "crypto" and _layer(target) not in {"crypto", "errors"}
    ]
    assert outside == []


def test_above_the_keyring_nobody_holds_a_plaintext_data_key() -> None:
    holders = [
        f"{source} -> {target}"
        for source, target in _edges()
        if _layer(source) in {"vault", "rotation", "ops", "cli"}
        and target == "tenantvault.crypto.datakey"
    ]
    assert holders == []


def test_only_the_cli_and_dev_tooling_import_dev() -> None:
    users = [
        f"{source} -> {target}"
        for source, target in _edges()
        if _layer(target) == "dev" and _layer(source) not in {"dev", "cli"}
    ]
    assert users == []


def _code_outside(owner: str, pattern: str) -> list[str]:
    """Modules other than ``owner`` whose code (not docstrings) matches ``pattern``."""
    hits = []
    for module, path in MODULES.items():
        if module == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.search(pattern, node.value)
                and not _is_docstring(node, path)
            ):
                hits.append(f"{module}: {node.value[:60]!r}")
    return hits


def _is_docstring(node: ast.Constant, path: Path) -> bool:
    for parent in ast.walk(ast.parse(path.read_text())):
        body = getattr(parent, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and body[0].value.lineno == node.lineno
            and body[0].value.col_offset == node.col_offset
        ):
            return True
    return False


def test_the_wire_format_lives_in_the_envelope_only() -> None:
    assert _code_outside("tenantvault.crypto.envelope", r"tv1\.|split_part") == []


STATES = {"active", "draining", "retired", "destroyed"}


def test_data_key_states_are_used_in_the_key_store_only() -> None:
    """No SQL literal of a state and no comparison with a state's string outside the
    store: everyone else asks the store, or compares with ``DataKeyState``."""
    sql_literal = "'(" + "|".join(sorted(STATES)) + ")'"
    hits = _code_outside("tenantvault.keys.store", sql_literal)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Constant) and o.value in STATES for o in operands):
                    hits.append(f"{module}:{node.lineno} compares with a state's string")
    assert hits == []


def test_every_statement_on_tenant_data_keys_is_in_the_key_store() -> None:
    # No raw SQL writes the table (the demo may show what it holds), and only the store
    # builds statements on its model.
    writes = r"(?i)(update|insert into|delete from)\s+\S*tenant_data_keys"
    assert _code_outside("tenantvault.keys.store", writes) == []
    users = sorted(
        source
        for source, target in _edges()
        if target == "tenantvault.db.models"
        and "TenantDataKey" in MODULES[source].read_text()
        and source != "tenantvault.db.models"
    )
    assert users == ["tenantvault.keys.store"]


def test_only_the_cli_output_prints() -> None:
    """The library returns reports; ``cli/output`` prints them (dev tooling's own
    ``python -m`` entry points aside)."""
    printers = []
    for module, path in MODULES.items():
        if module == "tenantvault.cli.output" or _layer(module) == "dev":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Name) and called.id == "print":
                printers.append(f"{module}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr"}:
                printers.append(f"{module}:{node.lineno}")
    assert printers == []
