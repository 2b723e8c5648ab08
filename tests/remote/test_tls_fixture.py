"""The test CA (``trustme``) works for real mutual TLS over real TCP sockets.

What ``tls://`` will be built on once channels take an ``ssl=`` context: both
sides verify each other (both directions of data checked), the server sees
the client's certificate name, and a client without a certificate is refused
by the server's handshake.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

from ..remote_support import TlsCa


def _serve_once(
    listener: socket.socket, ctx: ssl.SSLContext, seen: list[Any], errors: list[BaseException]
) -> None:
    conn, _ = listener.accept()
    with conn:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.getpeercert())
                tls.sendall(b"server says " + tls.recv(64))
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)


def _run(
    ca: TlsCa, client_ctx: ssl.SSLContext
) -> tuple[bytes | OSError, list[Any], list[BaseException]]:
    """One exchange; returns the client's reply (or its error), the server's view, its errors."""
    seen: list[Any] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(60)  # a client that never comes cannot hang the thread
        server = threading.Thread(
            target=_serve_once, args=(listener, ca.server_context(), seen, errors), daemon=True
        )
        server.start()
        reply: bytes | OSError = b""
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
                client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"hello")
                reply = tls.recv(64)
        except OSError as exc:  # ssl.SSLError is one
            reply = exc
        finally:
            server.join(30)
    return reply, seen, errors


def test_mutual_tls_both_directions(tls_ca: TlsCa) -> None:
    reply, seen, errors = _run(tls_ca, tls_ca.client_context())
    assert errors == []
    assert reply == b"server says hello"
    [cert] = seen
    assert ("DNS", "client.afunix.test") in cert["subjectAltName"]


def test_a_client_without_a_certificate_is_refused(tls_ca: TlsCa) -> None:
    reply, seen, errors = _run(tls_ca, tls_ca.client_context(with_cert=False))
    assert seen == []
    [refusal] = errors
    assert isinstance(refusal, ssl.SSLError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(refusal)
    # TLS 1.3: the client's handshake ends first; it learns of the refusal on reading.
    assert isinstance(reply, OSError) or reply == b""


def test_a_client_that_does_not_trust_the_test_ca_refuses_the_server(tls_ca: TlsCa) -> None:
    other = ssl.create_default_context()  # the system's CAs: ours is unknown there
    reply, seen, errors = _run(tls_ca, other)
    assert isinstance(reply, ssl.SSLCertVerificationError)
    assert seen == [] and len(errors) == 1
