"""The serving half of :class:`afunix.broker.server.Broker`: connections and requests.

:class:`Serving` holds what the broker does for each client, on the
connection's handler thread: per-uid accounting and refusal of one connection
too many (:meth:`Serving._handle`), the request loop over the connection's
:class:`~afunix.Channel` with its limits (size, descriptors in flight,
timeouts), the goodbye before a hang-up, and each request's answer
(:func:`afunix.broker._decide.decide`, the audit line, the reply with its
descriptor). :class:`~afunix.broker.server.Broker` builds the state it reads
(declared below) and adds the control half: start, reload, stop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from typing import Any, Final

from .. import Channel, PeerCredentials, PeerTimeout, ProtocolError
from ..server import Connection
from . import confine
from ._budget import DescriptorBudget, PeerState, drained, unread_bytes
from ._decide import (
    Installed,
    Outcome,
    decide,
    peer_exe,
    peer_record,
    rate_limited,
    request_record,
)
from .appends import AppendPipes
from .audit import AuditError, AuditLog, errno_name
from .policy import BrokerLimits, Policy
from .protocol import (
    KIND_ERROR,
    MAX_REPLY,
    BadRequest,
    OpenRequest,
    Reply,
    decode_request,
    encode_reply,
)

__all__ = ["GOODBYE_TIMEOUT", "Serving"]

log = logging.getLogger("afunix.broker")

#: Longest wait to write a goodbye (the error reply before a hang-up), in seconds: a
#: client that does not read cannot hold a handler thread longer than this.
GOODBYE_TIMEOUT: Final = 0.5


class Serving:
    """Connections and requests of a :class:`~afunix.broker.server.Broker` (its base).

    Stateless itself: it works on the attributes below, which ``Broker.__init__``
    sets (and a reload replaces ``_installed`` as a whole, under ``_installed_lock``).
    """

    #: The audit log (fail-closed for grants).
    audit: AuditLog
    #: How many connections fit the descriptor limit (fixed at start).
    budget: DescriptorBudget
    #: The resolver every open goes through.
    resolver: confine.Resolver
    #: Requests answered, by decision (granted, denied, failed, invalid, limited).
    counts: dict[str, int]
    _appends: AppendPipes
    _installed: Installed
    _installed_lock: threading.RLock
    _peers: dict[int, PeerState]
    _peers_lock: threading.Lock

    @property
    def policy(self) -> Policy:
        """The policy in force (a reload replaces it as a whole)."""
        return self._installed.policy

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
