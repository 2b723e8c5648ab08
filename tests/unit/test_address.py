"""Address parsing and validation (UNP 15.2): a table of inputs and expectations."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from afunix import Address, AddressError, AddressKind

PARSE_TABLE = [
    # input, kind, raw, port, str()
    ("/tmp/ux.sock", AddressKind.PATH, b"/tmp/ux.sock", None, "/tmp/ux.sock"),
    ("unix:/tmp/ux.sock", AddressKind.PATH, b"/tmp/ux.sock", None, "/tmp/ux.sock"),
    ("unix:///tmp/ux.sock", AddressKind.PATH, b"/tmp/ux.sock", None, "/tmp/ux.sock"),
    ("@app", AddressKind.ABSTRACT, b"app", None, "@app"),
    ("unix-abstract:app", AddressKind.ABSTRACT, b"app", None, "@app"),
    ("", AddressKind.UNNAMED, b"", None, ""),
    (b"", AddressKind.UNNAMED, b"", None, ""),
    (b"\0app", AddressKind.ABSTRACT, b"app", None, "@app"),
    (b"/tmp/\xff\xfe.sock", AddressKind.PATH, b"/tmp/\xff\xfe.sock", None, None),
    (Path("/tmp/p.sock"), AddressKind.PATH, b"/tmp/p.sock", None, "/tmp/p.sock"),
    ("tcp://127.0.0.1:8080", AddressKind.TCP, b"127.0.0.1", 8080, "tcp://127.0.0.1:8080"),
    ("tcp://[::1]:9", AddressKind.TCP, b"::1", 9, "tcp://[::1]:9"),
    ("tcp://localhost:0", AddressKind.TCP, b"localhost", 0, "tcp://localhost:0"),
]


@pytest.mark.parametrize(("value", "kind", "raw", "port", "text"), PARSE_TABLE)
def test_parse_table(
    value: object, kind: AddressKind, raw: bytes, port: int | None, text: str | None
) -> None:
    addr = Address.parse(value)  # type: ignore[arg-type]
    assert addr.kind is kind
    assert addr.raw == raw
    assert addr.port == port
    if text is not None:
        assert str(addr) == text
    # str() always round-trips, non-UTF-8 bytes included (surrogateescape).
    assert Address.parse(str(addr)) == addr


def test_relative_path_is_resolved_at_parse_time(tmp_path: Path) -> None:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        addr = Address.parse("rel.sock")
    finally:
        os.chdir(old)
    assert addr.raw == os.fsencode(tmp_path / "rel.sock")
    # The resolved form does not depend on where we are now (UNP 15.4 point 2).
    assert Address.parse(str(addr)) == addr


@pytest.mark.parametrize("name", ["rel.sock", b"rel.sock", "unix:rel.sock"])
def test_relative_path_is_resolved_again_after_chdir(tmp_path: Path, name: str | bytes) -> None:
    # Parsed addresses are remembered, but a relative one must follow the working
    # directory: the same text names another file after a chdir.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old = os.getcwd()
    try:
        os.chdir(tmp_path / "a")
        first = Address.parse(name)
        os.chdir(tmp_path / "b")
        second = Address.parse(name)
    finally:
        os.chdir(old)
    assert first.raw == os.fsencode(tmp_path / "a" / "rel.sock")
    assert second.raw == os.fsencode(tmp_path / "b" / "rel.sock")


@pytest.mark.parametrize(
    "value", ["/tmp/again.sock", b"/tmp/again.sock", "@again", "tcp://127.0.0.1:9", ""]
)
def test_parsing_the_same_value_again_gives_the_same_address(value: str | bytes) -> None:
    assert Address.parse(value) == Address.parse(value)
    assert Address.parse(value) is Address.parse(value)  # remembered, not parsed again


def test_a_rejected_address_is_rejected_every_time() -> None:
    for _ in range(2):
        with pytest.raises(AddressError) as info:
            Address.parse("/tmp/" + "x" * 200)
        assert info.value.errno == errno.ENAMETOOLONG


def test_remembered_addresses_are_bounded() -> None:
    # A program parsing ever new addresses (datagram replies to many clients)
    # must not grow the memory of parsed ones without end.
    from afunix import _address

    for i in range(3 * _address._PARSED_MAX):
        addr = Address.parse(f"/tmp/many-{i}.sock")
        assert addr.raw == f"/tmp/many-{i}.sock".encode()
    assert len(_address._PARSED[str]) <= _address._PARSED_MAX


@pytest.mark.parametrize(
    ("path", "length"),
    [("/tmp/ux.sock", 15), ("/a", 5), ("/" + "x" * 106, 110)],
)
def test_sockaddr_len_of_paths(path: str, length: int) -> None:
    assert Address.parse(path).sockaddr_len == length


def test_sockaddr_len_of_other_kinds() -> None:
    assert Address.parse("@ab").sockaddr_len == 2 + 1 + 2
    assert Address.unnamed().sockaddr_len == 2
    assert Address.parse("tcp://127.0.0.1:1").sockaddr_len == 16
    assert Address.parse("tcp://[::1]:1").sockaddr_len == 28


def test_longest_path_fits_and_one_more_byte_fails() -> None:
    ok = "/" + "a" * 106  # 107 bytes + NUL = 108 = sizeof(sun_path) on Linux
    assert len(Address.parse(ok).raw) == 107
    with pytest.raises(AddressError) as info:
        Address.parse(ok + "a")
    exc = info.value
    assert exc.errno == errno.ENAMETOOLONG
    assert isinstance(exc, ValueError)
    assert isinstance(exc, OSError)
    msg = str(exc)
    assert "108 bytes" in msg and "107" in msg and "108 with its NUL" in msg
    assert ok + "a" in msg


def test_longest_path_binds_for_real(tmp_path: Path) -> None:
    # The limit we enforce is the kernel's: a 107-byte path binds.
    d = Path("/tmp") / ("d" * 40)
    d.mkdir(exist_ok=True)
    try:
        path = str(d) + "/" + "s" * (107 - len(str(d)) - 1)
        assert len(path) == 107
        addr = Address.parse(path)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(addr.sockaddr)
            assert Address.from_sockaddr(socket.AF_UNIX, s.getsockname()) == addr
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@pytest.mark.parametrize(
    ("value", "err", "words"),
    [
        ("/tmp/a\0b", errno.EINVAL, "NUL byte at offset 6"),
        (b"/tmp/a\0b", errno.EINVAL, "NUL byte"),
        ("@" + "n" * 108, errno.ENAMETOOLONG, "abstract name is 108 bytes"),
        ("@", errno.EINVAL, "empty abstract name"),
        ("unix:", errno.EINVAL, "empty pathname"),
        ("tcp://host", errno.EINVAL, "tcp://HOST:PORT"),
        ("tcp://host:port", errno.EINVAL, "'port' is not a number"),
        ("tcp://host:70000", errno.EINVAL, "out of range"),
        ("tcp://[::1:80", errno.EINVAL, "tcp://[::1]:PORT"),
        ("tcp://[zz]:80", errno.EINVAL, "malformed IPv6"),
        ("tcp://:80", errno.EINVAL, "malformed TCP address"),
        ("http://x:1", errno.EINVAL, "unknown address scheme 'http'"),
    ],
)
def test_bad_input_is_a_clear_error(value: str | bytes, err: int, words: str) -> None:
    with pytest.raises(AddressError) as info:
        Address.parse(value)
    assert info.value.errno == err
    assert words in str(info.value)


def test_non_address_types_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot make an address from int"):
        Address.parse(42)  # type: ignore[arg-type]


def test_from_sockaddr_matches_what_the_kernel_returns() -> None:
    name = f"afx-test-from-sockaddr-{os.getpid()}"  # two runs at once (make pytest-both)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(b"\0" + name.encode())
        assert Address.from_sockaddr(s.family, s.getsockname()) == Address.parse(f"@{name}")
    a, b = socket.socketpair()
    with a, b:
        assert Address.from_sockaddr(a.family, a.getsockname()).kind is AddressKind.UNNAMED
    with socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        addr = Address.from_sockaddr(t.family, t.getsockname())
        assert addr.kind is AddressKind.TCP and addr.host == "127.0.0.1" and addr.port


def test_family_and_sockaddr() -> None:
    assert Address.parse("/x").family == socket.AF_UNIX
    assert Address.parse("/x").sockaddr == b"/x"
    assert Address.parse("@x").sockaddr == b"\0x"
    assert Address.parse("tcp://[::1]:5").family == socket.AF_INET6
    assert Address.parse("tcp://127.0.0.1:5").sockaddr == ("127.0.0.1", 5)
    assert Address.parse("tcp://127.0.0.1:5").filesystem_path is None
    assert repr(Address.unnamed()) == "Address(<unnamed>)"
    assert Address.unnamed().describe() == "<unnamed>"


# ------------------------------------------------------------- tls:// and ssh://

REMOTE_TABLE = [
    # input, kind, raw, port, user, host
    ("tls://127.0.0.1:8443", AddressKind.TLS, b"127.0.0.1", 8443, None, "127.0.0.1"),
    ("tls://[::1]:443", AddressKind.TLS, b"::1", 443, None, "::1"),
    ("tls://example.org:1", AddressKind.TLS, b"example.org", 1, None, "example.org"),
    ("ssh://db1/run/app.sock", AddressKind.SSH, b"/run/app.sock", None, None, "db1"),
    ("ssh://alice@db1/run/app.sock", AddressKind.SSH, b"/run/app.sock", None, "alice", "db1"),
    ("ssh://root@127.0.0.1:2222/tmp/x.sock", AddressKind.SSH, b"/tmp/x.sock", 2222, "root",
     "127.0.0.1"),
    ("ssh://[::1]:22/tmp/x.sock", AddressKind.SSH, b"/tmp/x.sock", 22, None, "::1"),
    ("ssh://bob@[fe80::1]/s", AddressKind.SSH, b"/s", None, "bob", "fe80::1"),
    ("ssh://ad@corp@jump-host.lan/run/a b.sock", AddressKind.SSH, b"/run/a b.sock", None,
     "ad@corp", "jump-host.lan"),
    ("ssh://db1//run/app.sock", AddressKind.SSH, b"//run/app.sock", None, None, "db1"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "kind", "raw", "port", "user", "host"), REMOTE_TABLE)
def test_remote_table(
    value: str, kind: AddressKind, raw: bytes, port: int | None, user: str | None, host: str
) -> None:
    addr = Address.parse(value)
    assert (addr.kind, addr.raw, addr.port, addr.user, addr.host) == (kind, raw, port, user, host)
    assert str(addr) == value  # written forms round-trip exactly
    assert Address.parse(str(addr)) == addr
    assert addr.is_remote and not addr.is_unix
    assert addr.filesystem_path is None  # the far path is not a file of this host


@pytest.mark.parametrize(
    ("value", "err", "words"),
    [
        ("tls://host", errno.EINVAL, "malformed TLS address 'tls://host': write tls://HOST:PORT"),
        ("tls://host:x", errno.EINVAL, "port 'x' is not a number"),
        ("tls://[::1:80", errno.EINVAL, "tls://[::1]:PORT"),
        ("ssh://db1", errno.EINVAL, "needs the far socket's path"),
        ("ssh://db1/", errno.EINVAL, "needs the far socket's absolute path"),
        ("ssh:///run/a.sock", errno.EINVAL, "no host"),
        ("ssh://@db1/run/a.sock", errno.EINVAL, "empty user name"),
        ("ssh://db1:/run/a.sock", errno.EINVAL, "port '' is not a number"),
        ("ssh://db1:ssh/run/a.sock", errno.EINVAL, "port 'ssh' is not a number"),
        ("ssh://db1:0/run/a.sock", errno.EINVAL, "out of range 1-65535"),
        ("ssh://db1:65536/run/a.sock", errno.EINVAL, "out of range 1-65535"),
        ("ssh://::1/run/a.sock", errno.EINVAL, "port ':1' is not a number"),
        ("ssh://[::1/run/a.sock", errno.EINVAL, "ssh://[::1]:PORT/path"),
        ("ssh://[db1]/run/a.sock", errno.EINVAL, "malformed IPv6 host 'db1'"),
        ("ssh://[::1]x/run/a.sock", errno.EINVAL, "ssh://[::1]:PORT/path"),
        ("ssh://db1/@app", errno.EAFNOSUPPORT, "OpenSSH forwards only pathname sockets"),
        ("ssh://-oProxyCommand=sh/x", errno.EINVAL, "ssh would read it as an option"),
        ("ssh://-l@db1/x", errno.EINVAL, "SSH user '-l'"),
        ("ssh://db1/run/a\0b", errno.EINVAL, "NUL byte"),
        ("ssh://db\x01/x", errno.EINVAL, "SSH host"),
        ("ssh://db1/" + "p" * 108, errno.ENAMETOOLONG, "far socket path is 109 bytes"),
        ("sftp://db1/x", errno.EINVAL, "ssh://[user@]host[:port]/path"),
    ],
)
def test_bad_remote_addresses_are_clear_errors(value: str, err: int, words: str) -> None:
    with pytest.raises(AddressError) as info:
        Address.parse(value)
    assert info.value.errno == err
    assert words in str(info.value)


def test_remote_kinds_family_and_sockaddr() -> None:
    tls = Address.parse("tls://[::1]:5")
    assert tls.family == socket.AF_INET6 and tls.sockaddr == ("::1", 5)
    assert Address.tls("127.0.0.1", 5) == Address.parse("tls://127.0.0.1:5")
    ssh = Address.parse("ssh://u@h:2/x.sock")
    assert ssh == Address.ssh("h", "/x.sock", user="u", port=2)
    assert ssh.family == socket.AF_UNIX  # the local end: a Unix socket to ssh
    with pytest.raises(AddressError, match="reached through ssh") as info:
        _ = ssh.sockaddr
    assert info.value.errno == errno.EAFNOSUPPORT
    with pytest.raises(AddressError, match="absolute path"):
        Address.ssh("h", "relative.sock")
    assert not Address.parse("/x").is_remote and Address.parse("tcp://h:1").is_remote
