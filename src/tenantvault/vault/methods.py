"""How a facade method is declared once and made for both facades.

Each service module declares its facade methods beside the service, one line each:
``TokenMethods(FacadeMethods[CallerSession])`` holds ``store_oauth_token =
Runs(TokenService[CallerSession].store_oauth_token)``, and so on.
``VaultMethods`` (``services.py``) joins the lists. ``Vault`` is a
``VaultMethods[Session]``: each method calls its service's in the caller's thread
(:func:`called`). ``AsyncVault`` is a ``VaultMethods[AsyncSession]``: each method
awaits its service's in the bridge's greenlet (:func:`awaited`, through
``AsyncVault._run``), unless ``AsyncVault`` writes it by hand (its hot paths). The
methods are made with the facade class: real functions, with the service method's
docstring, parameters and defaults, ``session`` typed by the facade.

mypy sees the same: a :class:`Runs` is, on a ``FacadeMethods[Session]``, the service
method's own signature, and on a ``FacadeMethods[AsyncSession]`` the same awaited,
``session`` an ``AsyncSession``; a hand-written coroutine of ``AsyncVault`` is checked
against it as any override.
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
import typing
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tenantvault.db.failures import translating
from tenantvault.vault.core import CallerSession

Service = TypeVar("Service")
P = ParamSpec("P")
T = TypeVar("T")


def _service_of(method: Callable[..., Any]) -> type[Any]:
    # A function names its class only in its qualified name: Service.method.
    owner = getattr(sys.modules[method.__module__], method.__qualname__.partition(".")[0])
    assert isinstance(owner, type), method
    assert vars(owner).get(method.__name__) is method, method
    return owner


class Runs(Generic[Service, P, T]):
    """A facade method: ``method`` (a service's, of the same name) run on the facade's
    instance of that service. ``async_note``: what ``AsyncVault``'s docstring adds."""

    def __init__(
        self, method: Callable[Concatenate[Service, P], T], *, async_note: str = ""
    ) -> None:
        self.method: Callable[..., Any] = method
        self.service: type[Any] = _service_of(method)
        self.async_note = async_note

    def __set_name__(self, owner: type, name: str) -> None:
        if name != self.method.__name__:
            raise TypeError(f"{name} must run {self.service.__name__}.{name}, not another method")

    @overload
    def __get__(self, facade: None, owner: type) -> Runs[Service, P, T]: ...
    @overload
    def __get__(self, facade: FacadeMethods[Session], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, facade: FacadeMethods[AsyncSession], owner: type
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, facade: object, owner: type) -> Any:
        # A facade class gets a method in place of every Runs (FacadeMethods.__init_subclass__).
        if facade is not None:
            raise TypeError(f"{owner.__name__} is not a facade: FacadeMethods[Session] makes one")
        return self


class FacadeMethods(Generic[CallerSession]):
    """The base of each service's declared list and of the facades: a class made
    with a session type (``Vault``: ``Session``; ``AsyncVault``: ``AsyncSession``) gets
    every declared method of its bases made for it (:func:`called`, :func:`awaited`),
    except those it writes itself; each of them, made or written, raises a database
    error as tenantvault's (:func:`tenantvault.db.failures.translating`). It holds its
    services in ``_services`` (:class:`tenantvault.vault.services.Services`).
    """

    def __init_subclass__(cls, **options: Any) -> None:
        super().__init_subclass__(**options)
        session = _session_of(cls)
        if session is None:
            return  # a declared list (made with CallerSession), or a facade's subclass
        derive = {Session: called, AsyncSession: awaited}[session]
        for name, runs in declared(cls).items():
            made = vars(cls).get(name)  # AsyncVault's hand-written hot paths stay
            if made is None:
                made = _named(derive(runs.method, runs.service), cls, runs, session)
            # The one place a database error becomes tenantvault's, for every path of
            # both facades (the hot path's psycopg errors and the full path's SQLAlchemy
            # ones): no method maps its own.
            setattr(cls, name, translating(made))


def declared(facade: type) -> dict[str, Runs[Any, ..., Any]]:
    """Every method declared for ``facade`` (in its bases' lists), by name."""
    return {
        name: runs
        for base in reversed(facade.__mro__)
        for name, runs in vars(base).items()
        if isinstance(runs, Runs)
    }


# --- the derivations: what a declared method is on each facade ---


def called(method: Callable[..., Any], service: type[Any]) -> Callable[..., Any]:
    """``Vault``'s method: ``method`` on the facade's ``service``, in the caller's thread."""

    def run(facade: Any, /, *args: Any, **kwargs: Any) -> Any:
        return method(facade._services.of(service), *args, **kwargs)

    return run


def awaited(method: Callable[..., Any], service: type[Any]) -> Callable[..., Any]:
    """``AsyncVault``'s method: ``method`` on the facade's ``service``, awaited in the
    bridge's greenlet (``AsyncVault._run``: a turn unless it joins a session)."""

    async def run(facade: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await facade._run(method, facade._services.of(service), *args, **kwargs)

    return run


def _named(
    function: Callable[..., Any], facade: type, runs: Runs[Any, ..., Any], session: type
) -> Callable[..., Any]:
    """``function`` as the facade's method of ``runs``: its name, its docstring, and
    the service method's signature with ``session`` of the facade's type."""
    method = runs.method
    name = method.__name__
    function.__name__, function.__qualname__ = name, f"{facade.__name__}.{name}"
    function.__module__ = facade.__module__
    if session is Session:
        function.__doc__ = method.__doc__
    else:
        note = f": {runs.async_note}" if runs.async_note else ""
        function.__doc__ = f"``Vault.{name}``, awaited{note}."
    hints = {key: _bound(hint, session) for key, hint in typing.get_type_hints(method).items()}
    signature = inspect.signature(method)
    itself, *rest = signature.parameters.values()  # the service's self: now the facade
    parameters = [parameter.replace(annotation=hints[parameter.name]) for parameter in rest]
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[itself, *parameters], return_annotation=hints["return"]
    )
    function.__annotations__ = {
        **{parameter.name: parameter.annotation for parameter in parameters},
        "return": hints["return"],
    }
    return function


def _bound(hint: Any, session: type) -> Any:
    """``hint`` with ``CallerSession`` bound to ``session``: ``CallerSession | None``
    becomes ``Session | None`` (or ``AsyncSession | None``), as a facade writes it."""
    if hint is CallerSession:
        return session
    if typing.get_origin(hint) is typing.Union and CallerSession in typing.get_args(hint):
        return functools.reduce(
            operator.or_, (_bound(arg, session) for arg in typing.get_args(hint))
        )
    if CallerSession in getattr(hint, "__parameters__", ()):
        raise TypeError(f"{hint}: a facade method takes CallerSession only as X or X | None")
    return hint


def _session_of(facade: type) -> type | None:
    """The session type ``facade`` is made with (None for a service's declared list,
    made with ``CallerSession``, and for a subclass of a facade, which inherits its
    methods)."""
    for base in vars(facade).get("__orig_bases__", ()):
        for session in typing.get_args(base):
            if session in (Session, AsyncSession):
                assert isinstance(session, type)
                return session
    return None
