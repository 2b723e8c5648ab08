"""The audit log: one valid, bounded JSON line per record; fail-closed; rotation."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from afunix.broker.audit import AuditError, AuditLog, errno_name, text


def test_one_json_line_per_record(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    try:
        log.record("open", request={"path": text(b"/x/\xff\x00y")}, errno=errno_name(13))
        log.record("reload", reason="ok")
    finally:
        log.close()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["event"] == "open" and first["errno"] == "EACCES"
    assert first["request"]["path"] == "/x/\\xff\x00y"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert stat.S_IMODE(os.stat(tmp_path / "a.jsonl").st_mode) == 0o600


def test_text_is_bounded() -> None:
    shown = text(b"a" * 5000)
    assert shown.startswith("a" * 512) and shown.endswith("...(5000 bytes)")
    assert errno_name(0) is None and errno_name(None) is None


def test_stderr_and_nowhere(capfd: pytest.CaptureFixture[str]) -> None:
    AuditLog("-").record("start", reason="x")
    assert json.loads(capfd.readouterr().err)["event"] == "start"
    rec = AuditLog(None).record("start")
    assert rec["event"] == "start"
    assert capfd.readouterr().err == ""


def test_write_failure_raises(tmp_path: Path) -> None:
    """Fail-closed: the broker turns this into a refused request (tests/security)."""
    log = AuditLog("/dev/full")
    try:
        with pytest.raises(AuditError) as info:
            log.record("open")
        assert info.value.errno == errno.ENOSPC
    finally:
        log.close()
    with pytest.raises(AuditError, match="cannot open the audit log"):
        AuditLog(tmp_path / "missing-dir" / "a.jsonl")
    closed = AuditLog(tmp_path / "c.jsonl")
    closed.close()
    with pytest.raises(AuditError, match="closed"):
        closed.record("open")


def test_reopen_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)
    try:
        log.record("one")
        os.rename(path, tmp_path / "a.jsonl.1")
        log.record("two")  # still the old file
        log.reopen()
        log.record("three")
    finally:
        log.close()
    assert [json.loads(x)["event"] for x in (tmp_path / "a.jsonl.1").read_text().splitlines()] == [
        "one",
        "two",
    ]
    assert json.loads(path.read_text())["event"] == "three"


def test_threads_never_interleave_lines(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")

    def write(n: int) -> None:
        for i in range(200):
            log.record("open", thread=n, i=i, pad="x" * 300)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 1200
    assert all(json.loads(line)["event"] == "open" for line in lines)
    assert log.lines == 1200
