"""The operator's control socket: where it lives, how it is bound safely, its protocol.

A Unix stream socket, mode 0600, in a folder only its user may enter (0700):
``$XDG_RUNTIME_DIR/wsfleet/PORT.sock``, else ``TMPDIR/wsfleet-UID/PORT.sock``,
so that ``wsfleet status --port N`` finds a server by its port.  The front
binds it when it listens (so a bad path fails ``listen``) and hands it to the
supervisor, which serves it (`wsfleet.supervisor.control`) and unlinks it when
it exits.

Safety: the folder must be a real folder (not a symlink) owned by us with
mode 0700 (we make it so if we created it, and refuse otherwise).  A socket
file already there is replaced only if it is a socket owned by us that
nobody answers on (a killed server's); a live one means another server has
this port's socket (``OSError`` EADDRINUSE); anything else is refused.  The
peer's uid is also checked on every connection (``SO_PEERCRED``) by the
server, in case the folder's mode was widened by hand.

Protocol: one request per connection: the client sends one JSON object
(``{"cmd": "status"}``) and shuts down its writing side; the server answers
with one JSON object per line (``stop`` sends a second one when done) and
closes.  orjson both ways.

Imports the standard library and orjson only.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from typing import Any

import orjson

#: The largest request a server reads.
MAX_REQUEST = 64 * 1024


def default_folder() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "wsfleet")
    return os.path.join(tempfile.gettempdir(), f"wsfleet-{os.getuid()}")


def default_path(port: int) -> str:
    """Where the server listening on ``port`` has its control socket by default."""
    return os.path.join(default_folder(), f"{port}.sock")


def _private_folder(folder: str) -> None:
    """Make ``folder`` (0700) or check that it is ours, a real folder, and 0700."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{folder} is not a folder (a symlink?): refusing it")
    if info.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{folder} belongs to uid {info.st_uid}: refusing it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise OSError(errno.EPERM, f"{folder} is open to others (mode {info.st_mode:o})")


def _clear_stale(path: str) -> None:
    """Remove a dead server's socket at ``path``; refuse anything else that is there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket of ours: refusing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a killed server's socket
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server answers on {path}")


def bind(path: str | None, port: int) -> tuple[socket.socket, str]:
    """A listening control socket at ``path`` (None: `default_path`) and its path.

    A path of the user's own choosing must be in a folder that exists; the
    default folder is made (0700).  The socket file is 0600 from the start
    (umask), so nobody else can ever connect to it.
    """
    if path is None:
        path = default_path(port)
        _private_folder(os.path.dirname(path))
    path = os.path.abspath(path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock, path


def file_id(path: str) -> tuple[int, int]:
    """The identity of the file at ``path`` (taken just after bind, to unlink it later)."""
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def unlink_if_ours(path: str, ours: tuple[int, int]) -> None:
    """Remove ``path`` if it still is the file `file_id` gave ``ours`` (not a successor's)."""
    try:
        if file_id(path) == ours:
            os.unlink(path)
    except OSError:
        pass


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[2]


def encode(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def send_request(path: str, message: dict[str, Any], timeout: float) -> socket.socket:
    """Connect to the server at ``path`` and send one request; the socket, to read answers from.

    ``OSError`` when nobody answers there (``FileNotFoundError``,
    ``ConnectionRefusedError``, ``PermissionError``...).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(orjson.dumps(message))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        raise
    return sock


def read_answers(sock: socket.socket) -> list[dict[str, Any]]:
    """Every answer line until the server closes (``TimeoutError`` past the socket's timeout)."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return [orjson.loads(line) for line in bytes(data).splitlines() if line.strip()]


def request(path: str, message: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """One request and its answers (see `send_request`, `read_answers`)."""
    sock = send_request(path, message, timeout)
    try:
        return read_answers(sock)
    finally:
        sock.close()
