"""The state directory: claim lock, read-set, key-value state, spool; real files and processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ddsmon.errors import ConfigError
from ddsmon.state import DEFAULT_STATE_NAME, AlreadyWatched, StateDir

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------- claim
def test_default_location_is_a_dot_directory(tmp_path):
    state = StateDir.for_directory(tmp_path)
    assert state.root == tmp_path / DEFAULT_STATE_NAME
    assert state.root.name.startswith(".")
    assert not state.root.exists()  # nothing created before the first write
    state.set("k", 1)
    assert state.root.is_dir()


def test_second_claim_in_process_names_the_holder(tmp_path):
    first = StateDir.for_directory(tmp_path)
    second = StateDir.for_directory(tmp_path)
    first.claim()
    first.claim()  # idempotent for its holder
    with pytest.raises(AlreadyWatched) as info:
        second.claim()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message
    assert socket.gethostname() in message
    assert str(tmp_path) in message
    assert isinstance(info.value, ConfigError)
    assert info.value.holder["pid"] == os.getpid()
    first.release()
    with second:  # free again once released
        assert second.claimed
    assert not second.claimed


def test_claim_held_by_another_process_and_freed_by_kill_9(tmp_path):
    child = _python(
        f"""
        import sys
        from ddsmon.state import StateDir
        s = StateDir({str(tmp_path / "st")!r})
        s.claim()
        print("claimed", flush=True)
        sys.stdin.read()
        """
    )
    try:
        assert child.stdout.readline().strip() == "claimed", child.stderr.read()
        mine = StateDir(tmp_path / "st")
        with pytest.raises(AlreadyWatched, match=f"pid {child.pid} on host {socket.gethostname()}"):
            mine.claim()
        assert mine.holder()["pid"] == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        mine.claim()  # the kernel dropped the dead holder's lock
        assert mine.holder()["pid"] == os.getpid()
        mine.release()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
        child.stdin.close()


def test_unusable_location_is_a_config_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = StateDir(blocker / ".ddsmon")
    with pytest.raises(ConfigError, match=str(blocker)):
        state.claim()


# ---------------------------------------------------------------------- read-set
def test_read_set_survives_restart_and_tracks_fingerprints(tmp_path):
    state = StateDir(tmp_path / "st")
    assert not state.is_done("a.pt", (10, 1))
    state.mark_done("a.pt", (10, 1), 100)
    state.mark_done("b.pt", (20, 2), 200)
    assert state.is_done("a.pt", (10, 1))
    assert not state.is_done("a.pt", (11, 1))  # rewritten file: read again
    again = StateDir(tmp_path / "st")
    assert again.is_done("b.pt", (20, 2))
    assert again.done_steps() == {100, 200}
    again.mark_done("a.pt", (11, 5), 150)  # the new version replaces the old one
    assert state.is_done("a.pt", (11, 5))  # another object sees the appended record
    assert not state.is_done("a.pt", (10, 1))
    assert state.done_steps() == {150, 200}


def test_torn_last_line_is_ignored_then_cut(tmp_path, caplog):
    state = StateDir(tmp_path / "st")
    state.mark_done("a.pt", (1, 1), 1)
    done = tmp_path / "st" / "done.jsonl"
    with open(done, "a") as fh:
        fh.write('{"path": "b.pt", "fp": [2, ')  # a crash mid-append
    fresh = StateDir(tmp_path / "st")
    assert fresh.is_done("a.pt", (1, 1))
    assert fresh.done_steps() == {1}
    fresh.mark_done("c.pt", (3, 3), 3)
    lines = done.read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == ["a.pt", "c.pt"]  # torn bytes cut
    assert done.read_text().endswith("\n")


def test_damaged_middle_line_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "st"
    root.mkdir()
    (root / "done.jsonl").write_text(
        '{"path": "a.pt", "fp": [1, 1], "step": 1}\nGARBAGE\n{"path": "b.pt", "fp": [2, 2], "step": 2}\n'
    )
    with caplog.at_level("WARNING", logger="ddsmon.state"):
        assert StateDir(root).done_steps() == {1, 2}
    assert "line 2" in caplog.text and "done.jsonl" in caplog.text


# ---------------------------------------------------------------------- key-value
def test_key_value_state_keeps_other_writers_keys(tmp_path):
    a, b = StateDir(tmp_path / "st"), StateDir(tmp_path / "st")
    assert a.get("missing") is None and a.get("missing", 7) == 7
    a.set("run", {"run_id": "abc"})
    b.set("detector", [1, 2, 3])  # written through another object: must not drop "run"
    a.set("count", 2)
    fresh = StateDir(tmp_path / "st")
    assert fresh.get("run") == {"run_id": "abc"}
    assert fresh.get("detector") == [1, 2, 3]
    assert fresh.get("count") == 2
    fresh.delete("count")
    assert a.get("count") is None
    with pytest.raises(TypeError, match="'bad'"):
        a.set("bad", object())
    assert a.get("run") == {"run_id": "abc"}
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["state.json", "state.json.lock"]


def test_corrupt_state_file_starts_empty_with_warning(tmp_path, caplog):
    root = tmp_path / "st"
    root.mkdir()
    (root / "state.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="ddsmon.state"):
        assert StateDir(root).get("x") is None
    assert "state.json" in caplog.text
    StateDir(root).set("x", 1)
    assert StateDir(root).get("x") == 1


def test_a_damaged_state_file_is_said_once_per_content(tmp_path, caplog):
    """A start reads state.json for several keys before its first write: one warning, and
    a new warning when the content is damaged anew."""
    root = tmp_path / "st"
    root.mkdir()
    (root / "state.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="ddsmon.state"):
        for key in ("detector", "detector_step", "trainer_log_steps"):
            assert StateDir(root).get(key) is None  # the daemon and its sinks: two objects
        assert caplog.text.count("is not JSON") == 1
        (root / "state.json").write_text("[1, 2]")
        StateDir(root).get("x")
        StateDir(root).get("y")
        assert caplog.text.count("does not hold a JSON object") == 1


# ---------------------------------------------------------------------- spool
def test_spool_order_ack_and_torn_tail(tmp_path):
    state = StateDir(tmp_path / "st")
    assert state.spool_pending() == []
    for i in range(5):
        state.spool_append({"i": i})
    assert [r["i"] for r in StateDir(tmp_path / "st").spool_pending()] == [0, 1, 2, 3, 4]
    state.spool_ack(2)
    assert [r["i"] for r in state.spool_pending()] == [2, 3, 4]
    with open(tmp_path / "st" / "spool.jsonl", "a") as fh:
        fh.write('{"i": 99')  # torn by a crash
    assert [r["i"] for r in state.spool_pending()] == [2, 3, 4]
    state.spool_append({"i": 5})
    assert [r["i"] for r in state.spool_pending()] == [2, 3, 4, 5]
    assert state.spool_count() == 4
    state.spool_ack(10)
    assert state.spool_pending() == []
    assert not (tmp_path / "st" / "spool.jsonl").exists()
    with pytest.raises(TypeError):
        state.spool_append({"x": object()})
    assert state.spool_pending() == []


def test_kill_9_mid_append_leaves_a_clean_prefix(tmp_path):
    """A writer killed at an arbitrary moment: the spool and the read-set read back as
    an unbroken prefix of what was written, and appending goes on cleanly."""
    child = _python(
        f"""
        from ddsmon.state import StateDir
        s = StateDir({str(tmp_path / "st")!r})
        i = 0
        while True:
            s.spool_append({{"i": i, "pad": "x" * 300}})
            s.mark_done(f"c{{i}}.pt", (i, i), i)
            i += 1
        """
    )
    spool = tmp_path / "st" / "spool.jsonl"
    try:
        _wait_for(
            lambda: spool.exists() and spool.stat().st_size > 100_000,
            what="the writer to get going",
        )
    finally:
        child.kill()
        child.wait(timeout=30)
        for fh in (child.stdin, child.stdout, child.stderr):
            fh.close()
    state = StateDir(tmp_path / "st")
    got = [r["i"] for r in state.spool_pending()]
    assert got == list(range(len(got))) and len(got) > 100
    steps = state.done_steps()
    assert steps == set(range(len(steps)))
    assert len(got) - 1 <= len(steps) <= len(got)
    state.spool_append({"i": len(got)})
    assert [r["i"] for r in state.spool_pending()] == list(range(len(got) + 1))


# ---------------------------------------------------------------------- a verifiable spool
def test_a_spool_line_changed_in_place_fails_its_checksum(tmp_path, caplog):
    state = StateDir(tmp_path / "st")
    for step in (1, 2, 3):
        state.spool_append({"kind": "reading", "step": step, "value": 0.5})
    spool = tmp_path / "st" / "spool.jsonl"
    lines = spool.read_text().splitlines()
    assert all(set(json.loads(line)) == {"sum", "record"} for line in lines)
    lines[1] = lines[1].replace("0.5", "0.6")  # still JSON, still a record: not the one written
    spool.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="ddsmon.state"):
        assert [r["step"] for r in state.spool_pending()] == [1, 3]
    assert "of step 2 fails its checksum" in caplog.text
    state.spool_ack(1)  # the rewrite keeps the records that check out
    assert [r["step"] for r in StateDir(tmp_path / "st").spool_pending()] == [3]


def test_spool_lines_of_earlier_versions_are_read_as_they_are(tmp_path):
    root = tmp_path / "st"
    root.mkdir()
    (root / "spool.jsonl").write_text('{"kind": "reading", "step": 7}\n')
    state = StateDir(root)
    assert state.spool_pending() == [{"kind": "reading", "step": 7}]
    state.spool_append({"kind": "tags", "tags": {}})
    assert [r["kind"] for r in state.spool_pending()] == ["reading", "tags"]


def test_the_ledger_and_forget(tmp_path):
    state = StateDir(tmp_path / "st")
    for step in (10, 20, 30):
        state.mark_done(f"c{step}.pt", (step, step), step)
        state.note_spooled(step)
    state.mark_done("alias.pt", (1, 1), None)
    assert StateDir(tmp_path / "st").spooled_steps() == {10, 20, 30}
    state.note_delivered([10, 99])
    assert state.spooled_steps() == {20, 30}
    other = StateDir(tmp_path / "st")  # the daemon's own object, its read-set cached
    assert other.is_done("c20.pt", (20, 20))
    assert state.forget([20, 30, 40]) == ["c20.pt", "c30.pt"]
    assert not other.is_done("c20.pt", (20, 20)) and not other.is_done("c30.pt", (30, 30))
    assert other.is_done("c10.pt", (10, 10)) and other.is_done("alias.pt", (1, 1))
    assert other.done_steps() == {10}
    state.note_delivered([20, 30])
    assert state.spooled_steps() == set() and state.get("spooled_steps") is None
    assert state.forget([]) == [] and state.forget([77]) == []
