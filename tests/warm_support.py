"""Counting what reaches Vault: every HTTP request of a real transit provider."""

from __future__ import annotations

from typing import Any

import hvac
import requests

from tenantvault.kms.transit import TransitKeyProvider
from tests.conftest import Services


class CountingSession(requests.Session):
    """A requests session that counts the requests it sends, by path."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        self.paths.append(str(url).split("/v1/", 1)[-1])
        return super().request(method, url, *args, **kwargs)

    def count(self, prefix: str) -> int:
        """Requests whose path (after ``/v1/``) starts with ``prefix``."""
        return sum(1 for path in self.paths if path.startswith(prefix))


def counted_transit(
    services: Services,
    *,
    key_name: str = "tenantvault-tests",
    url: str | None = None,
    token: str | None = None,
    **kwargs: Any,
) -> tuple[TransitKeyProvider, CountingSession]:
    """A transit provider on the test OpenBao (or ``url``), and its requests' counter."""
    session = CountingSession()
    client = hvac.Client(
        url=url or services.vault_addr,
        token=token or services.vault_token,
        timeout=5,
        session=session,
    )
    return TransitKeyProvider(client, key_name=key_name, **kwargs), session
