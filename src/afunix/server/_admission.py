"""``Admission``: who gets served, decided once per client for every runner.

In order, right after ``accept`` (UNP 15.8): the per-uid cap (one
``SO_PEERCRED``, before any thread, child or task), then ``policy`` on the
kernel's credentials, then the ``verify`` hook. Refusals are counted by reason
and logged in aggregate, so a flood never becomes a flood of log lines.
Datagrams are judged on the credentials the kernel attached to each one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeAlias, cast

from .._address import Address
from .._backends import wait_readable, wait_writable
from .._creds import PeerCredentials, enable_credentials, peer_credentials, recv_credentials
from .._errors import AfunixError, ProtocolError, UnsupportedFeature
from .._platform import NOSIGNAL, PLATFORM
from .._tlsio import TlsSocket
from ..policy import PeerPolicy
from ._connection import BUFSIZE, Datagram, peer_address

__all__ = ["REFUSAL_LOG_INTERVAL", "TLS_HANDSHAKE_TIMEOUT", "Admission", "Verifier"]

log = logging.getLogger("afunix.server")

#: ``verify(sock, peer_address)``: the server's template hook, after ``policy``.
Verifier: TypeAlias = Callable[[socket.socket, Address], bool]

#: Seconds between two log lines about clients refused for one reason.
REFUSAL_LOG_INTERVAL = 10.0

#: Seconds a ``tls://`` client has to finish its handshake (``Limits.idle_timeout``,
#: when set, instead): a client that connects and says nothing holds a slot only that long.
TLS_HANDSHAKE_TIMEOUT = 30.0


def _peer_uid(conn: socket.socket) -> int:
    """The client's effective uid at ``connect`` time (the platform's cheapest call:
    on Linux one ``SO_PEERCRED``, no groups, no pidfd), run on every accepted
    connection before anything else."""
    return PLATFORM.backend.peer_uid(conn)


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end before we accepted it, sending nothing.

    Such a connection can neither ask nor hear anything: a handler would only
    see end of file. One ``recv(MSG_PEEK)``; a client still connected (the
    usual case) makes it fail with ``EAGAIN``. ``POLLHUP`` tells a closed
    client from one that only shut down its writing side and waits for a reply.
    """
    try:
        if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return False
    except OSError:
        return False
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    return any(ev & select.POLLHUP for _fd, ev in poller.poll(0))


class _Refusals:
    """Clients turned away without a handler, counted by reason and logged in aggregate.

    A flood must not turn into a flood of log lines: the first refusal for a
    reason is logged at once, later ones are counted, and the count is logged
    with the next refusal that comes :data:`REFUSAL_LOG_INTERVAL` seconds after
    the last line, and at shutdown. Used by the accepting thread only.
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        #: Refusals since the server started, by reason.
        self.counts: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def add(self, reason: str, detail: str) -> None:
        """Count one refusal; log *detail* unless a line for *reason* went out recently."""
        total = self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.interval:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._logged_at[reason] = now
        self._unlogged.pop(reason, None)
        log.warning(
            "%s (%s: %d refused so far; logged at most every %gs)",
            detail,
            reason,
            total,
            self.interval,
        )

    def flush(self) -> None:
        """Log what was counted and not yet logged (at shutdown)."""
        for reason, n in sorted(self._unlogged.items()):
            log.warning("%s: %d more client(s) refused, %d in all", reason, n, self.counts[reason])
        self._unlogged.clear()


class Admission:
    """The admission of one server's clients, shared by its runners.

    Holds the server's ``policy``, ``verify``, ``max_clients``,
    ``max_clients_per_uid`` and ``refuse_with`` (the :class:`~afunix.Server`
    attributes of those names read and write them here, so a change, such as
    the broker lowering the per-uid cap on reload, applies to the next client),
    and counts what became of clients: ``served``, ``rejected`` (by ``policy`` or
    ``verify``), ``hung_up`` and ``refused`` (by reason). With ``fork=True``
    the per-uid count is :attr:`child_uid` (pid -> uid), kept by the fork runner.
    """

    def __init__(
        self,
        *,
        policy: PeerPolicy | None,
        verify: Verifier | None,
        max_clients: int | None,
        max_clients_per_uid: int | None,
        refuse_with: bytes,
        fork: bool,
    ) -> None:
        self.policy = policy
        self.verify = verify
        self.max_clients = max_clients
        self.max_clients_per_uid = max_clients_per_uid
        self.refuse_with = refuse_with
        self.fork = fork
        self.refusals = _Refusals()
        self.refused = self.refusals.counts
        self.served = 0
        self.rejected = 0
        self.hung_up = 0
        #: Whether datagrams arrive with their sender's credentials (see :meth:`prepare`).
        self.datagram_credentials = False
        self.child_uid: dict[int, int] = {}  # fork model: pid -> uid
        #: The server's ``ssl.SSLContext`` over ``tls://`` (set by :meth:`prepare`).
        self.tls: Any = None
        #: Seconds a TLS client has to finish its handshake.
        self.handshake_timeout = TLS_HANDSHAKE_TIMEOUT
        self._uid_conns: dict[int, int] = {}  # thread and asyncio models: uid -> connections
        self._uid_lock = threading.Lock()
        self._count_lock = threading.Lock()

    def prepare(
        self, sock: socket.socket, address: Address, sock_type: int, tls: Any = None
    ) -> None:
        """Check that ``policy`` and the per-uid cap can work on *sock* (a server of
        *sock_type*, over TLS with the server context *tls*); ask for per-datagram
        credentials on a Unix datagram socket."""
        self.tls = tls
        if sock.family != socket.AF_UNIX:
            if self.policy is not None and tls is not None and not self.policy.tls_names:
                raise UnsupportedFeature(
                    f"this PeerPolicy cannot allow any client of {address.describe()}: it "
                    "has no tls_names, and its uid/gid rules judge kernel credentials, "
                    "which a TLS peer has not; list the certificate names to allow, "
                    "PeerPolicy(tls_names=[...])"
                )
            if self.policy is not None and tls is None:
                raise UnsupportedFeature(
                    f"a PeerPolicy cannot judge the clients of {address.describe()}: it "
                    "judges the kernel's credentials of each client (uid, gid, groups), "
                    "which exist only for Unix-domain sockets, and a TCP peer has none; "
                    "serve tls:// with client certificates and PeerPolicy(tls_names=...), "
                    "or check clients in verify="
                )
            if self.max_clients_per_uid is not None:
                raise UnsupportedFeature(
                    "max_clients_per_uid needs the kernel's credentials of each client, "
                    f"which exist only for Unix-domain sockets, not for {address.describe()}"
                )
            return
        if sock_type != socket.SOCK_DGRAM:
            return
        try:
            enable_credentials(sock)
        except UnsupportedFeature:
            if self.policy is not None:
                raise UnsupportedFeature(
                    "a peer policy on a datagram server needs per-message credentials, "
                    "which this system does not provide; use a stream socket"
                ) from None
            return
        self.datagram_credentials = True

    # ------------------------------------------------------------ connections
    def admit(
        self, conn: socket.socket, peer: Address, uid: int | None
    ) -> tuple[bool, PeerCredentials | None]:
        """``policy``, then ``verify``: whether to serve *conn*, and its credentials if read.

        A refused *conn* is closed and its *uid* (from :meth:`uid_admit`) given back.
        Over TLS both come later, after the handshake, in the connection's own
        thread, child or task (:meth:`secure`, :meth:`secure_async`).
        """
        if self.tls is not None:
            return True, None
        creds = None
        ok = True
        if self.policy is not None:
            creds = self._credentials(conn, peer)
            ok = creds is not None and self._policy_allows(creds, peer, "connection")
        if ok and self._verify(conn, peer):
            return True, creds
        if creds is not None:
            creds.close()
        conn.close()
        self.uid_release(uid)
        return False, None

    def _reject(self) -> None:
        """Count one client refused by ``policy`` or ``verify`` (TLS clients are judged
        in their own threads: the count takes a lock)."""
        with self._count_lock:
            self.rejected += 1

    # --------------------------------------------------------------------- TLS
    def secure(self, conn: socket.socket, peer: Address) -> tuple[socket.socket, Address] | None:
        """TLS for accepted *conn*: the handshake (blocking, within the handshake
        timeout), then ``policy`` on the client's certificate and ``verify``.

        Returns the TLS socket and the client's ``tls://`` address, or ``None``
        when the client was refused (closed, counted in ``rejected``, logged).
        """
        where = _tls_address(peer)
        try:
            tls = TlsSocket.server(conn, self.tls, str(where), self.handshake_timeout)
        except OSError as exc:
            self._handshake_failed(conn, where, exc)
            return None
        return self._judge_tls(tls, where)

    async def secure_async(
        self, conn: socket.socket, peer: Address
    ) -> tuple[socket.socket, Address] | None:
        """:meth:`secure` in an event loop (asyncio or trio): the handshake waits for
        the socket without blocking the loop."""
        where = _tls_address(peer)
        tls = TlsSocket.wrap(conn, self.tls, True, None, str(where))
        timeout = self.handshake_timeout
        deadline = time.monotonic() + timeout
        try:
            while (want := tls.handshake_step()) is not None:
                wait = wait_writable if want == "write" else wait_readable
                if not await wait(conn.fileno(), max(deadline - time.monotonic(), 0.0)):
                    raise AfunixError(
                        errno.ETIMEDOUT,
                        f"TLS handshake with {where} did not finish within {timeout:g} s",
                    )
        except OSError as exc:
            self._handshake_failed(conn, where, exc)
            return None
        return self._judge_tls(tls, where)

    def refused_in_child(self, handshake: bool) -> None:
        """Count a client a forked child refused over ``tls://`` (the child logged it):
        its handshake failed (*handshake*), or ``policy`` or ``verify`` turned it away."""
        with self._count_lock:
            self.rejected += 1
            if handshake:
                counts = self.refusals.counts
                counts["tls-handshake"] = counts.get("tls-handshake", 0) + 1

    def _handshake_failed(self, conn: socket.socket, where: Address, exc: OSError) -> None:
        conn.close()
        self._reject()
        with self._count_lock:  # (refusals are otherwise the accepting thread's)
            self.refusals.add("tls-handshake", f"refused connection from {where}: {exc}")

    def _judge_tls(self, tls: TlsSocket, where: Address) -> tuple[socket.socket, Address] | None:
        """``policy`` on the certificate, then ``verify``; a refused client is closed.

        The socket returned is the :class:`~afunix.lowlevel.TlsSocket`: it has the
        calls of a socket that connections and channels use (``recv``, ``send``,
        ``sendall``, ``settimeout``, ``fileno``...), each through TLS.
        """
        ok = True
        if self.policy is not None:
            peer = tls.tls_peer
            if peer is None:
                ok = False
                reason = "it showed no certificate, and the peer policy needs one"
            else:
                decision = self.policy.check(peer)
                ok, reason = decision.allowed, decision.reason
            if not ok:
                self._reject()
                who = peer.describe() if peer is not None else "a client"
                log.warning("refused connection from %s at %s: %s", who, where, reason)
        sock = cast(socket.socket, tls)
        if ok and self._verify(sock, where):
            return sock, where
        tls.close()
        return None

    def _credentials(self, conn: socket.socket, peer: Address) -> PeerCredentials | None:
        """The client's credentials for ``policy``; ``None`` (refused, logged) if unreadable."""
        try:
            return peer_credentials(conn)
        except OSError as exc:
            self._reject()
            log.warning(
                "refused connection from %s: its credentials cannot be read (%s)",
                peer.describe(),
                exc,
            )
            return None

    def _verify(self, conn: socket.socket, peer: Address) -> bool:
        if self.verify is None:
            return True
        try:
            ok = self.verify(conn, peer)
        except Exception:
            log.exception("verify() raised for peer %s; refusing it", peer.describe())
            ok = False
        if not ok:
            self._reject()
        return ok

    def _policy_allows(self, creds: PeerCredentials | None, peer: Address, what: str) -> bool:
        """Judge one client against ``policy``; log and count a refusal."""
        if self.policy is None:
            return True
        if creds is None:
            self._reject()
            log.warning(
                "refused %s from %s: it carried no credentials, and the peer policy needs them",
                what,
                peer.describe(),
            )
            return False
        decision = self.policy.check(creds)
        if decision.allowed:
            log.debug("admitted %s from %s: %s", what, creds.describe(), decision.reason)
            return True
        self._reject()
        exe = ""
        try:
            facts = creds.facts()
        except OSError:
            pass
        else:
            if facts.exe:
                exe = f", exe {facts.exe}"
        where = "" if peer.kind.value == "unnamed" else f" at {peer.describe()}"
        log.warning(
            "refused %s from %s%s%s: %s", what, creds.describe(), exe, where, decision.reason
        )
        return False

    # ------------------------------------------------------------ per-uid cap
    @property
    def uid_limit(self) -> int | None:
        """Connections one uid may hold at once; ``None``: no per-uid cap.

        ``max_clients_per_uid``, but never more than three quarters of
        ``max_clients`` (``max_clients - max_clients // 4``): the last quarter,
        rounded down, is kept for the other uids, so one local user cannot take
        every slot however high its own cap. The check runs right after
        ``accept``, before ``policy``, ``verify``, a thread, a child or a task.
        """
        cap = self.max_clients_per_uid
        if cap is not None and self.max_clients:
            cap = min(cap, self.max_clients - self.max_clients // 4)
        return cap

    def uid_admit(self, conn: socket.socket) -> tuple[bool, int | None]:
        """The per-uid cap, checked with one ``SO_PEERCRED`` and no thread, no log line.

        Returns whether *conn* may be served (refused: already closed) and the
        uid it was counted under (``None`` without a cap); give that uid back
        with :meth:`uid_release` when the connection ends.
        """
        cap = self.uid_limit
        if cap is None:
            return True, None
        if _hung_up(conn):
            conn.close()
            self.hung_up += 1
            return False, None
        try:
            uid = _peer_uid(conn)
        except OSError as exc:
            self._refuse(conn, "uid-limit", f"refused a client: its uid cannot be read ({exc})")
            return False, None
        if self.fork:  # children end in the fork runner's reap, maybe in a signal handler
            held = list(self.child_uid.values()).count(uid)
            ok = held < cap
        else:
            with self._uid_lock:
                held = self._uid_conns.get(uid, 0)
                ok = held < cap
                if ok:
                    self._uid_conns[uid] = held + 1
        if not ok:
            self._refuse(
                conn,
                "uid-limit",
                f"refused a connection from uid {uid}: it holds {held}, the limit per uid",
            )
            return False, None
        return True, uid

    def uid_release(self, uid: int | None) -> None:
        """A connection counted under *uid* ended (nothing to do for ``None`` or forks)."""
        if uid is None or self.fork:
            return
        with self._uid_lock:
            left = self._uid_conns.get(uid, 0) - 1
            if left > 0:
                self._uid_conns[uid] = left
            else:
                self._uid_conns.pop(uid, None)

    def _refuse(self, conn: socket.socket, reason: str, detail: str) -> None:
        """Turn a client away: ``refuse_with`` if its buffer has room, close, count."""
        if self.refuse_with:
            with contextlib.suppress(OSError):
                conn.send(self.refuse_with, socket.MSG_DONTWAIT | NOSIGNAL)
        conn.close()
        self.refusals.add(reason, detail)

    # -------------------------------------------------------------- datagrams
    def admit_datagram(self, sock: socket.socket) -> Datagram | None:
        """One datagram from *sock* with its sender's credentials, judged by ``policy``;
        ``None`` if it was dropped (refused, or malformed).

        Raises ``BlockingIOError`` when none is waiting (the socket is non-blocking).
        """
        if self.datagram_credentials:
            try:
                msg = recv_credentials(sock, BUFSIZE)
            except ProtocolError as exc:
                log.warning("dropped a datagram: %s", exc)
                return None
            dgram = Datagram(msg.data, msg.sender, msg.credentials)
        else:
            data, raw = sock.recvfrom(BUFSIZE)
            dgram = Datagram(data, peer_address(sock, raw))
        if not self._policy_allows(dgram.credentials, dgram.sender, "datagram"):
            return None
        return dgram


def _tls_address(peer: Address) -> Address:
    """A TLS client's ``tls://host:port`` (from its TCP address)."""
    try:
        return Address.tls(peer.host, peer.port or 0)
    except OSError:  # pragma: no cover - an address of another kind
        return peer
