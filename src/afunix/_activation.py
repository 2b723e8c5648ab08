"""systemd's environment: listening sockets from ``LISTEN_FDS``, the watchdog interval.

The service manager (systemd, ``systemd-socket-activate``, or any tool that follows
the protocol) binds the sockets, then starts the server with them as descriptors
3, 4, ... and sets::

    LISTEN_PID=<the server's pid>   LISTEN_FDS=<how many>   LISTEN_FDNAMES=a:b:...

:func:`listen_fds` checks that the variables are meant for this process (a child
that inherits the environment must not steal its parent's sockets), marks the
descriptors close-on-exec, unsets the variables (like ``sd_listen_fds(1)``) and
returns them as :class:`afunix.Socket` objects that do **not** remove their socket
file on close: the manager owns the file. As in ``sd_listen_fds``, the variables are
only honoured when ``LISTEN_PID`` is set and names this process.

:func:`watchdog_interval` reads ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must
name this process when set), like ``sd_watchdog_enabled``: a service with
``WatchdogSec=`` must send ``WATCHDOG=1`` more often than that, or the manager kills
it. :class:`afunix.Server` sends it from its serving loop itself (see
``docs/operations.md``), so a stuck loop stops pinging and gets restarted.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ._errors import AfunixError
from ._sockets import DatagramSocket, Socket

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivatedSocket",
    "listen_fds",
    "parse_listen_env",
    "watchdog_interval",
]

#: The first inherited descriptor (``SD_LISTEN_FDS_START`` in sd-daemon.h).
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class ActivatedSocket:
    """One inherited socket and the name the manager gave it (``FileDescriptorName=``)."""

    name: str
    sock: Socket


def parse_listen_env(env: Mapping[str, str], pid: int) -> list[tuple[int, str]] | None:
    """Parse the activation variables (no I/O): ``[(fd, name), ...]`` or ``None``.

    ``None`` means "not socket-activated": no ``LISTEN_FDS``, no ``LISTEN_PID``
    (``sd_listen_fds`` requires it: without it the variables may have been
    inherited from a parent), or ``LISTEN_PID`` names another process.
    Malformed values raise :class:`AfunixError` (``EINVAL``) rather than being
    ignored: a half-configured unit should fail loudly.
    """
    count_text = env.get("LISTEN_FDS")
    pid_text = env.get("LISTEN_PID")
    if count_text is None or pid_text is None:
        return None
    if not pid_text.isdigit():
        raise AfunixError(errno.EINVAL, f"LISTEN_PID={pid_text!r} is not a process id")
    if int(pid_text) != pid:
        return None  # meant for another process (we inherited it)
    if not count_text.isdigit():
        raise AfunixError(errno.EINVAL, f"LISTEN_FDS={count_text!r} is not a number")
    count = int(count_text)
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        raise AfunixError(
            errno.EINVAL,
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors",
        )
    if not names:
        names = ["unknown"] * count
    return [(SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def listen_fds(
    env: MutableMapping[str, str] | None = None, *, unset_environment: bool = True
) -> list[ActivatedSocket]:
    """The sockets passed by socket activation, or ``[]`` if there are none."""
    environ: MutableMapping[str, str] = os.environ if env is None else env
    parsed = parse_listen_env(environ, os.getpid())
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(var, None)
    if not parsed:
        return []
    out: list[ActivatedSocket] = []
    try:
        for fd, name in parsed:
            try:
                os.set_inheritable(fd, False)
                probe = socket.socket(fileno=fd)
            except OSError as exc:
                raise AfunixError(
                    exc.errno or errno.EBADF,
                    f"LISTEN_FDS names descriptor {fd} ({name}), but it is not an open "
                    f"socket: {exc.strerror}",
                ) from exc
            family, sock_type = probe.family, probe.type
            raw = probe.detach()
            cls = DatagramSocket if sock_type == socket.SOCK_DGRAM else Socket
            out.append(ActivatedSocket(name, cls(family, sock_type, fileno=raw)))
    except BaseException:
        for item in out:
            item.sock.close()
        raise
    return out


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds asked by ``WATCHDOG_USEC``, or ``None``.

    ``None`` when there is no ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` is set and
    names another process (``sd_watchdog_enabled``). A service must send
    ``WATCHDOG=1`` well within the interval; :class:`afunix.Server` sends it at
    half of it. Malformed or zero values raise :class:`AfunixError` (``EINVAL``).
    The variables are left in place: a reload or a successor reads them again.
    """
    environ = os.environ if env is None else env
    usec_text = environ.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None:
        if not pid_text.isdigit():
            raise AfunixError(errno.EINVAL, f"WATCHDOG_PID={pid_text!r} is not a process id")
        if int(pid_text) != (os.getpid() if pid is None else pid):
            return None  # another process's watchdog (we inherited the variables)
    if not usec_text.isdigit() or int(usec_text) == 0:
        raise AfunixError(
            errno.EINVAL,
            f"WATCHDOG_USEC={usec_text!r} is not a positive number of microseconds; "
            "fix WatchdogSec= in the unit",
        )
    return int(usec_text) / 1_000_000
