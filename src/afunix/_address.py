"""Parse and validate socket addresses (UNP 15.2).

One :class:`Address` type covers everything afunix can bind or connect to:

===========================  ===================================================
written as                   means
===========================  ===================================================
``/run/app.sock``            a pathname (``sockaddr_un.sun_path``)
``unix:/run/app.sock``       the same, explicitly
``app.sock``                 a *relative* pathname, made absolute at parse time
``@app``                     a Linux abstract name (no file in the filesystem)
``unix-abstract:app``        the same, explicitly
``""``                       an unnamed socket (``sun_path[0] == 0``)
``tcp://host:port``          a TCP endpoint, so the same API reaches other hosts
``tcp://[::1]:port``         the same over IPv6
``tls://host:port``          TCP with TLS (mutual certificates); ``[::1]`` as above
``ssh://[user@]host[:port]/path``  a Unix socket on another host, reached through
                             the user's OpenSSH client; *path* is absolute on
                             the far host (see :mod:`afunix._remote`)
===========================  ===================================================

An ``ssh://`` address names a *pathname* socket on the far host: OpenSSH
forwards only those (``direct-streamlocal``; an ``@name`` after the host is
refused, since sshd would take it for a relative file name). User and host
are passed to ``ssh`` as they are, so a ``Host`` alias of ``~/.ssh/config``
works; neither may start with ``-`` (it would read as an ``ssh`` option).

Bytes are taken as the raw ``sun_path`` contents (a leading NUL means abstract),
so pathnames that are not UTF-8 work; ``str`` input is encoded with
:func:`os.fsencode`, so such paths also round-trip through ``str``.

Why relative paths are resolved here: a server that binds ``app.sock`` binds
it in *its* working directory, and a client must then run in that same
directory to reach it (UNP 15.4, point 2). afunix resolves the name once, when
it is parsed, and binds/connects the absolute form, so an address printed by a
server can be pasted into a client anywhere.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any, TypeAlias

from ._errors import AddressError
from ._platform import PLATFORM

__all__ = ["Address", "AddressKind", "AddressLike"]


class AddressKind(enum.Enum):
    """What an :class:`Address` names."""

    PATH = "path"
    ABSTRACT = "abstract"
    UNNAMED = "unnamed"
    TCP = "tcp"
    TLS = "tls"
    SSH = "ssh"


#: The kinds that name an ``AF_UNIX`` socket of this host.
_LOCAL_KINDS = frozenset({AddressKind.PATH, AddressKind.ABSTRACT, AddressKind.UNNAMED})
#: The kinds whose ``raw`` is an IP host name and that have a port.
_INET_KINDS = frozenset({AddressKind.TCP, AddressKind.TLS})


AddressLike: TypeAlias = "Address | str | bytes | os.PathLike[str] | os.PathLike[bytes]"

_SCHEMES = ("unix:", "unix-abstract:", "tcp://", "tls://", "ssh://")


@dataclass(frozen=True, slots=True)
class Address:
    """A validated socket address. Build one with :meth:`parse`.

    Attributes:
        kind: which of path / abstract / unnamed / tcp / tls / ssh.
        raw: the ``sun_path`` bytes for a path (absolute, no NUL), the name
            for an abstract address (without the leading NUL), ``b""`` for
            unnamed, the host (encoded) for TCP and TLS, and the far
            socket's absolute path for SSH.
        port: the TCP port (TCP, TLS; for SSH the sshd port if given), else ``None``.
        user: the SSH login name if given (``ssh://user@host/...``), else ``None``.
        ssh_host: the SSH host as written (a name, an IP, or a ``Host`` alias of
            ``~/.ssh/config``); ``""`` for the other kinds.
    """

    kind: AddressKind
    raw: bytes
    port: int | None = None
    user: str | None = None
    ssh_host: str = ""

    # ------------------------------------------------------------------ parse
    @classmethod
    def parse(cls, value: AddressLike) -> Address:
        """Parse *value* (``str``, ``bytes``, path-like or ``Address``).

        Raises :class:`afunix.AddressError` (a ``ValueError`` and ``OSError``)
        naming the limit and the offending value when the address cannot be
        used: too long for ``sun_path``, a NUL inside a pathname, an abstract
        name where the system has none, or a malformed ``tcp://`` URI.

        A ``str`` or ``bytes`` that parses the same from any working directory
        (anything but a relative pathname) is parsed once and remembered: a
        client that connects to the same address again and again pays for the
        checks only the first time.
        """
        cache = _PARSED.get(type(value))
        if cache is None:  # an Address, a path-like or a buffer: not remembered
            return cls._parse(value)
        addr = cache.get(value)
        if addr is None:
            addr = cls._parse(value)
            if addr.kind is not AddressKind.PATH or _is_absolute(value):
                if len(cache) >= _PARSED_MAX:
                    cache.clear()
                cache[value] = addr
        return addr

    @classmethod
    def _parse(cls, value: AddressLike) -> Address:
        if isinstance(value, Address):
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            if raw == b"":
                return cls.unnamed()
            if raw[:1] == b"\0":
                return cls.abstract(raw[1:])
            return cls.path(raw)
        if isinstance(value, os.PathLike):
            return cls.path(os.fsencode(value))
        if not isinstance(value, str):
            raise TypeError(f"cannot make an address from {type(value).__name__}: {value!r}")
        text = value
        if text == "":
            return cls.unnamed()
        if text.startswith("@"):
            return cls.abstract(os.fsencode(text[1:]))
        if text.startswith("unix-abstract:"):
            return cls.abstract(os.fsencode(text[len("unix-abstract:") :]))
        if text.startswith("unix:"):
            rest = text[len("unix:") :]
            if rest.startswith("//"):  # unix:///abs/path (URI form)
                rest = rest[2:]
            if rest == "":
                raise AddressError(
                    errno.EINVAL, f"empty pathname in address {text!r}: write unix:/path/to/sock"
                )
            return cls.path(os.fsencode(rest))
        if text.startswith("tcp://"):
            return cls._parse_tcp(text)
        if text.startswith("tls://"):
            tcp = cls._parse_tcp(text, "tls")
            return cls(AddressKind.TLS, tcp.raw, tcp.port)
        if text.startswith("ssh://"):
            return cls._parse_ssh(text)
        if "://" in text:
            scheme = text.split("://", 1)[0]
            raise AddressError(
                errno.EINVAL,
                f"unknown address scheme {scheme!r} in {text!r}: use a path, @name, "
                "unix:/path, unix-abstract:name, tcp://host:port, tls://host:port "
                "or ssh://[user@]host[:port]/path",
            )
        return cls.path(os.fsencode(text))

    @classmethod
    def path(cls, path: bytes | str | os.PathLike[str] | os.PathLike[bytes]) -> Address:
        """A pathname address; a relative path is made absolute now."""
        raw = os.fsencode(path)
        if raw == b"":
            raise AddressError(errno.EINVAL, "empty pathname: use Address.unnamed() for no name")
        if b"\0" in raw:
            where = raw.index(b"\0")
            raise AddressError(
                errno.EINVAL,
                f"pathname {raw!r} contains a NUL byte at offset {where}: "
                "sun_path is a C string and would be cut there",
            )
        if not raw.startswith(b"/"):
            raw = os.path.join(os.getcwdb(), raw)
        limit = PLATFORM.max_path_bytes
        if len(raw) > limit:
            shown = os.fsdecode(raw)
            raise AddressError(
                errno.ENAMETOOLONG,
                f"socket path is {len(raw)} bytes, longer than the {limit} that sun_path "
                f"holds on {PLATFORM.name} ({PLATFORM.sun_path_size} with its NUL): {shown!r}; "
                "use a shorter directory (e.g. under /run or /tmp)"
                + (" or an abstract name (@name)" if PLATFORM.has_abstract else ""),
                shown,
            )
        return cls(AddressKind.PATH, raw)

    @classmethod
    def abstract(cls, name: bytes | str) -> Address:
        """A Linux abstract-namespace address (``@name``)."""
        raw = os.fsencode(name) if isinstance(name, str) else bytes(name)
        if not PLATFORM.has_abstract:
            raise AddressError(
                errno.EAFNOSUPPORT,
                f"abstract socket name @{os.fsdecode(raw)!s} is not available on "
                f"{PLATFORM.name}: only Linux has an abstract namespace; use a pathname",
            )
        if raw == b"":
            raise AddressError(
                errno.EINVAL,
                "empty abstract name: write @name, or use Address.unnamed() (autobind) "
                "to let the kernel pick one",
            )
        limit = PLATFORM.max_abstract_bytes
        if len(raw) > limit:
            raise AddressError(
                errno.ENAMETOOLONG,
                f"abstract name is {len(raw)} bytes, longer than the {limit} that sun_path "
                f"holds after its leading NUL: @{os.fsdecode(raw)!s}",
            )
        return cls(AddressKind.ABSTRACT, raw)

    @classmethod
    def unnamed(cls) -> Address:
        """The unnamed address (what an unbound or ``socketpair`` socket has)."""
        return cls(AddressKind.UNNAMED, b"")

    @classmethod
    def tcp(cls, host: str, port: int) -> Address:
        """A TCP endpoint."""
        if not host:
            raise AddressError(errno.EINVAL, "TCP address needs a host: tcp://host:port")
        if not 0 <= port <= 65535:
            raise AddressError(
                errno.EINVAL, f"TCP port {port} is out of range 0-65535 in tcp://{host}:{port}"
            )
        return cls(AddressKind.TCP, host.encode("idna" if not _is_ip(host) else "ascii"), port)

    @classmethod
    def tls(cls, host: str, port: int) -> Address:
        """A TLS endpoint (TCP underneath): ``tls://host:port``."""
        tcp = cls.tcp(host, port)
        return cls(AddressKind.TLS, tcp.raw, tcp.port)

    @classmethod
    def ssh(
        cls,
        host: str,
        path: bytes | str | os.PathLike[str] | os.PathLike[bytes],
        *,
        user: str | None = None,
        port: int | None = None,
    ) -> Address:
        """A pathname socket on another host, reached through ``ssh`` (``ssh://``).

        *path* must be absolute: it is resolved on the far host, where this
        process's working directory means nothing. *host* may be a ``Host``
        alias of the user's ``~/.ssh/config``.
        """
        shown = f"ssh://{host}{os.fsdecode(os.fsencode(path))}"
        _check_ssh_word("host", host, shown)
        if user is not None:
            _check_ssh_word("user", user, shown)
        if port is not None and not 1 <= port <= 65535:
            raise AddressError(
                errno.EINVAL, f"SSH port {port} is out of range 1-65535 in {shown!r}"
            )
        raw = os.fsencode(path)
        if raw[:1] == b"@" or raw[:2] == b"/@":
            raise AddressError(
                errno.EAFNOSUPPORT,
                f"{shown!r} names an abstract socket: OpenSSH forwards only pathname "
                "sockets (sshd would look for a file named like it); serve a path "
                "on the far host, e.g. ssh://host/run/app.sock",
            )
        if not raw.startswith(b"/") or raw == b"/":
            raise AddressError(
                errno.EINVAL,
                f"{shown!r} needs the far socket's absolute path: "
                "ssh://[user@]host[:port]/path/to/socket",
            )
        if b"\0" in raw:
            raise AddressError(errno.EINVAL, f"the far path in {shown!r} contains a NUL byte")
        limit = PLATFORM.max_path_bytes
        if len(raw) > limit:
            raise AddressError(
                errno.ENAMETOOLONG,
                f"the far socket path is {len(raw)} bytes, longer than the {limit} that "
                f"sun_path holds: {shown!r}",
                shown,
            )
        return cls(AddressKind.SSH, raw, port, user, host)

    @classmethod
    def _parse_ssh(cls, text: str) -> Address:
        rest = text[len("ssh://") :]
        authority, slash, path = rest.partition("/")
        if not slash:
            raise AddressError(
                errno.EINVAL,
                f"malformed SSH address {text!r}: it needs the far socket's path, "
                "ssh://[user@]host[:port]/path/to/socket",
            )
        user: str | None = None
        if "@" in authority:
            user, _, authority = authority.rpartition("@")
            if not user:
                raise AddressError(
                    errno.EINVAL, f"empty user name in {text!r}: write ssh://user@host/path"
                )
        port_text = ""
        if authority.startswith("["):
            end = authority.find("]")
            tail = authority[end + 1 :] if end >= 0 else ""
            if end < 0 or (tail and not tail.startswith(":")):
                raise AddressError(
                    errno.EINVAL, f"malformed SSH address {text!r}: write ssh://[::1]:PORT/path"
                )
            host, sep, port_text = authority[1:end], tail[:1], tail[1:]
            if not _is_ip(host):
                raise AddressError(errno.EINVAL, f"malformed IPv6 host {host!r} in {text!r}")
        else:
            host, sep, port_text = authority.partition(":")
        if sep and not port_text.isdigit():
            raise AddressError(
                errno.EINVAL,
                f"malformed SSH address {text!r}: port {port_text!r} is not a number "
                "(an IPv6 host goes in brackets: ssh://[::1]:22/path)",
            )
        if not host:
            raise AddressError(
                errno.EINVAL,
                f"malformed SSH address {text!r}: no host; ssh://[user@]host[:port]/path",
            )
        port = int(port_text) if port_text else None
        return cls.ssh(host, "/" + path, user=user, port=port)

    @classmethod
    def _parse_tcp(cls, text: str, scheme: str = "tcp") -> Address:
        label = scheme.upper()
        rest = text[len(scheme) + 3 :].rstrip("/")
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0 or rest[end + 1 : end + 2] != ":":
                raise AddressError(
                    errno.EINVAL, f"malformed {label} address {text!r}: write {scheme}://[::1]:PORT"
                )
            host, port_text = rest[1:end], rest[end + 2 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise AddressError(
                    errno.EINVAL, f"malformed IPv6 host {host!r} in {text!r}"
                ) from exc
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or not host or ":" in host:
                raise AddressError(
                    errno.EINVAL,
                    f"malformed {label} address {text!r}: write {scheme}://HOST:PORT "
                    f"(an IPv6 host goes in brackets: {scheme}://[::1]:PORT)",
                )
        if not port_text.isdigit():
            raise AddressError(
                errno.EINVAL,
                f"malformed {label} address {text!r}: port {port_text!r} is not a number",
            )
        return cls.tcp(host, int(port_text))

    # ------------------------------------------------------------ from kernel
    @classmethod
    def from_sockaddr(cls, family: int, sockaddr: Any) -> Address:
        """Build an address from what ``getsockname``/``accept``/``recvfrom`` return."""
        if family == socket.AF_UNIX:
            if sockaddr is None:
                return cls.unnamed()
            raw = os.fsencode(sockaddr) if isinstance(sockaddr, str) else bytes(sockaddr)
            if raw == b"":
                return cls.unnamed()
            if raw[:1] == b"\0":
                return cls(AddressKind.ABSTRACT, raw[1:])
            return cls(AddressKind.PATH, raw)
        if family in (socket.AF_INET, socket.AF_INET6):
            host, port = sockaddr[0], sockaddr[1]
            return cls(AddressKind.TCP, str(host).encode("ascii"), int(port))
        raise AddressError(errno.EAFNOSUPPORT, f"unsupported address family {family}")

    # -------------------------------------------------------------- accessors
    @property
    def is_unix(self) -> bool:
        """True for path, abstract and unnamed addresses (a Unix socket of this host)."""
        return self.kind in _LOCAL_KINDS

    @property
    def is_remote(self) -> bool:
        """True for ``tcp://``, ``tls://`` and ``ssh://``: the peer may be on another host.

        Over those, descriptors and kernel credentials do not travel.
        """
        return self.kind not in _LOCAL_KINDS

    @property
    def family(self) -> int:
        """The socket family to create (``AF_UNIX``, ``AF_INET`` or ``AF_INET6``).

        For ``ssh://`` it is ``AF_UNIX``: the local end is a socketpair to the
        ``ssh`` process.
        """
        if self.kind in _INET_KINDS:
            return socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return socket.AF_UNIX

    @property
    def host(self) -> str:
        """The TCP/TLS host, the SSH host (as written), ``""`` for Unix addresses."""
        if self.kind in _INET_KINDS:
            return self.raw.decode("ascii")
        return self.ssh_host

    @property
    def filesystem_path(self) -> bytes | None:
        """The pathname as bytes for a path address, else ``None``."""
        return self.raw if self.kind is AddressKind.PATH else None

    @property
    def sockaddr(self) -> Any:
        """What Python's ``socket.bind``/``connect`` take for this address."""
        if self.kind is AddressKind.PATH:
            return self.raw
        if self.kind is AddressKind.ABSTRACT:
            return b"\0" + self.raw
        if self.kind is AddressKind.UNNAMED:
            return b""
        if self.kind is AddressKind.SSH:
            raise AddressError(
                errno.EAFNOSUPPORT,
                f"{self} has no socket address of this host: it is reached through ssh; "
                "use afunix.connect()",
            )
        return (self.host, self.port)

    @property
    def sockaddr_len(self) -> int:
        """The ``socklen_t`` that ``getsockname`` returns for this address.

        For a pathname: ``offsetof(sun_path) + strlen(path) + 1`` (15 for
        ``/tmp/ux.sock`` on Linux, as the book's ``unixbind`` prints); for an
        abstract name the NUL and the name with no terminator; for unnamed
        just the family.
        """
        off = PLATFORM.sun_path_offset
        if self.kind is AddressKind.PATH:
            return off + len(self.raw) + 1
        if self.kind is AddressKind.ABSTRACT:
            return off + 1 + len(self.raw)
        if self.kind is AddressKind.UNNAMED:
            return off
        if self.kind is AddressKind.SSH:
            return off + len(self.raw) + 1  # what the far sshd connects with
        return 28 if self.family == socket.AF_INET6 else 16

    def __str__(self) -> str:
        if self.kind is AddressKind.PATH:
            return os.fsdecode(self.raw)
        if self.kind is AddressKind.ABSTRACT:
            return "@" + os.fsdecode(self.raw)
        if self.kind is AddressKind.UNNAMED:
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.kind is AddressKind.SSH:
            user = f"{self.user}@" if self.user is not None else ""
            port = f":{self.port}" if self.port is not None else ""
            return f"ssh://{user}{host}{port}{os.fsdecode(self.raw)}"
        return f"{self.kind.value}://{host}:{self.port}"

    def __repr__(self) -> str:
        if self.kind is AddressKind.UNNAMED:
            return "Address(<unnamed>)"
        return f"Address({str(self)!r})"

    def describe(self) -> str:
        """A human label: the path, ``@name``, ``<unnamed>`` or the URI."""
        return str(self) if self.kind is not AddressKind.UNNAMED else "<unnamed>"


#: Addresses already parsed from a ``str`` / a ``bytes``, by the value given. Only
#: results that do not depend on the working directory are kept (see
#: :meth:`Address.parse`); an :class:`Address` is immutable, so one can be shared.
#: Bounded: emptied when full, so a program that parses ever new addresses
#: (replies to many datagram clients) does not grow it without end.
_PARSED: dict[type, dict[Any, Address]] = {str: {}, bytes: {}}
_PARSED_MAX = 256


def _is_absolute(value: object) -> bool:
    """Whether *value* is a ``str``/``bytes`` written as an absolute pathname (``/...``).

    A relative one is resolved against the working directory when parsed, so
    its result must not be remembered. ``unix:/path`` is not recognised here:
    it is correct to parse it every time, only slower.
    """
    if isinstance(value, str):
        return value.startswith("/")
    return isinstance(value, bytes) and value.startswith(b"/")


def _check_ssh_word(what: str, value: str, shown: str) -> None:
    """Refuse an SSH user or host that ``ssh`` would misread.

    A leading ``-`` would be taken for an option (``-oProxyCommand=...`` runs a
    command); whitespace and control characters belong to no host or login
    name, nor ``@`` and ``/`` to a host (a login name may hold an ``@``).
    """
    if not value:
        raise AddressError(errno.EINVAL, f"empty SSH {what} in {shown!r}")
    if value.startswith("-"):
        raise AddressError(
            errno.EINVAL,
            f"SSH {what} {value!r} in {shown!r} starts with '-': ssh would read it as "
            "an option; refused",
        )
    forbidden = "@/" if what == "host" else ""
    bad = [c for c in value if c.isspace() or c in forbidden or not c.isprintable()]
    if bad:
        raise AddressError(
            errno.EINVAL, f"SSH {what} {value!r} in {shown!r} contains {bad[0]!r}; refused"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
