"""Linux specifics: who holds a socket path (``/proc/net/unix`` + ``/proc/*/fd``)."""

from __future__ import annotations

import os


def _socket_inodes(path: bytes) -> set[int]:
    """Inodes of listening sockets bound to *path*, from ``/proc/net/unix``."""
    inodes: set[int] = set()
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)  # header
            for line in f:
                fields = line.rstrip(b"\n").split(None, 7)
                # Num RefCount Protocol Flags Type St Inode Path
                if len(fields) == 8 and fields[7] == path:
                    inodes.add(int(fields[6]))
    except OSError:
        return set()
    return inodes


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"


def find_socket_holder(path: bytes) -> str | None:
    """Describe a process that has a socket bound at *path* open, if visible.

    Returns ``"pid N (command line)"`` or ``None`` when the holder cannot be
    seen (another user's process without privilege, or another PID namespace).
    """
    inodes = _socket_inodes(path)
    if not inodes:
        return None
    targets = {f"socket:[{ino}]" for ino in inodes}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # pragma: no cover - /proc always listable on Linux
        return None
    for pid in sorted(pids):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link in targets:
                who = "this process" if pid == me else _cmdline(pid)
                return f"pid {pid} ({who})"
    return None
