"""The one TLS loader: PEM text or a path -> `TlsConfig` -> ``ssl.SSLContext``.

The front calls `load_tls` in ``listen()`` (it reads the files and builds a
context once, as the check) and sends the resulting `TlsConfig` (PEM text,
no file names) to the supervisor; every shard builds its context from that
same text with the same `server_context`.  So whatever ``listen()`` accepts,
every shard can load, and a bad certificate, key or chain is a clear error
in the user's process instead of shards that cannot boot.

Contexts are loaded through anonymous memory (``memfd``), never through a
file a shard would have to find again.  An encrypted private key is refused
(no passphrase prompt on the terminal of a server process).

Imports the standard library and `wsfleet.ipc.config` only.
"""

from __future__ import annotations

import os
import ssl
from contextlib import ExitStack

from .config import TlsConfig

_PEM_MARK = "-----BEGIN"


class TlsError(ValueError):
    """A certificate, key or chain that cannot be used; the message names which and why."""


def read_pem(value: str | bytes | os.PathLike[str] | None, what: str) -> str | None:
    """PEM text as given, or read from the file it names; None for None or "".

    ``what`` names the value in errors (``"ssl_certificate"``...).
    """
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise TlsError(f"{what} is neither PEM text nor a file name") from None
    if isinstance(value, str) and _PEM_MARK in value:
        return value
    path = os.fspath(value)
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError as exc:
        raise TlsError(f"cannot read {what} from {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TlsError(f"{what}: {path!r} is not a PEM file (not ASCII)") from None
    if _PEM_MARK not in text:
        raise TlsError(f"{what}: {path!r} is not a PEM file")
    return text


def load_tls(
    certificate: str | bytes | os.PathLike[str] | None,
    private_key: str | bytes | os.PathLike[str] | None,
    ca_chain: str | bytes | os.PathLike[str] | None = None,
) -> TlsConfig | None:
    """Read and check the three values (PEM text or paths); None when TLS is off.

    Raises `TlsError` when only one of certificate and key is set, or when
    `server_context` cannot build a context from them.
    """
    cert = read_pem(certificate, "ssl_certificate")
    key = read_pem(private_key, "private_key")
    if cert is None and key is None:
        return None  # as in Godot, a ca_chain alone does nothing
    if cert is None or key is None:
        raise TlsError("TLS needs both private_key and ssl_certificate")
    chain = read_pem(ca_chain, "ca_chain") or ""
    tls = TlsConfig(certificate=cert, private_key=key, ca_chain=chain)
    server_context(tls)  # the check: the shards run exactly this
    return tls


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server-side context serving ``tls``; `TlsError` saying which part is bad."""
    _check_certificates(tls.certificate, "ssl_certificate")
    if tls.ca_chain:
        _check_certificates(tls.ca_chain, "ca_chain")
    chain = tls.certificate + ("\n" + tls.ca_chain if tls.ca_chain else "")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with ExitStack() as stack:
        cert_path = _memory_file(stack, "wsfleet-cert", chain)
        key_path = _memory_file(stack, "wsfleet-key", tls.private_key)
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TlsError("private_key does not belong to ssl_certificate") from None
            raise TlsError(f"private_key is not a usable PEM private key ({exc})") from None
    return context


def _check_certificates(pem: str, what: str) -> None:
    """Every certificate in ``pem`` parses (the chain loader would not say which file is bad)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{what} holds no valid PEM certificate ({exc})") from None


def _memory_file(stack: ExitStack, name: str, text: str) -> str:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    stack.callback(os.close, fd)
    os.write(fd, text.encode("ascii", errors="replace"))
    return f"/proc/self/fd/{fd}"


def _no_password() -> bytes:
    raise TlsError("private_key is encrypted; give it without a passphrase")
