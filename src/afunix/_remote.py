"""``ssh://``: a stream to a Unix socket on another host, through the user's own OpenSSH.

``afunix.connect("ssh://alice@db1/run/app.sock")`` starts the user's ``ssh``
(so ``~/.ssh/config``, keys, the agent, ``ProxyJump`` and known hosts all
apply) and returns a connected :class:`SshSocket`: a :class:`socket.socket`
whose peer is that ``ssh`` process, which relays the bytes to the far socket
over an SSH ``direct-streamlocal`` channel. Nothing but ``sshd`` is needed on
the far side (``AllowStreamLocalForwarding`` must not be ``no``). The far
server sees the sshd session of the SSH login user as its peer, so its kernel
credentials (``SO_PEERCRED``) and any ``PeerPolicy`` still apply there.

How, and why not ``ssh -W``. ``ssh -W host:port`` relays standard input and
output to a TCP port; OpenSSH 9.2 (Debian 12) parses ``-W /path`` but drops
the path (``stdio_forward_host`` is taken from ``listen_host``, which is
empty for a path) and opens no channel at all, so the client waits forever.
afunix uses a local Unix-socket forward instead, one ``ssh`` per connection::

    ssh -N -T -o ExitOnForwardFailure=yes -o ClearAllForwardings=no
        -o ControlMaster=no -o ControlPath=none -o LogLevel=DEBUG2
        [-o ConnectTimeout=N] [-p PORT] [-l USER] [-F CONFIG]
        [OPTIONS] -L PRIVATE_DIR/s:/far/path -- HOST

The local end lives in a fresh ``0700`` directory and is removed as soon as
this process has connected to it, so no one else can use the forward. ``ssh``
logs at ``DEBUG2`` into an unnamed temporary file: ``channel N: open confirm``
says the far socket accepted (``connect`` returns only then), ``open failed``
that it did not (an error at connect time, not an end of file later). Errors
carry ``ssh``'s own lines (without its debug lines) and an errno chosen from
them. Multiplexing (``ControlMaster``) is switched off: a mux client's forward
would be set up by the master, whose log this process cannot read; each
connection is its own SSH session.

Closing the socket closes the forward: afunix waits (at most
:data:`CLOSE_LINGER` seconds) until ``ssh`` has read everything written and
sent the end of file on, then ends ``ssh`` with ``SIGTERM`` (on which it
flushes what it queued and disconnects) and reaps it. If ``ssh`` dies first,
the socket reads end of file and writes raise ``BrokenPipeError``.

Descriptors and credentials do not cross: :attr:`SshSocket.carries_fds` and
:attr:`SshSocket.carries_credentials` are ``False``; a channel over this
socket must refuse them before sending anything.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any, TypeVar

from ._address import Address, AddressKind
from ._errors import AddressError, AfunixError

__all__ = ["CLOSE_LINGER", "SSH_ENV", "RemoteError", "SshSocket", "connect_ssh", "ssh_command"]

#: The environment variable naming the ``ssh`` command (split like a shell
#: would: ``AFUNIX_SSH="ssh -F ~/.ssh/lab.conf"``), as ``GIT_SSH_COMMAND`` does.
SSH_ENV = "AFUNIX_SSH"

#: How long :meth:`SshSocket.close` waits for ``ssh`` to pass the last bytes on.
CLOSE_LINGER = 5.0

_CONFIRMED = re.compile(rb"channel \d+: open confirm")
_FAILED = re.compile(rb"channel \d+: open failed: ([^\r\n]*)")
# After close: ssh has read all we wrote and sent the end of file on, or the
# channel is gone already (the far side closed first).
_DRAINED = re.compile(rb"channel \d+: (send eof|free: direct-streamlocal)")

# ssh's words -> errno, first match wins (the lines are ssh's, not the kernel's).
_ERRNO_BY_TEXT: list[tuple[str, int]] = [
    ("administratively prohibited", errno.EACCES),
    ("open failed", errno.ECONNREFUSED),
    ("Connection refused", errno.ECONNREFUSED),
    ("Permission denied", errno.EACCES),
    ("Host key verification failed", errno.EACCES),
    ("Could not resolve hostname", errno.EHOSTUNREACH),
    ("No route to host", errno.EHOSTUNREACH),
    ("Network is unreachable", errno.ENETUNREACH),
    ("timed out", errno.ETIMEDOUT),
    ("Connection closed", errno.ECONNRESET),
    ("Connection reset", errno.ECONNRESET),
]

# sshd answers "connect failed: open failed" both for a missing socket and for a
# forward it refuses (OpenSSH 9.2, checked): only its own log tells them apart.
_FAR_HINT = (
    "is the server running on the far host, and is the path right? (or sshd there "
    "refuses the forward: AllowStreamLocalForwarding, restrictions of this key in "
    "authorized_keys; sshd's log on the far host says which)"
)
_PROHIBITED_HINT = (
    "sshd there forbids forwarding to Unix sockets (AllowStreamLocalForwarding in "
    "sshd_config, or a restriction of this key in authorized_keys)"
)
_HINTS: dict[int, str] = {
    errno.ECONNREFUSED: "is sshd running on that host and port?",
    errno.EACCES: "check the key (ssh-add -l), the login name and the host key "
    "(try: ssh HOST true)",
    errno.EHOSTUNREACH: "check the host name",
    errno.ETIMEDOUT: "the host did not answer in time",
}


class RemoteError(AfunixError):
    """``ssh`` could not open the stream, or ended it.

    The errno is chosen from what ``ssh`` said (``ECONNREFUSED`` for a refused
    port or a far socket that refused the channel, ``EACCES`` for a refused
    key or host key, ``ETIMEDOUT``, ...; ``EIO`` when nothing matched);
    :attr:`ssh_message` holds ``ssh``'s own lines, without its debug lines.
    """

    ssh_message: str = ""


class SshSocket(socket.socket):
    """A connected stream socket whose peer is an ``ssh`` process relaying to a far socket.

    Everything of :class:`socket.socket` works (it is one end of a local
    ``AF_UNIX`` stream); :meth:`close` also ends and reaps the ``ssh``
    process. Attributes for code layered on top (a channel decides from them
    what it may send):

    * :attr:`carries_fds`, :attr:`carries_credentials`: ``False``;
    * :attr:`remote_address`: the ``ssh://`` :class:`Address`;
    * :attr:`peer_description`: who the peer is, for messages;
    * :attr:`process`: the ``ssh`` process (``None`` once reaped).
    """

    carries_fds = False
    carries_credentials = False
    remote_address: Address = Address.unnamed()
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _linger = CLOSE_LINGER

    @property
    def peer_description(self) -> str:
        pid = self.process.pid if self.process is not None else None
        via = f"ssh pid {pid}" if pid is not None else "ssh, ended"
        return f"{self.remote_address} (through {via})"

    @property
    def address(self) -> Address:
        """This end's address: unnamed (it connected from an unbound socket)."""
        return Address.unnamed()

    @property
    def peer_address(self) -> Address:
        """The far socket, as the ``ssh://`` address it was reached by."""
        return self.remote_address

    def ssh_log(self) -> str:
        """What ``ssh`` has said so far, without its debug lines."""
        return _plain_lines(_read_log(self._log))

    def close(self) -> None:
        """Close the socket, then let ``ssh`` pass the last bytes on, end it and reap it."""
        try:
            super().close()
        finally:
            if self.process is not None or self._log is not None:
                self._end_ssh()

    def _end_ssh(self) -> None:
        proc, self.process = self.process, None
        log, self._log = self._log, None
        try:
            if proc is not None:
                _wait_for(lambda: _DRAINED.search(_read_log(log)) is not None, proc, self._linger)
                _stop(proc)
        finally:
            if log is not None:
                log.close()

    def detach(self) -> int:
        """Refused: the ``ssh`` process belongs to this object (use :meth:`dup`)."""
        raise AfunixError(
            errno.EOPNOTSUPP,
            f"cannot detach the socket to {self.remote_address}: the ssh process relaying "
            "it is owned by this object and ended by close(); keep the object, or dup() it",
        )

    def __repr__(self) -> str:
        state = "closed" if self.fileno() < 0 else self.peer_description
        return f"<afunix.SshSocket fd={self.fileno()} {state}>"


S = TypeVar("S", bound=SshSocket)


def ssh_command(explicit: str | Sequence[str] | None = None) -> list[str]:
    """The ``ssh`` argv to start: *explicit*, else ``$AFUNIX_SSH`` (shell-split), else ``ssh``."""
    if explicit is None:
        explicit = os.environ.get(SSH_ENV) or "ssh"
    argv = shlex.split(explicit) if isinstance(explicit, str) else list(explicit)
    if not argv:
        raise AfunixError(errno.EINVAL, f"the ssh command is empty (check ${SSH_ENV})")
    return argv


def connect_ssh(
    address: Address | str,
    *,
    timeout: float | None = None,
    ssh: str | Sequence[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    options: Sequence[str] = (),
    cls: type[S] = SshSocket,  # type: ignore[assignment]
) -> S:
    """Connect to the Unix socket an ``ssh://`` address names; returns a connected socket.

    Args:
        address: ``ssh://[user@]host[:port]/path`` (or its :class:`Address`).
        timeout: bound the whole setup (SSH login and the far connect), in
            seconds; also given to ``ssh`` as ``ConnectTimeout``. ``None``:
            as long as ``ssh`` takes.
        ssh: the ``ssh`` command (a string is shell-split); default
            ``$AFUNIX_SSH`` or ``ssh``.
        config: an ``ssh_config`` file for ``-F`` (default: the user's).
        options: more ``ssh`` arguments, e.g. ``["-o", "ProxyJump=bastion"]``.
        cls: the class of the socket returned (a subclass of :class:`SshSocket`).

    Raises :class:`RemoteError` with ``ssh``'s message when the login or the
    far connect fails, or the setup outlasts *timeout* (``ETIMEDOUT``).
    """
    addr = Address.parse(address)
    if addr.kind is not AddressKind.SSH:
        raise AddressError(errno.EINVAL, f"{addr.describe()} is not an ssh:// address")
    if b":" in addr.raw:
        raise AddressError(
            errno.EINVAL,
            f"{addr}: the far path contains ':', which ssh's -L cannot express; "
            "serve the socket under a path without ':'",
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    argv = ssh_command(ssh)
    sock = cls(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.remote_address = addr
    sock._linger = 0.0  # until connected: nothing of ours to pass on
    private = ""
    try:
        private = tempfile.mkdtemp(prefix="afx-ssh-")  # mode 0700
        local = os.path.join(private, "s")
        argv += _ssh_args(addr, local, timeout, config, options)
        sock._log = tempfile.TemporaryFile()  # noqa: SIM115 - the socket closes it
        sock.process = _start(argv, sock._log, addr)
        _open(sock, local, deadline)
    except BaseException:
        sock.close()
        raise
    finally:
        if private:
            shutil.rmtree(private, ignore_errors=True)
    del sock._linger  # the class's CLOSE_LINGER from now on
    return sock


def _start(argv: list[str], log: IO[bytes], addr: Address) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # no terminal to prompt on; our Ctrl-C is ours
        )
    except OSError as exc:
        raise RemoteError(
            exc.errno or errno.ENOENT,
            f"cannot connect to {addr}: cannot start {argv[0]!r} ({exc.strerror}); "
            f"install the OpenSSH client or set ${SSH_ENV}",
        ) from exc


def _ssh_args(
    addr: Address,
    local: str,
    timeout: float | None,
    config: str | os.PathLike[str] | None,
    options: Sequence[str],
) -> list[str]:
    args = ["-N", "-T"]
    # The first value given wins in ssh: these override the user's config, which
    # could otherwise clear our forward or hand it to a multiplexing master.
    for option in (
        "ExitOnForwardFailure=yes",
        "ClearAllForwardings=no",
        "ControlMaster=no",
        "ControlPath=none",
    ):
        args += ["-o", option]
    args += ["-o", "LogLevel=DEBUG2"]  # the channel's open confirm/failure (module doc)
    if timeout is not None:
        args += ["-o", f"ConnectTimeout={max(1, int(timeout + 0.999))}"]
    if addr.port is not None:
        args += ["-p", str(addr.port)]
    if addr.user is not None:
        args += ["-l", addr.user]
    if config is not None:
        args += ["-F", os.fspath(config)]
    args += [*options, "-L", f"{local}:{os.fsdecode(addr.raw)}", "--", addr.host]
    return args


def _open(sock: SshSocket, local: str, deadline: float | None) -> None:
    """Connect to ssh's local end once it listens, then wait for the far side's answer."""
    proc, log, addr = sock.process, sock._log, sock.remote_address
    assert proc is not None and log is not None
    delay = 0.001
    while True:
        try:
            sock.connect(local)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # ssh is still logging in; its listener comes after
        if proc.poll() is not None:
            raise _failure(addr, log, proc)
        _check_deadline(addr, log, deadline)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    os.unlink(local)  # nobody else may use this forward
    while True:
        text = _read_log(log)
        if _CONFIRMED.search(text):
            return
        if _FAILED.search(text) or proc.poll() is not None:
            raise _failure(addr, log, proc)
        _check_deadline(addr, log, deadline)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _check_deadline(addr: Address, log: IO[bytes], deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        said = _plain_lines(_read_log(log))
        exc = RemoteError(
            errno.ETIMEDOUT,
            f"cannot connect to {addr}: timed out"
            + (f" (ssh said: {said})" if said else " waiting for ssh to log in and connect"),
        )
        exc.ssh_message = said
        raise exc


def _failure(addr: Address, log: IO[bytes], proc: subprocess.Popen[bytes]) -> RemoteError:
    """The error for a failed setup, from what ssh said."""
    text = _read_log(log)
    said = _plain_lines(text)
    failed = _FAILED.search(text)
    if failed is not None:
        reason = failed.group(1).decode(errors="replace")
        what = f"the far host could not connect to {os.fsdecode(addr.raw)} ({reason})"
    elif said:
        what = f"ssh said: {said}"
    else:
        what = f"ssh exited with status {proc.poll()} and said nothing"
    err = next((num for key, num in _ERRNO_BY_TEXT if key in (said or what)), errno.EIO)
    hint = _HINTS.get(err)
    if failed is not None:
        hint = _FAR_HINT if err == errno.ECONNREFUSED else _PROHIBITED_HINT
    exc = RemoteError(
        err, f"cannot connect to {addr} through ssh: {what}" + (f"; {hint}" if hint else "")
    )
    exc.ssh_message = said
    return exc


def _read_log(log: IO[bytes] | None) -> bytes:
    """All ssh has logged (a few KiB: DEBUG2 adds a line per window of ~1 MiB relayed)."""
    if log is None:
        return b""
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _plain_lines(text: bytes) -> str:
    """ssh's messages without its debug lines, on one line."""
    lines = [
        line.strip()
        for line in text.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith(("debug1:", "debug2:", "debug3:"))
    ]
    return "; ".join(lines)


def _wait_for(done: Any, proc: subprocess.Popen[bytes], limit: float) -> None:
    """Poll *done()* until true, *proc* exits, or *limit* seconds pass."""
    deadline = time.monotonic() + limit
    delay = 0.001
    while not done() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End *proc* (SIGTERM, then SIGKILL after 5 s) and reap it."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
