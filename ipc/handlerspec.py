"""``module:attr`` of a shard handler, resolved: where the front checks it and shards load it.

`resolve` imports ``module`` (the current directory on ``sys.path``, as
``python -m`` would: a successor started by ``wsfleet reload`` runs in the
supervisor's directory and finds it there too) and returns ``attr``, which
must be callable; anything else is a `ValueError` naming ``shard_handler``.

Imports the standard library only.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


def resolve(spec: object) -> Callable[..., Any]:
    """The callable ``spec`` (``"module:attr"``, attr may be dotted) names; ValueError if none."""
    if not isinstance(spec, str):
        raise ValueError(f"shard_handler must be a 'module:attr' string: {spec!r}")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"shard_handler {spec}: expected module:attr, e.g. mygame.shard:handler")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"shard_handler {spec}: cannot import {module_name}: {exc}") from None
    except Exception as exc:  # its top level raised: as bad as a missing module
        raise ValueError(
            f"shard_handler {spec}: importing {module_name} raised {type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"shard_handler {spec}: {module_name} has no {attr}") from None
    if not callable(target):
        raise ValueError(f"shard_handler {spec}: {attr} is not callable")
    return target
