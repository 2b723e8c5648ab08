"""Command-line conventions: exit statuses, ``--json`` schemas, ``--version``,
``--debug`` anywhere, shell completion, progress and ``NO_COLOR``.

Every exit status of the table in docs/operations.md is produced here by a
real situation (a missing socket, a stale one, a socket only root may use
tried as uid 65534, a datagram server that never answers, ...), except 70
(internal error), which needs a bug and is injected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afunix import __core__, __version__
from afunix.cli import build_parser
from afunix.cli._common import EXIT_STATUSES, json_text, run, strict_json

from ..conftest import NOBODY, afunix_cmd, serving
from ..security.broker_support import BrokerProcess, Tree, broker, tree

__all__ = ["broker", "tree"]  # fixtures, used by their names


def afunix(
    *args: str, data: bytes = b"", prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*prefix, *afunix_cmd(*args)],
        input=data,
        capture_output=True,
        timeout=30,
        check=False,
        cwd="/",
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The error contract: nothing on stdout, one ``afunix: error:`` line on stderr."""
    assert result.stdout == b""
    lines = result.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("afunix: error: "), lines
    return lines[0]


# ------------------------------------------------------------------ exit statuses


def test_the_table_has_each_status_once_and_no_raw_errno_collisions() -> None:
    statuses = [status for status, _, _ in EXIT_STATUSES]
    assert len(statuses) == len(set(statuses))
    assert 64 not in statuses  # EX_USAGE: usage errors are 2, as argparse makes them
    assert set(statuses) == {0, 1, 2, 65, 66, 69, 70, 73, 74, 75, 77, 78, 130, 141}


def test_status_0_success(sockdir: Path) -> None:
    result = afunix("bind", str(sockdir / "ok.sock"), "--remove")
    assert result.returncode == 0, result.stderr


def test_status_1_a_commands_own_failure(tmp_path: Path) -> None:
    result = afunix("cat", str(tmp_path / "missing"))
    assert result.returncode == 1


def test_status_2_usage_error_from_argparse() -> None:
    result = afunix("connect")
    assert result.returncode == 2
    assert b"usage: afunix connect" in result.stderr


def test_status_2_a_path_too_long_is_a_usage_error_in_one_line(sockdir: Path) -> None:
    result = afunix("connect", str(sockdir / ("x" * 120)))
    assert result.returncode == 2  # it was ENAMETOOLONG (36) before
    assert "[ENAMETOOLONG]" in one_error_line(result)


def test_status_2_open_without_a_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AFUNIX_BROKER"}
    result = afunix("open", str(tmp_path / "x"), env=env)
    assert result.returncode == 2  # it was EINVAL (22) before
    assert "--broker" in one_error_line(result)


def test_status_65_the_peer_broke_the_protocol(sockdir: Path) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path):
        result = afunix("creds", path)  # an echo server sends the request back
    assert result.returncode == 65  # EPROTO (71) before
    assert "echoed the request back" in one_error_line(result)


def test_status_66_an_input_file_is_missing(sockdir: Path) -> None:
    result = afunix("send-fds", str(sockdir / "x.sock"), str(sockdir / "missing"))
    assert result.returncode == 66  # ENOENT (2), "usage", before
    assert str(sockdir / "missing") in one_error_line(result)


def test_status_69_no_such_socket(sockdir: Path) -> None:
    result = afunix("connect", str(sockdir / "missing.sock"))
    assert result.returncode == 69  # ENOENT (2) before: the same as a usage error
    assert "no such socket" in one_error_line(result)


def test_status_69_stale_socket(sockdir: Path) -> None:
    path = str(sockdir / "stale.sock")
    assert afunix("bind", path).returncode == 0  # leaves the file, nobody listening
    result = afunix("connect", path)
    assert result.returncode == 69  # ECONNREFUSED (111) before
    assert "nothing is listening there" in one_error_line(result)


def test_status_73_address_in_use(sockdir: Path) -> None:
    path = str(sockdir / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        result = afunix("bind", path)
    assert result.returncode == 73  # EADDRINUSE (98) before
    assert path in one_error_line(result)


def test_status_73_a_file_in_the_way_or_no_directory(sockdir: Path) -> None:
    (sockdir / "file").write_text("not a socket\n")
    result = afunix("bind", str(sockdir / "file"))
    assert result.returncode == 73  # EEXIST (17) before
    assert "not a socket" in one_error_line(result)
    result = afunix("serve", str(sockdir / "no" / "x.sock"))
    assert result.returncode == 73  # ENOENT (2) before
    assert "the directory does not exist" in one_error_line(result)


# 74 (I/O error: the server hangs up with input unread) is
# tests/integration/test_cli.py::test_connect_reports_a_server_that_hangs_up_mid_input.


def test_status_75_timed_out(sockdir: Path) -> None:
    path = str(sockdir / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as silent:
        silent.bind(path)
        result = afunix("connect", path, "--type", "dgram", "--reply-timeout", "0.3", data=b"a\n")
    assert result.returncode == 75  # ETIMEDOUT (110) before
    assert "[ETIMEDOUT]" in one_error_line(result)


def test_status_77_permission_denied_as_nobody(sockdir: Path) -> None:
    path = str(sockdir / "root-only.sock")
    with socket.socket(socket.AF_UNIX) as private:
        private.bind(path)
        os.chmod(path, 0o600)
        private.listen()
        result = afunix("connect", path, prefix=tuple(NOBODY))
    assert result.returncode == 77  # EACCES (13) before
    assert "[EACCES]" in one_error_line(result)


def test_status_78_an_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text("version = 1\n[[rule]]\nroot = '/'\nallow = ['read']\n")
    result = afunix("broker", "--check", str(policy))
    assert result.returncode == 78  # EINVAL (22) before
    assert "invalid policy" in one_error_line(result)


def test_status_141_standard_output_closed(sockdir: Path) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path):
        proc = subprocess.Popen(
            afunix_cmd("connect", path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.close()  # before any reply can exist: the reply's write fails
        _, err = proc.communicate(b"hello\n", timeout=30)
    assert proc.returncode == 141
    assert err == b""


# A parent that runs this suite in the background (a shell's `cmd &`) ignores SIGINT,
# and an ignored signal stays ignored across exec: Python then installs no
# KeyboardInterrupt handler. The test is about Ctrl-C reaching a normal afunix, so the
# command is started through this, which puts SIGINT back to its default first.
_SIGINT_AT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def test_status_130_interrupted(sockdir: Path) -> None:
    """Ctrl-C (SIGINT) once the client is connected: 130, no traceback."""
    path = str(sockdir / "quiet.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGINT_AT_DEFAULT, *afunix_cmd("connect", path)[1:]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            listener.settimeout(30)
            conn, _ = listener.accept()  # the client is connected and waiting: interrupt it
            with conn:
                # stdin stays open (communicate() would close it: an end of input that a
                # busy client may read, and exit 0 on, before it handles the signal)
                proc.send_signal(signal.SIGINT)
                proc.wait(30)
            assert proc.stdout is not None and proc.stderr is not None
            out, err = proc.stdout.read(), proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    assert proc.returncode == 130
    assert (out, b"Traceback" in err) == (b"", False)


def test_status_70_internal_error_is_one_line_that_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bug (here injected: a command raising RuntimeError) is 70, not a traceback."""

    def buggy(args: argparse.Namespace) -> int:
        raise RuntimeError("cannot happen")

    assert run(argparse.Namespace(func=buggy, debug=False)) == 70
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "afunix: error: internal error: RuntimeError: cannot happen (a bug in afunix: run "
        "again with --debug for the traceback and report it)"
    ]


def test_openfile_keeps_the_books_convention(tmp_path: Path) -> None:
    """``openfile`` exits with the errno itself (UNP's openfile): ENOENT is 2 there."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = subprocess.run(
            afunix_cmd("openfile", str(theirs.fileno()), str(tmp_path / "nope"), "0"),
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2  # errno.ENOENT


def test_help_lists_the_table() -> None:
    text = " ".join(afunix("--help").stdout.decode().split())
    for status, label, _ in EXIT_STATUSES:
        assert f"{status} {label}" in text
    assert "openfile exits with the errno" in text


def test_docs_list_the_table() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    for status, label, _ in EXIT_STATUSES:
        assert re.search(rf"^\| {status} \| {re.escape(label)} \|", docs, re.M), (status, label)


# ---------------------------------------------------------------- --debug, --version


def test_debug_after_the_command(sockdir: Path) -> None:
    path = str(sockdir / "missing.sock")
    plain = afunix("connect", path)
    for argv in (("--debug", "connect", path), ("connect", path, "--debug")):
        debug = afunix(*argv)
        assert debug.returncode == plain.returncode == 69
        text = debug.stderr.decode()
        assert text.startswith("Traceback (most recent call last):"), argv
        assert text.splitlines()[-1] == one_error_line(plain)


def test_version() -> None:
    result = afunix("--version")
    assert result.returncode == 0
    assert result.stdout.decode().splitlines() == [
        f"afunix {__version__}",
        f"core: {__core__}",
        f"python: {platform.python_implementation()} {platform.python_version()}",
        f"platform: {platform.platform()}",
    ]


# ------------------------------------------------------------------ JSON schemas


def strict_loads(text: bytes) -> Any:
    """Parse JSON and fail on NaN/Infinity, which Python's json accepts by default."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def check(obj: dict[str, Any], command: str, fields: dict[str, Any]) -> None:
    """*obj* has exactly *fields* (name -> type or tuple of types), schema first."""
    assert next(iter(obj)) == "schema"
    assert obj["schema"] == f"afunix.{command}/1"
    assert set(obj) == {"schema", *fields}, set(obj) ^ {"schema", *fields}
    for name, kind in fields.items():
        assert isinstance(obj[name], kind), (name, obj[name])
        if isinstance(obj[name], bool):
            assert bool in (kind if isinstance(kind, tuple) else (kind,)), name


NUM = (int, float)
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))


def test_json_bind(sockdir: Path) -> None:
    result = afunix("bind", str(sockdir / "j.sock"), "--json", "--remove")
    obj = strict_loads(result.stdout)
    check(
        obj,
        "bind",
        {"name": str, "kind": str, "type": str, "len": int, "mode": OPT_STR, "removed": bool},
    )


def test_json_connect(sockdir: Path) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path, "--type", "seqpacket"):
        result = afunix("connect", path, "--type", "seqpacket", "--json", data=b"one\ntwo\n")
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(
        obj,
        "connect",
        {
            "address": str,
            "type": str,
            "sent": int,
            "received": int,
            "received_bytes": int,
            "replies": list,
        },
    )
    assert obj["replies"] == ["one\n", "two\n"] and obj["sent"] == obj["received"] == 2


CREDS_FIELDS: dict[str, Any] = {
    "version": int,
    "mechanism": str,
    "pid": OPT_INT,
    "uid": int,
    "user": OPT_STR,
    "gid": int,
    "group": OPT_STR,
    "groups": (list, type(None)),
    "pidfd": bool,
    "exe": OPT_STR,
    "cmdline": (list, type(None)),
    "cgroup": OPT_STR,
    "verified": bool,
    "policy": OPT_STR,
    "server_pid": int,
}


def test_json_creds(sockdir: Path) -> None:
    path = str(sockdir / "creds.sock")
    with serving(sockdir, path, "--show-creds"):
        result = afunix("creds", path, "--json")
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(obj, "creds", CREDS_FIELDS)
    assert obj["uid"] == os.getuid()


LOAD_BUSY: dict[str, Any] = {
    "mode": str,
    "clients": int,
    "duration_s": NUM,
    "requests": int,
    "errors": dict,
    "unfinished": int,
    "requests_per_s": (*NUM, type(None)),
    "latency_us": dict,
}


def test_json_load_busy(sockdir: Path) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path):
        result = afunix("load", path, "--clients", "2", "--duration", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(obj, "load", LOAD_BUSY)
    assert set(obj["latency_us"]) == {"p50", "p90", "p99", "p99.9", "max"}
    assert all(isinstance(v, NUM) for v in obj["latency_us"].values())


def test_json_load_when_nothing_comes_back_has_null_not_nan(sockdir: Path) -> None:
    """A server that accepts and never answers: no latency to report, null not NaN."""
    path = str(sockdir / "mute.sock")
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen(16)
        result = afunix("load", path, "--clients", "2", "--duration", "0.3", "--json")
    assert result.returncode == 1  # load's own status: no request completed
    obj = strict_loads(result.stdout)
    check(obj, "load", LOAD_BUSY)
    assert obj["requests"] == 0
    assert obj["latency_us"]["p50"] is None


def test_json_load_hold(sockdir: Path) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path) as server:
        result = afunix(
            "load", path, "--hold", "3", "--duration", "0.2", "--server-pid", str(server.pid),
            "--json",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(
        obj,
        "load",
        {
            "mode": str,
            "clients": int,
            "duration_s": NUM,
            "requests": int,
            "errors": dict,
            "held": int,
            "server_rss_kib": dict,
            "server_kib_per_connection": NUM,
        },
    )
    assert obj["held"] == 3


def test_json_send_fds(sockdir: Path, tmp_path: Path) -> None:
    path = str(sockdir / "echo.sock")
    text = tmp_path / "f.txt"
    text.write_text("hello\n")
    with serving(sockdir, path):
        result = afunix("send-fds", path, str(text), "--json")
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(obj, "send-fds", {"address": str, "type": str, "payload_bytes": int, "descriptors": list})
    [fd] = obj["descriptors"]
    assert set(fd) == {"spec", "kind", "target", "inode", "mode"}
    assert (fd["spec"], fd["kind"], fd["target"]) == (str(text), "regular file", str(text))
    assert isinstance(fd["inode"], int) and isinstance(fd["mode"], str)


def test_json_broker_check(tree: Tree) -> None:
    result = afunix("broker", "--check", str(tree.policy), "--json")
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(obj, "broker-check", {"file": str, "valid": bool, "default": str, "rules": list})
    assert [r["name"] for r in obj["rules"]] == ["data", "drop box"]
    for rule in obj["rules"]:
        assert set(rule) == {"name", "line", "root", "allow", "description"}
        assert isinstance(rule["line"], int) and isinstance(rule["allow"], list)


def test_json_open(tree: Tree, broker: BrokerProcess) -> None:
    result = afunix("open", "--broker", str(tree.sock), str(tree.root / "pub.txt"), "--json")
    assert result.returncode == 0, result.stderr
    obj = strict_loads(result.stdout)
    check(
        obj,
        "open",
        {
            "path": str,
            "kind": str,
            "access": str,
            "inode": int,
            "device": int,
            "size": int,
            "mode": str,
            "uid": int,
            "gid": int,
        },
    )
    assert (obj["kind"], obj["access"], obj["size"]) == ("regular file", "read", 7)


def test_open_of_a_missing_file_is_no_input(tree: Tree, broker: BrokerProcess) -> None:
    result = afunix("open", "--broker", str(tree.sock), str(tree.root / "nope.txt"))
    assert result.returncode == 66  # ENOENT (2) before
    assert "[ENOENT]" in one_error_line(result)


def test_json_never_holds_nan() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        json_text("x", {"v": math.nan})
    assert strict_json({"a": [1.5, math.inf, {"b": -math.inf, "c": math.nan}]}) == {
        "a": [1.5, None, {"b": None, "c": None}]
    }


def test_the_json_docs_name_every_schema() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "cli-json.md").read_text()
    for name in ("bind", "connect", "creds", "load", "open", "send-fds", "broker-check"):
        assert f"`afunix.{name}/1`" in docs, name


# ------------------------------------------------------------------ completion


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def test_bash_completion_loads_and_completes_a_command(afunix_on_path: dict[str, str]) -> None:
    loaded = _bash("source <(afunix completion bash) && complete -p afunix", afunix_on_path)
    assert loaded.returncode == 0, loaded.stderr
    assert "_python_argcomplete afunix" in loaded.stdout
    words = _bash(
        "source <(afunix completion bash) && "
        'COMP_LINE="afunix comp" COMP_POINT=11 COMP_WORDS=(afunix comp) COMP_CWORD=1 && '
        '_python_argcomplete afunix comp afunix && printf "%s\\n" "${COMPREPLY[@]}"',
        afunix_on_path,
    )
    assert words.returncode == 0, words.stderr
    assert [w.strip() for w in words.stdout.splitlines()] == ["completion"]
    options = _bash(
        "source <(afunix completion bash) && "
        'COMP_LINE="afunix connect --re" COMP_POINT=19 '
        "COMP_WORDS=(afunix connect --re) COMP_CWORD=2 && "
        '_python_argcomplete afunix --re connect && printf "%s\\n" "${COMPREPLY[@]}"',
        afunix_on_path,
    )
    assert sorted(w.strip() for w in options.stdout.splitlines()) == [
        "--reply-timeout",
        "--retries",
    ]


@pytest.mark.parametrize(("shell", "marker"), [("zsh", "#compdef afunix"), ("fish", "complete")])
def test_zsh_and_fish_scripts_are_generated(shell: str, marker: str) -> None:
    result = afunix("completion", shell)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert marker in text and "afunix" in text
    if shell == "fish":
        assert "--command afunix" in text
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is required for this test (apt-get install {shell}; .ci/run does)")
    ok = subprocess.run([shell, "-n"], input=text, text=True, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr  # the shell itself parses the script


def test_every_command_accepts_debug_after_its_name() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert any("--debug" in a.option_strings for a in command._actions), name


# ------------------------------------------------------------ progress, NO_COLOR


def _run_with_pty_stderr(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run *argv* with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    out = b""
    try:
        assert proc.stdout is not None

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain)
        reader.start()
        out = proc.stdout.read()
        proc.stdout.close()
        proc.wait(30)
        reader.join(30)
    finally:
        os.close(master)
    return proc.returncode, out, b"".join(chunks)


@pytest.fixture
def term_env() -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="30")
    yield env


COLOR = re.compile(rb"\x1b\[[0-9;]*(?:3[0-8]|9[0-7])[;m]")


def test_load_shows_progress_on_a_terminal_and_stdout_stays_clean(
    sockdir: Path, term_env: dict[str, str]
) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path):
        argv = afunix_cmd("load", path, "--clients", "2", "--duration", "1", "--json")
        status, out, err = _run_with_pty_stderr(argv, term_env)
    assert status == 0, err
    assert b"2 clients" in err  # the progress bar's label
    assert COLOR.search(err)  # a colour terminal gets a coloured bar
    check(strict_loads(out), "load", LOAD_BUSY)


def test_no_color_turns_colours_off_but_keeps_the_progress(
    sockdir: Path, term_env: dict[str, str]
) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path):
        argv = afunix_cmd("load", path, "--clients", "2", "--duration", "1", "--json")
        status, _, err = _run_with_pty_stderr(argv, {**term_env, "NO_COLOR": "1"})
    assert status == 0, err
    assert b"2 clients" in err
    assert not COLOR.search(err), err[:400]


def test_no_progress_when_stderr_is_a_pipe(sockdir: Path, term_env: dict[str, str]) -> None:
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path):
        result = afunix("load", path, "--clients", "2", "--duration", "0.5", "--json", env=term_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    check(strict_loads(result.stdout), "load", LOAD_BUSY)


BENCH_SMALL = (
    "bench",
    "--quick",
    "--rounds",
    "1",
    "--seconds",
    "0.001",
    "--max-size",
    "4K",
    "--cases",
    "rtt",
    "--impls",
    "stdlib,afunix",
)
MOFN = re.compile(rb"\b\d+/\d+\b")  # rich's "done/total" column


def test_bench_shows_progress_on_a_terminal(tmp_path: Path, term_env: dict[str, str]) -> None:
    env = {**term_env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    status, out, err = _run_with_pty_stderr(afunix_cmd(*BENCH_SMALL), env)
    assert status == 0, err[-2000:]
    assert b"round-trip latency" in out  # the tables on standard output
    assert MOFN.search(err), err[-2000:]  # the bar, on the terminal only
    # It names what runs. Frames in between come 4 times a second, so a run this
    # short may show none of the "calibrating rtt ..." labels; the last frame, drawn
    # when the bar stops, always shows the last label: the case's title and round.
    assert b"round-trip latency 4096: round 1/1" in err, err[-2000:]


def test_bench_shows_no_progress_when_stderr_is_a_pipe(
    tmp_path: Path, term_env: dict[str, str]
) -> None:
    env = {**term_env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = afunix(*BENCH_SMALL, env=env)
    assert result.returncode == 0, result.stderr
    assert b"round-trip latency" in result.stdout
    assert not MOFN.search(result.stderr), result.stderr[-2000:]
