"""What the application hears about its users' OAuth grants: ``on_token_event``.

A grant that fails for good (the provider said ``invalid_grant``: re-consent is
needed; or it refused the client: ``failed``) and one that recovers (a new grant
stored where re-consent was needed) call the application's hook, the way it sends
its own webhook or e-mail, and count in the metrics. The hook runs after the change
commits; whatever it raises is logged and dropped (a webhook that fails must not
undo or hide the refresh's outcome).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenantvault.metrics import Metrics, TokenEventOutcome

log = logging.getLogger("tenantvault")


@dataclass(frozen=True)
class TokenEvent:
    """One grant event: which tenant and config, and what happened (never a token).

    ``outcome``: ``reconsent_required`` (the grant was revoked or lapsed: send the
    user through ``authorization_url`` again), ``failed`` (the provider refused the
    client: its secret or registration needs an operator; ``reason`` names the OAuth
    error code) or ``recovered`` (a new grant was stored after re-consent)."""

    tenant_id: str
    config_id: str
    outcome: TokenEventOutcome
    reason: str = ""


TokenEventHook = Callable[[TokenEvent], Awaitable[None] | None]
"""``on_token_event``: a function (``Vault``), or a function or coroutine function
(``AsyncVault``: awaited on the loop)."""


def _await_nothing(awaited: Awaitable[object]) -> object:
    raise TypeError("Vault's on_token_event must be a plain function (AsyncVault awaits)")


class TokenEvents:
    """Where a facade's grant events go: the metrics, and the application's hook.

    ``wait``: how a coroutine the hook returned is awaited (``AsyncVault``: suspending
    the task in the bridge's greenlet; ``Vault`` refuses coroutines)."""

    def __init__(
        self,
        metrics: Metrics,
        hook: TokenEventHook | None = None,
        *,
        wait: Callable[[Awaitable[object]], object] = _await_nothing,
    ) -> None:
        if hook is not None and not callable(hook):
            raise TypeError("on_token_event must be callable")
        if wait is _await_nothing and inspect.iscoroutinefunction(hook):
            raise TypeError("Vault's on_token_event must be a plain function (AsyncVault awaits)")
        self._metrics = metrics
        self._hook = hook
        self._wait = wait

    def emit(self, event: TokenEvent) -> None:
        """Count ``event`` and hand it to the hook (after the change committed)."""
        self._metrics.oauth_event(event.outcome)
        if self._hook is None:
            return
        try:
            answered = self._hook(event)
            if inspect.isawaitable(answered):
                self._wait(answered)
        except Exception:
            log.exception(
                "on_token_event failed for %s of config %s of tenant %s",
                event.outcome,
                event.config_id,
                event.tenant_id,
            )
