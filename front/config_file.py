"""`wsfleet serve`'s options from a TOML file (``--config FILE``) and ``WSFLEET_*`` variables.

Owns where an option's value comes from besides the command line.  The
precedence is: command line > environment > file > built-in defaults.  It
works on the serve parser itself, so that every option (today's and any
added later) is covered without a list to keep up to date:

* a file key is an option's name without the dashes, with ``-`` or ``_``
  (``max-peers = 100`` or ``max_peers = 100``); values are TOML's own types
  (a number, a string, ``true`` / ``false`` for a switch, a list of strings
  for a comma-separated option such as ``protocols``);
* a variable is ``WSFLEET_`` and the name in capitals with ``_``
  (``WSFLEET_MAX_PEERS=100``); a switch takes ``1/true/yes/on`` or
  ``0/false/no/off``.  Variables that name no option are left alone
  (``WSFLEET_GODOT`` belongs to the benchmarks);
* each value goes through the option's own check (its argparse type and
  choices), so a bad one is refused with the option's own message.

`ConfigError` carries the one line the CLI prints before it exits with 2.

Imports the standard library only.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "WSFLEET_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: Options that cannot come from the file (the file itself).
_NOT_IN_FILE = {"config"}


class ConfigError(ValueError):
    """A bad key or value in the file or the environment (its message is the one line)."""


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option of ``parser`` by its dest (``max_peers``), --help and --version aside."""
    return {
        action.dest: action
        for action in parser._actions  # argparse's public-enough list of what it parses
        if action.option_strings
        and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
    }


def _convert(action: argparse.Action, text: str, where: str) -> Any:
    """``text`` as the option would take it on the command line; ConfigError if it would not."""
    option = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{where}: {option} is a switch: true or false, not {text!r}")
    value: Any = text
    if action.type is not None:
        try:
            value = action.type(text)  # type: ignore[misc]
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {option}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {option}: {text!r} is not one of {choices}")
    return value


def _toml_text(action: argparse.Action, value: Any, where: str) -> str:
    """A TOML value as the option's command-line text (lists joined with commas)."""
    option = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {option} is a switch: true or false, not {value!r}")
        return "true" if value else "false"
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {option} takes a value, not {value!r}")
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: {option}: a list must hold strings: {value!r}")
        return ",".join(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"{where}: {option}: not a number, string or list: {value!r}")


def from_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options ``path`` sets, by dest, checked; ConfigError for anything wrong."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not TOML: {exc}") from None
    options = _options(parser)
    values: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = options.get(dest)
        if action is None or dest in _NOT_IN_FILE:
            known = ", ".join(sorted(name for name in options if name not in _NOT_IN_FILE))
            raise ConfigError(f"--config {path}: unknown key {key!r} (known: {known})")
        where = f"--config {path}: {key}"
        values[dest] = _convert(action, _toml_text(action, value, where), where)
    return values


def from_environment(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The options ``WSFLEET_*`` variables set, by dest, checked."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for dest, action in _options(parser).items():
        name = ENV_PREFIX + dest.upper()
        if name in environ:
            values[dest] = _convert(action, environ[name], name)
    return values


def apply_sources(
    parser: argparse.ArgumentParser,
    parse: Callable[[], argparse.Namespace],
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """``parse()`` again with ``parser``'s defaults taken from the environment and the file.

    ``parser`` is serve's (sub)parser and ``parse`` parses the command line
    with it.  The file is named by ``--config`` (or ``WSFLEET_CONFIG``);
    what the command line leaves out comes from the environment, then the
    file.
    """
    first = parse()
    env = from_environment(parser, environ)
    path = getattr(first, "config", None) or env.get("config")
    defaults: dict[str, Any] = {}
    if path:
        defaults.update(from_file(path, parser))
    defaults.update(env)
    if not defaults:
        return first
    parser.set_defaults(**defaults)
    return parse()
