"""The audit log's bounds: line size whatever the fields, per-uid refusal budget, lost lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afunix.broker.audit import MAX_LINE, MAX_SHOWN, AuditLog, text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _recs(path: Path) -> list[dict[str, Any]]:
    lines = path.read_bytes().splitlines(keepends=True)
    assert all(len(line) <= MAX_LINE for line in lines), max(map(len, lines))
    return [json.loads(line) for line in lines]


def test_every_line_fits_whatever_the_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    try:
        log.record("open", reason="r" * 100_000, path=b"\xff" * 100_000)
        log.record("open", peer={"groups": list(range(65_536)), "exe": "x\udcff\n" * 5000})
        log.record("open", **{f"field{i}": "v" * 400 for i in range(200)})
        log.record("open", nested={"a": {"b": ["c" * 5000] * 50}})
    finally:
        log.close()
    recs = _recs(tmp_path / "a.jsonl")
    assert len(recs) == 4
    assert recs[0]["reason"].endswith("...(100000 chars)")
    assert recs[0]["path"].startswith("\\xff\\xff")
    assert "cut" in recs[1] or recs[1]["peer"]["groups"][-1] == "...(65536 items)"
    assert recs[2]["cut"] > MAX_LINE and recs[2]["event"] == "open"


def test_strings_are_text_whatever_they_hold() -> None:
    """Lone surrogates (os.fsdecode of bytes that are not UTF-8) come out as \\xNN."""
    assert text("/usr/bin/a\udcff\nb") == "/usr/bin/a\\xff\nb"
    assert text(b"a\xfe") == "a\\xfe"
    assert text("x" * (MAX_SHOWN + 1)) == "x" * MAX_SHOWN + f"...({MAX_SHOWN + 1} chars)"
    assert text("\ud800").encode()  # encodable, whatever the surrogate


def test_refusals_past_the_budget_are_counted_then_summed_up(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, refusal_bytes=2000, refusal_window=10.0, clock=clock)
    written = [
        log.refusal(65534, "open/denied/EACCES", "open", reason="x" * 300) for _ in range(50)
    ]
    assert 0 < sum(written) < 10 and written[0] and not written[-1]
    assert log.refusal(0, "open/denied/EACCES", "open", reason="other uid")  # its own budget
    log.record("open", decision="granted")  # grants are never budgeted
    assert not [r for r in _recs(path) if r["event"] == "suppressed"]
    clock.now += 10.0  # the window is over: the next line brings the summary
    assert log.refusal(65534, "open/limited/EAGAIN", "open", reason="new window")
    recs = _recs(path)
    [summary] = [r for r in recs if r["event"] == "suppressed"]
    assert summary["peer"] == {"uid": 65534}
    assert summary["counts"] == {"open/denied/EACCES": 50 - sum(written)}
    assert summary["lines"] == 50 - sum(written) == log.suppressed
    assert recs[-1]["reason"] == "new window"
    again = [log.refusal(65534, "open/limited/EAGAIN", "open", reason="y" * 300) for _ in range(50)]
    log.close()  # the open window's summary too
    last = _recs(path)[-1]
    assert last["event"] == "suppressed"
    assert last["counts"] == {"open/limited/EAGAIN": 50 - sum(again)}


def test_a_line_that_cannot_be_written_is_counted_and_reported(tmp_path: Path) -> None:
    """On /dev/full every write fails (ENOSPC): the count of lost lines is kept."""
    log = AuditLog("/dev/full")
    try:
        for _ in range(3):
            try:
                log.record("open", decision="granted")
            except OSError as exc:
                assert exc.errno == 28
        assert log.lost == 3 and log.lines == 0
    finally:
        log.close()
