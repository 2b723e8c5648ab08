"""The blocking runners: a thread per client (``ThreadRunner``) or a child (``ForkRunner``).

Both share one accept loop (UNP 15.5): ``select`` on the listener and the
wake-up pair (so a stop request or the watchdog's next ping is never late),
``accept`` restarted after ``EINTR`` (PEP 475), admission, then dispatch. Out
of descriptors, threads or processes, the loop refuses that client, pauses
briefly and goes on serving the clients it has.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator

from .._address import Address
from .._creds import PeerCredentials
from .._platform import NOSIGNAL, PLATFORM
from ._connection import Connection, Datagram, log_handler_failure, peer_address
from ._listener import PAUSE_ERRNOS, ListeningSocket, watchdog_period, watchdog_ping
from ._runner import Runner

__all__ = ["THREAD_MAX_CLIENTS", "ForkRunner", "ThreadRunner"]

log = logging.getLogger("afunix.server")

#: ``max_clients`` of a ``model="thread"`` server when none is given: a thread per
#: client is a task the kernel counts against ``RLIMIT_NPROC``, so the model is
#: bounded by default; more clients wait in the listen queue.
THREAD_MAX_CLIENTS = 256

#: Seconds the accept loop pauses after running out of descriptors, threads or
#: processes: clients that arrive meanwhile wait in the listen queue.
_PAUSE = 0.1
_ACCEPT_INHERITS_NONBLOCK = PLATFORM.accepted_may_be_nonblocking
#: How a forked child tells the parent it refused its ``tls://`` client (so that the
#: parent's ``refused``/``rejected`` count it): its handshake failed (sysexits'
#: EX_PROTOCOL), or ``policy``/``verify`` refused it (EX_NOPERM).
_CHILD_HANDSHAKE_FAILED = 76
_CHILD_REFUSED = 77


@contextlib.contextmanager
def _signals(enabled: bool, listener: ListeningSocket) -> Iterator[None]:
    """``SIGTERM``/``SIGINT`` stop the server, ``SIGUSR2`` hands it over; restored after."""
    if not enabled:
        yield
        return
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: listener.request_stop())
    previous[signal.SIGUSR2] = signal.signal(
        signal.SIGUSR2, lambda *_: listener.hand_over_in_background()
    )
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Runner(Runner, abc.ABC):
    """The accept loop of both blocking models; subclasses dispatch and drain."""

    #: The last accept found a client (another may wait: accept again at once).
    _queue_ready = False
    #: Longest select wait (with a watchdog: shorter).
    _tick = 0.25

    @abc.abstractmethod
    def _setup(self) -> None:
        """The model's own state (called by ``Runner.__init__``)."""

    def run(self, handle_signals: bool) -> None:
        """Serve until a stop is requested; then stop accepting and drain."""
        sel = selectors.DefaultSelector()
        self.listener.sock.setblocking(False)
        sel.register(self.listener.sock, selectors.EVENT_READ)
        sel.register(self.listener.wake_r, selectors.EVENT_READ)
        period = watchdog_period()
        self._tick = min(0.25, period) if period is not None else 0.25
        try:
            with _signals(handle_signals, self.listener):
                self.listener.announce()
                self._loop(sel, period)
        finally:
            sel.close()
            self.admission.refusals.flush()
            self.listener.stop_accepting()
            self._drain()

    def _loop(self, sel: selectors.BaseSelector, period: float | None) -> None:
        due = 0.0  # the first WATCHDOG=1 goes out with the first pass of the loop
        while not self.listener.stopping.is_set():
            if period is not None:
                due = _watchdog_due(due, period)
            self._turn(sel)

    @abc.abstractmethod
    def _turn(self, sel: selectors.BaseSelector) -> None:
        """One pass of the accept loop."""

    @abc.abstractmethod
    def _dispatch(
        self, conn: socket.socket, peer: Address, creds: PeerCredentials | None, uid: int | None
    ) -> bool:
        """Hand an admitted client to a thread or child; whether a thread took the slot."""

    @abc.abstractmethod
    def _drain(self) -> None:
        """Let connections in flight finish for up to ``shutdown_timeout``, then end them."""

    def _accept_and_dispatch(self, sel: selectors.BaseSelector) -> bool:
        """Wait briefly for a client; hand it to a thread or child.

        Returns whether a thread took over the slot (it releases it when done).
        After an accept the next call tries ``accept`` straight away, without
        ``select``: a full listen queue drains at the cost of its refusals.
        """
        if not self._queue_ready:
            events = sel.select(timeout=self._tick)
            if not any(key.fileobj is self.listener.sock for key, _ in events):
                return False
        if self.listener.type == socket.SOCK_DGRAM:
            self._serve_datagram()
            return False
        try:
            conn, raw = self.listener.sock.accept()  # EINTR is retried (PEP 475)
        except (BlockingIOError, InterruptedError):
            self._queue_ready = False
            return False
        except OSError as exc:
            if exc.errno in PAUSE_ERRNOS:
                log.error("accept failed: %s; pausing briefly", exc)
                time.sleep(0.1)
                return False
            raise
        self._queue_ready = True
        ok, uid = self.admission.uid_admit(conn)
        if not ok:
            return False
        if _ACCEPT_INHERITS_NONBLOCK or socket.getdefaulttimeout() is not None:
            conn.setblocking(True)  # (on Linux it is blocking already: no ioctl per client)
        peer = peer_address(self.listener.sock, raw)
        ok, creds = self.admission.admit(conn, peer, uid)
        return ok and self._dispatch(conn, peer, creds, uid)

    def _out_of(self, reason: str, detail: str) -> None:
        """No thread or process for a client: it was refused; pause accepting briefly.

        Like ``EMFILE``: the server keeps serving the clients it has, and new
        ones wait in the listen queue until the pause is over.
        """
        self.admission.refusals.add(
            reason,
            f"{detail}; refused that client and pausing accepts for {_PAUSE:g}s "
            f"(threads and processes count against RLIMIT_NPROC; lower max_clients)",
        )
        self.listener.stopping.wait(_PAUSE)

    def _serve_datagram(self) -> None:
        try:
            dgram = self.admission.admit_datagram(self.listener.sock)
        except (BlockingIOError, InterruptedError):
            return
        if dgram is not None:
            self._datagram(dgram)

    def _datagram(self, dgram: Datagram) -> None:
        """Answer *dgram* in the accepting thread (the thread model)."""
        self.admission.served += 1
        self._reply(dgram)

    def _reply(self, dgram: Datagram) -> None:
        sender = dgram.sender
        try:
            reply = self.handler(dgram)
        except Exception:
            log.exception("datagram handler raised for sender %s", sender.describe())
            return
        if reply is None:
            return
        if sender.kind.value == "unnamed":
            log.warning(
                "cannot reply to a datagram from an unbound socket (UNP 15.4 point 8); "
                "the client must bind an address"
            )
            return
        try:
            self.listener.sock.sendto(reply, NOSIGNAL, sender.sockaddr)
        except OSError as exc:
            log.warning("reply to %s failed: %s", sender.describe(), exc)


class ThreadRunner(_Runner):
    """A thread per client, at most ``max_clients`` at once.

    Without a free slot the loop does not accept, so new clients wait in the
    listen queue. A thread that cannot be started (``RLIMIT_NPROC``, memory)
    refuses that client (``refused["no-thread"]``) and pauses accepting.
    """

    def _setup(self) -> None:
        self._workers: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_clients) if self.max_clients else None

    def _turn(self, sel: selectors.BaseSelector) -> None:
        slots = self._slots
        if slots is not None and not slots.acquire(timeout=min(0.1, self._tick)):
            return
        dispatched = False
        try:
            dispatched = self._accept_and_dispatch(sel)
        finally:
            if slots is not None and not dispatched:
                slots.release()
        if dispatched:  # (not per refusal: a flood is refused cheaply)
            self._workers = {w for w in self._workers if w.is_alive()}

    def _dispatch(
        self, conn: socket.socket, peer: Address, creds: PeerCredentials | None, uid: int | None
    ) -> bool:
        with self._lock:
            self._conns.add(conn)
        t = threading.Thread(target=self._run_thread, args=(conn, peer, creds, uid), daemon=True)
        try:
            t.start()
        except RuntimeError as exc:  # "can't start new thread": RLIMIT_NPROC, memory
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            if creds is not None:
                creds.close()
            self.admission.uid_release(uid)
            self._out_of("no-thread", f"cannot start a thread for a client ({exc})")
            return False
        self._workers.add(t)
        self.admission.served += 1
        return True

    def _run_thread(
        self, conn: socket.socket, peer: Address, creds: PeerCredentials | None, uid: int | None
    ) -> None:
        connection = Connection(conn, peer, creds, self.limits)
        try:
            if self.admission.tls is not None:  # tls://: handshake and admission here
                secured = self.admission.secure(conn, peer)
                if secured is None:
                    return
                connection = Connection(*secured, None, self.limits)
            self.handler(connection)
        except Exception as exc:
            log_handler_failure(exc, connection.describe())
        finally:
            with self._lock:
                self._conns.discard(conn)
            connection.close()
            self.admission.uid_release(uid)
            if self._slots is not None:
                self._slots.release()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        for t in list(self._workers):
            t.join(max(deadline - time.monotonic(), 0))
        with self._lock:
            leftovers = list(self._conns)
        for conn in leftovers:
            log.warning("closing connection still open at shutdown")
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in list(self._workers):
            t.join(1.0)


class ForkRunner(_Runner):
    """The book's model: a child process per client (and per datagram).

    The child closes the listening socket (never its file: only the binding
    pid removes it). ``SIGCHLD`` (when handling signals) and every pass of the
    accept loop reap with ``waitpid(pid, WNOHANG)`` for each of the server's
    own children, not ``waitpid(-1)``, so a library user's ``subprocess``
    children keep their exit status. ``fork()`` failing (``EAGAIN``,
    ``ENOMEM``) refuses that client (``refused["no-process"]``).
    """

    def _setup(self) -> None:
        self._children: set[int] = set()
        self._child_uid = self.admission.child_uid  # pid -> uid, for the per-uid cap
        #: Exit codes of children that refused their tls:// client, to count: ``_reap``
        #: also runs in the SIGCHLD handler, which must take no lock (the loop it
        #: interrupts may hold it), so the loop counts them (``_count_refusals``).
        self._refused_exits: deque[int] = deque()

    def run(self, handle_signals: bool) -> None:
        old_chld = (
            signal.signal(signal.SIGCHLD, lambda *_: self._reap()) if handle_signals else None
        )
        try:
            super().run(handle_signals)
        finally:
            if old_chld is not None:
                signal.signal(signal.SIGCHLD, old_chld)

    def _turn(self, sel: selectors.BaseSelector) -> None:
        self._reap()
        self._count_refusals()
        if self.max_clients and len(self._children) >= self.max_clients:
            time.sleep(0.005)  # leave new clients in the listen queue
            return
        self._accept_and_dispatch(sel)

    def _dispatch(
        self, conn: socket.socket, peer: Address, creds: PeerCredentials | None, uid: int | None
    ) -> bool:
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pid_max) or ENOMEM
            conn.close()
            if creds is not None:
                creds.close()
            self._out_of("no-process", f"cannot fork a child for a client ({exc})")
            return False
        if pid == 0:  # pragma: no cover - child; measured through its effects
            self._child(Connection(conn, peer, creds, self.limits))
        self._children.add(pid)
        if uid is not None:
            self._child_uid[pid] = uid
        self.admission.served += 1
        conn.close()  # the parent's copies; the child has its own
        if creds is not None:
            creds.close()
        return False

    def _child(self, connection: Connection) -> None:  # pragma: no cover - child
        """Run the handler in a forked child; never returns."""
        code = 0
        try:
            self._after_fork()
            if self.admission.tls is not None:  # tls://: handshake and admission here
                failed = self.admission.refused.get("tls-handshake", 0)
                secured = self.admission.secure(connection.sock, connection.peer)
                if secured is None:  # the parent counts it (from the exit status)
                    failed = self.admission.refused.get("tls-handshake", 0) > failed
                    os._exit(_CHILD_HANDSHAKE_FAILED if failed else _CHILD_REFUSED)
                connection = Connection(*secured, None, self.limits)
            self.handler(connection)
        except BaseException as exc:
            log_handler_failure(exc, connection.describe())
            code = 1
        finally:
            with contextlib.suppress(OSError):
                connection.close()
            os._exit(code)

    def _datagram(self, dgram: Datagram) -> None:
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pid_max) or ENOMEM
            self._out_of("no-process", f"cannot fork a child for a datagram ({exc})")
            return
        self.admission.served += 1
        if pid == 0:  # pragma: no cover - child; measured through its effects
            code = 0
            try:
                self._after_fork(keep_listener=True)  # the reply leaves through it
                self._reply(dgram)
            except BaseException:
                log.exception("datagram handler failed")
                code = 1
            finally:
                os._exit(code)
        self._children.add(pid)

    def _after_fork(self, keep_listener: bool = False) -> None:
        """In a forked child: default signals; drop the listener (without removing its file)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self.listener.close_in_child(keep_listener)

    def _reap(self) -> None:
        """``waitpid(pid, WNOHANG)`` for each of our children (the book's SIGCHLD loop)."""
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == pid:
                self._ended(pid, status)

    def _ended(self, pid: int, status: int) -> None:
        """A child was reaped: forget it, and note a ``tls://`` client it refused (counted
        by :meth:`_count_refusals`: this may run in the SIGCHLD handler)."""
        self._children.discard(pid)
        self._child_uid.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code in (_CHILD_HANDSHAKE_FAILED, _CHILD_REFUSED) and self.admission.tls is not None:
            self._refused_exits.append(code)

    def _count_refusals(self) -> None:
        """Count the refusals children reported (the accept loop's thread, never a handler)."""
        exits = self._refused_exits
        while exits:
            self.admission.refused_in_child(exits.popleft() == _CHILD_HANDSHAKE_FAILED)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self._children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        for pid in list(self._children):
            log.warning("child %d still running at shutdown; terminating it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(self._children):
            status = 0
            with contextlib.suppress(ChildProcessError):
                status = os.waitpid(pid, 0)[1]
            self._ended(pid, status)
        self._count_refusals()


def _watchdog_due(due: float, period: float) -> float:
    """Ping if *due* has passed (called by the accept loop); the next due time."""
    now = time.monotonic()
    if now < due:
        return due
    watchdog_ping()
    return now + period
