"""The test run's Godot check (tests/godot_setup.py): without Godot and root, one line and out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import godot_setup

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_a_run_without_godot_and_root_stops_at_once_with_one_line(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"  # a PATH without godot3-server (nor apt-get)
    empty_bin.mkdir()
    env = {
        "PATH": str(empty_bin),
        "HOME": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_variant.py"]
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0:
        if setpriv is not None:
            # Really not root: nobody/nogroup, no supplementary groups.
            command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        else:
            env["WSFLEET_TEST_ASSUME_NONROOT"] = "1"
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=90, check=False
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == godot_setup.EXIT_NO_GODOT, (result.returncode, lines)
    assert len(lines) == 1, lines
    assert "apt-get install godot3-server" in lines[0] and "WSFLEET_GODOT" in lines[0]


@pytest.mark.timeout(120)
def test_a_root_run_that_must_not_install_refuses_too(tmp_path: Path) -> None:
    """The switch the refusal test falls back to (root without setpriv) does refuse."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {
        "PATH": str(empty_bin),
        "HOME": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "WSFLEET_TEST_ASSUME_NONROOT": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_variant.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == godot_setup.EXIT_NO_GODOT and len(lines) == 1, lines


FAKE_APT_GET = """#!{python}
# apt-get as far as the Godot check sees it: logs its arguments; "install" puts a stub
# godot3-server beside itself, or fails with apt's status 100 when told to.
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "install":
    if {fail}:
        sys.exit(100)
    stub = os.path.join(here, "godot3-server")
    with open(stub, "w") as file:
        file.write("#!/bin/sh\\necho 3.2.3.stable.custom_build\\n")
    os.chmod(stub, 0o755)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("apt_fails", [False, True])
def test_a_root_run_on_debian_installs_godot_with_apt_get(tmp_path: Path, apt_fails: bool) -> None:
    """The install branch, with an apt-get stand-in first on the PATH (no network, no change
    to this machine). Not root on Debian, the same run must refuse instead."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    apt_get = fake_bin / "apt-get"
    apt_get.write_text(FAKE_APT_GET.format(python=sys.executable, fail=apt_fails))
    apt_get.chmod(0o755)
    env = {"PATH": str(fake_bin), "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/test_variant.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = result.stdout + result.stderr
    if not (os.geteuid() == 0 and godot_setup.is_debian()):
        lines = [line for line in output.splitlines() if line.strip()]
        assert result.returncode == godot_setup.EXIT_NO_GODOT and len(lines) == 1, lines
        return
    calls = (fake_bin / "calls.log").read_text().splitlines()
    assert calls == ["update -q", "install -y -q godot3-server"]
    assert "installing Godot: apt-get update -q" in output
    assert "installing Godot: apt-get install -y -q godot3-server" in output
    if apt_fails:
        assert result.returncode == godot_setup.EXIT_NO_GODOT, output
        last = output.strip().splitlines()[-1]
        assert "cannot install godot3-server" in last and "status 100" in last, last
        assert "passed" not in output
    else:
        assert result.returncode == 0, output
        assert "passed" in output.splitlines()[-1]


@pytest.mark.parametrize(
    ("text", "debian"),
    [
        ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n', True),
        ("ID=ubuntu\nID_LIKE=debian\n", True),
        ('ID="fedora"\n', False),
        ("", False),
    ],
)
def test_debian_is_told_by_os_release(tmp_path: Path, text: str, debian: bool) -> None:
    release = tmp_path / "os-release"
    release.write_text(text)
    expected = debian and shutil.which("apt-get") is not None
    assert godot_setup.is_debian(release) is expected


def test_no_os_release_is_not_debian(tmp_path: Path) -> None:
    assert godot_setup.is_debian(tmp_path / "missing") is False
