"""`wsfleet.ipc.logconfig` and `wsfleet.config_file` on their own: formats, levels, sources.

In-process and quick; the processes' side (every line of a real fleet) is tests/test_logs.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from wsfleet import config_file
from wsfleet.cli import serve_parser
from wsfleet.ipc import control
from wsfleet.ipc.config import FleetConfig, Limits
from wsfleet.ipc.logconfig import JsonFormatter, LogConfig, TextFormatter


def record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("wsfleet.x", logging.WARNING, __file__, 1, message, (), exc_info)


def test_text_and_json_lines() -> None:
    text = TextFormatter("shard 2").format(record("hello there"))
    assert text.endswith(" WARNING shard 2: hello there") and text[23] == "Z"
    entry = json.loads(JsonFormatter("supervisor").format(record('with "quotes"', exc=True)))
    assert entry["process"] == "supervisor" and entry["level"] == "warning"
    assert entry["logger"] == "wsfleet.x" and entry["message"] == 'with "quotes"'
    assert "ValueError: boom" in entry["exception"]


def test_levels_and_the_connection_log_level() -> None:
    assert LogConfig().connection_log_level() is None  # info, no access log: not logged
    assert LogConfig(level="debug").connection_log_level() == logging.DEBUG
    assert LogConfig(access_log=True).connection_log_level() == logging.INFO
    with pytest.raises(ValueError, match="log level"):
        LogConfig(level="loud")
    with pytest.raises(ValueError, match="log format"):
        LogConfig(format="xml")


def test_the_log_config_crosses_the_control_channel() -> None:
    limits = Limits(5.0, 0, 65536, 8192, None, False, 20.0, 20.0)
    config = FleetConfig(
        (), limits, None, False, 1 << 16, log=LogConfig("debug", "json", True), shard_timeout=7.5
    )
    assert control.decode(control.encode(config)) == config
    shard = config.for_shard(1, 4)
    assert shard.log == config.log and shard.shards == 4
    with pytest.raises(ValueError, match="shard_timeout"):
        FleetConfig((), limits, None, False, 1 << 16, shard_timeout=1.0)


def test_file_and_environment_values_go_through_each_option_check(tmp_path: Path) -> None:
    parser = serve_parser()
    path = tmp_path / "w.toml"
    path.write_text('max-peers = 7\nprotocols = ["a", "b"]\naccess_log = true\nbind = "::1"\n')
    assert config_file.from_file(str(path), parser) == {
        "max_peers": 7,
        "protocols": ["a", "b"],
        "access_log": True,
        "bind": "::1",
    }
    env = {"WSFLEET_MAX_PEERS": "9", "WSFLEET_ACCESS_LOG": "off", "WSFLEET_GODOT": "x"}
    assert config_file.from_environment(parser, env) == {"max_peers": 9, "access_log": False}
    for text, problem in [
        ("shards = 0", "shards are 1 to"),
        ("shards = true", "takes a value"),
        ("quiet = 1", "switch"),
        ("config = 'x.toml'", "unknown key"),
        ("protocols = [1]", "must hold strings"),
    ]:
        path.write_text(text + "\n")
        with pytest.raises(config_file.ConfigError, match=problem):
            config_file.from_file(str(path), parser)


def test_a_handler_installed_twice_is_replaced_not_doubled(capsys) -> None:
    from wsfleet.ipc.logconfig import apply

    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        apply(LogConfig(), "front")
        apply(LogConfig(format="json"), "front")
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
