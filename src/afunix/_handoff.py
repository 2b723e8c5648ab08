"""Zero-downtime restart: hand the listening socket to a successor process.

This is descriptor passing (UNP 15.7) put to work, the way nginx, HAProxy and Envoy
upgrade binaries. The listening socket is never closed and the socket file never
disappears: the old and the new process share the *same* kernel socket for a
moment, so connections waiting in its listen queue are accepted by whichever
process gets to them first, and none is refused.

The exchange, over a ``socketpair`` whose one end the successor inherits (its
descriptor number is in ``$AFUNIX_HANDOFF_FD``)::

    old -> new   {"afunix-handoff": 1, "address": ..., "type": ...}  + the listener (SCM_RIGHTS)
    new -> old   b"READY"      once the successor accepts on it
    old          stops accepting, forgets the socket file (it is the successor's
                 now), finishes the connections in flight, exits

If the successor dies or does not answer in time, the old process keeps serving
and says why. Trigger it with ``SIGUSR2`` (``afunix serve``, or any
``Server`` serving in the main thread) or :meth:`afunix.Server.hand_over`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from ._address import Address
from ._bind import BoundPath
from ._errors import AfunixError, ProtocolError
from ._fds import recv_fds, send_fds
from ._platform import NOSIGNAL
from ._sockets import DatagramSocket, Socket

__all__ = ["ENV_VAR", "Takeover", "offer", "reap_failed", "spawn_successor", "take_over"]

#: The variable naming the successor's end of the hand-over channel.
ENV_VAR = "AFUNIX_HANDOFF_FD"
READY = b"READY"
_VERSION = 1
_MAX_HEADER = 4096


@dataclass
class Takeover:
    """What a successor received: the listener, and the channel to say READY on."""

    sock: Socket
    channel: socket.socket

    def ready(self) -> None:
        """Tell the old process we accept now; it stops accepting and drains."""
        try:
            # MSG_NOSIGNAL: an old process that died already is a BrokenPipeError
            # here, not a SIGPIPE that kills its successor.
            self.channel.sendall(READY, NOSIGNAL)
        finally:
            self.channel.close()


def spawn_successor(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, socket.socket]:
    """Start the successor with one end of a fresh socketpair; return its pid and our end.

    ``argv`` defaults to this process's own command line (``sys.orig_argv``), so
    ``SIGUSR2`` re-executes the same program, typically after its code was updated.
    The successor is spawned with ``posix_spawn`` rather than ``subprocess``: it
    is meant to outlive us, not to be waited for.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        child_env = dict(os.environ if env is None else env)
        child_env[ENV_VAR] = str(theirs.fileno())
        for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            child_env.pop(var, None)
        command = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        os.set_inheritable(theirs.fileno(), True)
        pid = os.posix_spawnp(command[0], command, child_env)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return pid, ours


def reap_failed(pid: int) -> None:
    """Kill and reap a successor that failed to take over."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def offer(channel: socket.socket, listener: socket.socket, timeout: float) -> None:
    """Old side: send the listener, wait for ``READY``. Raises if the successor fails."""
    address = Address.from_sockaddr(listener.family, listener.getsockname())
    header = json.dumps(
        {"afunix-handoff": _VERSION, "address": str(address), "type": listener.type}
    ).encode()
    send_fds(channel, header, [listener.fileno()])
    ready, _, _ = select.select([channel], [], [], timeout)
    if not ready:
        raise AfunixError(
            errno.ETIMEDOUT, f"the successor did not take over {address.describe()} in {timeout}s"
        )
    try:
        answer = channel.recv(len(READY))
    except ConnectionResetError:  # it exited without reading what we sent
        answer = b""
    if answer != READY:
        raise AfunixError(
            errno.ECONNABORTED,
            f"the successor exited before taking over {address.describe()}"
            if not answer
            else f"the successor answered {answer!r} instead of READY",
        )


def take_over(env: MutableMapping[str, str] | None = None) -> Takeover | None:
    """New side: receive the listener if ``$AFUNIX_HANDOFF_FD`` is set (else ``None``).

    The variable is removed so that our own children do not try again. The
    returned socket removes the socket file on close only if it is still the
    inode it was handed, exactly as if this process had bound it.
    """
    environ: MutableMapping[str, str] = os.environ if env is None else env
    text = environ.pop(ENV_VAR, None)
    if text is None:
        return None
    if not text.isdigit():
        raise AfunixError(errno.EINVAL, f"{ENV_VAR}={text!r} is not a descriptor number")
    channel = socket.socket(fileno=int(text))
    try:
        os.set_inheritable(channel.fileno(), False)
        data, fds, _flags, _addr = recv_fds(channel, _MAX_HEADER, 1)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"hand-over brought {len(fds)} descriptors, expected 1")
        try:
            meta = json.loads(data)
            if meta.get("afunix-handoff") != _VERSION:
                raise ValueError(f"unknown hand-over version {meta.get('afunix-handoff')!r}")
        except ValueError as exc:
            os.close(fds[0])
            raise ProtocolError(f"bad hand-over header {data[:80]!r}: {exc}") from exc
        try:
            probe = socket.socket(fileno=fds[0])
        except OSError as exc:
            os.close(fds[0])
            raise ProtocolError(f"hand-over brought a descriptor that is no socket: {exc}") from exc
        family, sock_type = probe.family, probe.type
        cls = DatagramSocket if sock_type == socket.SOCK_DGRAM else Socket
        sock = cls(family, sock_type, fileno=probe.detach())
        try:
            address = Address.from_sockaddr(family, sock.getsockname())
        except BaseException:
            sock.close()
            raise
        path = address.filesystem_path
        if path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                sock._bound = BoundPath(path, st.st_dev, st.st_ino)
    except BaseException:
        channel.close()
        raise
    return Takeover(sock, channel)
