"""A pytest plugin (loaded by conftest.py): make sure Godot 3.2's headless binary is there.

Several test modules run the real engine (`godot_runner`). Without it they
would fail one by one, dozens of times, long into the run; so at startup:

* ``godot3-server`` is on the PATH (or ``WSFLEET_GODOT`` names a binary): nothing to do;
* else, as root on Debian: ``apt-get update`` and ``apt-get install godot3-server``,
  saying so, then go on (a failed install stops the run with its reason);
* else: stop at once with one line saying what to install.

``WSFLEET_TEST_ASSUME_NONROOT=1`` makes a root process take the last branch;
only the test of this refusal uses it, where it cannot drop root for real.
This module imports nothing of the project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = "godot3-server"
#: Exit status of a run stopped because Godot is missing and cannot be installed here.
EXIT_NO_GODOT = 4  # pytest's own "usage error": the run could not start


def godot_on_path() -> str | None:
    """The Godot binary the tests would use, or None (`godot_runner.godot_binary`'s rule)."""
    return shutil.which(os.environ.get("WSFLEET_GODOT") or PACKAGE)


def is_debian(os_release: Path = Path("/etc/os-release")) -> bool:
    """True on Debian and its derivatives that have Debian's package (``ID``/``ID_LIKE``)."""
    try:
        text = os_release.read_text()
    except OSError:
        return False
    ids: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("ID", "ID_LIKE"):
            ids.update(value.strip().strip('"').split())
    return "debian" in ids and shutil.which("apt-get") is not None


def can_install() -> bool:
    """Root on Debian: apt-get can install the package."""
    if os.environ.get("WSFLEET_TEST_ASSUME_NONROOT") == "1":
        return False
    return os.geteuid() == 0 and is_debian()


def refusal() -> str:
    """The one line a run without Godot stops with."""
    return (
        f"wsfleet tests: {PACKAGE} (Godot 3.2.3 headless) is not on the PATH; install it "
        f"(Debian 12: apt-get install {PACKAGE}, or run the tests as root to have it installed) "
        "or set WSFLEET_GODOT to a Godot 3.2 headless binary"
    )


def install() -> str | None:
    """Install the package with apt-get, printing what runs; None, or why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", PACKAGE],
    ):
        print("wsfleet tests: installing Godot:", " ".join(command), flush=True)
        status = subprocess.run(command, env=env).returncode
        if status != 0:
            return f"`{' '.join(command)}` failed with status {status}"
    if godot_on_path() is None:
        return f"apt-get installed {PACKAGE} but it is still not on the PATH"
    return None


def pytest_configure(config: pytest.Config) -> None:
    # pytest_configure runs before the session header: a refusal is then the only output.
    if godot_on_path() is not None:
        return
    if not can_install():
        pytest.exit(refusal(), returncode=EXIT_NO_GODOT)
    failure = install()
    if failure is not None:
        pytest.exit(f"wsfleet tests: cannot install {PACKAGE}: {failure}", returncode=EXIT_NO_GODOT)
