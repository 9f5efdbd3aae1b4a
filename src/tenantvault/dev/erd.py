"""The schema as a Mermaid ER diagram, made from the SQLAlchemy models.

``python -m tenantvault.dev.erd`` prints it, ``python -m tenantvault.dev.erd --write``
refreshes the copy docs/schema.md holds between markers; a test fails when that
copy is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from tenantvault.db.models import Base

BEGIN_MARKER = "<!-- erd:begin (python -m tenantvault.dev.erd --write) -->"
END_MARKER = "<!-- erd:end -->"
DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def _column_line(column: sa.Column[object]) -> str:
    type_name = column.type.compile(dialect=DIALECT).lower()
    type_name = type_name.replace(" without time zone", "").replace("[]", "_array")
    keys = [key for key, has in (("PK", column.primary_key), ("FK", column.foreign_keys)) if has]
    parts = [type_name, column.name, ",".join(keys), '"nullable"' if column.nullable else ""]
    return "        " + " ".join(part for part in parts if part)


def render_mermaid(metadata: sa.MetaData = Base.metadata) -> str:
    """A Mermaid ``erDiagram`` of every table and foreign key in ``metadata``."""
    lines = ["```mermaid", "erDiagram"]
    for table in sorted(metadata.tables.values(), key=lambda t: t.name):
        lines.append(f"    {table.name} {{")
        lines.extend(_column_line(column) for column in table.columns)
        lines.append("    }")
    relations = set()
    for table in metadata.tables.values():
        for constraint in table.foreign_key_constraints:
            referred = constraint.referred_table.name
            columns = ", ".join(constraint.column_keys)
            optional = any(table.columns[key].nullable for key in constraint.column_keys)
            cardinality = "|o--o{" if optional else "||--o{"
            relations.add(f'    {referred} {cardinality} {table.name} : "{columns}"')
    lines.extend(sorted(relations))
    lines.append("```")
    return "\n".join(lines) + "\n"


def write_into(path: Path) -> None:
    """Replace the diagram between the markers in ``path`` with a fresh one."""
    text = path.read_text()
    head, rest = text.split(BEGIN_MARKER, 1)
    tail = rest.split(END_MARKER, 1)[1]
    path.write_text(f"{head}{BEGIN_MARKER}\n{render_mermaid()}{END_MARKER}{tail}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_into(Path(sys.argv[2] if len(sys.argv) > 2 else "docs/schema.md"))
    else:
        print(render_mermaid(), end="")
