"""The documents stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

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


# --- the documents are self-contained: every relative link resolves inside the repository ---

DOCUMENTS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCED = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.DOTALL | re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)
_SCHEME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|//)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def _without_code(text: str) -> str:
    return _INLINE_CODE.sub("", _FENCED.sub("", text))


def link_targets(text: str) -> list[str]:
    """The targets of the markdown links and link definitions outside code."""
    prose = _without_code(text)
    return [m.group(1) for m in (*_INLINE_LINK.finditer(prose), *_REFERENCE.finditer(prose))]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings (and the explicit HTML anchors) of a document."""
    found: set[str] = set(_HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCED.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(document: Path, root: Path) -> list[str]:
    """Each relative link of ``document`` that does not resolve to a file (and anchor)
    inside ``root``; links with a scheme (``https:``, ``mailto:``) are not relative."""
    text = document.read_text()
    broken = []
    for target in link_targets(text):
        if _SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        path = unquote(path)
        if not path:
            resolved = document
        elif path.startswith("/"):
            resolved = (root / path.lstrip("/")).resolve()
        else:
            resolved = (document.parent / path).resolve()
        where = f"{document.relative_to(root)}: ({target})"
        if not resolved.is_relative_to(root.resolve()):
            broken.append(f"{where} points outside the repository")
        elif not resolved.exists():
            broken.append(f"{where} names no file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{where} names no heading of {resolved.relative_to(root.resolve())}")
    return broken


def test_the_link_check_finds_links_that_leave_or_miss(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Vault policy (least privilege)\n")
    document = tmp_path / "README.md"
    document.write_text(
        "[ok](docs/guide.md) [ok](docs/guide.md#vault-policy-least-privilege) [ok](#top)\n"
        "[web](https://example.com/x) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "# Top\n"
        "[out](../shared/DESIGN.md) [missing](docs/gone.md)\n"
        "[bad anchor](docs/guide.md#nothing) [self](#nothing-here)\n"
        "[defined]: docs/also-gone.md\n"
    )
    assert broken_links(document, tmp_path) == [
        "README.md: (../shared/DESIGN.md) points outside the repository",
        "README.md: (docs/gone.md) names no file",
        "README.md: (docs/guide.md#nothing) names no heading of docs/guide.md",
        "README.md: (#nothing-here) names no heading of README.md",
        "README.md: (docs/also-gone.md) names no file",
    ]


def test_every_relative_link_of_the_documents_resolves_inside_the_repository() -> None:
    assert len(DOCUMENTS) >= 3
    broken = [problem for document in DOCUMENTS for problem in broken_links(document, ROOT)]
    assert broken == []


def test_the_documents_cite_nothing_outside_the_repository() -> None:
    for document in DOCUMENTS:
        text = document.read_text()
        name = document.relative_to(ROOT)
        assert "../shared" not in text, f"{name} cites ../shared, outside the repository"
        if not (ROOT / "DESIGN.md").exists():
            assert "DESIGN.md" not in text, f"{name} cites DESIGN.md, not in the repository"
