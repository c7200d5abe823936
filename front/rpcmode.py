"""Godot's RPC keywords as Python decorators: which methods and properties clients may reach.

In GDScript a ``remote func`` may be called by ``rpc``, a ``puppet var`` set by
``rset``; here the same keywords mark a method or a class attribute of an
object registered with `MultiplayerAPI.register_node`:

.. code-block:: python

    class Player:
        @wsfleet.remote             # any peer may call it
        def say(self, text): ...

        @wsfleet.master             # only when the server is the node's network master
        def move(self, direction): ...

        hp = wsfleet.puppet(100)    # an rset-able attribute, default 100
        name = wsfleet.remote("")   # (a ``property`` may be wrapped too)

The rules are Godot 3.2's (``core/io/multiplayer_api.cpp``): `can_call` says
whether a remote peer may call or set, `calls_local` whether the server's own
``rpc``/``rset`` also runs locally and whether it still goes out.

Imports the standard library only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

_ATTRIBUTE = "__wsfleet_rpc_mode__"
_F = TypeVar("_F", bound=Callable[..., Any])


class RPCMode(enum.IntEnum):
    """Godot 3.2's ``MultiplayerAPI.RPCMode`` (same values)."""

    DISABLED = 0
    REMOTE = 1
    MASTER = 2
    PUPPET = 3
    REMOTESYNC = 4
    MASTERSYNC = 5
    PUPPETSYNC = 6


def can_call(mode: RPCMode, is_master: bool, sender: int, master: int) -> bool:
    """Whether peer ``sender`` may call (or set) a member of mode ``mode`` on a node whose
    network master is ``master`` (``is_master``: this side is that master)."""
    if mode is RPCMode.REMOTE or mode is RPCMode.REMOTESYNC:
        return True
    if mode is RPCMode.MASTER or mode is RPCMode.MASTERSYNC:
        return is_master
    if mode is RPCMode.PUPPET or mode is RPCMode.PUPPETSYNC:
        return not is_master and sender == master
    return False


def calls_local(mode: RPCMode, is_master: bool) -> tuple[bool, bool]:
    """For this side's own ``rpc``/``rset`` to everyone: (run it here too, skip sending it)."""
    if mode is RPCMode.MASTERSYNC:
        return True, is_master
    if mode is RPCMode.REMOTESYNC or mode is RPCMode.PUPPETSYNC:
        return True, False
    if mode is RPCMode.MASTER:
        return is_master, is_master
    if mode is RPCMode.PUPPET:
        return not is_master, False
    return False, False


class RsetProperty:
    """A class attribute that ``rset`` may set (made by the decorators from a value)."""

    def __init__(self, mode: RPCMode, default: Any) -> None:
        self.mode = mode
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


class _MarkedProperty(property):
    """A ``property`` with an RPC mode (its setter runs for ``rset``); the mode stays when
    ``@name.setter`` (or ``getter``/``deleter``) makes the property anew."""

    mode: RPCMode = RPCMode.DISABLED

    def _same_mode(self, other: property) -> property:
        other.mode = self.mode  # type: ignore[attr-defined]
        return other

    def getter(self, fget: Callable[[Any], Any]) -> property:
        return self._same_mode(super().getter(fget))

    def setter(self, fset: Callable[[Any, Any], None]) -> property:
        return self._same_mode(super().setter(fset))

    def deleter(self, fdel: Callable[[Any], None]) -> property:
        return self._same_mode(super().deleter(fdel))


def _marker(mode: RPCMode) -> Callable[[Any], Any]:
    def mark(target: Any) -> Any:
        if isinstance(target, property):
            marked = _MarkedProperty(target.fget, target.fset, target.fdel, target.__doc__)
            marked.mode = mode
            return marked
        if callable(target):
            setattr(target, _ATTRIBUTE, mode)
            return target
        return RsetProperty(mode, target)

    mark.__name__ = mode.name.lower()
    mark.__doc__ = (
        f"Godot's ``{mode.name.lower()}``: mark a method (rpc), or make an rset-able "
        "attribute from a default value or a property."
    )
    return mark


remote = _marker(RPCMode.REMOTE)
master = _marker(RPCMode.MASTER)
puppet = _marker(RPCMode.PUPPET)
remotesync = _marker(RPCMode.REMOTESYNC)
mastersync = _marker(RPCMode.MASTERSYNC)
puppetsync = _marker(RPCMode.PUPPETSYNC)


def rpc_mode(obj: Any, method: str) -> RPCMode:
    """The mode of ``obj``'s method ``method`` (DISABLED: not marked, or no such method)."""
    member = getattr(type(obj), method, None)
    if member is None or not callable(member):
        return RPCMode.DISABLED
    return getattr(member, _ATTRIBUTE, RPCMode.DISABLED)


def rset_mode(obj: Any, prop: str) -> RPCMode:
    """The mode of ``obj``'s attribute ``prop`` (DISABLED: not marked, or none)."""
    member = getattr(type(obj), prop, None)
    if isinstance(member, (RsetProperty, _MarkedProperty)):
        return member.mode
    return RPCMode.DISABLED
