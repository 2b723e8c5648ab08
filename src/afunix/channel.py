"""Message channels that carry descriptors: :class:`Channel` and :class:`Message` (UNP 15.7).

A channel sends *messages* (bytes plus descriptors) over a Unix-domain
socket of any type, with the same semantics on each::

    import afunix

    a, b = afunix.Channel.pair()              # or Channel.connect(path), Listener.accept()
    with open("/etc/hostname", "rb") as f:
        a.send(b"here is a file", fds=[f])    # ints, files and sockets
    with b.recv() as msg:                     # a Message owns its descriptors
        f2 = msg.take_file(0)                 # take what you keep...
    ...                                       # ...the rest is closed on exit

* stream: messages are framed (:mod:`afunix._protocol`), each message's
  descriptors travel with its header's first byte and are counted
  (``send(..., more=True)`` writes several messages and all their
  descriptors with one ``sendmsg``; each message still gets exactly its own);
* seqpacket and datagram: one packet is one message;
* payloads of :data:`~afunix._memfd.MEMFD_THRESHOLD` bytes or more (or
  with ``memfd=True``) travel as a sealed ``memfd`` mapped read-only by the
  receiver (:attr:`Message.data` is then a read-only ``memoryview``).

Errors. A malformed frame, or descriptors that do not match the header, is
a :class:`~afunix.ProtocolError`: on a stream the channel is closed (the
byte stream cannot be trusted any more), on packet sockets only that packet
is dropped; either way every descriptor that came with it is closed. A
message whose control data was truncated (``MSG_CTRUNC``: the receiver had
less room than the sender sent) raises :class:`~afunix.ControlTruncated`.
``recv`` raises :class:`EOFError` when the peer closed between messages.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from ._address import Address, AddressKind, AddressLike
from ._cmsg import SCM_MAX_FD, FdLike
from ._connect import check_tls, connect, connect_tls, requires_client_certificates, tcp_of
from ._io import (
    frame_limit,
    protocol_for,
    receive,
    receiver_for,
    recv_frame,
    send_frame,
    set_timeout,
    try_frame,
    write_some,
)
from ._memfd import MEMFD_THRESHOLD, MemfdBuffer
from ._peer import TlsPeer
from ._platform import PLATFORM
from ._protocol import CLOSED, DEFAULT_MAX_SIZE, NEED_DATA
from ._protocol.framing import HOLD_IN_C, PLAIN_WORD, WORDS, hold_frame
from ._protocol.machine import HOLD_MAX, RECV_BUFSIZE
from ._protocol.message import Message
from ._protocol.timeouts import ReceiveWait, check_timeouts, timed_out
from ._protocol.write import BROKEN, OPEN, Write
from ._sockets import SocketTypeLike, listen, pair, refuse_exposed, socket_type, type_name
from ._tlsio import TlsSocket

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = ["Channel", "Listener", "Message"]

_RCVTIMEO, _SNDTIMEO = socket.SO_RCVTIMEO, socket.SO_SNDTIMEO
_TLS = AddressKind.TLS


_pack_words = WORDS.pack


class Channel:
    """Messages with descriptors over one Unix-domain socket (blocking), or over TCP.

    Args:
        sock: a connected stream/seqpacket socket, or a datagram socket
            (connected, or bound and used with ``address=``). The channel
            takes ownership and closes it. A connected TCP socket
            (``tcp://``), or one whose ``carries_fds`` attribute is ``False``
            (``ssh://``), carries messages and batches only: descriptors,
            ``memfd=True`` and :meth:`send_buffer` raise
            :class:`~afunix.UnsupportedFeature` before anything is sent (the
            channel stays usable), ``credentials=True`` is refused, and large
            payloads go inline (the receiver sees the same :attr:`Message.data`).
            A ``tls://`` connection (``connect(..., ssl=)``, ``Listener.accept``)
            follows the same rules, and :attr:`tls_peer` says who the peer is.
        max_size: largest payload accepted, inline or memfd (default 64 MiB);
            a larger frame from the peer is a protocol error.
        maxfds: most descriptors accepted with one message (0-253). On a
            stream a message announcing more is a :class:`~afunix.ProtocolError`
            (each ``recvmsg`` makes room for 253, as one ``sendmsg`` may carry
            the descriptors of several messages); on seqpacket and datagram
            sockets it is the room made per packet, and a peer sending more
            gets :class:`~afunix.ControlTruncated`.
        memfd_threshold: payloads this large or larger go as a sealed memfd
            (default 32 MiB, see :mod:`afunix._memfd` for why); ``None`` never.
        recv_bufsize: bytes asked for per ``recvmsg`` on a stream.
        credentials: set ``SO_PASSCRED`` and fill :attr:`Message.credentials`.
        max_fds_in_flight: at most this many received descriptors may be held
            in messages not yet closed (or their descriptors taken); one more is
            a :class:`~afunix.ProtocolError` (``ETOOMANYREFS``) and the message's
            descriptors are closed. D-Bus uses 64. ``None``: no limit.
        accept_memfd: ``False`` refuses memfd payloads from the peer: such a
            message is a :class:`~afunix.ProtocolError` (``EINVAL``), its
            descriptors closed, and the channel stays usable.
        idle_timeout: ``recv`` waits at most this many seconds for a message to
            begin, then raises :class:`~afunix.PeerTimeout` (the channel stays
            open: try again or close it). ``None``: no limit.
        message_timeout: once a message has begun, the rest of it must come
            within this many seconds (:class:`~afunix.PeerTimeout`; a stream is
            then mid-message: close the channel). ``None``: no limit.
        send_timeout: each write waits at most this long for room in the
            socket (:class:`~afunix.PeerTimeout`; a stream message cut short
            closes the channel). ``None``: no limit. Without any timeout the
            socket is never touched for them. :attr:`PeerTimeout.expired
            <afunix.PeerTimeout.expired>` says which of the three ran out.
        fd_room: descriptors one ``recvmsg`` makes room for. By default
            ``maxfds`` on seqpacket and datagram sockets and 253 on a stream
            (one ``sendmsg`` of a peer's ``more=True`` batch may carry the
            descriptors of several messages). A smaller room bounds what a
            peer can make this process hold: the kernel closes what does not
            fit and the message raises :class:`~afunix.ControlTruncated` (on
            a stream the channel is then closed).
        discard_fds: close every descriptor from the peer as soon as the
            ``recvmsg`` that brought it returns, before the message it came
            with is whole: a peer cannot make this process hold any. The
            framing still counts them, and the message shows each as ``-1``
            in :attr:`Message.fds` (already closed), so ``len(msg.fds)`` says
            how many came; a memfd payload is refused as with
            ``accept_memfd=False``. The broker, whose requests carry none, uses
            ``maxfds=1, fd_room=1, discard_fds=True``.

    Thread-safe: one sender and one receiver may work at the same time, and
    concurrent senders never interleave their messages.
    """

    # Receive timeouts, as class defaults: an untimed channel sets none of them.
    _idle_timeout: float | None = None
    _message_timeout: float | None = None
    #: ``SO_RCVTIMEO`` as last set (``None``: none), and what the limits say (made by the
    #: first timed receive; it keeps the deadline of a message under way across calls).
    _rcvtimeo: float | None = None
    _wait: ReceiveWait | None = None

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        maxfds: int = SCM_MAX_FD,
        memfd_threshold: int | None = MEMFD_THRESHOLD,
        recv_bufsize: int = RECV_BUFSIZE,
        credentials: bool = False,
        max_fds_in_flight: int | None = None,
        accept_memfd: bool = True,
        idle_timeout: float | None = None,
        message_timeout: float | None = None,
        send_timeout: float | None = None,
        fd_room: int | None = None,
        discard_fds: bool = False,
    ) -> None:
        self._proto = protocol_for(
            sock,
            max_size=max_size,
            maxfds=maxfds,
            memfd_threshold=memfd_threshold,
            accept_memfd=accept_memfd,
            credentials=credentials,
            max_fds_in_flight=max_fds_in_flight,
            recv_bufsize=recv_bufsize,
            fd_room=fd_room,
            discard_fds=discard_fds,
        )
        self._sock = sock
        self._receive = receiver_for(sock)
        #: Largest payload the core's send_frame takes (-1: none), and whether with descriptors.
        self._frame_limit = frame_limit(sock, self._proto)
        self._fds_fast = self._proto.carries_fds
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._timed = idle_timeout is not None or message_timeout is not None
        #: recv may call the core's recv_frame itself: untimed, and not over tls://.
        self._inline_recv = not self._timed and self._receive is receive
        self._send_timeout = send_timeout
        if self._timed or send_timeout is not None:
            check_timeouts(idle_timeout, message_timeout, send_timeout)
            self._idle_timeout, self._message_timeout = idle_timeout, message_timeout
            if send_timeout is not None:
                set_timeout(sock, _SNDTIMEO, send_timeout)

    # -- opening ---------------------------------------------------------------

    @classmethod
    def from_socket(cls, sock: socket.socket, **options: Any) -> Channel:
        """Wrap *sock* (``AF_UNIX``, or connected TCP); the channel owns it after."""
        if sock.gettimeout() == 0.0:
            sock.setblocking(True)
        return cls(sock, **options)

    @classmethod
    def connect(
        cls,
        address: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        timeout: float | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        **options: Any,
    ) -> Channel:
        """Connect to *address* with :func:`afunix.connect` and wrap the socket.

        ``tls://host:port`` needs *ssl*, an ``ssl.SSLContext`` (see
        :func:`afunix.lowlevel.connect_tls`): the handshake is done within
        *timeout* and :attr:`tls_peer` is the server's certificate.
        *server_hostname* is the name its certificate must have (default: *host*).
        """
        sock: Any
        addr = Address.parse(address)
        if ssl is None and addr.kind is not _TLS:  # (nothing for check_tls to refuse)
            sock = connect(address, type, timeout=timeout)  # (a str parses from a cache)
        elif check_tls(addr, ssl):
            assert ssl is not None  # (check_tls refuses tls:// without it)
            sock = connect_tls(addr, ssl, timeout=timeout, server_hostname=server_hostname)
        else:
            sock = connect(addr, type, timeout=timeout)
        try:
            return cls(sock, **options)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def pair(cls, type: SocketTypeLike = "stream", **options: Any) -> tuple[Channel, Channel]:
        """Two connected channels over :func:`afunix.pair` (parent/child, threads, tests)."""
        a, b = pair(type)
        try:
            return cls(a, **options), cls(b, **options)
        except BaseException:
            a.close()
            b.close()
            raise

    @classmethod
    def bind(cls, address: AddressLike, **options: Any) -> Channel:
        """A datagram channel bound at *address*: ``recv`` gives each sender's address,
        reply with ``send(..., address=msg.address)``."""
        sock = listen(address, "dgram")
        try:
            return cls(sock, **options)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def listen(
        cls,
        address: AddressLike,
        type: Literal["stream", "seqpacket"] = "stream",
        *,
        allow_remote: bool = False,
        ssl: _ssl.SSLContext | None = None,
        **options: Any,
    ) -> Listener:
        """A :class:`Listener` on *address*; ``accept()`` returns channels.

        A ``tcp://`` address other hosts can reach (anything but loopback:
        ``127.0.0.0/8``, ``::1``, ``localhost``) is refused unless
        *allow_remote* is ``True``: plain TCP authenticates nobody. A
        ``tls://`` address needs *ssl* (a server ``ssl.SSLContext``); with
        ``verify_mode = ssl.CERT_REQUIRED`` (mutual TLS) it may listen
        beyond loopback, else it is refused there like ``tcp://``.
        """
        return Listener(address, type, allow_remote=allow_remote, ssl=ssl, **options)

    # -- using ---------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (do not read or write it directly)."""
        return self._sock

    @property
    def type(self) -> str:
        return type_name(self._proto.kind)

    @property
    def closed(self) -> bool:
        return self._proto.state is not OPEN

    @property
    def tls_peer(self) -> TlsPeer | None:
        """Over ``tls://``: the peer's verified certificate (names, subject, issuer);
        ``None`` when it showed none, and over every other transport."""
        return getattr(self._sock, "tls_peer", None)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(
        self,
        data: bytes | bytearray | memoryview = b"",
        fds: Iterable[FdLike] = (),
        *,
        memfd: bool | None = None,
        address: Any = None,
        more: bool = False,
    ) -> None:
        """Send one message: *data* plus *fds* (ints, files, sockets).

        The descriptors stay yours: close them whenever you like, even right
        away; the kernel keeps what is in flight open for the receiver (UNP
        15.7 step 3). *fds* is read once, and the objects in it stay
        referenced until the message went (``fds=[open(path)]`` sends that
        file). *memfd* forces (``True``) or forbids (``False``) a
        sealed-memfd payload; by default payloads from ``memfd_threshold``
        bytes up use one. *address* is the destination on an unconnected
        datagram channel.

        *more* (stream channels) says more messages follow at once, like
        ``MSG_MORE``: a small message (up to 8 KiB, inline) may then be held
        and written together with the next ones, one system call for many
        (up to 64 KiB, or 253 descriptors: ``SCM_MAX_FD``). The descriptors
        of held messages are duplicated, so yours are still free to close at
        once; all of them ride on the first byte of the one ``sendmsg``, and
        the receiver hands each message exactly its own. Held messages go
        out with the next ``send`` without *more*, a larger message,
        :meth:`flush`, :meth:`recv` or :meth:`close`. Without *more* nothing
        is ever held back.
        """
        lock = self._send_lock  # (acquire/release: a with-block costs twice as much)
        lock.acquire()
        try:
            proto = self._proto
            if memfd is None and address is None and proto.state is OPEN:
                # One small frame: the core sends it (of ints) or holds it (without
                # descriptors), or says -1 (not its case: the protocol takes it).
                if not more:
                    if not proto.holding and (self._fds_fast or not fds):
                        try:
                            sent = send_frame(self._sock, data, fds, self._frame_limit)
                        except BlockingIOError as exc:  # SO_SNDTIMEO ran out: nothing went
                            raise self._timed_out(exc, sending=True) from exc
                        if sent >= 0:
                            if sent < len(data) + 8:  # (descriptors went with the first byte)
                                self._write(proto.rest_of(data, sent, len(fds)))  # type: ignore[arg-type]
                            return
                elif not fds:
                    if HOLD_IN_C:
                        held = hold_frame(proto.held, data, self._frame_limit)
                    elif type(data) is bytes and len(data) <= self._frame_limit:
                        buf = proto.held  # py_hold_frame inline: the call cost what it does
                        buf += _pack_words(PLAIN_WORD, len(data))
                        buf += data
                        held = len(buf)
                    else:
                        held = -1  # (a bytearray too: the protocol holds it)
                    if held >= 0:
                        proto.holding = True
                        if held >= HOLD_MAX:
                            self._flush_locked()
                        return
            out = proto.send(data, fds, memfd=memfd, address=address, more=more)
            if type(out) is bytes:
                try:
                    out = try_frame(self._sock, out, self._proto)
                except BlockingIOError as exc:
                    raise self._timed_out(exc, sending=True) from exc
            if out is not None:
                self._write(out)  # type: ignore[arg-type]
        finally:
            lock.release()

    def send_buffer(
        self, buf: MemfdBuffer, length: int, fds: Iterable[FdLike] = (), *, address: Any = None
    ) -> None:
        """Seal a filled :class:`~afunix._memfd.MemfdBuffer` and send it as the payload.

        The zero-copy path: write into ``buf.view`` in place, then send its
        first *length* bytes. The buffer is consumed (sealed and closed).
        """
        with self._send_lock:
            self._write(self._proto.send_buffer(buf, length, fds, address=address))

    def flush(self) -> None:
        """Write the messages held by ``send(..., more=True)`` now."""
        with self._send_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """:meth:`flush` with the send lock held."""
        out = self._proto.flush()
        if out is not None:
            self._write(out)

    def _write(self, out: Write) -> None:
        """Write *out* and what is queued behind it (the send lock is held)."""
        sock, proto = self._sock, self._proto
        while True:
            try:
                while not write_some(sock, out):
                    pass
            except BaseException as exc:
                again = proto.write_failed(out, exc)
                if again is None:
                    if proto.state is BROKEN:
                        self.close()  # half a message went: the peer's framing is lost
                    if isinstance(exc, BlockingIOError):
                        raise self._timed_out(exc, sending=True) from exc
                    raise
                out = again
                continue
            if out.owned:
                proto.write_done(out)  # (the refs go with the Write, right after)
            if not proto.queued:
                return
            nxt = proto.next_write()
            assert nxt is not None
            out = nxt

    def recv(self, *, timeout: float | None = None) -> Message:
        """Receive one message (blocking). ``EOFError`` when the peer has closed.

        *timeout* bounds this call, waiting for a message to begin and for
        the rest of it: :class:`~afunix.PeerTimeout` (``expired == "call"``)
        after that many seconds, whatever the channel's own timeouts (the
        shorter one wins). If a message had begun on a stream, close the channel.
        """
        proto = self._proto
        if proto.holding:
            self.flush()  # a reply may depend on what we hold
        if timeout is None:
            if proto.ready:  # decoded already (a busy stream): no lock needed
                try:
                    return proto.ready.popleft()
                except IndexError:  # (another thread's receive took it)
                    pass
            if proto.idle and self._inline_recv:
                lock = self._recv_lock  # the lean receive (see _io.receive), inline
                lock.acquire()
                try:
                    view = proto.rview
                    if proto.idle and view is not None:
                        got = recv_frame(
                            self._sock, view, proto.control_space, proto.max_size, proto.maxfds
                        )
                        if type(got) is not tuple:
                            if got is not None:
                                return got  # type: ignore[no-any-return]
                        else:  # anything but one simple frame: the protocol's (below)
                            try:
                                proto.received(got[0], got[1], got[2], None)
                            except BaseException:
                                if proto.state is BROKEN:
                                    self.close()
                                raise
                finally:
                    lock.release()
        until = None
        if timeout is not None:
            if not timeout >= 0:
                raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
            until = time.monotonic() + timeout
            self._timed = True  # from now on _arm runs (and clears what it set)
            self._inline_recv = False
        with self._recv_lock:
            sock = self._sock
            wait = self._wait_until(until, timeout) if self._timed else None
            try:
                while True:
                    if not proto.idle:
                        event = proto.next_event()
                        if event is not NEED_DATA:
                            break
                    if wait is not None:
                        self._arm(wait)
                    event = self._receive(sock, proto)
                    if event is not NEED_DATA:
                        break
            except BlockingIOError as exc:
                raise self._timed_out(exc, sending=False) from exc
            except BaseException:
                if proto.state is BROKEN:
                    self.close()  # the byte stream cannot be trusted any more
                raise
            if wait is not None and event is not CLOSED:
                wait.message_done(proto.receiving, time.monotonic())
        if event is CLOSED:
            raise EOFError("the peer closed the channel")
        return event

    def _wait_until(self, until: float | None, timeout: float | None) -> ReceiveWait:
        """The channel's :class:`ReceiveWait`, set for a call ending at *until*."""
        wait = self._wait
        if wait is None:
            wait = self._wait = ReceiveWait(self._idle_timeout, self._message_timeout, 0.0)
        wait.until, wait.timeout = until, timeout
        return wait

    def _arm(self, wait: ReceiveWait) -> None:
        """Set ``SO_RCVTIMEO`` for the next read as *wait* says (the idle limit per read,
        as the kernel counts it: unchanged, it costs no system call)."""
        now = time.monotonic()
        wait.start = now
        want = wait.limit(self._proto.receiving, now)
        if want is not None:
            want = max(want, 1e-6)  # (0 would be no timeout at all)
        if want != self._rcvtimeo:
            set_timeout(self._sock, _RCVTIMEO, want)
            self._rcvtimeo = want

    def _timed_out(self, exc: BlockingIOError, *, sending: bool) -> OSError:
        """A blocking call gave up (``SO_RCVTIMEO``/``SO_SNDTIMEO``): why, as PeerTimeout."""
        if sending and self._send_timeout is not None:
            return timed_out("send", self._send_timeout)
        if not sending and self._timed and self._wait is not None:
            return self._wait.expired(self._proto.receiving) or exc
        return exc  # a non-blocking socket given to a blocking channel

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer closes."""
        while True:
            try:
                yield self.recv()
            except EOFError:
                return

    def close(self) -> None:
        """Close the socket and any descriptors received but not yet handed out.

        Messages held by ``send(..., more=True)`` are written first.
        """
        proto = self._proto
        try:
            if proto.holding and proto.state is OPEN:
                with contextlib.suppress(OSError):  # the peer is gone: nobody to tell
                    self.flush()
        finally:
            proto.close()
            self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<afunix.Channel {self.type} {state}>"


# The C ``accept`` under ``socket.accept()``, which would read the listener's family
# and type again (two enum conversions) for every connection.
_accept: Callable[[socket.socket], tuple[int, Any]] = _socket.socket._accept  # type: ignore[attr-defined]
#: Linux's accept() gives a blocking socket; a BSD one passes O_NONBLOCK on.
_ACCEPT_INHERITS_NONBLOCK = PLATFORM.accepted_may_be_nonblocking


class Listener:
    """A listening stream or seqpacket socket whose :meth:`accept` returns :class:`Channel` s.

    On a ``tcp://`` address the channels carry messages and batches, not
    descriptors or credentials. On ``tls://`` (``ssl=`` a server
    ``ssl.SSLContext``) :meth:`accept` also shakes hands, within
    *handshake_timeout* seconds; a failed handshake (a client without the
    certificate a ``CERT_REQUIRED`` context asks for) raises
    :class:`~afunix.AfunixError` (``EACCES``) from ``accept`` and closes that
    connection; the channel's :attr:`~Channel.tls_peer` names the client.
    An address other hosts can reach is refused (``EACCES``) unless
    ``allow_remote=True``: plain TCP has no authentication, so loopback
    (``127.0.0.0/8``, ``::1``, ``localhost``) is the default (``tls://`` with a
    context that requires client certificates may listen anywhere).
    """

    def __init__(
        self,
        address: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        backlog: int = 128,
        mode: int | None = None,
        allow_remote: bool = False,
        ssl: _ssl.SSLContext | None = None,
        handshake_timeout: float | None = 30.0,
        **options: Any,
    ) -> None:
        self._kind = socket_type(type)
        if self._kind == socket.SOCK_DGRAM:
            raise ValueError("a datagram socket does not listen: use Channel.bind(address)")
        addr = Address.parse(address)
        self._tls = ssl if check_tls(addr, ssl) else None
        authenticated = requires_client_certificates(ssl)
        addr = refuse_exposed(addr, allow_remote=allow_remote, authenticated=authenticated)
        self.sock = listen(tcp_of(addr), type, backlog=backlog, mode=mode)
        try:  # bound now: check the address the name gave
            refuse_exposed(
                addr, allow_remote=allow_remote, sock=self.sock, authenticated=authenticated
            )
        except BaseException:
            self.sock.close()
            raise
        self._family = _socket.socket.family.__get__(self.sock)
        self._handshake_timeout = handshake_timeout
        self._options = options

    @property
    def address(self) -> Any:
        """Where it listens: the bound ``tcp://`` (or ``tls://``) address, or the path."""
        bound = self.sock.address
        if self._tls is not None:
            return Address.tls(bound.host, bound.port or 0)
        return bound

    def accept(self) -> Channel:
        """Wait for a client; return a channel on the new connection."""
        fd, _ = _accept(self.sock)
        try:
            conn = socket.socket(self._family, self._kind, 0, fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        chan: Any = conn
        try:
            if _ACCEPT_INHERITS_NONBLOCK or socket.getdefaulttimeout() is not None:
                conn.setblocking(True)  # blocking whatever the default timeout says
            if self._tls is not None:
                peer = Address.from_sockaddr(self._family, conn.getpeername())
                where = str(Address.tls(peer.host, peer.port or 0))
                chan = TlsSocket.server(conn, self._tls, where, self._handshake_timeout)
            return Channel(chan, **self._options)
        except BaseException:
            chan.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
