"""Row ids: the same shape whether Python or the database makes them."""

from __future__ import annotations

import uuid

# The deployed application makes cuid2 ids in its own code and the database has
# no generate_cuid(). tenantvault's rows use "tv" + 32 hex digits (122 random
# bits), made here or by the database function of the same shape that the
# migrations install, so set-based SQL data migrations can insert rows too.
ID_PREFIX = "tv"


def new_id() -> str:
    """A fresh random row id."""
    return ID_PREFIX + uuid.uuid4().hex
