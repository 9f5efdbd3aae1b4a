"""What a failed request to transit means, in the words an operator acts on: the token
was refused (or only this request was), the host's name does not resolve, nothing
answered, or the server is sealed. Shared by the key provider and ``status``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import hvac
import requests

from tenantvault.kms.failover import NoActiveNodeError

TOKEN_REFUSED = "the token was refused (not a valid token: mistyped, expired or revoked)"  # noqa: S105 - a message


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: requests keeps urllib3's error in its args, which
    keeps the socket's error as its ``reason`` or cause."""
    seen: set[int] = set()
    stack: list[object] = [error]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        stack += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]


def unresolved_host(error: BaseException, address: str) -> str | None:
    """The host name of ``address`` when ``error`` says it did not resolve (DNS)."""
    if any(isinstance(cause, socket.gaierror) for cause in _causes(error)):
        return urlsplit(address).hostname or address
    return None


def unanswered(error: BaseException, address: str) -> str:
    """Why transit at ``address`` did not serve a request, as the end of a sentence
    that starts with the address: "... is unreachable (no connection)"."""
    if isinstance(error, requests.exceptions.ConnectionError):
        host = unresolved_host(error, address)
        if host is not None:
            return f"cannot be found: the host name {host} does not resolve"
        return "is unreachable (no connection)"
    if isinstance(error, NoActiveNodeError):
        return "has no active node (an election under way, or too few nodes unsealed)"
    if isinstance(error, hvac.exceptions.VaultDown):
        return "is sealed or not initialised"
    return f"answered with a server error ({type(error).__name__})"


def token_refused(client: hvac.Client) -> bool:
    """Whether a 403 refused the token itself rather than one request of a valid token.

    Transit answers both with 403 "permission denied"; a valid token may look itself
    up (the default policy allows it), an unknown, expired or revoked one, or none,
    may not. A token created without the default policy reads as refused too. Unsure
    (the lookup got no answer): False, and the request's own refusal is reported."""
    try:
        client.auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        return True
    except (requests.exceptions.RequestException, hvac.exceptions.VaultError):
        return False
    return False
