"""The tree is the architecture: the import graph keeps the layers of docs/architecture.md.

Walks every module's imports (as written, with ``ast``), so a new import that
breaks a layer fails here before review."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tenantvault"

# Bottom to top. A module may import its own layer and any layer below it; two
# layers on one rank (vault and rotation; db and kms) do not import each other.
RANKS: dict[str, int] = {
    "errors": 0,
    "settings": 1,
    "metrics": 1,  # the OpenTelemetry instruments: below every layer that records
    "crypto": 2,
    "kms": 3,
    "oauth": 3,  # the OAuth client of a mail provider's endpoints (authlib)
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


# What hands out or holds key bytes: the key provider's plaintext answers, the
# keyring's cache of unwrapped keys, a new key's bytes.
KEY_BYTES = {"generate_data_key", "unwrap", "unwrap_many", "wrap", "cache", "_plaintext"}


def test_above_the_keyring_nobody_reaches_for_key_bytes() -> None:
    """The import rule above cannot see a key fetched through an attribute (the
    keyring's provider or cache): asking for one by name is refused too."""
    reaching = [
        f"{module}: .{node.attr}"
        for module, path in MODULES.items()
        if _layer(module) in {"vault", "rotation", "ops", "cli"}
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr in KEY_BYTES
        and not (isinstance(node.value, ast.Name) and node.value.id == "functools")
    ]
    assert reaching == []


def test_only_the_kms_layer_talks_to_the_kms() -> None:
    """kms/ is the only door to transit and AWS KMS: nothing else imports hvac, boto3 or
    botocore (the dev tooling, which starts and initialises OpenBao, aside)."""
    clients = {"hvac", "boto3", "botocore"}
    talking = [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] in clients and _layer(source) not in {"kms", "dev"}
    ]
    assert talking == []
    assert any(target == "hvac" for target in GRAPH["tenantvault.kms.transit"])  # it sees hvac
    assert any(t.startswith("botocore") for t in GRAPH["tenantvault.kms.awskms"])


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
    assert _code_outside("tenantvault.crypto.envelope", r"\btv\d+\.|split_part") == []


def test_the_kms_is_called_transit_in_messages() -> None:
    """``Vault`` is the facade: a message about the KMS names transit (the server may
    be OpenBao or Vault)."""
    assert _code_outside("", r"\bVault (at|is|was|did|failed|unreachable)\b|\(Vault\)") == []


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
    ``python -m`` entry points aside, and ``cli/basics``, which prints ``--version``
    before ``cli/output`` and the library it imports are loaded)."""
    printers = []
    for module, path in MODULES.items():
        if (
            module in {"tenantvault.cli.output", "tenantvault.cli.basics"}
            or _layer(module) == "dev"
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Name) and called.id == "print":
                printers.append(f"{module}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr"}:
                printers.append(f"{module}:{node.lineno}")
    assert printers == []


# --- one implementation of the rules: both facades are made from one declared list ---

ASYNC_FACADE = "tenantvault.vault.aio"
DECLARED = "tenantvault.vault.methods"


def _async_methods() -> dict[str, ast.AsyncFunctionDef]:
    """The coroutines written by hand in AsyncVault's body."""
    tree = ast.parse(MODULES[ASYNC_FACADE].read_text())
    facade = next(
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "AsyncVault"
    )
    return {
        node.name: node
        for node in facade.body
        if isinstance(node, ast.AsyncFunctionDef) and not node.name.startswith("_")
    }


HOT_PATHS = {
    # A credentials load also records its duration on the core's instruments.
    "load_credentials": {
        "self._held.fetch_one",
        "hot_load_parameters",
        "finish_hot_load",
        "time.perf_counter",
        "self._core.metrics.loaded",
    },
    "load_oauth_token": {"self._held.fetch_one", "hot_load_parameters", "finish_hot_token"},
    "open_config": {
        "self._held.fetch_one",
        "hot_load_parameters",
        "finish_hot_open",
        "time.perf_counter",
        "self._core.metrics.loaded",
    },
}
# Written by hand in AsyncVault: the hot paths, the refresher (a coroutine function is
# awaited on the loop), and dispose (closes resources). Every other coroutine is derived.
HAND_WRITTEN = {*HOT_PATHS, "refresh_oauth_token", "dispose"}


def _declared_lists() -> dict[str, ast.ClassDef]:
    """Every service's declared list: a class on ``FacadeMethods[...]``, by module."""
    return {
        module: node
        for module in MODULES
        if _layer(module) == "vault"
        for node in ast.parse(MODULES[module].read_text()).body
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base).startswith("FacadeMethods[") for base in node.bases)
    }


def test_every_declared_method_runs_the_service_method_of_its_own_name() -> None:
    """Each service module declares its facade methods beside the service, each as
    ``name = Runs(<Service>.name)``; every public method of every service is declared
    (none is left off the facades), and the facades join every list."""
    from tenantvault import Vault
    from tenantvault.vault.methods import declared

    lists = _declared_lists()
    strays = []
    for module, body in lists.items():
        for node in body.body:
            if isinstance(node, ast.Expr):  # the docstring
                continue
            call = node.value if isinstance(node, ast.Assign) else None
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            method = call.args[0] if isinstance(call, ast.Call) and len(call.args) == 1 else None
            if not (
                isinstance(call, ast.Call)
                and ast.unparse(call.func) == "Runs"
                and isinstance(method, ast.Attribute)
                and isinstance(target, ast.Name)
                and method.attr == target.id
            ):
                strays.append(f"{module}: {ast.unparse(node)}")
    assert strays == []
    services = {
        member
        for module in lists
        for member in vars(importlib.import_module(module)).values()
        if isinstance(member, type)
        and member.__module__ == module
        and member.__name__.endswith("Service")
    }
    offered = {
        name
        for service in services
        for name, member in vars(service).items()
        if callable(member) and not name.startswith("_")
    }
    made = declared(Vault)
    assert {runs.service for runs in made.values()} == services
    assert set(made) == offered
    assert {body.name for body in lists.values()} <= {base.__name__ for base in Vault.__mro__}


def test_both_facades_are_made_from_the_declared_list() -> None:
    """Every declared method is a method of ``Vault`` and of ``AsyncVault``, derived from
    its declaration (closing over exactly its service's method of that name), except
    the coroutines AsyncVault writes by hand; neither facade has another public method
    but its constructors and ``dispose``."""
    from tenantvault import AsyncVault, Vault
    from tenantvault.vault import methods

    declared = methods.declared(Vault)
    assert methods.declared(AsyncVault) == declared
    for facade, derivation in ((Vault, methods.called), (AsyncVault, methods.awaited)):
        public = {n for n in dir(facade) if not n.startswith("_") and callable(getattr(facade, n))}
        assert public == {*declared, "from_settings", "dispose"}, facade
        for name, runs in declared.items():
            if name in vars(facade) and facade is AsyncVault and name in HAND_WRITTEN:
                continue
            # Each made method raises a database error as tenantvault's around its derivation.
            made = vars(facade)[name].__wrapped__
            assert made.__code__ is derivation(runs.method, runs.service).__code__, name
            assert inspect.getclosurevars(made).nonlocals == {
                "method": getattr(runs.service, name),
                "service": runs.service,
            }, name
    assert set(_async_methods()) == HAND_WRITTEN


def test_every_facade_method_raises_database_errors_as_tenantvaults() -> None:
    """Every public method of both facades, made or written by hand, runs inside the one
    translation of database errors (tests/vault/test_database_errors.py runs it)."""
    from tenantvault import AsyncVault, Vault
    from tenantvault.db.failures import translating
    from tenantvault.vault import methods

    def plain() -> None: ...

    async def coroutine() -> None: ...

    wrappers = {translating(plain).__code__, translating(coroutine).__code__}
    for facade in (Vault, AsyncVault):
        for name in methods.declared(facade):
            assert vars(facade)[name].__code__ in wrappers, f"{facade.__name__}.{name}"


def test_a_derived_method_only_runs_its_service_method() -> None:
    """A derivation is one statement: the service's method on the facade's instance of
    that service, with the caller's arguments (Vault: called; AsyncVault: awaited in
    ``self._run``). Run on a stand-in facade, every derived coroutine hands ``_run``
    exactly that and returns what it gives back."""
    import asyncio

    from tenantvault import AsyncVault
    from tenantvault.vault import methods

    tree = ast.parse(MODULES[DECLARED].read_text())
    derivations = {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name in {"called", "awaited"}
    }
    expected = {
        "called": "return method(facade._services.of(service), *args, **kwargs)",
        "awaited": "return await facade._run(method, facade._services.of(service), *args, **kwargs)",
    }
    for name, derivation in derivations.items():
        (run,) = [
            n for n in derivation.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        assert [ast.unparse(statement) for statement in run.body] == [expected[name]], name
    assert set(derivations) == set(expected)

    class StandIn:
        def __init__(self) -> None:
            self.instances: dict[type, object] = {}
            self.ran: list[tuple[object, ...]] = []
            self._services = self

        def of(self, service: type) -> object:
            return self.instances.setdefault(service, object())

        async def _run(self, function: object, *args: object, **kwargs: object) -> str:
            self.ran.append((function, args, kwargs))
            return "its result"

    for name, runs in methods.declared(AsyncVault).items():
        if name in HAND_WRITTEN:
            continue
        facade = StandIn()
        result = asyncio.run(vars(AsyncVault)[name](facade, "t", session="s"))
        service_method = getattr(runs.service, name)
        assert (result, facade.ran) == (
            "its result",
            [(service_method, (facade.of(runs.service), "t"), {"session": "s"})],
        ), name


def test_every_hand_written_async_method_only_runs_the_service_method_of_its_own_name() -> None:
    """Each coroutine AsyncVault writes by hand is its docstring and one statement:
    ``await self._run(self._services.<service>.<its own name>, ...)`` — no validation,
    no statement, no error mapping of its own (``dispose`` closes resources); a hot
    path first awaits its one statement on a held connection, with the core's own
    functions for its statement's parameters and for what its row becomes."""
    strays = []
    for name, method in _async_methods().items():
        if name == "dispose":
            continue
        body = method.body[1:] if ast.get_docstring(method) is not None else method.body
        if name in HOT_PATHS:
            hot, body = body[:-1], body[-1:]
            called = {
                ast.unparse(node.func)
                for statement in hot
                for node in ast.walk(statement)
                if isinstance(node, ast.Call)
            }
            assert called == HOT_PATHS[name], name
        statement = body[0] if len(body) == 1 else None
        awaited = getattr(statement, "value", None)
        call = awaited.value if isinstance(awaited, ast.Await) else None
        target = call.args[0] if isinstance(call, ast.Call) and call.args else None
        if not (
            isinstance(call, ast.Call)
            and ast.unparse(call.func) == "self._run"
            and isinstance(target, ast.Attribute)
            and target.attr == name
            and isinstance(target.value, ast.Attribute)
            and ast.unparse(target.value.value) == "self._services"
        ):
            strays.append(name)
    assert strays == []


@pytest.mark.parametrize(
    "module", [ASYNC_FACADE, DECLARED, "tenantvault.vault.facade", "tenantvault.vault.services"]
)
def test_the_facades_hold_no_sql_no_rules_and_no_private_core_calls(module: str) -> None:
    """The facades (and what makes their methods) only run services."""
    source = MODULES[module].read_text()
    # No statement text, and nothing that builds or runs statements.
    assert _sql_text_in(module) == []
    allowed_sqlalchemy = {"sqlalchemy.ext.asyncio", "sqlalchemy.orm"}
    if module == "tenantvault.vault.facade":
        allowed_sqlalchemy.add("sqlalchemy")  # the Engine type its constructor takes
    imported = GRAPH[module]
    assert {t for t in imported if t.startswith(("sqlalchemy", "psycopg"))} <= allowed_sqlalchemy
    # The rules live in the services and the core: no validators, sealed places, audit,
    # queries, errors here.
    rules = {
        "tenantvault.vault.versions",
        "tenantvault.keys.sealed",
        "tenantvault.audit",
        "tenantvault.audit.events",
        "tenantvault.db.queries",
        "tenantvault.errors",
        "tenantvault.crypto.envelope",
    }
    assert imported & rules == set()
    assert not re.search(r"_core\._", source), "calls into the core's private parts"
    assert "parse_config" not in source
    assert "parse_credentials" not in source


def _sql_text_in(module: str) -> list[str]:
    sql = re.compile(r"(?i)\b(select|insert\s+into|update\s+\S+\s+set|delete\s+from)\b")
    path = MODULES[module]
    return [
        repr(node.value[:60])
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and sql.search(node.value)
        and not _is_docstring(node, path)
    ]


def test_async_vault_has_every_vault_method_with_the_same_signature() -> None:
    """Same names, parameters, kinds, defaults and results (the coroutines' docstrings
    name Vault's method); only ``session``
    (an AsyncSession) and ``refresher`` (which may be a coroutine function) differ."""
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from tenantvault import AsyncVault, OAuthToken, RefreshedToken, Vault
    from tenantvault.vault.aio import Refresher

    def public(cls: type) -> dict[str, typing.Any]:
        return {
            name: member
            for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member)
        }

    sync, asynchronous = public(Vault), public(AsyncVault)
    assert set(sync) == set(asynchronous)
    differ = {
        ("session", Session | None): AsyncSession | None,
        ("refresher", Callable[[OAuthToken], RefreshedToken]): Refresher,
        ("refresher", Callable[[OAuthToken], RefreshedToken] | None): Refresher | None,
    }
    for name, member in sync.items():
        signature, theirs = inspect.signature(member), inspect.signature(asynchronous[name])
        hints, their_hints = (
            typing.get_type_hints(member),
            typing.get_type_hints(asynchronous[name]),
        )
        assert hints["return"] == their_hints["return"], name
        assert list(signature.parameters) == list(theirs.parameters), name
        for parameter in signature.parameters.values():
            other = theirs.parameters[parameter.name]
            assert (parameter.kind, parameter.default) == (other.kind, other.default), name
            hint = hints.get(parameter.name)
            expected = differ.get((parameter.name, hint), hint)
            assert their_hints.get(parameter.name) == expected, f"{name}({parameter.name})"
        if name not in {"from_settings", "dispose"}:
            assert inspect.iscoroutinefunction(asynchronous[name]), name
            assert f"Vault.{name}" in (asynchronous[name].__doc__ or ""), name


def test_only_the_bridge_knows_greenlets() -> None:
    users = {
        source
        for source, targets in GRAPH.items()
        for target in targets
        if target.startswith(("sqlalchemy.util", "greenlet"))
    }
    assert users == {"tenantvault.db.bridge"}


def test_the_shared_core_blocks_only_on_the_database_and_the_key_provider() -> None:
    """What AsyncVault runs on the event loop must not block it: the facade and the
    keys layer make no network or sleeping call of their own (the key provider is
    injected, and runs off the loop for AsyncVault)."""
    blocking = {"requests", "hvac", "socket", "urllib", "http", "httpx", "subprocess"}
    found = [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        if _layer(source) in {"vault", "keys"}
        for target in targets
        if target.split(".")[0] in blocking
    ]
    sleeps = [
        module
        for module, path in MODULES.items()
        if _layer(module) in {"vault", "keys"} and re.search(r"\bsleep\(", path.read_text())
    ]
    assert (found, sleeps) == ([], [])
