"""The command line under hostile or careless use (issue 15, items 15-18).

* ``afunix load`` with requests larger than the socket buffers, and against
  servers that never answer: it reads while it writes, and ``--duration``
  (``--timeout`` with ``--hold``) bounds the run whatever the server does.
* ``afunix serve --show-creds`` / ``--show-fds`` whose standard output reader
  has gone: one line on standard error, no more printing, every client still
  served; only a peer policy refuses a client.
* ``afunix connect --type dgram`` against a server that does not answer: an
  error and exit status ETIMEDOUT after ``--reply-timeout``, never a silent 0.
* Every numeric option of every command refuses negative (and, where they make
  no sense, zero, nan and infinite) values as a usage error: exit status 2 and
  a message saying what is allowed. A test walks the parser so that an option
  added later with a bare ``int``/``float`` type fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from afunix.cli import build_parser
from afunix.cli._common import count_arg, id_arg, mode_arg, seconds_arg
from afunix.cli.bench import size_arg

from ..conftest import NOBODY, afunix_cmd, serving, wait_for_path


def afunix(
    *args: str, data: bytes = b"", timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        afunix_cmd(*args), input=data, capture_output=True, timeout=timeout, check=False
    )


@contextmanager
def mute_listener(path: str) -> Iterator[list[socket.socket]]:
    """A stream server that accepts every connection and never reads or writes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(0.05)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)

    t = threading.Thread(target=accept)
    t.start()
    try:
        yield held
    finally:
        stop.set()
        t.join(10)
        for conn in held:
            conn.close()
        listener.close()


# ------------------------------------------------------------------ item 15: load
@pytest.mark.parametrize("model", ["async", "thread", "fork"])
def test_load_with_requests_larger_than_the_socket_buffers_ends_on_time(
    sockdir: Path, model: str
) -> None:
    """1 MB requests used to deadlock with the echo server (both blocked in send)."""
    path = str(sockdir / "big.sock")
    with serving(sockdir, path, "--model", model):
        started = time.monotonic()
        result = afunix(
            "load", path, "--size", "1000000", "--duration", "2", "--clients", "4", "--json"
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == {}
    assert report["requests"] > 0  # whole megabyte echoes came back
    assert 0 <= report["unfinished"] <= 4
    assert report["latency_us"]["p50"] > 0
    assert 2 <= report["duration_s"] < 3
    assert elapsed < 15  # start-up plus the 2 s, even with both CPUs busy


def test_load_exactly_as_reported_finishes_and_reports(sockdir: Path) -> None:
    """`afunix load --size 1000000 --duration 2` (100 clients) against `afunix serve`."""
    path = str(sockdir / "as-reported.sock")
    with serving(sockdir, path):
        started = time.monotonic()
        result = afunix("load", path, "--size", "1000000", "--duration", "2", "--json")
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["clients"], report["errors"]) == (100, {})
    assert report["requests"] > 0
    assert report["requests"] + report["unfinished"] >= 100  # every client got going
    assert elapsed < 20


def test_load_against_a_server_that_never_reads_ends_at_its_deadline(sockdir: Path) -> None:
    path = str(sockdir / "mute.sock")
    with mute_listener(path):
        started = time.monotonic()
        result = afunix(
            "load", path, "--size", "1000000", "--duration", "1", "--clients", "3", "--json"
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    report = json.loads(result.stdout)  # valid JSON: no NaN for the empty percentiles
    assert (report["requests"], report["errors"], report["unfinished"]) == (0, {}, 3)
    assert report["latency_us"]["p50"] is None
    assert elapsed < 12
    assert b"no echo came back from " + path.encode() + b" within 1s" in result.stderr


def test_load_hold_bounds_opening_and_checking_by_its_timeout(sockdir: Path) -> None:
    path = str(sockdir / "hold.sock")
    with mute_listener(path):
        started = time.monotonic()
        result = afunix(
            "load", path, "--hold", "3", "--duration", "0.2", "--timeout", "0.5", "--json"
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["errors"] == {"ETIMEDOUT": 3}  # connected, but the echo never came
    assert report["requests"] == 0
    assert elapsed < 12


# ----------------------------------------------------- item 16: serve's stdout gone
@contextmanager
def serve_into_a_pipe(
    sockdir: Path, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], BinaryIO]]:
    """``afunix serve`` with standard output a pipe; yields the process and the read end."""
    log = sockdir / "serve.log"
    r, w = os.pipe()
    reader = os.fdopen(r, "rb", buffering=0)
    try:
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                afunix_cmd("serve", *args), stdin=subprocess.DEVNULL, stdout=w, stderr=err
            )
    finally:
        os.close(w)
    try:
        deadline = time.monotonic() + 10
        while b"serving" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        yield proc, reader
    finally:
        reader.close()  # if the test has not
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            proc.kill()
            proc.wait()


def read_line(reader: BinaryIO) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = reader.read(1)
        assert chunk, line
        line += chunk
    return line


@pytest.mark.parametrize(
    ("model", "sock_type"),
    [
        ("async", "stream"),
        ("thread", "stream"),
        ("fork", "stream"),
        ("async", "seqpacket"),
        ("thread", "dgram"),
        ("async", "dgram"),
    ],
)
def test_show_creds_keeps_answering_when_its_stdout_reader_is_gone(
    sockdir: Path, model: str, sock_type: str
) -> None:
    path = str(sockdir / "c.sock")
    args = (path, "--show-creds", "--model", model, "--type", sock_type)
    with serve_into_a_pipe(sockdir, *args) as (proc, r):
        first = afunix("creds", path, "--type", sock_type, "--json")
        assert first.returncode == 0, first.stderr
        assert read_line(r).startswith(b"peer: pid=")  # printing works while read
        r.close()  # the reader goes away (a pager quit, `| head` exited)
        for _ in range(5):
            result = afunix("creds", path, "--type", sock_type, "--json")
            assert result.returncode == 0, result.stderr  # not "refused"
            assert json.loads(result.stdout)["policy"] is None
        echo = afunix("connect", path, "--type", sock_type, data=b"still echoing\n")
        assert (echo.returncode, echo.stdout) == (0, b"still echoing\n"), echo.stderr
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    lines = (sockdir / "serve.log").read_text().splitlines()
    broken = [line for line in lines if "standard output" in line]
    # One line, even with a process per client (fork model).
    assert broken == [
        "afunix serve: cannot write to standard output (Broken pipe [EPIPE]); "
        "no longer printing, still serving"
    ], lines
    assert not [line for line in lines if "Exception ignored" in line or "Traceback" in line]


def test_show_creds_with_stdout_closed_from_the_start(sockdir: Path) -> None:
    """Started with standard output closed (``>&-``): serve and say so once."""
    path = str(sockdir / "closed.sock")
    log = sockdir / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["sh", "-c", 'exec "$@" >&-', "sh", *afunix_cmd("serve", path, "--show-creds")],
            stdin=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for_path(path)
        for _ in range(2):
            result = afunix("creds", path, "--json")
            assert result.returncode == 0, result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    text = log.read_text()
    assert text.count("cannot write to standard output") == 1, text
    assert "[EBADF]" in text


def test_only_a_policy_refusal_is_reported_as_refused(sockdir: Path) -> None:
    """With a policy and no stdout reader: root is answered, nobody refused and logged."""
    path = str(sockdir / "p.sock")
    with serve_into_a_pipe(sockdir, path, "--show-creds", "--allow-uid", "0", "--mode", "666") as (
        proc,
        r,
    ):
        r.close()
        ok = afunix("creds", path, "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["policy"] == "uid 0 (root) is allowed"
        refused = subprocess.run(
            [*NOBODY, *afunix_cmd("creds", path)], capture_output=True, timeout=30, check=False
        )
        assert refused.returncode == 77  # EX_NOPERM
        assert b"closed the connection without a report" in refused.stderr
        assert proc.poll() is None
    text = (sockdir / "serve.log").read_text()
    assert text.count("refused connection from") == 1, text
    assert "uid 65534" in text


def test_show_fds_keeps_serving_when_its_stdout_reader_is_gone(sockdir: Path) -> None:
    path = str(sockdir / "fds.sock")
    with serve_into_a_pipe(sockdir, path, "--show-fds") as (proc, r):
        sent = afunix("send-fds", path, "/etc/hostname", "-q")
        assert sent.returncode == 0, sent.stderr
        assert read_line(r).startswith(b"message 1 from ")
        r.close()
        for _ in range(3):
            sent = afunix("send-fds", path, "/etc/hostname", "-q")
            assert sent.returncode == 0, sent.stderr
        assert proc.poll() is None  # used to die with exit 141, silently
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    text = (sockdir / "serve.log").read_text()
    assert text.count("cannot write to standard output (Broken pipe [EPIPE])") == 1, text


# ------------------------------------------------ item 17: connect --type dgram
@contextmanager
def datagram_server(path: str, answer: int) -> Iterator[None]:
    """A datagram server that echoes the first *answer* datagrams, then falls silent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    stop = threading.Event()

    def run() -> None:
        answered = 0
        while not stop.is_set():
            try:
                data, sender = sock.recvfrom(65536)
            except TimeoutError:
                continue
            if answered < answer:
                sock.sendto(data, sender)
                answered += 1

    t = threading.Thread(target=run)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)
        sock.close()


def test_datagram_connect_fails_when_no_reply_comes(sockdir: Path) -> None:
    """The default --reply-timeout (5 s): the old code exited 0 here, silently."""
    path = str(sockdir / "silent.sock")
    with datagram_server(path, answer=0):
        started = time.monotonic()
        result = afunix("connect", path, "--type", "dgram", data=b"a\nb\n")
        elapsed = time.monotonic() - started
    assert result.returncode == 75, result.stderr  # EX_TEMPFAIL (ETIMEDOUT)
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert lines == [
        f"afunix: error: no reply from the server at {path} to datagram 1 (of 2 sent, "
        "0 answered) within 5s: it dropped the datagram or does not answer; "
        "--reply-timeout S waits longer [ETIMEDOUT]"
    ]
    assert 5 <= elapsed < 20


def test_datagram_connect_names_the_first_unanswered_datagram(sockdir: Path) -> None:
    path = str(sockdir / "half.sock")
    with datagram_server(path, answer=1):
        result = afunix(
            "connect", path, "--type", "dgram", "--reply-timeout", "0.5", data=b"one\ntwo\n"
        )
    assert result.returncode == 75  # EX_TEMPFAIL (ETIMEDOUT)
    assert result.stdout == b"one\n"  # the reply that came is still printed
    assert b"to datagram 2 (of 2 sent, 1 answered) within 0.5s" in result.stderr


def test_datagram_connect_waits_for_a_slow_reply_within_the_timeout(sockdir: Path) -> None:
    path = str(sockdir / "slow.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    with (
        sock,
        subprocess.Popen(
            afunix_cmd("connect", path, "--type", "dgram", "--reply-timeout", "20"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(b"late\n")
            proc.stdin.close()
            sock.settimeout(10)
            data, sender = sock.recvfrom(100)
            time.sleep(1)  # the reply is late on purpose, well within --reply-timeout
            sock.sendto(data, sender)
            assert proc.wait(20) == 0, proc.stderr.read()
            assert proc.stdout.read() == b"late\n"
        finally:
            if proc.poll() is None:
                proc.kill()


# --------------------------------------------------- item 18: numeric options
POSITIVE_SECONDS = ["-1", "0", "nan", "inf", "-inf", "1e10"]
NONNEGATIVE_SECONDS = ["-1", "-0.5", "nan", "inf"]
AT_LEAST_1 = ["-1", "0", "1.5", "nan"]
AT_LEAST_0 = ["-1", "nan"]
IDS = ["-1", "4294967295", "nan"]
MODES = ["-1", "8", "nan"]
SIZES = ["-1", "0", "nan"]

P = "/tmp/afx-not-used.sock"
# (command and positionals, option, values refused): every numeric option of every command.
NUMERIC: list[tuple[list[str], str, list[str]]] = [
    (["serve", P], "--backlog", AT_LEAST_1),
    (["serve", P], "--max-clients", AT_LEAST_1),
    (["serve", P], "--shutdown-timeout", NONNEGATIVE_SECONDS),
    (["serve", P], "--idle-timeout", POSITIVE_SECONDS),
    (["serve", P], "--send-timeout", POSITIVE_SECONDS),
    (["serve", P], "--nofile", AT_LEAST_1),
    (["serve", P], "--allow-uid", IDS),
    (["serve", P], "--allow-gid", IDS),
    (["serve", P], "--mode", MODES),
    (["serve", P], "--parent-mode", MODES),
    (["connect", P], "--timeout", POSITIVE_SECONDS),
    (["connect", P], "--retries", AT_LEAST_0),
    (["connect", P], "--linger", NONNEGATIVE_SECONDS),
    (["connect", P], "--reply-timeout", POSITIVE_SECONDS),
    (["dial-stdio", P], "--timeout", POSITIVE_SECONDS),
    (["creds", P], "--timeout", POSITIVE_SECONDS),
    (["creds", P], "--claim-pid", ["-1", "2147483648", "nan"]),
    (["creds", P], "--claim-uid", IDS),
    (["creds", P], "--claim-gid", IDS),
    (["load", P], "--clients", AT_LEAST_1),
    (["load", P], "--duration", POSITIVE_SECONDS),
    (["load", P], "--size", [*AT_LEAST_1, str((64 << 20) + 1)]),
    (["load", P], "--hold", AT_LEAST_1),
    (["load", P], "--timeout", POSITIVE_SECONDS),
    (["load", P], "--server-pid", AT_LEAST_1),
    (["bench"], "--rounds", AT_LEAST_1),
    (["bench"], "--seconds", POSITIVE_SECONDS),
    (["bench"], "--max-size", SIZES),
    (["open", P], "--mode", MODES),
    (["open", P], "--timeout", POSITIVE_SECONDS),
    (["pair"], "--rounds", AT_LEAST_1),
    (["bind", P], "--mode", MODES),
    (["broker"], "--mode", MODES),
    (["spy", P, P], "--backlog", AT_LEAST_1),
    (["spy", P, P], "--preview", [*AT_LEAST_0, "65537"]),
    (["spy", P, P], "--mode", MODES),
    (["ls"], "--pid", AT_LEAST_1),
]
# Positional numbers (the book's openfile SOCKFD PATH MODE [PERM]).
POSITIONAL: list[tuple[list[str], str, list[str]]] = [
    (["openfile", "--", "{}", "/etc/hostname", "0"], "SOCKFD", AT_LEAST_0),
    (["openfile", "--", "3", "/etc/hostname", "{}"], "MODE", AT_LEAST_0),
    (["openfile", "--", "3", "/etc/hostname", "0", "{}"], "PERM", MODES),
]
NUMERIC_TYPES = {"seconds", "count", "mode_arg", "size_arg"}


def _refuses(
    argv: list[str], name: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert f"usage: afunix {argv[0]}" in err
    assert f"argument {name}: " in err
    return exit_info.value.code, err.splitlines()[-1]


@pytest.mark.parametrize(
    ("head", "option", "value"),
    [(head, option, value) for head, option, values in NUMERIC for value in values],
)
def test_a_bad_number_is_a_usage_error_that_says_what_is_allowed(
    head: list[str], option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _refuses([*head, f"{option}={value}"], option, capsys)
    assert code == 2
    assert line.startswith(f"afunix {head[0]}: error: argument {option}: ")
    if "mode" not in option and option != "--max-size":
        assert f"{value} is not allowed: give " in line or f"{value} is too long" in line, line
        assert (" from " in line) or (" above " in line) or ("at most" in line), line


@pytest.mark.parametrize(
    ("argv", "name", "value"),
    [(argv, name, value) for argv, name, values in POSITIONAL for value in values],
)
def test_a_bad_positional_number_is_a_usage_error(
    argv: list[str], name: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _refuses([a.format(value) for a in argv], name, capsys)
    assert code == 2
    assert line.startswith(f"afunix openfile: error: argument {name}: "), line


def test_every_numeric_option_is_in_the_table_and_none_takes_a_bare_int_or_float() -> None:
    """The audit, enforced: a new numeric option must use a checked type and join the table."""
    listed = {(head[0], option) for head, option, _ in NUMERIC}
    listed |= {("openfile", name) for _, name, _ in POSITIONAL}
    found = set()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, cmd_parser in sub.choices.items():
        for action in cmd_parser._actions:
            kind = action.type
            assert kind not in (int, float), (command, action.dest)
            if kind is not None and getattr(kind, "__name__", "") in NUMERIC_TYPES:
                name = action.option_strings[0] if action.option_strings else action.metavar
                found.add((command, name))
    assert found == listed


@pytest.mark.parametrize(
    ("argv", "dest", "want"),
    [
        (["serve", P, "--shutdown-timeout=0"], "shutdown_timeout", 0.0),
        (["serve", P, "--idle-timeout=0.25"], "idle_timeout", 0.25),
        (["serve", P, "--backlog=1"], "backlog", 1),
        (["serve", P, "--allow-uid=4294967294"], "allow_uid", [4294967294]),
        (["connect", P, "--retries=0"], "retries", 0),
        (["connect", P, "--linger=0"], "linger", 0.0),
        (["load", P, "--size", str(64 << 20)], "size", 64 << 20),
        (["creds", P, "--claim-pid", "0"], "claim_pid", 0),
        (["bench", "--max-size=64K"], "max_size", 65536),
        (["openfile", "0", "/etc/hostname", "0", "600"], "perm", 0o600),
    ],
)
def test_the_edges_of_what_is_allowed_are_accepted(
    argv: list[str], dest: str, want: object
) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == want


def test_the_argument_types_themselves() -> None:
    assert seconds_arg()("1e-3") == 0.001
    assert seconds_arg(zero=True)("0") == 0.0
    assert count_arg(0)("0") == 0
    assert id_arg("a user id")("0") == 0
    assert mode_arg("0o640") == 0o640
    assert size_arg("1M") == 1 << 20
    for bad in ("", " ", "1_0x", "0x10"):
        with pytest.raises(argparse.ArgumentTypeError):
            count_arg()(bad)
        with pytest.raises(argparse.ArgumentTypeError):
            seconds_arg()(bad)


def test_serve_with_a_negative_idle_timeout_exits_2_without_serving(sockdir: Path) -> None:
    """The reported case, as a user runs it: it used to serve and drop every client."""
    path = sockdir / "neg.sock"
    result = afunix("serve", str(path), "--idle-timeout", "-1", timeout=15)
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().splitlines()[-1] == (
        "afunix serve: error: argument --idle-timeout: -1 is not allowed: give a number of "
        "seconds above 0, at most 31536000 (such as 0.5 or 30)"
    )
    assert not path.exists()
