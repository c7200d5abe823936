"""``wsfleet serve --app module:attr``: the user's application inside `wsfleet serve`.

Owns the contract between `wsfleet serve` and an application:

* ``attr`` is a callable of ``module`` (imported with the current directory
  on ``sys.path``, as ``python -m`` would): ``setup(server)``;
* it is called once with the `WebSocketServer` `wsfleet serve` configured
  from its options, *before* ``listen``: it connects its signals and may
  change settings (``set_buffers``, attributes);
* it returns None (the application lives in its signal handlers) or a
  per-tick function, ``tick()``, which `wsfleet serve` calls after each
  ``poll`` (every 50 ms at the latest).  A tick that returns ``False`` asks
  for an orderly stop (exit status 0); any other value is ignored.  An
  exception from ``setup`` or a tick ends the server with status 1 (logged
  with its traceback).

`wsfleet serve` keeps the loop (the ``poll`` calls) so that signals, the
exit when every shard is given up, and every operator feature work the same
with any application; an application that needs its own loop uses the
library directly.

Imports the standard library only (the server is handed in).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

Tick = Callable[[], Any]


class AppError(ValueError):
    """``--app`` names nothing callable (its message is the one line the CLI prints)."""


def load(spec: str) -> Callable[[Any], Tick | None]:
    """The callable ``module:attr`` names; AppError if it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"--app {spec}: expected module:attr, e.g. mygame.server:setup")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as python -m: the application next to where it runs
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppError(f"--app {spec}: cannot import {module_name}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppError(f"--app {spec}: {module_name} has no {attr}") from None
    if not callable(target):
        raise AppError(f"--app {spec}: {attr} is not callable")
    return target


def check_tick(spec: str, result: object) -> Tick | None:
    """What ``setup`` returned, checked: None or a callable."""
    if result is None or callable(result):
        return result  # type: ignore[return-value]
    raise AppError(f"--app {spec}: it returned {type(result).__name__}, not None or a function")
