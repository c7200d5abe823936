"""Mutation run over the shard's wire: do the tests notice a broken ``shards/wire.py``?

Not a test (pytest does not collect it).  Each mutant is one hand-made change
to ``shards/wire.py`` (an off-by-one in length decoding, the mask not applied,
FIN ignored, ...).  For each, the installed layout of the package is copied to
a temporary folder with the mutant in place of ``wsfleet/shards/wire.py``, and
the tests run against it (``PYTHONPATH``, which the server's supervisor
process inherits, so the network tests run the mutant too), stopping at the
first failure.  A mutant is *killed* when the tests fail, *survives* when
they pass.  The working tree is never changed.  Run from the repository root::

    python tests/mutate_wire.py [--only NAME ...] [--tests FILE ...]

Survivors are killed by new tests or explained in ``docs/WIRE.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "shards" / "wire.py"
#: Fast ones first: a mutant is usually killed within seconds.
TESTS = [
    "tests/test_wire_phases.py",
    "tests/test_wire_deflate.py",
    "tests/test_conformance.py",
    "tests/test_wire_differential.py",
    "tests/test_shard_frames.py",
    "tests/test_wire_deflate_differential.py",
]
#: The package layout pyproject.toml installs: import name -> folder of the repository.
LAYOUT = {
    "wsfleet": "front",
    "wsfleet/shards": "shards",
    "wsfleet/supervisor": "supervisor",
    "wsfleet/ipc": "ipc",
    "wsfleet/loadtest": "loadtest",
}


@dataclass(frozen=True)
class Mutant:
    name: str
    old: str  # text of shards/wire.py to replace ...
    new: str  # ... with this
    occurrence: int = 0  # which occurrence of ``old`` (0: the first)


MUTANTS = [
    # One header decode serves both paths (the fast one and the frames for websockets).
    Mutant(
        "16-bit length one too long",
        "length = _U16.unpack_from(data, pos + 2)[0]",
        "length = _U16.unpack_from(data, pos + 2)[0] + 1",
    ),
    Mutant(
        "64-bit length read from the wrong offset",
        "length = _U64.unpack_from(data, pos + 2)[0]",
        "length = _U64.unpack_from(data, pos + 1)[0]",
    ),
    Mutant(
        "64-bit length cut to 16 bits",
        "length = _U64.unpack_from(data, pos + 2)[0]",
        "length = _U64.unpack_from(data, pos + 2)[0] & 0xFFFF",
    ),
    Mutant(
        "16-bit length one too short",
        "length = _U16.unpack_from(data, pos + 2)[0]",
        "length = _U16.unpack_from(data, pos + 2)[0] - 1",
    ),
    Mutant(
        "mask not applied",
        "payload = apply_mask(data[start:end], data[start - 4 : start])",
        "payload = data[start:end]",
    ),
    Mutant(
        "FIN ignored (fast path takes fragments)",
        "fast = (first == 0x82 or first == 0x81) and second & 0x80",
        "fast = (first & 0x7F in (1, 2)) and second & 0x80",
    ),
    Mutant(
        "mask bit ignored (fast path takes unmasked frames)",
        "fast = (first == 0x82 or first == 0x81) and second & 0x80 and not self._fragments",
        "fast = (first == 0x82 or first == 0x81) and not self._fragments",
    ),
    Mutant(
        "reserved bits ignored on the header",
        "    if first & 0x70:\n",
        "    if False:\n",
    ),
    Mutant(
        "wrong close code for invalid UTF-8 (fast path)",
        'self._fail(1007, "invalid UTF-8 in a text message", events)\n' + " " * 24 + "break",
        'self._fail(1002, "invalid UTF-8 in a text message", events)\n' + " " * 24 + "break",
    ),
    Mutant(
        "UTF-8 not checked in fragmented messages",
        "        if text and not data.isascii():",
        "        if False:",
    ),
    Mutant(
        "size limit off by one (fast path)",
        "            if fast and length <= max_message:",
        "            if fast and length <= max_message + 1:",
    ),
    Mutant(
        "size limit of fragments off by one",
        "if length <= max_message - self._fragments_size:",
        "if length < max_message - self._fragments_size:",
    ),
    Mutant(
        "phase transition skipped: OPEN stays OPEN at the end of the stream",
        "(Phase.OPEN, Trigger.END): Phase.CLOSED,",
        "(Phase.OPEN, Trigger.END): Phase.OPEN,",
    ),
    Mutant(
        "phase transition skipped: closing the server's side leaves it OPEN",
        "(Phase.OPEN, Trigger.SEND_CLOSE): Phase.CLOSING,",
        "(Phase.OPEN, Trigger.SEND_CLOSE): Phase.OPEN,",
    ),
    Mutant(
        "Autobahn 7.1.5 deviation dropped (websockets' 1002)",
        "if first & 0x0F == 8 and self._fragments:",
        "if False:",
    ),
    Mutant(
        "frame end off by one (both paths)",
        "            end = start + length\n",
        "            end = start + length + 1\n",
    ),
    Mutant(
        "a held frame waits for one byte too many",
        "need = end - pos",
        "need = end - pos + 1",
    ),
    Mutant(
        "the answer to our own close reported as a close request",
        "if ws.close_rcvd_then_sent:",
        "if ws.close_rcvd is not None:",
    ),
    Mutant(
        "the fast upgrade ignores the subprotocol rule",
        'protocol = self._select_subprotocol(offered) or ""',
        'protocol = offered[0] if offered else ""',
    ),
    Mutant(
        "max_request_bytes off by one",
        "        if end + 4 > limit:",
        "        if end + 4 > limit + 1:",
    ),
    Mutant(
        "header names not checked on the fast upgrade",
        "or (name not in _KNOWN_NAMES and not _TOKEN.fullmatch(name))",
        "or False",
    ),
    Mutant(
        "opcode 11 not refused on its first two bytes",
        "if opcode > 2 and opcode not in (8, 9, 10):",
        "if opcode > 2 and opcode not in (8, 9, 10, 11):",
    ),
    Mutant(
        "control frame length limit off by one",
        "        if length > 125:",
        "        if length > 126:",
    ),
    # permessage-deflate (DeflateWire).
    Mutant(
        "deflate: RSV1 accepted on a continuation frame",
        "        if 0 < opcode < 3:\n            return None",
        "        if opcode < 3:\n            return None",
    ),
    Mutant(
        "deflate: RSV1 accepted without the extension",
        "    _check_header = staticmethod(_header_violation)",
        "    _check_header = staticmethod("
        "lambda f, n: None if f & 0x40 else _header_violation(f, n))",
    ),
    Mutant(
        "deflate: an offer takes the fast upgrade (never negotiated)",
        'if b"sec-websocket-extensions" in head.lower():',
        "if False:",
    ),
    Mutant(
        "deflate: a half-received compressed message may move",
        "        if deflate.decode_cont_data:\n            raise",
        "        if False:\n            raise",
    ),
    Mutant(
        "deflate: deflated frames sent without RSV1",
        "frame_header(_DEFLATED_TEXT if text else _DEFLATED_BINARY, len(data))",
        "frame_header(_TEXT_BYTE if text else _BINARY_BYTE, len(data))",
    ),
]


def mutated_source(source: str, mutant: Mutant) -> str:
    start = -1
    for _ in range(mutant.occurrence + 1):
        start = source.find(mutant.old, start + 1)
        assert start >= 0, f"{mutant.name}: the text to mutate is not in shards/wire.py"
    return source[:start] + mutant.new + source[start + len(mutant.old) :]


def package_copy(target: Path, wire_source: str) -> None:
    """The installed layout of wsfleet under ``target``, with ``wire_source`` as its wire."""
    for package, folder in LAYOUT.items():
        shutil.copytree(
            ROOT / folder, target / package, dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )  # fmt: skip
    (target / "wsfleet" / "shards" / "wire.py").write_text(wire_source)


def run_tests(pythonpath: Path, tests: list[str]) -> tuple[bool, float, str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), WSFLEET_MUTATION_RUN="1")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = (failed or lines[-1:] or ["(no output)"])[0]
    return result.returncode == 0, time.monotonic() - started, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run only the mutants whose name has this")
    parser.add_argument("--tests", nargs="*", default=TESTS)
    args = parser.parse_args()
    source = WIRE.read_text()
    mutants = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]
    with tempfile.TemporaryDirectory(prefix="wsfleet-mutant-") as tmp:
        baseline = Path(tmp) / "baseline"
        package_copy(baseline, source)
        passed, seconds, summary = run_tests(baseline, args.tests)
        print(f"unmutated: {'pass' if passed else 'FAIL'} ({seconds:.0f} s) {summary}", flush=True)
        if not passed:
            return 1
        survivors = []
        for number, mutant in enumerate(mutants, 1):
            where = Path(tmp) / f"mutant{number}"
            package_copy(where, mutated_source(source, mutant))
            passed, seconds, summary = run_tests(where, args.tests)
            verdict = "SURVIVED" if passed else "killed"
            line = f"{number:2}. {verdict:8} ({seconds:3.0f} s) {mutant.name}: {summary}"
            print(line, flush=True)
            if passed:
                survivors.append(mutant.name)
            shutil.rmtree(where)
    print(f"{len(mutants) - len(survivors)} of {len(mutants)} mutants killed", flush=True)
    for name in survivors:
        print(f"  survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
