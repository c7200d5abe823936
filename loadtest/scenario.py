"""What a scenario is: one kind of load, as every front end runs it.

Owns: `Scenario`, the base class of the five scenarios (echo, broadcast, connect,
idle, mp-relay): its name, the application its servers run (``mode``), its table,
its options and their checks, its one-line texts, and `Scenario.measure` (one run
against a server that is up: its figures). `ProcessScenario` is the kind whose
load runs in spawned load processes (`loadprocs.run_clients`): it says what each
process runs (`ProcessScenario.load`) and what figures come of their results
(`ProcessScenario.figures`). The front ends (the benchmarks' command lines through
`bench`, ``wsfleet loadtest`` on any URL, ``compare``) call only these methods.

May import `loadprocs`, `report` and `servers`.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from wsfleet.loadtest.loadprocs import Load, Progress, run_clients
from wsfleet.loadtest.report import Table
from wsfleet.loadtest.servers import Target


class Scenario(ABC):
    """One kind of load. Subclasses set the class attributes and the abstract methods."""

    name: ClassVar[str]
    mode: ClassVar[str]  # the application the servers run: "echo", "broadcast" or "mp-relay"
    table: ClassVar[Table]
    seconds: ClassVar[float | None] = 5.0  # the default measured window; None: it has none
    one_process: ClassVar[bool] = False  # the load runs in one load process
    in_this_process: ClassVar[bool] = False  # the load runs in the driving process itself

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Its own options (the load, server and run options are the front end's)."""

    @abstractmethod
    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """``parser.error`` for options it cannot run (it may fill in derived defaults)."""

    @abstractmethod
    def config_text(self, args: argparse.Namespace) -> str:
        """One line on what a run does."""

    @abstractmethod
    def describe(self, run: dict[str, Any]) -> str:
        """One run's figures in one line."""

    def prepare(self, args: argparse.Namespace) -> None:
        """Before any server starts (they inherit what it sets); RuntimeError to refuse.
        Nothing by default."""
        return None

    def expected_seconds(self, args: argparse.Namespace) -> float:
        """How long one run's load should take, set-up and close aside."""
        return args.warmup + args.seconds

    @abstractmethod
    def measure(
        self, args: argparse.Namespace, target: Target, progress: Progress
    ) -> dict[str, Any]:
        """One run against a server that is up: its figures. RuntimeError, OSError,
        EOFError or psutil.Error when the load could not run."""


class ProcessScenario(Scenario):
    """A scenario whose load runs in load processes (`loadprocs.run_clients`)."""

    @abstractmethod
    def load(self, args: argparse.Namespace) -> Load:
        """What each load process runs, with its config."""

    @abstractmethod
    def figures(self, results: list[Any], server_cpu: float, window: float) -> dict[str, Any]:
        """One run's figures from the load processes' results, the server's CPU seconds in
        the window and the window's length (as the driving process measured it)."""

    def measure(
        self, args: argparse.Namespace, target: Target, progress: Progress
    ) -> dict[str, Any]:
        results, server_cpu, window = run_clients(self.load(args), args, target, progress)
        figures = self.figures(results, server_cpu, window)
        figures["server_processes"] = target.server_processes()
        return figures
