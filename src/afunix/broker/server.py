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

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .. import Channel, PeerCredentials, PeerTimeout, ProtocolError
from ..lowlevel import AddressLike, notify
from ..server import Connection, Server
from . import confine
from ._budget import FDS_PER_CONNECTION as FDS_PER_CONNECTION
from ._budget import FDS_RESERVE as FDS_RESERVE
from ._budget import DescriptorBudget as DescriptorBudget
from ._budget import PeerState, drained, unread_bytes
from ._budget import descriptor_budget as descriptor_budget
from ._decide import (
    Installed,
    decide,
    hold_roots,
    peer_exe,
    peer_record,
    rate_limited,
    request_record,
)
from ._decide import Outcome as Outcome
from .appends import AppendPipes
from .audit import AuditError, AuditLog, errno_name
from .policy import BrokerLimits, Policy, PolicyFileError, load_policy
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

#: The broker's listen queue (see the Server construction in :class:`Broker`).
BROKER_BACKLOG: Final = 64
#: Longest wait to write a goodbye (the error reply before a hang-up), in seconds: a
#: client that does not read cannot hold a handler thread longer than this.
GOODBYE_TIMEOUT: Final = 0.5
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
        self._installed = Installed(policy, hold_roots(policy))
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
        self._peers: dict[int, PeerState] = {}
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
            roots = hold_roots(new)
        except Exception as exc:  # PolicyFileError, or a bug: keep the old policy
            if not isinstance(exc, PolicyFileError):
                why = f"unexpected {type(exc).__name__}: {exc}"
                exc = PolicyFileError(self.policy_path, None, why)
            log.error("reload refused, keeping the previous policy: %s", exc)
            self._audit_event("reload-failed", reason=exc.strerror, line=exc.line)
            return False, f"reload failed, old policy kept: {exc}"
        with self._installed_lock:
            old, self._installed = self._installed, Installed(new, roots)
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

    def _peer_state(self, uid: int, limits: BrokerLimits) -> PeerState:
        with self._peers_lock:
            state = self._peers.get(uid)
            if state is None:
                state = self._peers[uid] = PeerState(float(limits.burst), time.monotonic())
            return state

    def _take_installed(self) -> Installed:
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
        peer = peer_record(creds)
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
        peer["exe"] = peer_exe(creds)  # once per connection: facts of a peer cost /proc reads
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
        self, conn: Connection, creds: PeerCredentials, peer: dict[str, Any], state: PeerState
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
                if in_flight and unread_bytes(chan.socket) == 0:
                    in_flight = 0
                if in_flight >= limits.fds_in_flight and not drained(chan.socket, limits):
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
        state: PeerState,
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
        state: PeerState,
        *,
        inst: Installed,
    ) -> bool:
        policy = inst.policy
        if not state.take(policy.limits):
            out = rate_limited(creds, policy.limits)
        else:
            out = self._decide(req, creds, policy, inst.roots)
        fd = out.opened.fd if out.opened is not None else None
        try:
            record = request_record(req, peer, out)
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
        return decide(
            req,
            creds,
            policy,
            roots,
            appends=self._appends,
            append_limits=self.budget.append_pipes(policy.limits),
            resolver=self.resolver,
        )


def _notify_quietly(fields: dict[str, str | int]) -> None:
    """``sd_notify`` that never fails a reload: a gone manager is logged only."""
    try:
        notify({k: str(v).replace("\n", " ") for k, v in fields.items()})
    except OSError as exc:
        log.warning("could not notify the service manager: %s", exc)
