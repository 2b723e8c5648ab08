"""The broker daemon: answers open requests with a descriptor or an errno.

:class:`Broker` is an :class:`afunix.Server` (``model="thread"``: an open can
block on a slow filesystem, and a thread per connection keeps one client's
slow open from delaying another's) whose handler speaks the protocol of
:mod:`afunix.broker.protocol`. For each request it:

1. checks the flags (:func:`afunix.broker.flags.check`) and the path
   (:func:`afunix.broker.policy.split_path`);
2. asks the policy, with the peer's *kernel* credentials (``SO_PEERCRED``,
   ``SO_PEERGROUPS``; the executable through the pidfd), never anything the
   client says about itself;
3. opens the file beneath the granting rule's root
   (:func:`afunix.broker.confine.open_beneath`), which also checks the
   descriptor's device and inode. Roots are opened once, at start and at
   each reload, without following any symlink, and held
   (:class:`afunix.broker.confine.HeldRoots`): a root replaced by a symlink
   later does not move the broker;
4. writes the audit line (fail-closed: no line, no descriptor);
5. sends the reply, with the descriptor attached, and closes its own copy.

Limits (the policy's ``[limits]``), all per peer uid unless said otherwise:
a token bucket of requests per second (past it: ``EAGAIN``); connections per
uid (past it: an ``EAGAIN`` error frame and the connection is closed, by
the :class:`afunix.Server` right after ``accept``: no thread, no audit line);
``max_clients`` connections in all (more wait in the listen queue); a
request size limit (larger: ``EMSGSIZE`` and closed); descriptors in flight
per connection (sent but not yet read: the broker stops reading that
client's requests until it catches up, and disconnects it after
``in_flight_timeout``); an idle timeout and a timeout to finish a request
(``request_timeout``, from the first byte of a message to its last, however
the client spreads the bytes out).

**Descriptors** are budgeted against ``RLIMIT_NOFILE`` (:class:`DescriptorBudget`):
a connection holds at most :data:`FDS_PER_CONNECTION`, because the broker
keeps none of a client's: a request carries no descriptors, and any that
arrive are closed the moment ``recvmsg`` returns (its channel's
``discard_fds``; room is made for one, ``fd_room=1``, so a client attaching
more is cut off by the kernel, ``MSG_CTRUNC``, and disconnected).
``max_clients`` and ``connections_per_peer`` are lowered, if need be, so that
all connections together fit the limit and one uid's fit in half of it.

**The audit log** writes every grant (fail-closed) and budgets refusals per
uid (:meth:`AuditLog.refusal`); what the broker knows of a peer beyond its
credentials (its executable) is read once per connection, bounded, as text.

Socket activation (``LISTEN_FDS``), ``sd_notify`` (``READY=1``,
``STOPPING=1``, ``WATCHDOG=1``) and the zero-downtime hand-over come from
:class:`afunix.Server`. ``SIGHUP`` reloads the policy atomically (the old one
stays, with its roots, if the new one cannot be read, is invalid, or names a
root that cannot be opened safely) and reopens the audit log; each reload is
announced as systemd's ``Type=notify-reload`` expects: ``RELOADING=1`` with
``MONOTONIC_USEC=``, then ``READY=1`` with a ``STATUS=`` saying how it went.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import resource
import signal
import socket
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .. import Channel, PeerCredentials, PeerTimeout, ProtocolError
from ..lowlevel import AddressLike, notify
from ..server import Connection, Server
from . import confine
from . import flags as _flags
from .appends import AppendLimit, AppendPipes
from .audit import MAX_SHOWN, AuditError, AuditLog, errno_name, text
from .policy import (
    BrokerLimits,
    PathRefused,
    Policy,
    PolicyFileError,
    load_policy,
    split_path,
)
from .protocol import (
    KIND_ERROR,
    MAX_REPLY,
    BadRequest,
    OpenRequest,
    Reply,
    decode_request,
    encode_reply,
    frame,
)

__all__ = [
    "FDS_PER_CONNECTION",
    "FDS_RESERVE",
    "Broker",
    "DescriptorBudget",
    "Outcome",
    "descriptor_budget",
]

log = logging.getLogger("afunix.broker")

#: Descriptors one connection may hold at once: its socket and a duplicate of it (for
#: the goodbye, see ``Broker._goodbye``), the peer's pidfd, one arriving descriptor
#: (closed with its request), and an open in progress (the rule's root, a step of the
#: ``walk`` resolver, its parent, the file).
FDS_PER_CONNECTION: Final = 8
#: Descriptors kept for the broker itself on top of those open when it starts (the
#: listener, its selector, the audit log reopened, a policy re-read, ``/proc`` reads).
FDS_RESERVE: Final = 32
#: The broker's listen queue (see the Server construction in :class:`Broker`).
BROKER_BACKLOG: Final = 64
#: Longest fact about a peer (the path of its executable) read, in bytes.
FACT_BYTES: Final = 4096
#: Longest wait to write a goodbye (the error reply before a hang-up), in seconds: a
#: client that does not read cannot hold a handler thread longer than this.
GOODBYE_TIMEOUT: Final = 0.5
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)
#: The error frame a client past ``connections_per_peer`` gets before the close (the
#: Server writes it right after ``accept``, with no channel: hence a whole frame).
_TOO_MANY = frame(
    encode_reply(
        Reply(
            0,
            errno.EAGAIN,
            "too many connections from your uid (the broker's connections_per_peer); "
            "close one and retry",
            KIND_ERROR,
            closing=True,
        )
    )
)


def _unread_bytes(sock: socket.socket) -> int:
    """Bytes we sent that the peer has not read yet (``SIOCOUTQ``)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _SIOCOUTQ, buf, True)
    except OSError:
        return 0
    return buf[0]


def _drained(sock: socket.socket, limits: BrokerLimits) -> bool:
    """Whether the peer reads what was sent to it (all of it) within ``in_flight_timeout``."""
    deadline = time.monotonic() + limits.in_flight_timeout
    while time.monotonic() < deadline:
        if _unread_bytes(sock) == 0:
            return True
        time.sleep(0.005)
    return False


@dataclass(frozen=True)
class DescriptorBudget:
    """How many connections fit the descriptor limit (see :func:`descriptor_budget`)."""

    #: The soft ``RLIMIT_NOFILE`` the budget was made for.
    nofile: int
    #: Descriptors kept for the broker itself.
    reserve: int
    #: Connections served at once (``max_clients``, lowered to fit).
    clients: int
    #: Most connections one uid may hold: half of those that fit.
    per_uid: int
    #: Append pipes open at once in all (two descriptors each: the pipe's read end and
    #: the file), within an eighth of the descriptors left after the reserve.
    appends: int = 0

    def per_peer(self, limits: BrokerLimits) -> int:
        """``connections_per_peer`` of *limits* (a reloaded policy too), within the budget."""
        return min(limits.connections_per_peer, self.per_uid)

    def append_pipes(self, limits: BrokerLimits) -> tuple[int, int]:
        """``(append_pipes_per_peer, max_append_pipes)`` of *limits*, within the budget:
        one uid gets at most half of the append pipes there is room for."""
        total = min(limits.max_append_pipes, self.appends)
        return min(limits.append_pipes_per_peer, max(1, total // 2)), total


def _open_descriptors() -> int:
    for where in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(where)) - 1  # less the one listdir used
    return 0


def descriptor_budget(
    limits: BrokerLimits, *, rules: int = 0, nofile: int | None = None, open_now: int | None = None
) -> DescriptorBudget:
    """Fit *limits* to the descriptor limit.

    ``reserve = open_now + FDS_RESERVE + rules`` (one descriptor per rule, for
    its root); append pipes get at most an eighth of the rest,
    ``appends = min(max_append_pipes, (nofile - reserve) // 16)`` (two descriptors
    each); ``room = (nofile - reserve - 2 * appends) // FDS_PER_CONNECTION``
    connections fit;
    ``clients = min(max_clients, room)`` and ``per_uid = room // 2``
    (:meth:`DescriptorBudget.per_peer` gives ``min(connections_per_peer, per_uid)``):
    one uid never holds more than half of the descriptors there are room for.
    *nofile* defaults to the soft ``RLIMIT_NOFILE``, *open_now* to the descriptors
    open now.

    Raises ``OSError(EMFILE)`` if fewer than 2 connections fit: the limit is too
    low to run a broker at all.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 30
    if open_now is None:
        open_now = _open_descriptors()
    reserve = open_now + FDS_RESERVE + rules
    appends = max(0, min(limits.max_append_pipes, (nofile - reserve) // 16))
    room = (nofile - reserve - 2 * appends) // FDS_PER_CONNECTION
    if room < 2:
        need = reserve + 2 * FDS_PER_CONNECTION + 2  # and one append pipe
        raise OSError(
            errno.EMFILE,
            f"the descriptor limit (RLIMIT_NOFILE {nofile}) is too low for the broker: it "
            f"keeps {reserve} for itself and needs {FDS_PER_CONNECTION} per connection; "
            f"raise it to at least {need} (ulimit -n, or LimitNOFILE= under systemd)",
        )
    return DescriptorBudget(
        nofile,
        reserve,
        min(limits.max_clients, room),
        max(1, room // 2),
        appends,
    )


@dataclass
class _PeerState:
    """Per-uid accounting: open connections and a token bucket."""

    tokens: float
    stamp: float
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, limits: BrokerLimits) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(
                float(limits.burst), self.tokens + (now - self.stamp) * limits.requests_per_second
            )
            self.stamp = now
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            return True


@dataclass
class Outcome:
    """What happened to one request (for the reply and the audit line)."""

    decision: str
    errno: int
    reason: str
    rule: str | None = None
    opened: confine.Opened | None = None
    #: What the client is told, if less than ``reason`` (which names rules).
    public: str | None = None
    #: ``opened.fd`` is the write end of a pipe drained into the file (an append grant).
    pipe: bool = False


class Broker:
    """A descriptor broker on a Unix socket. See the module docs.

    Args:
        address: where to listen (a path, ``@abstract``); ignored when the
            socket comes from socket activation or a hand-over.
        policy: a :class:`~afunix.broker.Policy`, or the path of a TOML policy
            file (which :meth:`reload` reads again).
        audit: an :class:`~afunix.broker.AuditLog`, a path, ``"-"`` (stderr)
            or ``None`` (no audit log).
        mode, owner, group: the socket file's permissions.
        resolver: force a resolver (tests); default :data:`~afunix.broker.confine.RESOLVER`.
    """

    def __init__(
        self,
        address: AddressLike,
        policy: Policy | str | os.PathLike[str],
        *,
        audit: AuditLog | str | os.PathLike[str] | None = None,
        mode: int | None = None,
        owner: str | int | None = None,
        group: str | int | None = None,
        resolver: confine.Resolver | None = None,
        sock: socket.socket | None = None,
        shutdown_timeout: float = 2.0,
        on_ready: Callable[[Server], None] | None = None,
    ) -> None:
        confine.check_environment()
        if isinstance(policy, Policy):
            self.policy_path: str | None = None
        else:
            self.policy_path = os.fspath(policy)
            policy = load_policy(self.policy_path)
        # RLock: reload() runs in a signal handler, on a thread that may hold it.
        self._installed_lock = threading.RLock()
        self._installed = _Installed(policy, _hold_roots(policy))
        try:
            self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        except BaseException:
            self._installed.roots.retire()
            raise
        self._own_audit = not isinstance(audit, AuditLog)
        self.resolver = resolver or confine.RESOLVER
        self._appends = AppendPipes(on_end=lambda rec: self._audit_event("append-end", **rec))
        self._shutdown_timeout = shutdown_timeout
        try:
            #: How many connections fit the descriptor limit (fixed at start).
            self.budget = descriptor_budget(self.policy.limits, rules=len(self.policy.rules))
        except OSError:
            if self._own_audit:
                self.audit.close()
            self._installed.roots.retire()
            raise
        per_peer = self.budget.per_peer(self.policy.limits)
        if (
            self.budget.clients < self.policy.limits.max_clients
            or per_peer < self.policy.limits.connections_per_peer
        ):
            log.warning(
                "max_clients %d lowered to %d to fit RLIMIT_NOFILE %d (%d per connection, "
                "%d kept); connections per uid at most %d",
                self.policy.limits.max_clients,
                self.budget.clients,
                self.budget.nofile,
                FDS_PER_CONNECTION,
                self.budget.reserve,
                per_peer,
            )
        self._peers: dict[int, _PeerState] = {}
        self._peers_lock = threading.Lock()
        #: Requests answered, by decision (granted, denied, failed, invalid, limited).
        self.counts: dict[str, int] = {}
        try:
            self.server = Server(
                address,
                self._handle,
                model="thread",
                mode=mode,
                owner=owner,
                group=group,
                max_clients=self.budget.clients,
                # A short listen queue: a connect waits for room in the kernel, which
                # wakes waiters one at a time in order, so a flood of connects from one
                # uid delays another uid's connect by the few waiters ahead of it, not
                # by a queue of thousands (the Server default, somaxconn).
                backlog=BROKER_BACKLOG,
                # Refused right after accept, before a thread or an audit line: a
                # flood from one uid costs one SO_PEERCRED per connection.
                max_clients_per_uid=per_peer,
                refuse_with=_TOO_MANY,
                shutdown_timeout=shutdown_timeout,
                sock=sock,
                on_ready=on_ready,
            )
        except BaseException:
            if self._own_audit:
                self.audit.close()
            self._appends.close(0)
            self._installed.roots.retire()
            raise
        self.address = self.server.address

    @property
    def policy(self) -> Policy:
        """The policy in force (a reload replaces it as a whole)."""
        return self._installed.policy

    # ---------------------------------------------------------------- control
    def reload(self) -> bool:
        """Read the policy file again; swap it in if valid, else keep the old one.

        Returns whether the new policy is in force. Also reopens the audit log.
        Never raises (it runs in the ``SIGHUP`` handler): whatever goes wrong
        reading, validating or opening the new policy's roots leaves the old
        policy answering, and is logged with the file and line.

        Tells the service manager (``$NOTIFY_SOCKET``; systemd's
        ``Type=notify-reload``): ``RELOADING=1`` and ``MONOTONIC_USEC=`` first,
        then ``READY=1`` when done, also when the reload failed, with a
        ``STATUS=`` saying why and that the old policy is kept.
        """
        _notify_quietly(
            {"RELOADING": 1, "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}
        )
        try:
            ok, status = self._reload()
        except Exception as exc:  # never raises: the old policy stays
            log.error("reload failed, keeping the previous policy: %s", exc)
            ok, status = False, f"reload failed ({exc}); old policy kept"
        _notify_quietly({"READY": 1, "STATUS": status})
        return ok

    def _reload(self) -> tuple[bool, str]:
        try:
            self.audit.reopen()
        except Exception as exc:  # a signal handler must not raise
            log.error("could not reopen the audit log: %s", exc)
        if self.policy_path is None:
            return False, "nothing to reload: the policy was given as an object; audit log reopened"
        try:
            new = load_policy(self.policy_path)
            roots = _hold_roots(new)
        except Exception as exc:  # PolicyFileError, or a bug: keep the old policy
            if not isinstance(exc, PolicyFileError):
                why = f"unexpected {type(exc).__name__}: {exc}"
                exc = PolicyFileError(self.policy_path, None, why)
            log.error("reload refused, keeping the previous policy: %s", exc)
            self._audit_event("reload-failed", reason=exc.strerror, line=exc.line)
            return False, f"reload failed, old policy kept: {exc}"
        with self._installed_lock:
            old, self._installed = self._installed, _Installed(new, roots)
        old.roots.retire()  # closed once the requests still using them are done
        self.server.max_clients_per_uid = self.budget.per_peer(new.limits)
        log.info("policy reloaded from %s: %d rule(s)", self.policy_path, len(new.rules))
        self._audit_event("reload", reason=f"{len(new.rules)} rule(s) from {self.policy_path}")
        return True, f"policy reloaded: {len(new.rules)} rule(s) from {self.policy_path}"

    def serve_forever(self, *, handle_signals: bool | None = None) -> None:
        """Serve until ``SIGTERM``/``SIGINT`` or :meth:`shutdown`; ``SIGHUP`` reloads."""
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGHUP, lambda *_: self.reload()) if handle_signals else None
        self._audit_event(
            "start", pid=os.getpid(), reason=f"listening on {self.address.describe()}"
        )
        try:
            self.server.serve_forever(handle_signals=handle_signals)
        finally:
            if old is not None:
                signal.signal(signal.SIGHUP, old)
            handed = self.server.handed_over_to
            why = f"handed over to pid {handed}" if handed else "shut down"
            self._audit_event("stop", pid=os.getpid(), reason=why)
            self.close()

    def start(self) -> Broker:
        """Serve on a background thread (no signal handling); returns once accepting."""
        self._audit_event(
            "start", pid=os.getpid(), reason=f"listening on {self.address.describe()}"
        )
        self.server.start()
        return self

    def shutdown(self) -> None:
        self.server.shutdown()

    def stop(self) -> None:
        """Stop a :meth:`start`-ed broker and close it."""
        self.server.stop()
        self.close()

    def close(self) -> None:
        self.server.close()
        self._appends.close(self._shutdown_timeout)
        if self._own_audit:
            self.audit.close()
        with self._installed_lock:
            roots = self._installed.roots
        roots.retire()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers
    def _audit_event(self, event: str, **fields: Any) -> None:
        try:
            self.audit.record(event, **fields)
        except AuditError as exc:
            self._audit_failed(exc)

    def _audit_refusal(self, uid: int, kind: str, event: str, **fields: Any) -> None:
        """A refusal's line, within the uid's budget. A refusal stands even unwritten."""
        try:
            self.audit.refusal(uid, kind, event, **fields)
        except AuditError as exc:
            self._audit_failed(exc)

    def _audit_failed(self, exc: AuditError) -> None:
        if self.audit.lost <= 1:  # once per run of lost lines, not once per line
            log.error("%s (lines are counted until it can be written again)", exc)

    def _peer_state(self, uid: int, limits: BrokerLimits) -> _PeerState:
        with self._peers_lock:
            state = self._peers.get(uid)
            if state is None:
                state = self._peers[uid] = _PeerState(float(limits.burst), time.monotonic())
            return state

    def _take_installed(self) -> _Installed:
        """The policy in force and its roots, acquired: give them back with ``roots.release()``."""
        with self._installed_lock:
            inst = self._installed
            inst.roots.acquire()
        return inst

    def _count(self, decision: str) -> None:
        with self._peers_lock:
            self.counts[decision] = self.counts.get(decision, 0) + 1

    # ------------------------------------------------------------- connection
    def _handle(self, conn: Connection) -> None:
        try:
            creds = conn.credentials
        except OSError as exc:
            log.warning("no credentials for a client (%s); closing it", exc)
            return
        limits = self.policy.limits
        state = self._peer_state(creds.uid, limits)
        per_peer = self.budget.per_peer(limits)
        with state.lock:
            over = state.connections >= per_peer
            if not over:
                state.connections += 1
        peer = _peer_record(creds)
        if over:
            reason = f"too many connections from uid {creds.uid} (limit {per_peer})"
            self._audit_refusal(
                creds.uid,
                "connection-refused",
                "connection-refused",
                peer=peer,
                errno="EAGAIN",
                reason=reason,
            )
            self._goodbye(conn.sock, errno.EAGAIN, reason)
            return
        peer["exe"] = _exe(creds)  # once per connection: facts of a peer cost /proc reads
        try:
            self._serve(conn, creds, peer, state)
        finally:
            with state.lock:
                state.connections -= 1

    def _goodbye(self, sock: socket.socket, err: int, reason: str) -> None:
        """Best effort: tell the client why we hang up, within :data:`GOODBYE_TIMEOUT`.

        *sock* is the connection's socket or a duplicate of it, kept for this: a
        stream channel closes itself on a protocol error, and the client must
        still hear why. The goodbye goes through a channel of its own whose
        ``send_timeout`` is the short bound (``SO_SNDTIMEO`` of the one socket
        both descriptors name); it closes *sock*.
        """
        body = encode_reply(Reply(0, err, reason, KIND_ERROR, closing=True))
        try:
            with Channel.from_socket(
                sock, memfd_threshold=None, send_timeout=GOODBYE_TIMEOUT
            ) as chan:
                chan.send(body)
        except OSError as exc:  # gone, or not reading: nobody to tell
            log.debug("goodbye not delivered: %s", exc)

    def _serve(
        self, conn: Connection, creds: PeerCredentials, peer: dict[str, Any], state: _PeerState
    ) -> None:
        limits = self.policy.limits
        spare = conn.sock.dup()  # for the goodbye, whatever becomes of the channel
        try:
            chan = conn.channel(
                # (max_size bounds both ways: room for the longest reply too; a request
                # longer than max_request_bytes but not than that is refused below)
                max_size=max(limits.max_request_bytes, MAX_REPLY),
                maxfds=1,
                fd_room=1,  # room for one descriptor per recvmsg: more is MSG_CTRUNC, cut off
                discard_fds=True,  # closed as they arrive, counted against the header
                max_fds_in_flight=None,
                memfd_threshold=None,
                accept_memfd=False,
                idle_timeout=limits.idle_timeout,
                message_timeout=limits.request_timeout,
                send_timeout=limits.in_flight_timeout,
            )
        except BaseException:
            spare.close()
            raise
        in_flight = 0  # descriptors sent since the client's queue was last seen empty
        try:
            while True:
                if in_flight and _unread_bytes(chan.socket) == 0:
                    in_flight = 0
                if in_flight >= limits.fds_in_flight and not _drained(chan.socket, limits):
                    reason = (
                        f"{in_flight} descriptors sent and not read for "
                        f"{limits.in_flight_timeout}s (limit {limits.fds_in_flight} in flight)"
                    )
                    self._hang_up(spare, peer, "timeout/in-flight", errno.ETIMEDOUT, reason)
                    return
                if in_flight >= limits.fds_in_flight:
                    in_flight = 0
                with chan.recv() as msg:
                    if len(msg.data) > limits.max_request_bytes:
                        self._too_large(spare, peer, len(msg.data), limits)
                        return
                    try:
                        req = decode_request(msg.data, len(msg.fds))
                    except BadRequest as bad:
                        if self._invalid(chan, peer, bad):
                            return
                        continue
                if self._answer(chan, req, creds, peer, state):
                    in_flight += 1
        except (EOFError, PeerTimeout, ProtocolError) as exc:
            self._ended(exc, chan, spare, peer, limits)
        except OSError as exc:  # the client went away, or a reply could not be written
            log.debug("connection from %s ended: %s", creds.describe(), exc)
        finally:
            chan.close()
            spare.close()

    def _ended(
        self,
        exc: BaseException,
        chan: Channel,
        spare: socket.socket,
        peer: dict[str, Any],
        limits: BrokerLimits,
    ) -> None:
        """The connection ends on *exc*: today's replies and audit lines.

        An idle client, one gone between requests, or one that stopped reading
        its replies goes silently; one that stalled mid-request hears
        ``ETIMEDOUT``; a memfd request (the channel refuses it, its framing
        intact) is an invalid request, answered ``EINVAL``; any other protocol
        error (a bad header, an oversized request, ``MSG_CTRUNC``, descriptors
        the header did not announce) is answered with its errno.
        """
        if isinstance(exc, PeerTimeout):
            if exc.expired == "message":
                reason = f"request not completed within {limits.request_timeout}s"
                self._hang_up(spare, peer, "timeout/request", errno.ETIMEDOUT, reason)
            else:  # idle: nothing to say; send: it does not read what we say
                log.debug("connection from uid %s ended: %s", peer["uid"], exc)
        elif isinstance(exc, ProtocolError) and not chan.closed:
            why = "requests are never sent as memfd payloads"
            with contextlib.suppress(OSError):  # gone already: nobody to tell
                self._invalid(chan, peer, BadRequest(errno.EINVAL, why, closing=True))
        elif isinstance(exc, ProtocolError):
            err = exc.errno or errno.EPROTO
            kind = f"protocol-error/{errno_name(err)}"
            self._hang_up(spare, peer, kind, err, exc.strerror or "protocol error")

    def _too_large(
        self, spare: socket.socket, peer: dict[str, Any], size: int, limits: BrokerLimits
    ) -> None:
        """A request body over ``max_request_bytes`` (that its header did not betray)."""
        reason = (
            f"request of {size} bytes exceeds the maximum message size of "
            f"{limits.max_request_bytes} bytes (the broker's max_request_bytes)"
        )
        self._hang_up(spare, peer, "protocol-error/EMSGSIZE", errno.EMSGSIZE, reason)

    def _hang_up(
        self, spare: socket.socket, peer: dict[str, Any], kind: str, err: int, reason: str
    ) -> None:
        """Audit a refusal that ends the connection (``timeout/...`` or ``protocol-error/...``)
        and say goodbye with *err*."""
        event = kind.split("/", 1)[0]
        self._audit_refusal(
            peer["uid"], kind, event, peer=peer, errno=errno_name(err), reason=reason
        )
        self._goodbye(spare, err, reason)

    def _invalid(self, chan: Channel, peer: dict[str, Any], bad: BadRequest) -> bool:
        """Refuse a request that cannot be served as sent; ``True`` if the connection ends."""
        self._count("invalid")
        self._audit_refusal(
            peer["uid"],
            f"open/invalid/{errno_name(bad.errno)}",
            "open",
            peer=peer,
            request={"id": bad.id},
            decision="invalid",
            errno=errno_name(bad.errno),
            reason=bad.strerror,
        )
        reply = Reply(
            bad.id, bad.errno or errno.EINVAL, bad.strerror or "", KIND_ERROR, bad.closing
        )
        chan.send(encode_reply(reply))
        return bad.closing

    # ---------------------------------------------------------------- request
    def _answer(
        self,
        chan: Channel,
        req: OpenRequest,
        creds: PeerCredentials,
        peer: dict[str, Any],
        state: _PeerState,
    ) -> bool:
        """Serve one request; returns whether a descriptor was sent."""
        inst = self._take_installed()  # one snapshot for the whole request
        try:
            return self._answer_with(chan, req, creds, peer, state, inst=inst)
        finally:
            inst.roots.release()

    def _answer_with(
        self,
        chan: Channel,
        req: OpenRequest,
        creds: PeerCredentials,
        peer: dict[str, Any],
        state: _PeerState,
        *,
        inst: _Installed,
    ) -> bool:
        policy = inst.policy
        if not state.take(policy.limits):
            out = Outcome(
                "limited",
                errno.EAGAIN,
                f"rate limit: uid {creds.uid} may make {policy.limits.requests_per_second:g} "
                f"requests/s (burst {policy.limits.burst}); retry later",
            )
        else:
            out = self._decide(req, creds, policy, inst.roots)
        fd = out.opened.fd if out.opened is not None else None
        try:
            record = self._request_record(req, peer, out, creds)
            if fd is None:  # a refusal: budgeted per uid; it stands even if unwritten
                kind = f"open/{out.decision}/{errno_name(out.errno)}"
                self._audit_refusal(creds.uid, kind, "open", **record)
            else:
                try:
                    self.audit.record("open", **record)
                except AuditError as exc:  # fail-closed: no line, no descriptor
                    self._audit_failed(exc)
                    os.close(fd)
                    fd = None
                    out = Outcome("failed", errno.EIO, "the broker cannot write its audit log")
            self._count(out.decision)
            body = encode_reply(
                Reply(req.id, out.errno, out.public or out.reason), with_fd=fd is not None
            )
            chan.send(body, () if fd is None else (fd,))  # (within send_timeout)
            return fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def decide(
        self, req: OpenRequest, creds: PeerCredentials, policy: Policy | None = None
    ) -> Outcome:
        """Check, judge and (if granted) open one request. The caller owns ``opened.fd``.

        With the policy in force (*policy* ``None``) the open is confined
        beneath its held roots; another *policy* has its roots opened (without
        following symlinks) for this call only.
        """
        if policy is None:
            inst = self._take_installed()
            try:
                return self._decide(req, creds, inst.policy, inst.roots)
            finally:
                inst.roots.release()
        return self._decide(req, creds, policy, None)

    def _decide(
        self,
        req: OpenRequest,
        creds: PeerCredentials,
        policy: Policy,
        roots: confine.HeldRoots | None,
    ) -> Outcome:
        try:
            _flags.check(req.flags, req.mode)
        except _flags.FlagError as exc:
            return Outcome("denied", exc.errno or errno.EINVAL, f"flags refused: {exc.reason}")
        try:
            comps = split_path(req.path)
        except PathRefused as exc:
            return Outcome("denied", exc.errno or errno.EINVAL, f"path refused: {exc.reason}")
        decision = policy.decide(creds, comps, req.flags)
        rule = decision.rule
        if rule is None:
            return Outcome(
                "denied", decision.errno, decision.reason, public="not granted by the policy"
            )
        owner = (creds.uid, creds.gid) if rule.create_owner == "peer" else None
        pipe = rule.appends_through_pipe(_flags.operations(req.flags))
        limits = self.budget.append_pipes(policy.limits)
        try:
            if pipe:  # refuse before creating anything; and earlier bytes go in first
                self._appends.check_room(creds.uid, *limits)
                self._appends.flush(creds.uid)
            opened = confine.open_beneath(
                rule.root if roots is None else roots.fd(rule.root),
                decision.rel,
                req.flags,
                req.mode & rule.create_mode,
                no_symlinks=rule.no_symlinks,
                owner=owner,
                resolver=self.resolver,
            )
        except AppendLimit as exc:
            return Outcome("limited", exc.errno or errno.EAGAIN, exc.strerror or "", rule.name)
        except confine.ConfinementError as exc:
            kernel = f" (kernel: {errno_name(exc.kernel_errno)})" if exc.kernel_errno else ""
            return Outcome(
                "denied",
                exc.errno or errno.EACCES,
                f"confinement: {exc.strerror}{kernel}",
                rule.name,
            )
        except OSError as exc:
            err = exc.errno or errno.EIO
            return Outcome(
                "failed", err, f"open failed: {exc.strerror or os.strerror(err)}", rule.name
            )
        if pipe:
            what = {"peer": {"pid": creds.pid, "uid": creds.uid}, "rule": rule.name}
            what["file"] = {"dev": opened.dev, "ino": opened.ino, "path": text(opened.path)}
            try:
                opened.fd = self._appends.start(
                    creds.uid,
                    opened.fd,
                    what,
                    nonblock=bool(req.flags & _flags.Wire.NONBLOCK),
                    limits=limits,
                )
            except OSError as exc:  # the file descriptor is closed by start()
                return Outcome(
                    "limited" if isinstance(exc, AppendLimit) else "failed",
                    exc.errno or errno.EAGAIN,
                    exc.strerror or str(exc),
                    rule.name,
                )
        reason = decision.reason + (" (append through a pipe)" if pipe else "")
        return Outcome("granted", 0, reason, rule.name, opened, public="granted", pipe=pipe)

    def _request_record(
        self, req: OpenRequest, peer: dict[str, Any], out: Outcome, creds: PeerCredentials
    ) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "peer": peer,
            "request": {
                "id": req.id,
                "path": text(req.path),
                "flags": _flags.describe(req.flags),
                "mode": f"{req.mode:04o}",
            },
            "decision": out.decision,
            "errno": errno_name(out.errno),
            "reason": out.reason,
        }
        if out.rule is not None:
            rec["rule"] = out.rule
        if out.opened is not None:
            rec["file"] = {
                "dev": out.opened.dev,
                "ino": out.opened.ino,
                "path": text(out.opened.path),
                "created": out.opened.created,
            }
            if out.pipe:
                rec["file"]["via"] = "pipe"
            rec["resolver"] = out.opened.resolver
        return rec


@dataclass(frozen=True)
class _Installed:
    """A policy together with its rules' roots, opened once (replaced whole on reload)."""

    policy: Policy
    roots: confine.HeldRoots


def _hold_roots(policy: Policy) -> confine.HeldRoots:
    """Open every rule's root without following symlinks, or raise :class:`PolicyFileError`."""
    try:
        return confine.HeldRoots.open(
            (rule.root, rule.root_line or rule.line) for rule in policy.rules
        )
    except confine.RootError as exc:
        raise PolicyFileError(policy.source, exc.line, exc.reason) from None


def _notify_quietly(fields: dict[str, str | int]) -> None:
    """``sd_notify`` that never fails a reload: a gone manager is logged only."""
    try:
        notify({k: str(v).replace("\n", " ") for k, v in fields.items()})
    except OSError as exc:
        log.warning("could not notify the service manager: %s", exc)


def _peer_record(creds: PeerCredentials) -> dict[str, Any]:
    return {
        "pid": creds.pid,
        "uid": creds.uid,
        "gid": creds.gid,
        "groups": None if creds.groups is None else list(creds.groups),
    }


def _exe(creds: PeerCredentials) -> str | None:
    """The peer's executable as bounded text, or ``None`` if unknown or gone.

    The path is whatever bytes the client's executable has (newlines, bytes
    that are not UTF-8, up to ``PATH_MAX``): it is read as bytes, at most
    :data:`FACT_BYTES`, and written with ``\\xNN`` escapes, cut at
    :data:`~afunix.broker.audit.MAX_SHOWN` characters. Where the kernel gives a
    pidfd it is checked *after* reading that the peer still lives, so the path
    cannot be that of a process that reused its pid. Nothing here raises: a
    client cannot make its own handler fail by how it was started.
    """
    if creds.pid is None:
        return None
    try:
        raw = os.readlink(f"/proc/{creds.pid}/exe".encode())
    except FileNotFoundError:
        if os.path.exists("/proc/self/exe"):
            return None  # gone
        try:  # no /proc: whatever this system offers
            exe = creds.facts().exe
        except (OSError, ValueError):
            return None
        return None if exe is None else text(exe[:FACT_BYTES])
    except (OSError, ValueError):
        return None
    try:
        if creds.pidfd is not None and creds.exited():
            return None
    except OSError:
        return None
    return text(raw[:FACT_BYTES], MAX_SHOWN)
