"""Large payloads as sealed ``memfd`` descriptors (Linux): zero-copy on the receiving side.

A payload above :data:`MEMFD_THRESHOLD` (or any payload, on request) is not
copied through the socket. The sender writes it into an anonymous
``memfd_create`` file, *seals* it against shrinking, growing and writing
(``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE``, plus ``F_SEAL_SEAL`` so no
seal can be added or taken away later) and passes the descriptor. The
receiver checks the seals and the size before it trusts anything, then maps
the file read-only: once ``F_SEAL_WRITE`` is set nobody, the sender
included, can change the bytes under the receiver's feet, so the receiver
may parse the mapping in place without a defensive copy.

Why the threshold is 32 MiB. Speed alone would never pick a memfd for
the message sizes most programs send. Measured on the development machine
(Linux 6.18 in a 2-vCPU VM, Python 3.11; stream socketpair, the receiver
reading every page; ``afunix bench`` and ``docs/benchmarks.md`` measure it on
yours):

=========  ============  ==============
payload    inline frame  sealed memfd
=========  ============  ==============
64 KiB     23 us         78 us
1 MiB      147 us        663 us
16 MiB     4.6 ms        10.8 ms
32 MiB     21 ms         27 ms
64 MiB     40-53 ms      33-83 ms
=========  ============  ==============

The inline path copies into memory that is reused message after message;
a memfd's pages are fresh every time (sealing makes a memfd single-use), so
both ends pay for allocating, zeroing and mapping them, about 1.5 us per
4 KiB page there. What a memfd buys instead is not speed: the sender never
blocks on a slow receiver (the payload does not wait in the socket buffer,
208 KiB by default), the receiver holds one mapped copy and parses it in
place, safely, because nobody can change it any more, and packet sockets can
carry payloads far above their size limit. Those benefits matter for big
messages, and at 32 MiB the extra cost has shrunk to about a quarter, so
32 MiB is the default. Below it, payloads go inline, except that a datagram
or seqpacket message too big for the socket (``EMSGSIZE``) is resent as a
memfd automatically. Pass ``memfd=True`` to force one (e.g. for a payload the
receiver keeps mapped) or set ``memfd_threshold=`` per channel.

Pools. Sealing is permanent, so a sealed memfd is never reused. What can be
reused is the *preparation*: :class:`MemfdBuffer` separates allocation
(``memfd_create`` + ``ftruncate`` + a writable mapping), filling (write into
:attr:`MemfdBuffer.view` in place) and sealing (:meth:`MemfdBuffer.seal`),
and :class:`MemfdPool` keeps allocated, unsealed buffers ready so the hot
path only fills and seals.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Iterable

from ._errors import ProtocolError, UnsupportedFeature

__all__ = [
    "MEMFD_THRESHOLD",
    "REQUIRED_SEALS",
    "SENDER_SEALS",
    "MemfdBuffer",
    "MemfdPool",
    "PayloadError",
    "SealedPayload",
    "available",
    "seal_bytes",
    "seal_names",
]

#: Payloads of this many bytes or more go as a sealed memfd by default.
MEMFD_THRESHOLD = 32 * 1024 * 1024

_SEAL_SEAL: int = getattr(fcntl, "F_SEAL_SEAL", 0x1)
_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x4)
_SEAL_WRITE: int = getattr(fcntl, "F_SEAL_WRITE", 0x8)
_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
_GET_SEALS: int = getattr(fcntl, "F_GET_SEALS", 1034)

#: The seals a receiver insists on before it maps a payload.
REQUIRED_SEALS = _SEAL_SHRINK | _SEAL_GROW | _SEAL_WRITE
#: The seals afunix puts on the payloads it sends.
SENDER_SEALS = REQUIRED_SEALS | _SEAL_SEAL

# MAP_POPULATE maps every page in the mmap call itself instead of one page
# fault per page later: the receiver is going to read the payload anyway.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

_NAMES = {
    _SEAL_SEAL: "F_SEAL_SEAL",
    _SEAL_SHRINK: "F_SEAL_SHRINK",
    _SEAL_GROW: "F_SEAL_GROW",
    _SEAL_WRITE: "F_SEAL_WRITE",
}


def available() -> bool:
    """Whether this system has sealable ``memfd_create`` (Linux >= 3.17)."""
    return hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING")


def seal_names(seals: int) -> str:
    """``"F_SEAL_SHRINK|F_SEAL_GROW"`` for a seal bit mask (``"none"`` for 0)."""
    names = [name for bit, name in _NAMES.items() if seals & bit]
    return "|".join(names) or "none"


class PayloadError(ProtocolError):
    """A memfd payload from the peer failed the checks (seals, size, kind); it was closed."""


def _memfd(name: str) -> int:
    if not available():  # pragma: no cover - not Linux
        raise UnsupportedFeature("sealed memfd payloads need Linux memfd_create")
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


class MemfdBuffer:
    """A writable, not yet sealed memfd: allocate, fill :attr:`view` in place, :meth:`seal`.

    ::

        buf = MemfdBuffer(len(data))
        buf.view[: len(data)] = data
        fd = buf.seal(len(data))     # the caller now owns fd, sealed
    """

    def __init__(self, capacity: int, name: str = "afunix-payload") -> None:
        if capacity < 0:
            raise ValueError(f"negative capacity {capacity}")
        self.capacity = capacity
        self._fd = _memfd(name)
        try:
            os.ftruncate(self._fd, capacity)
            self._map: mmap.mmap | None = mmap.mmap(self._fd, capacity) if capacity else None
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def view(self) -> memoryview:
        """A writable view of the whole buffer (release it before :meth:`seal`)."""
        if self._fd < 0:
            raise ValueError("buffer is sealed or closed")
        return memoryview(self._map) if self._map is not None else memoryview(bytearray())

    def seal(self, length: int) -> int:
        """Cut the file to *length*, seal it and hand its descriptor over to the caller.

        The writable mapping is removed first (``F_SEAL_WRITE`` is refused
        while one exists); a ``memoryview`` still holding it is an error.
        """
        if self._fd < 0:
            raise ValueError("buffer is sealed or closed")
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside the buffer's 0..{self.capacity}")
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                raise BufferError(
                    "cannot seal: a memoryview of MemfdBuffer.view is still alive; "
                    "release it (del it or use 'with buf.view as v:') first"
                ) from None
            self._map = None
        fd, self._fd = self._fd, -1
        try:
            if length != self.capacity:
                os.ftruncate(fd, length)
            fcntl.fcntl(fd, _ADD_SEALS, SENDER_SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Drop an unsealed buffer."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> MemfdBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def seal_bytes(data: bytes | bytearray | memoryview, name: str = "afunix-payload") -> int:
    """Copy *data* into a new memfd, seal it, return the (owned) descriptor."""
    fd = _memfd(name)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        fcntl.fcntl(fd, _ADD_SEALS, SENDER_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SealedPayload:
    """A received memfd payload, checked and mapped read-only.

    Takes ownership of *fd*: it is closed once mapped (the mapping keeps the
    memory) or on any failed check, which raises :class:`PayloadError`.
    """

    def __init__(self, fd: int, length: int) -> None:
        self._map: mmap.mmap | None = None
        try:
            self._check(fd, length)
            if length:
                self._map = mmap.mmap(fd, length, _MAP_FLAGS, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.length = length
        self._view: memoryview | None = (
            memoryview(self._map) if self._map is not None else memoryview(b"")
        )

    @staticmethod
    def _check(fd: int, length: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PayloadError(
                "the peer's payload descriptor is not a memfd (not even a regular file)"
            )
        try:
            seals = fcntl.fcntl(fd, _GET_SEALS)
        except OSError as exc:
            raise PayloadError(
                "the peer's payload descriptor is not a sealable memfd "
                f"(F_GET_SEALS: {os.strerror(exc.errno or errno.EINVAL)})"
            ) from exc
        missing = REQUIRED_SEALS & ~seals
        if missing:
            raise PayloadError(
                f"the peer's memfd payload lacks the seal(s) {seal_names(missing)} "
                f"(it has {seal_names(seals)}); it could change while mapped, refused"
            )
        if st.st_size != length:
            raise PayloadError(
                f"the peer's memfd payload holds {st.st_size} bytes but the header "
                f"announced {length}"
            )

    @property
    def view(self) -> memoryview:
        """The payload, read-only, mapped straight from the sender's pages."""
        if self._view is None:
            raise ValueError("payload is closed")
        return self._view

    def close(self) -> None:
        """Release the mapping (views derived from :attr:`view` must be released first)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A slice of the view is still alive somewhere; the mapping
                # goes away when that is garbage collected.
                pass
            self._map = None


class MemfdPool:
    """Allocated, unsealed :class:`MemfdBuffer` s of one capacity, ready to fill and seal.

    :meth:`acquire` hands out a spare buffer when one is big enough, else
    allocates; :meth:`fill` tops the spares up (call it off the hot path).
    """

    def __init__(self, capacity: int, spares: int = 4) -> None:
        self.capacity = capacity
        self.spares = spares
        self._free: list[MemfdBuffer] = []

    def fill(self) -> None:
        while len(self._free) < self.spares:
            self._free.append(MemfdBuffer(self.capacity))

    def acquire(self, size: int) -> MemfdBuffer:
        if size <= self.capacity and self._free:
            return self._free.pop()
        return MemfdBuffer(max(size, self.capacity))

    def __len__(self) -> int:
        return len(self._free)

    def close(self) -> None:
        free, self._free = self._free, []
        _close_all(free)

    def __enter__(self) -> MemfdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_all(buffers: Iterable[MemfdBuffer]) -> None:
    for buf in buffers:
        buf.close()
