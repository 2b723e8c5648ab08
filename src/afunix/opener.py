"""``my_open``: open a file through a helper process that passes the descriptor back (UNP 15.7).

The book's protocol, kept byte for byte so that our ``my_open`` works with
the book's C ``openfile`` and the book's C ``mycat`` works with our
``afunix openfile``:

1. the parent makes a stream ``socketpair``;
2. it forks and execs the helper as ``openfile SOCKFD PATH MODE``, where
   ``SOCKFD`` is the child's end of the pair and ``MODE`` the ``open(2)``
   flags, both in decimal;
3. the helper opens the file; on failure it exits with ``errno`` as its exit
   status; on success it sends **one byte** of payload with the descriptor
   attached (``SCM_RIGHTS``) and exits 0;
4. the parent waits for the child, then (status 0) receives the byte and
   the descriptor, or turns the exit status back into ``OSError(errno)``.

The parent may wait before reading because the descriptor is *in flight*:
the kernel keeps it open in the socket even though the helper has exited
(15.7 step 3).

A helper is useful when it has rights the caller lacks (a set-user-ID
program, a process in another container) or runs policy before opening.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from ._errors import PeerError
from ._fds import recvmsg_items, send_fds
from ._sockets import pair

__all__ = ["DEFAULT_HELPER", "HelperError", "HelperLike", "my_open", "openfile_main"]

#: ``afunix openfile`` of the running interpreter (works inside a virtualenv).
DEFAULT_HELPER: tuple[str, ...] = (sys.executable, "-m", "afunix", "openfile")

HelperLike = str | os.PathLike[str] | Sequence[str]


class HelperError(PeerError):
    """The helper did not follow the protocol (killed by a signal, or no descriptor sent)."""


def _helper_argv(helper: HelperLike | None) -> list[str]:
    if helper is None:
        return list(DEFAULT_HELPER)
    if isinstance(helper, str | os.PathLike):
        return [os.fspath(helper)]
    return [os.fspath(part) for part in helper]


def my_open(
    path: str | os.PathLike[str],
    flags: int = os.O_RDONLY,
    mode: int = 0o666,
    *,
    helper: HelperLike | None = None,
    timeout: float | None = None,
) -> int:
    """Open *path* in a helper process and return the descriptor it passes back.

    Args:
        path: the file to open (relative paths are relative to our cwd,
            which the helper inherits).
        flags: ``open(2)`` flags, e.g. ``os.O_RDONLY`` (the book's "mode").
        mode: permissions for ``O_CREAT``; passed to the helper as a fourth
            argument only when ``O_CREAT`` is set (the book's helper takes
            exactly three).
        helper: the helper program: a path, or an argv prefix; default
            ``afunix openfile`` (:data:`DEFAULT_HELPER`). It is run as
            ``helper SOCKFD PATH FLAGS``.
        timeout: seconds to wait for the helper (default: forever).

    Returns a descriptor (close-on-exec) that the caller owns. Raises
    ``OSError(errno, strerror, path)`` (e.g. :class:`FileNotFoundError`)
    built from the helper's exit status, or :class:`HelperError` if the
    helper died from a signal or exited 0 without sending a descriptor.
    """
    path_s = os.fspath(path)
    ours, theirs = pair("stream")
    try:
        argv = [*_helper_argv(helper), str(theirs.fileno()), path_s, str(flags)]
        if flags & os.O_CREAT:
            argv.append(f"{mode:o}")
        try:
            proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()  # the child has its copy; ours would hide the child's exit (EOF)
        try:
            status = proc.wait(timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if status < 0:
            raise HelperError(
                errno.ECHILD,
                f"helper {argv[0]} was killed by signal {-status} while opening {path_s!r}",
                path_s,
            )
        if status != 0:
            # The book: "exit status = errno". 255 stands for "errno unknown".
            raise OSError(status, os.strerror(status), path_s)
        try:
            # The child has exited: whatever it sent is queued already.
            got = recvmsg_items(ours, 1, 1, flags=socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise HelperError(
                errno.EPROTO,
                f"helper {argv[0]} exited 0 but sent nothing for {path_s!r} (did a child of "
                "it keep the socket open?)",
                path_s,
            ) from None
        fds = got.fds
        if len(got.data) != 1 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise HelperError(
                errno.EPROTO,
                f"helper {argv[0]} exited 0 but sent {len(got.data)} byte(s) and "
                f"{len(fds)} descriptor(s) for {path_s!r}; the protocol is one byte and "
                "one descriptor",
                path_s,
            )
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def openfile_main(sockfd: int, path: str | bytes, flags: int, mode: int = 0o666) -> int:
    """The book's ``openfile``: open *path*, pass the descriptor on *sockfd*.

    Returns the exit status: 0 on success, else the ``errno`` (255 if it
    does not fit an exit status). Prints nothing, as the book's program.
    """
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        return _status(exc)
    try:
        sock = socket.socket(fileno=sockfd)
    except OSError as exc:
        os.close(fd)
        return _status(exc)
    try:
        send_fds(sock, b"\0", [fd])
    except OSError as exc:
        return _status(exc)
    finally:
        sock.detach()
        os.close(fd)
    return 0


def _status(exc: OSError) -> int:
    err = exc.errno or 0
    return err if 0 < err < 256 else 255
