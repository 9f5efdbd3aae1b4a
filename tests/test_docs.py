"""The documents stay true to the code."""

from __future__ import annotations

from pathlib import Path

from tenantvault.dev.erd import BEGIN_MARKER, END_MARKER, render_mermaid

ROOT = Path(__file__).resolve().parents[1]


def test_committed_er_diagram_matches_the_models() -> None:
    text = (ROOT / "docs" / "schema.md").read_text()
    committed = text.split(BEGIN_MARKER, 1)[1].split(END_MARKER, 1)[0].strip("\n")
    assert committed == render_mermaid().strip("\n"), (
        "docs/schema.md is stale: regenerate it with python -m tenantvault.dev.erd"
    )


def test_readme_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo" in readme
    assert "scripts/test" in readme
