"""Godot-style signals: ``obj.connect("name", callable)``, emitted inside ``poll()``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .errors import Error

log = logging.getLogger("wsfleet")


class SignalEmitter:
    """A fixed set of named signals (``SIGNALS``), each with a list of callables.

    A callable that raises is logged with its traceback and the remaining
    callables and events still run: one faulty handler must not lose the
    events of other peers that the same ``poll()`` already took.
    """

    SIGNALS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._handlers: dict[str, list[Callable[..., Any]]] = {name: [] for name in self.SIGNALS}

    def connect(self, signal: str, handler: Callable[..., Any]) -> Error:
        handlers = self._handlers.get(signal)
        if handlers is None:
            log.error("connect: no signal %r (signals: %s)", signal, ", ".join(self.SIGNALS))
            return Error.ERR_INVALID_PARAMETER
        if handler in handlers:
            log.error("connect: %r is already connected to %r", handler, signal)
            return Error.ERR_INVALID_PARAMETER
        handlers.append(handler)
        return Error.OK

    def disconnect(self, signal: str, handler: Callable[..., Any]) -> None:
        handlers = self._handlers.get(signal, [])
        if handler in handlers:
            handlers.remove(handler)

    def is_connected(self, signal: str, handler: Callable[..., Any]) -> bool:
        return handler in self._handlers.get(signal, ())

    def emit_signal(self, signal: str, *args: Any) -> None:
        for handler in self._handlers[signal]:
            try:
                handler(*args)
            except Exception:
                log.exception("error in a %r handler", signal)
