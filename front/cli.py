"""The ``wsfleet`` command."""

from __future__ import annotations

import argparse

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfleet",
        description="Godot 3.2's WebSocketServer API over one worker process per core.",
    )
    parser.add_argument("--version", action="version", version=f"wsfleet {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    # The server and its subcommands arrive with the sharded server.
    print(f"wsfleet {__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
