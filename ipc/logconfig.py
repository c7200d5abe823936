"""The one logging setup of every wsfleet process: the front, the supervisor, each shard.

Owns `LogConfig` (level, format, access log: what ``wsfleet serve
--log-level/--log-format/--access-log`` say, carried to the supervisor in the
`FleetConfig` and to each shard in its `ShardConfig`) and `apply`, which each
process calls once with its own name, so that every line says when, how bad
and where:

* text: ``2026-12-01T23:40:01.123Z INFO shard 3: message``;
* json: one object per line, ``{"time", "level", "process", "logger", "message"}``
  (plus ``"exception"`` when there is one).

Per-connection lines (the access log: connects and departures, written only
with ``access_log``) go to the logger `ACCESS_LOGGER`.  Refused
handshakes and abnormal closes are logged by the shards at INFO on that
logger with the access log on, else at DEBUG (``--log-level debug``); a shard
decides once at start whether it logs them at all (`connection_log_level`), so
with both off a handshake pays one attribute check, and a message nothing.

Imports the standard library only (the ``ipc`` rule: nothing else of wsfleet).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
ACCESS_LOGGER = "wsfleet.access"
#: A handler `apply` installed (so that a second call replaces it, not doubles lines).
_MARK = "_wsfleet_handler"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How a wsfleet process logs; checked on construction."""

    level: str = "info"
    format: str = "text"
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}: {self.level!r}")
        if self.format not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}: {self.format!r}")

    @property
    def levelno(self) -> int:
        return logging.getLevelName(self.level.upper())

    def connection_log_level(self) -> int | None:
        """The level of refusal and abnormal-close lines; None when they are not logged."""
        if self.access_log:
            return logging.INFO
        if self.levelno <= logging.DEBUG:
            return logging.DEBUG
        return None


def _timestamp(created: float) -> str:
    """UTC, ISO 8601 with milliseconds: sortable, and the same in every process."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname} {self.process}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def apply(config: LogConfig, process: str) -> None:
    """Make this process log as ``config`` says, each line naming ``process`` (e.g. "shard 3").

    Replaces the handler a previous `apply` installed (a forked shard
    inherits the supervisor's) and leaves other handlers alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(
        JsonFormatter(process) if config.format == "json" else TextFormatter(process)
    )
    root.addHandler(handler)
    root.setLevel(config.levelno)
    logging.getLogger("wsfleet").setLevel(logging.NOTSET)
    # The access logger follows the root's level: whether a shard emits its lines at all
    # is decided once, from access_log and the level (`connection_log_level`).
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # no line per connection
