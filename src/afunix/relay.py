"""A relay that forwards Unix-domain connections and reports what crosses it (``afunix spy``).

Clients connect to the relay's LISTEN address; for each one the relay
connects to TARGET and copies both ways, passing descriptors through:
``SCM_RIGHTS`` received from one side are sent on, attached to the same
bytes, to the other, then closed in the relay. Message boundaries are kept
on seqpacket and datagram sockets (one ``recvmsg``, one ``sendmsg``). Each
step is reported to a *sink* as an event, a JSON-ready ``dict`` (schema
``afunix.spy/1``, see ``docs/operations.md``): the client's credentials at
connect, every chunk or packet with its size, a bounded preview of its
bytes, the afunix frames that start in it and every descriptor passed
(what it refers to), end of stream, errors, close.

The server sees the relay, not the client, as its peer: ``SO_PEERCRED``
on the server's side reports the relay's process.

Threads: one per direction of each connection (blocking ``recvmsg``), so
a slow side never holds up another connection. Datagrams are relayed from
one loop, with one socket towards TARGET per client address (so replies
find their way back).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from ._address import Address, AddressLike
from ._cmsg import ControlTruncated, close_fds
from ._connect import connect
from ._creds import PeerCredentials, enable_credentials, message_credentials, peer_credentials
from ._fds import describe_fd, recv_fds, recvmsg_items, sendall_fds
from ._protocol import FLAG_MEMFD, HEADER, SCM_MAX_FD, FrameError, decode_header
from ._sockets import Socket, SocketTypeLike, listen, socket_type, type_name

__all__ = [
    "SCHEMA",
    "TO_CLIENT",
    "TO_SERVER",
    "Event",
    "FrameTracker",
    "Relay",
    "Sink",
    "client_identity",
    "decode_packet_frame",
    "describe_passed_fd",
    "preview",
]

SCHEMA: Final = "afunix.spy/1"
#: One event: a JSON-ready mapping with ``schema``, ``event`` and its fields.
Event = dict[str, Any]
Sink = Callable[[Event], None]

_STREAM_CHUNK: Final = 65536
#: Room for one packet on seqpacket/datagram sockets; a bigger one is reported truncated.
_PACKET_ROOM: Final = 1 << 20
_NO_LIMIT: Final = 0xFFFFFFFF  # the relay observes frames; it refuses no size
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)

_CTRUNC_HINT: Final = (
    "the relay had room for 253 descriptors, so it is most likely out of descriptors "
    "(RLIMIT_NOFILE, ulimit -n); the message's bytes and descriptors are lost, so the "
    "connection was ended"
)

TO_SERVER: Final = "to-server"
TO_CLIENT: Final = "to-client"


def preview(data: bytes, limit: int) -> dict[str, Any]:
    """The first *limit* bytes of *data* as hex and as ASCII (``.`` for the rest)."""
    head = data[:limit]
    return {
        "hex": head.hex(" "),
        "ascii": "".join(chr(b) if 32 <= b < 127 else "." for b in head),
        "shown": len(head),
    }


def describe_passed_fd(fd: int) -> dict[str, Any]:
    """What descriptor *fd* refers to: kind, path, inode, open mode; for a socket its
    type, own address and peer address."""
    try:
        info = describe_fd(fd)
    except OSError as exc:
        return {"fd": fd, "kind": "unknown", "error": os.strerror(exc.errno or 0)}
    out: dict[str, Any] = {
        "fd": fd,
        "kind": info.kind,
        "target": info.target,
        "inode": info.inode,
        "mode": info.mode,
    }
    if info.kind == "socket":
        out.update(_socket_facts(fd))
    return out


def _socket_facts(fd: int) -> dict[str, Any]:
    try:
        sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    except OSError:
        return {}
    try:
        facts: dict[str, Any] = {"family": sock.family.name, "type": type_name(sock.type)}
        for key, call in (("address", sock.getsockname), ("peer", sock.getpeername)):
            try:
                facts[key] = Address.from_sockaddr(sock.family, call()).describe()
            except (OSError, ValueError, TypeError):
                facts[key] = None
        return facts
    finally:
        sock.detach()


class FrameTracker:
    """Follows afunix frame headers through one direction of a byte stream, read-only.

    :meth:`feed` takes each chunk as it passes and returns the frames whose
    header completed in it. The first header that does not parse (another
    protocol, a lost byte count) stops tracking: :attr:`stopped` then says why.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._skip = 0
        self.offset = 0
        self.stopped: str | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        view = memoryview(data)
        while view and self.stopped is None:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
            else:
                step = min(HEADER.size - len(self._head), len(view))
                self._head += view[:step]
                if len(self._head) == HEADER.size:
                    frames.extend(self._header(self.offset + step - HEADER.size))
            view = view[step:]
            self.offset += step
        return frames

    def _header(self, at: int) -> Iterator[dict[str, Any]]:
        try:
            flags, nfds, length = decode_header(bytes(self._head), _NO_LIMIT)
        except FrameError as exc:
            self.stopped = f"at byte {at}: {exc.strerror}"
            return
        self._head.clear()
        self._skip = 0 if flags & FLAG_MEMFD else length
        yield _frame(at, flags, nfds, length)


def _frame(at: int, flags: int, nfds: int, length: int) -> dict[str, Any]:
    return {
        "at": at,
        "length": length,
        "nfds": nfds,
        "memfd": bool(flags & FLAG_MEMFD),
        "flags": flags,
    }


def decode_packet_frame(packet: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The afunix frame one seqpacket/datagram packet holds, or why it is not one."""
    if len(packet) < HEADER.size:
        return None, f"{len(packet)} bytes, shorter than a frame header"
    try:
        flags, nfds, length = decode_header(packet[: HEADER.size], _NO_LIMIT)
    except FrameError as exc:
        return None, exc.strerror
    body = 0 if flags & FLAG_MEMFD else length
    if len(packet) - HEADER.size != body:
        return None, f"header announces {body} payload bytes, packet holds {len(packet) - 8}"
    return _frame(0, flags, nfds, length), None


def client_identity(creds: PeerCredentials) -> dict[str, Any]:
    """pid, uid, gid (with names) and command line of a connected client."""
    out: dict[str, Any] = {
        "pid": creds.pid,
        "uid": creds.uid,
        "user": creds.user,
        "gid": creds.gid,
        "group": creds.group,
        "command": None,
    }
    try:
        facts = creds.facts()
    except OSError:
        return out
    if facts.cmdline:
        out["command"] = " ".join(facts.cmdline)
    elif facts.exe:
        out["command"] = facts.exe
    return out


class _Side:
    """One direction of one relayed connection."""

    def __init__(self, direction: str, stream: bool) -> None:
        self.direction = direction
        self.tracker = FrameTracker() if stream else None
        self.bytes = 0
        self.fds = 0
        self.messages = 0


class Relay:
    """Listen at *listen_at*; forward every client to *target*, reporting to *sink*.

    Args:
        listen_at: where clients connect (bound safely: a live server there is
            refused, a stale file replaced; removed again by :meth:`close`).
        target: the real server.
        type: ``"stream"``, ``"seqpacket"`` or ``"dgram"``, on both sides.
        sink: called with each event (from several threads; calls are serialized).
        preview: how many bytes of each chunk to show (0: none).
        mode, backlog: as for :func:`afunix.listen`.

    Use :meth:`serve_forever` (returns after :meth:`stop`, which a signal
    handler may call) and then :meth:`close`, or ``with Relay(...) as r``.
    """

    def __init__(
        self,
        listen_at: AddressLike,
        target: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        sink: Sink,
        preview: int = 32,
        mode: int | None = None,
        backlog: int = 128,
    ) -> None:
        self.target = Address.parse(target)
        self.type = socket_type(type)
        self.preview = preview
        self._sink = sink
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._links: dict[int, tuple[socket.socket, ...]] = {}
        self._threads: list[threading.Thread] = []
        self._count = 0
        self._closing = False
        self.listener: Socket = listen(listen_at, self.type, backlog=backlog, mode=mode)
        if self.type == socket.SOCK_DGRAM:
            try:  # datagrams have no peer: each one carries its sender (SCM_CREDENTIALS)
                enable_credentials(self.listener)
            except BaseException:
                self.listener.close()
                raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------ running
    def emit(self, event: str, **fields: Any) -> None:
        """Hand one event to the sink (serialized: lines never interleave)."""
        with self._lock:
            self._sink({"schema": SCHEMA, "event": event, **fields})

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (safe from a signal handler or thread)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def serve_forever(self) -> None:
        """Relay until :meth:`stop`; then end every relayed connection."""
        self.emit(
            "listening",
            listen=self.listener.address.describe(),
            target=self.target.describe(),
            type=type_name(self.type),
        )
        try:
            if self.type == socket.SOCK_DGRAM:
                self._serve_datagrams()
            else:
                self._accept_loop()
        finally:
            self._end_links()
            self.emit("stopped", connections=self._count)

    def close(self) -> None:
        """Stop, close the listener (removing the LISTEN file) and the wake-up pair."""
        self.stop()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                if any(key.fileobj is self.listener for key, _ in sel.select()):
                    self._accept_one()

    def _accept_one(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:  # EMFILE, ECONNABORTED: report, keep listening
            self.emit("error", conn=None, error=_why(exc), errno=exc.errno)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The client stays queued; retrying at once would spin. Give the
                # relayed connections a moment to end and free descriptors.
                self._stop.wait(0.1)
            return
        self._count += 1
        # Daemon threads: a side that never answers must not keep the process alive
        # after SIGTERM (serve_forever has already shut every connection down).
        thread = threading.Thread(
            target=self._run_link, args=(self._count, conn), name=f"spy-{self._count}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or a limit
            self.emit("error", conn=self._count, error=f"cannot relay: {exc}", errno=None)
            conn.close()
            return
        self._threads.append(thread)

    def _end_links(self) -> None:
        with self._lock:
            self._closing = True
            links = [s for socks in self._links.values() for s in socks]
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)

    # -------------------------------------------------- one connection
    def _run_link(self, n: int, client: socket.socket) -> None:
        try:
            with client:
                self.emit("connect", conn=n, client=self._identity(client))
                try:
                    server = connect(self.target, self.type, timeout=10)
                except OSError as exc:
                    self.emit("error", conn=n, error=_why(exc), errno=exc.errno)
                    return
                with server:
                    server.settimeout(None)
                    self._relay_both_ways(n, client, server)
        except Exception as exc:  # a thread must report, not vanish
            self.emit("error", conn=n, error=repr(exc), errno=None)

    def _identity(self, client: socket.socket) -> dict[str, Any] | None:
        try:
            with peer_credentials(client) as creds:
                return client_identity(creds)
        except OSError:
            return None

    def _relay_both_ways(self, n: int, client: socket.socket, server: socket.socket) -> None:
        stream = self.type == socket.SOCK_STREAM
        up, down = _Side(TO_SERVER, stream), _Side(TO_CLIENT, stream)
        with self._lock:
            if self._closing:  # connected while the relay was stopping
                return
            self._links[n] = (client, server)
        back = threading.Thread(target=self._pump, args=(n, server, client, down), daemon=True)
        try:
            back.start()
            self._pump(n, client, server, up)
            back.join()
        finally:
            with self._lock:
                self._links.pop(n, None)
        self.emit("close", conn=n, **{s.direction: _totals(s) for s in (up, down)})

    def _pump(self, n: int, src: socket.socket, dst: socket.socket, side: _Side) -> None:
        """Copy *src* to *dst* until end of stream; an error ends both directions."""
        room = _STREAM_CHUNK if side.tracker is not None else _PACKET_ROOM
        while True:
            try:
                data, fds, flags, _ = recv_fds(src, room, SCM_MAX_FD)
            except ControlTruncated as exc:
                # Bytes and descriptors of this message are lost: the stream can no
                # longer be relayed faithfully. Say so and end the connection.
                self.emit(
                    "ctrunc",
                    conn=n,
                    direction=side.direction,
                    error=exc.strerror,
                    hint=_CTRUNC_HINT,
                )
                return _abort(src, dst)
            except OSError as exc:
                return self._fail(n, side, exc, src, dst)
            if not data and not fds:
                self.emit("eof", conn=n, direction=side.direction)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return None
            try:
                self._show(n, side, data, fds, truncated=bool(flags & _MSG_TRUNC))
                sendall_fds(dst, data, fds)
            except OSError as exc:
                return self._fail(n, side, exc, src, dst)
            finally:
                close_fds(fds)

    def _fail(
        self, n: int, side: _Side, exc: OSError, src: socket.socket, dst: socket.socket
    ) -> None:
        if exc.errno not in (errno.EBADF, errno.ENOTCONN):  # our own shutdown at stop
            self.emit("error", conn=n, direction=side.direction, error=_why(exc), errno=exc.errno)
        _abort(src, dst)

    def _show(
        self,
        n: int | None,
        side: _Side,
        data: bytes,
        fds: list[int],
        *,
        truncated: bool = False,
        **extra: Any,
    ) -> None:
        side.bytes += len(data)
        side.fds += len(fds)
        side.messages += 1
        fields: dict[str, Any] = {"conn": n, "direction": side.direction, "size": len(data)}
        fields.update(extra)
        if truncated:
            fields["truncated"] = True
        if self.preview:
            fields["preview"] = preview(data, self.preview)
        if side.tracker is not None:
            was = side.tracker.stopped
            fields["frames"] = side.tracker.feed(data)
            if side.tracker.stopped != was:
                fields["not_frames"] = side.tracker.stopped
        else:
            frame, why = decode_packet_frame(data)
            fields["frames"] = [] if frame is None else [frame]
            if why is not None:
                fields["not_frames"] = why
        fields["fds"] = [describe_passed_fd(fd) for fd in fds]
        self.emit("data", **fields)

    # --------------------------------------------------------- datagrams
    def _serve_datagrams(self) -> None:
        """One loop: client datagrams to TARGET, replies back to their sender."""
        upstream: dict[Any, tuple[socket.socket, _Side, _Side, int]] = {}
        owner: dict[socket.socket, Any] = {}
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self.listener:
                        self._datagram_in(sel, upstream, owner)
                    elif sock is not self._wake_r:
                        assert isinstance(sock, socket.socket)
                        self._datagram_back(sock, upstream[owner[sock]], owner[sock])
        finally:
            sel.close()
            for sock in owner:
                sock.close()

    def _datagram_in(
        self,
        sel: selectors.BaseSelector,
        upstream: dict[Any, tuple[socket.socket, _Side, _Side, int]],
        owner: dict[socket.socket, Any],
    ) -> None:
        try:
            got = recvmsg_items(self.listener, _PACKET_ROOM, SCM_MAX_FD, credentials=True)
        except ControlTruncated as exc:
            self.emit("ctrunc", conn=None, direction=TO_SERVER, error=exc.strerror)
            return
        data, fds, flags, sender = got.data, got.fds, got.flags, got.address
        try:
            key = sender or None
            if key not in upstream:
                fresh = connect(self.target, self.type, timeout=10)
                self._count += 1
                upstream[key] = (
                    fresh,
                    _Side(TO_SERVER, False),
                    _Side(TO_CLIENT, False),
                    self._count,
                )
                owner[fresh] = key
                sel.register(fresh, selectors.EVENT_READ)
                who = Address.from_sockaddr(socket.AF_UNIX, sender).describe() if key else None
                cred = got.credentials
                client = None if cred is None else client_identity(message_credentials(cred))
                self.emit("connect", conn=self._count, client=client, sender=who)
            server, up, _, n = upstream[key]
            self._show(n, up, data, fds, truncated=bool(flags & _MSG_TRUNC))
            sendall_fds(server, data, fds)
        except OSError as exc:
            self.emit("error", conn=None, direction=TO_SERVER, error=_why(exc), errno=exc.errno)
        finally:
            close_fds(fds)

    def _datagram_back(
        self, server: socket.socket, link: tuple[socket.socket, _Side, _Side, int], key: Any
    ) -> None:
        _, _, down, n = link
        try:
            data, fds, flags, _ = recv_fds(server, _PACKET_ROOM, SCM_MAX_FD)
        except ControlTruncated as exc:
            self.emit("ctrunc", conn=n, direction=TO_CLIENT, error=exc.strerror)
            return
        except OSError as exc:
            self.emit("error", conn=n, direction=TO_CLIENT, error=_why(exc), errno=exc.errno)
            return
        try:
            self._show(n, down, data, fds, truncated=bool(flags & _MSG_TRUNC))
            if key is None:
                raise OSError(errno.EDESTADDRREQ, "the client sent from an unbound socket")
            sendall_fds(self.listener, data, fds, address=key)
        except OSError as exc:
            self.emit("error", conn=n, direction=TO_CLIENT, error=_why(exc), errno=exc.errno)
        finally:
            close_fds(fds)


def _totals(side: _Side) -> dict[str, int]:
    return {"bytes": side.bytes, "fds": side.fds, "messages": side.messages}


def _abort(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} [{name}]" if name else text
