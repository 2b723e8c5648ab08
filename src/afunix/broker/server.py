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

import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from ..lowlevel import AddressLike, notify
from ..server import Server
from . import confine
from ._budget import FDS_PER_CONNECTION as FDS_PER_CONNECTION
from ._budget import FDS_RESERVE as FDS_RESERVE
from ._budget import DescriptorBudget as DescriptorBudget
from ._budget import PeerState
from ._budget import descriptor_budget as descriptor_budget
from ._decide import Installed, hold_roots
from ._decide import Outcome as Outcome
from ._serving import GOODBYE_TIMEOUT as GOODBYE_TIMEOUT
from ._serving import Serving
from .appends import AppendPipes
from .audit import AuditLog
from .policy import Policy, PolicyFileError, load_policy
from .protocol import KIND_ERROR, Reply, encode_reply, frame

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


class Broker(Serving):
    """A descriptor broker on a Unix socket. See the module docs.

    What it does per connection and request (and :meth:`decide`) is in its base,
    :class:`afunix.broker._serving.Serving`; this class builds it, and starts,
    reloads and stops it.

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


def _notify_quietly(fields: dict[str, str | int]) -> None:
    """``sd_notify`` that never fails a reload: a gone manager is logged only."""
    try:
        notify({k: str(v).replace("\n", " ") for k, v in fields.items()})
    except OSError as exc:
        log.warning("could not notify the service manager: %s", exc)
