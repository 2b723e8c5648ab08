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
   descriptor's device and inode;
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
``in_flight_timeout``); an idle timeout and a timeout to finish a request.

Socket activation (``LISTEN_FDS``), ``sd_notify`` (``READY=1``,
``STOPPING=1``, ``WATCHDOG=1``) and the zero-downtime hand-over come from
:class:`afunix.Server`. ``SIGHUP`` reloads the policy atomically (the old one
stays if the new one is invalid) and reopens the audit log; each reload is
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
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._address import AddressLike
from .._creds import PeerCredentials
from .._errors import AfunixError
from .._fds import recv_fds
from .._notify import notify
from .._protocol import CLOSED, NEED_DATA, FrameError
from ..server import Connection, Server
from . import confine
from . import flags as _flags
from .audit import AuditError, AuditLog, errno_name, text
from .policy import Limits, PathRefused, Policy, PolicyError, load_policy, split_path
from .protocol import (
    KIND_ERROR,
    BadRequest,
    OpenRequest,
    Reply,
    decode_request,
    encode_reply,
)
from .protocol import Connection as ProtocolState

__all__ = ["Broker", "Outcome"]

log = logging.getLogger("afunix.broker")

#: Room for descriptors a hostile client might attach (they are closed unused).
_MAX_FDS_IN = 16
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)
#: The error frame a client past ``connections_per_peer`` gets before the close.
_TOO_MANY = encode_reply(
    Reply(
        0,
        errno.EAGAIN,
        "too many connections from your uid (the broker's connections_per_peer); "
        "close one and retry",
        KIND_ERROR,
        closing=True,
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


def _send_reply(sock: socket.socket, frame: bytes, fd: int | None) -> None:
    """Send *frame* with *fd* attached to its first byte; ``MSG_NOSIGNAL`` (never SIGPIPE)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))] if fd is not None else []
    view = memoryview(frame)
    while view:
        n = sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
        anc = []  # the descriptor went with the first byte
        view = view[n:]


@dataclass
class _PeerState:
    """Per-uid accounting: open connections and a token bucket."""

    tokens: float
    stamp: float
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, limits: Limits) -> bool:
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
            self.policy = policy
        else:
            self.policy_path = os.fspath(policy)
            self.policy = load_policy(self.policy_path)
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        self._own_audit = not isinstance(audit, AuditLog)
        self.resolver = resolver or confine.RESOLVER
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
                max_clients=self.policy.limits.max_clients,
                # Refused right after accept, before a thread or an audit line: a
                # flood from one uid costs one SO_PEERCRED per connection.
                max_clients_per_uid=self.policy.limits.connections_per_peer,
                refuse_with=_TOO_MANY,
                shutdown_timeout=shutdown_timeout,
                sock=sock,
                on_ready=on_ready,
            )
        except BaseException:
            if self._own_audit:
                self.audit.close()
            raise
        self.address = self.server.address

    # ---------------------------------------------------------------- control
    def reload(self) -> bool:
        """Read the policy file again; swap it in if valid, else keep the old one.

        Returns whether the new policy is in force. Also reopens the audit log.
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
        except BaseException as exc:
            _notify_quietly({"READY": 1, "STATUS": f"reload failed ({exc}); old policy kept"})
            raise
        _notify_quietly({"READY": 1, "STATUS": status})
        return ok

    def _reload(self) -> tuple[bool, str]:
        with contextlib.suppress(AuditError):
            self.audit.reopen()
        if self.policy_path is None:
            return False, "nothing to reload: the policy was given as an object; audit log reopened"
        try:
            new = load_policy(self.policy_path)
        except PolicyError as exc:
            log.error("reload refused, keeping the previous policy: %s", exc)
            self._audit_event("reload-failed", reason=exc.strerror, line=exc.line)
            return False, f"reload failed, old policy kept: {exc}"
        self.policy = new  # one reference assignment: requests see the old or the new, whole
        self.server.max_clients_per_uid = new.limits.connections_per_peer
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
        if self._own_audit:
            self.audit.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers
    def _audit_event(self, event: str, **fields: Any) -> None:
        try:
            self.audit.record(event, **fields)
        except AuditError as exc:
            log.error("%s", exc)

    def _peer_state(self, uid: int, limits: Limits) -> _PeerState:
        with self._peers_lock:
            state = self._peers.get(uid)
            if state is None:
                state = self._peers[uid] = _PeerState(float(limits.burst), time.monotonic())
            return state

    def _count(self, decision: str) -> None:
        with self._peers_lock:
            self.counts[decision] = self.counts.get(decision, 0) + 1

    # ------------------------------------------------------------- connection
    def _handle(self, conn: Connection) -> None:
        sock = conn.sock
        try:
            creds = conn.credentials
        except OSError as exc:
            log.warning("no credentials for a client (%s); closing it", exc)
            return
        limits = self.policy.limits
        state = self._peer_state(creds.uid, limits)
        with state.lock:
            over = state.connections >= limits.connections_per_peer
            if not over:
                state.connections += 1
        peer = _peer_record(creds)
        if over:
            reason = (
                f"too many connections from uid {creds.uid} (limit {limits.connections_per_peer})"
            )
            self._audit_event("connection-refused", peer=peer, errno="EAGAIN", reason=reason)
            self._goodbye(sock, errno.EAGAIN, reason)
            return
        try:
            self._serve(sock, creds, peer, state)
        finally:
            with state.lock:
                state.connections -= 1

    def _goodbye(self, sock: socket.socket, err: int, reason: str, rid: int = 0) -> None:
        """Best effort: tell the client why we hang up."""
        frame = encode_reply(Reply(rid, err, reason, KIND_ERROR, closing=True))
        with contextlib.suppress(OSError):
            sock.settimeout(0.5)
            _send_reply(sock, frame, None)

    def _serve(
        self, sock: socket.socket, creds: PeerCredentials, peer: dict[str, Any], state: _PeerState
    ) -> None:
        limits = self.policy.limits
        proto = ProtocolState(max_size=limits.max_request_bytes, max_fds=_MAX_FDS_IN)
        in_flight = 0  # descriptors sent since the client's queue was last seen empty
        try:
            while True:
                if in_flight and _unread_bytes(sock) == 0:
                    in_flight = 0
                if in_flight >= limits.fds_in_flight and not self._wait_drained(sock, limits):
                    reason = (
                        f"{in_flight} descriptors sent and not read for "
                        f"{limits.in_flight_timeout}s (limit {limits.fds_in_flight} in flight)"
                    )
                    self._audit_event("timeout", peer=peer, errno="ETIMEDOUT", reason=reason)
                    self._goodbye(sock, errno.ETIMEDOUT, reason)
                    return
                if in_flight >= limits.fds_in_flight:
                    in_flight = 0
                frame = self._next_frame(sock, proto, limits, peer)
                if frame is None:
                    return
                try:
                    req = decode_request(frame)
                except BadRequest as bad:
                    self._count("invalid")
                    self._audit_event(
                        "open",
                        peer=peer,
                        request={"id": bad.id},
                        decision="invalid",
                        errno=errno_name(bad.errno),
                        reason=bad.strerror,
                    )
                    frame_out = encode_reply(
                        Reply(
                            bad.id,
                            bad.errno or errno.EINVAL,
                            bad.strerror or "",
                            KIND_ERROR,
                            closing=bad.closing,
                        )
                    )
                    sock.settimeout(limits.in_flight_timeout)
                    _send_reply(sock, frame_out, None)
                    if bad.closing:
                        return
                    continue
                if self._answer(sock, req, creds, peer, state):
                    in_flight += 1
        except FrameError as exc:
            self._audit_event(
                "protocol-error", peer=peer, errno=errno_name(exc.errno), reason=exc.strerror
            )
            self._goodbye(sock, exc.errno or errno.EPROTO, exc.strerror or "protocol error")
        except OSError as exc:  # the client went away, or a send timed out
            log.debug("connection from %s ended: %s", creds.describe(), exc)
        finally:
            proto.close()

    def _wait_drained(self, sock: socket.socket, limits: Limits) -> bool:
        deadline = time.monotonic() + limits.in_flight_timeout
        while time.monotonic() < deadline:
            if _unread_bytes(sock) == 0:
                return True
            time.sleep(0.005)
        return False

    def _next_frame(
        self, sock: socket.socket, proto: ProtocolState, limits: Limits, peer: dict[str, Any]
    ) -> Any:
        """The next request frame, or ``None`` when the client is gone or timed out."""
        deadline: float | None = None
        while True:
            got = proto.next_frame()
            if got is CLOSED:
                return None
            if got is not NEED_DATA:
                return got
            if proto.buffered:
                if deadline is None:
                    deadline = time.monotonic() + limits.request_timeout
                timeout = deadline - time.monotonic()
            else:
                deadline = None
                timeout = limits.idle_timeout
            if timeout <= 0:
                timeout = 0.0
            sock.settimeout(timeout)
            try:
                data, fds, _flags_in, _addr = recv_fds(sock, limits.max_request_bytes, _MAX_FDS_IN)
            except TimeoutError:
                if proto.buffered:
                    reason = f"request not completed within {limits.request_timeout}s"
                    self._audit_event("timeout", peer=peer, errno="ETIMEDOUT", reason=reason)
                    self._goodbye(sock, errno.ETIMEDOUT, reason)
                return None
            except FrameError:
                raise
            except AfunixError as exc:  # MSG_CTRUNC, unexpected control data (fds closed)
                raise FrameError(
                    exc.strerror or "bad control data", exc.errno or errno.EPROTO
                ) from exc
            proto.receive_data(data, fds)

    # ---------------------------------------------------------------- request
    def _answer(
        self,
        sock: socket.socket,
        req: OpenRequest,
        creds: PeerCredentials,
        peer: dict[str, Any],
        state: _PeerState,
    ) -> bool:
        """Serve one request; returns whether a descriptor was sent."""
        policy = self.policy  # one snapshot for the whole request
        if not state.take(policy.limits):
            out = Outcome(
                "limited",
                errno.EAGAIN,
                f"rate limit: uid {creds.uid} may make {policy.limits.requests_per_second:g} "
                f"requests/s (burst {policy.limits.burst}); retry later",
            )
        else:
            out = self.decide(req, creds, policy)
        fd = out.opened.fd if out.opened is not None else None
        try:
            record = self._request_record(req, peer, out, creds)
            try:
                self.audit.record("open", **record)
            except AuditError as exc:
                log.error("%s; refusing the request", exc)
                if fd is not None:
                    os.close(fd)
                    fd = None
                out = Outcome("failed", errno.EIO, "the broker cannot write its audit log")
            self._count(out.decision)
            frame = encode_reply(
                Reply(req.id, out.errno, out.public or out.reason), with_fd=fd is not None
            )
            sock.settimeout(policy.limits.in_flight_timeout)
            _send_reply(sock, frame, fd)
            return fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def decide(
        self, req: OpenRequest, creds: PeerCredentials, policy: Policy | None = None
    ) -> Outcome:
        """Check, judge and (if granted) open one request. The caller owns ``opened.fd``."""
        policy = policy or self.policy
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
        try:
            opened = confine.open_beneath(
                rule.root,
                decision.rel,
                req.flags,
                req.mode & rule.create_mode,
                no_symlinks=rule.no_symlinks,
                owner=owner,
                resolver=self.resolver,
            )
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
        return Outcome("granted", 0, decision.reason, rule.name, opened, public="granted")

    def _request_record(
        self, req: OpenRequest, peer: dict[str, Any], out: Outcome, creds: PeerCredentials
    ) -> dict[str, Any]:
        exe = _exe(creds)
        rec: dict[str, Any] = {
            "peer": {**peer, "exe": exe},
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
            rec["resolver"] = out.opened.resolver
        return rec


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
    """The peer's executable, checked through its pidfd where the kernel gives one."""
    try:
        return creds.facts().exe
    except OSError:
        return None
