"""The audit chain's hash, computed here from the rows (not by the database).

``audit verify`` must not trust a function the database owner can replace, so the
encoding lives in code: SHA-256 over the text PostgreSQL gives a ``jsonb`` array of
the previous hash and the row's fields (the trigger's ``tenantvault_audit_digest``
computes the same when an event is written). That text is: arrays and objects with
``", "`` and ``": "`` between items, object keys ordered shortest first and then by
their UTF-8 bytes (duplicates: the last wins), strings with ``"``, ``\\`` and control
characters escaped, ``null``, ``true``, ``false``, and numbers as PostgreSQL's
``numeric`` prints the value it stored (see :func:`number_text`).

Numbers are why ``audit verify`` reads ``details`` as the ``jsonb``'s text and
parses it here with :class:`~decimal.Decimal`, never as floats: a float has lost
what the trigger hashed (``1.50`` and ``1.5`` are one float, two texts). The
encoding the trigger writes is unchanged since migration 0008, so every chain
already stored verifies with it; there is no second digest version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _string(value: str) -> str:
    out = []
    for char in value:
        escaped = _ESCAPES.get(char)
        if escaped is None and ord(char) < 0x20:
            escaped = f"\\u{ord(char):04x}"
        out.append(escaped or char)
    return '"' + "".join(out) + '"'


def number_text(value: Decimal | float) -> str:
    """A JSON number as ``jsonb`` prints it: the value ``numeric`` stored, in plain
    notation (no exponent), with the scale it was written with (``1.50`` stays
    ``1.50``, ``1.5e-7`` is ``0.00000015``, ``1E+2`` is ``100``) and no negative zero.

    A float is taken as ``json.dumps`` would send it (its shortest repr)."""
    number = Decimal(repr(value)) if isinstance(value, float) else value
    if not number.is_finite():
        raise TypeError("not a JSON number: not finite")
    text = format(number, "f")
    # numeric has no negative zero: '-0.0' is stored as 0.0.
    return text[1:] if number.is_zero() and text.startswith("-") else text


def jsonb_text(value: Any) -> str:
    """``value`` as PostgreSQL prints it as ``jsonb`` text."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal | float):
        return number_text(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{_string(k)}: {jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(jsonb_text(item) for item in value) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def event_hash(
    prev_hash: str,
    tenant_id: str,
    seq: int,
    occurred_at: datetime,
    actor: str | None,
    action: str,
    target_type: str | None,
    target_id: str | None,
    details: Mapping[str, Any],
) -> str:
    """The hash an event's row must carry, given the hash of the one before it."""
    fields = [
        prev_hash,
        tenant_id,
        seq,
        occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        actor,
        action,
        target_type,
        target_id,
        details,
    ]
    return hashlib.sha256(jsonb_text(fields).encode()).hexdigest()
