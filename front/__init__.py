"""wsfleet: Godot 3.2's WebSocketServer API, served by one worker process per core.

This folder (``front/``) is the import package ``wsfleet`` itself: the public
API that runs in the user's process (the front) and the ``wsfleet`` command.
It may import `wsfleet.ipc` and starts the supervisor as a fresh interpreter;
nothing imports it except the CLI, tests and examples.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
