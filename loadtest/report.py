"""The summary of a benchmark: medians over the runs, the table with the ratio to a base
server, the JSON file and the exit status.

Owns: `Column` and `Table` (how a scenario's figures are summed up and shown),
`summarize_servers`, `print_table`, `report`, and the small helpers the other
front ends share (`ratio_base`, `client_capacity_pct`, `config_of`, `all_clean`).

Imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    """One column of the table: a summary value, or (``key=""``) the ratio to the first
    server's rate."""

    title: str
    key: str
    width: int
    spec: str = ""  # format spec of the value
    suffix: str = ""

    def cell(self, summary: dict[str, Any], ratio: str) -> str:
        if not self.key:
            return f"{ratio:>{self.width}}"
        return f"{summary[self.key]:>{self.width - len(self.suffix)}{self.spec}}{self.suffix}"


@dataclass(frozen=True)
class Table:
    rate: str  # the summary value the ratio compares
    medians: tuple[str, ...]  # summary values: medians over the good runs
    sums: tuple[str, ...]  # summary values: totals over the good runs, 0 for exit status 0
    columns: tuple[Column, ...]
    name_width: int
    lower_is_better: bool = False  # of ``rate`` (memory per connection)

    def rate_title(self) -> str:
        return next(c.title for c in self.columns if c.key == self.rate)


def summarize(runs: list[dict[str, Any]], table: Table) -> dict[str, Any] | None:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in good) for k in table.medians}
    for k in table.sums:
        summary[k] = sum(r[k] for r in good)
    summary["runs_ok"] = len(good)
    return summary


def summarize_servers(servers: list[dict[str, Any]], table: Table) -> None:
    """Each server's ``summary`` (None, with a ``failure``, when no run succeeded)."""
    for s in servers:
        s["summary"] = summarize(s["runs"], table)
        if s["summary"] is None and s["failure"] is None:
            s["failure"] = "no successful run"


def ratio_base(servers: list[dict[str, Any]], base: str | None) -> dict[str, Any] | None:
    """The server the ratios compare with: the one named ``base``, else the first."""
    for s in servers:
        if s["name"] == base:
            return s
    return servers[0] if servers else None


def client_load_pct(summary: dict[str, Any]) -> float:
    """How much of its CPUs the load generator used or waited for (``client_busy_pct``: CPU
    plus run-queue wait, where known; else ``client_cpu_pct``): what saturation is judged by."""
    cpu = summary.get("client_cpu_pct", 0.0)
    busy = summary.get("client_busy_pct")
    if isinstance(busy, int | float) and busy == busy:  # not NaN
        return max(cpu, busy)
    return cpu


def saturation_text(names: list[str], capacity_pct: float) -> str:
    """The sentence that flags the figures the load generator may have limited."""
    cores = capacity_pct / 100
    return (
        f"NOTE: the load generator was near saturation (>= 90 % of the {cores:g} CPU(s) it "
        f"had, counting run-queue wait) for {', '.join(names)}: those figures are floors, "
        "not the server's limit."
    )


def print_table(
    servers: list[dict[str, Any]],
    table: Table,
    client_capacity_pct: float,
    base: str | None = None,
) -> None:
    """The table of summaries; the ratio column compares with ``base`` (default: the first)."""
    ref = ratio_base(servers, base)
    base_rate = ref["summary"][table.rate] if ref and ref["summary"] else None
    w = table.name_width
    titles = [c.title or f"vs {ref['name'] if ref else '-'}" for c in table.columns]
    head = f"{'server':<{w}}" + "".join(
        f" {title:>{c.width}}" for c, title in zip(table.columns, titles, strict=True)
    )
    print(head)
    print("-" * len(head))
    saturated = []
    for s in servers:
        m = s["summary"]
        if m is None:
            print(f"{s['name']:<{w}} failed: {s['failure']}")
            continue
        ratio = f"{m[table.rate] / base_rate:.2f}x" if base_rate else "-"
        print(f"{s['name']:<{w}}" + "".join(f" {c.cell(m, ratio)}" for c in table.columns))
        if client_load_pct(m) >= 0.9 * client_capacity_pct:
            saturated.append(s["name"])
            print(f"{'':<{w}} note: the load processes were near saturation: the figure is a floor")
    if saturated:
        print(saturation_text(saturated, client_capacity_pct))


def client_capacity_pct(args: argparse.Namespace, client_cpus: list[int]) -> float:
    # Each load process is one thread: it can use at most one of the CPUs it may run on.
    return 100.0 * min(args.client_procs, len(client_cpus) or os.cpu_count() or 1)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a run as JSON values."""
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("json", "server")
    }


def all_clean(servers: list[dict[str, Any]], table: Table) -> bool:
    """Every server has a summary, and it counted none of ``table.sums`` (errors...)."""
    return all(
        s["summary"] is not None and all(s["summary"][k] == 0 for k in table.sums) for s in servers
    )


def report(
    servers: list[dict[str, Any]], args: argparse.Namespace, client_cpus: list[int], table: Table
) -> int:
    """Summaries, the table, the JSON file; the exit status (1: a server failed, or a run
    counted any of ``table.sums``)."""
    summarize_servers(servers, table)
    print()
    print_table(servers, table, client_capacity_pct(args, client_cpus))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": config_of(args), "cpu_count": os.cpu_count(), "servers": servers},
                f,
                indent=1,
            )
    return 0 if all_clean(servers, table) else 1
