"""Alert outputs: the --events-json file and the --on-event hook, with real files and shells."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest

from ddsmon.errors import ConfigError
from ddsmon.events import Event
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.signature import LayerSignature, Signatures
from ddsmon.sinks import RunInfo
from ddsmon.sinks.alerts import CommandHookSink, EventsJsonSink, event_record

INFO = RunInfo(directory=Path("ckpts"), mode="watch")
SIGS = Signatures(
    layers={"fc1": LayerSignature(name="fc1", n=8, N=8, d=4)},
    n=8,
    device="cpu",
    forward_dtype="float64",
    fisher="activation",
    loss="ce",
)
LOGGER = "ddsmon.sinks.alerts"


def reading(step: int, path: Path | None = None) -> CheckpointReading:
    return CheckpointReading(step=step, path=path or Path(f"ckpts/step_{step}.pt"), signatures=SIGS)


def event(step: int = 1200, kind: str = "transition", **kw: Any) -> Event:
    fields: dict[str, Any] = dict(
        layer="fc1",
        reading="lambda_min",
        before=1.25e-3,
        after=3.5e-7,
        magnitude=3.55,
        message=f"{kind} at step {step}",
    )
    fields.update(kw)
    return Event(step=step, kind=kind, **fields)


def strict_json(line: str) -> dict[str, Any]:
    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=no_constants)


def _gone(pid: int, within: float) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its reaper counts as exited)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


# ---------------------------------------------------------------------------- event_record


def test_event_record_fields_and_strict_json() -> None:
    when = datetime(2026, 7, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)
    rec = event_record(event(magnitude=math.inf, before=None), Path("a/b.pt"), when)
    assert rec == {
        "step": 1200,
        "layer": "fc1",
        "kind": "transition",
        "reading": "lambda_min",
        "before": None,
        "after": 3.5e-7,
        "magnitude": None,  # inf is no JSON number
        "message": "transition at step 1200",
        "checkpoint": "a/b.pt",
        "time": "2026-07-01T12:00:00.123+00:00",
    }
    strict_json(json.dumps(rec))


# -------------------------------------------------------------------------- EventsJsonSink


def test_events_json_appends_one_object_per_event(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "events.jsonl"
    sink = EventsJsonSink(path)
    sink.start(INFO)
    assert path.exists() and path.read_text() == ""  # created (with parents) at start

    sink.on_reading(reading(100), [event(100, "collapse"), event(100, "transition")])
    sink.on_reading(reading(200), [])
    sink.on_failure(CheckpointFailure(Path("ckpts/bad.pt"), "truncated"))  # not an event
    # written and flushed before on_reading returns: visible while the sink is open
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    sink.on_reading(reading(300), [event(300, "revival", magnitude=float("nan"))])
    sink.close()
    sink.close()

    records = [strict_json(ln) for ln in path.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [
        (100, "collapse"),
        (100, "transition"),
        (300, "revival"),
    ]
    assert records[0]["checkpoint"] == str(Path("ckpts/step_100.pt"))
    assert records[2]["magnitude"] is None
    assert records[0]["after"] == 3.5e-7 and records[0]["message"] == "collapse at step 100"
    stamp = datetime.fromisoformat(records[0]["time"])
    assert stamp.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 600

    # a restarted daemon appends to the same log
    again = EventsJsonSink(path)
    again.start(INFO)
    again.on_reading(reading(400), [event(400, "rank_change")])
    again.close()
    assert [strict_json(ln)["step"] for ln in path.read_text().splitlines()] == [100, 100, 300, 400]


def test_events_json_unwritable_path_names_it(tmp_path: Path) -> None:
    target = tmp_path / "a_directory"
    target.mkdir()
    with pytest.raises(ConfigError, match="a_directory"):
        EventsJsonSink(target).start(INFO)


# ------------------------------------------------------------------------- CommandHookSink


def test_hook_sees_the_event_in_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DDSMON_TEST_INHERITED", "from-the-daemon")
    out = tmp_path / "env.txt"
    sink = CommandHookSink(f"env > {shlex.quote(str(out))}")
    sink.start(INFO)
    ckpt = tmp_path / "ckpts" / "step_1200.pt"
    sink.on_reading(reading(1200, ckpt), [event(1200, "transition", before=None)])
    sink.close()

    env = dict(ln.split("=", 1) for ln in out.read_text().splitlines() if "=" in ln)
    assert env["DDSMON_EVENT_KIND"] == "transition"
    assert env["DDSMON_EVENT_STEP"] == "1200"
    assert env["DDSMON_EVENT_LAYER"] == "fc1"
    assert env["DDSMON_EVENT_READING"] == "lambda_min"
    assert env["DDSMON_EVENT_BEFORE"] == ""  # unresolved
    assert float(env["DDSMON_EVENT_AFTER"]) == 3.5e-7
    assert float(env["DDSMON_EVENT_MAGNITUDE"]) == 3.55
    assert env["DDSMON_EVENT_MESSAGE"] == "transition at step 1200"
    assert env["DDSMON_EVENT_CHECKPOINT"] == str(ckpt)
    whole = strict_json(env["DDSMON_EVENT_JSON"])
    assert whole["kind"] == "transition" and whole["step"] == 1200
    assert whole["checkpoint"] == str(ckpt) and whole["before"] is None
    assert env["DDSMON_TEST_INHERITED"] == "from-the-daemon"
    assert env["PATH"] == os.environ["PATH"]
    assert (sink.ran, sink.failed) == (1, 0)


def test_hooks_run_once_per_event_in_order(tmp_path: Path) -> None:
    out = tmp_path / "order.txt"
    sink = CommandHookSink(
        f'printf "%s %s\\n" "$DDSMON_EVENT_STEP" "$DDSMON_EVENT_KIND" >> {shlex.quote(str(out))}'
    )
    sink.start(INFO)
    started = time.monotonic()
    sink.on_reading(reading(1), [event(1, "collapse"), event(1, "transition")])
    sink.on_reading(reading(2), [])
    sink.on_reading(reading(3), [event(3, "revival")])
    assert sink.wait(30)
    assert out.read_text().splitlines() == ["1 collapse", "1 transition", "3 revival"]
    sink.close()
    assert time.monotonic() - started < 30


def test_failing_hook_is_logged_and_the_next_one_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ok = tmp_path / "ok.txt"
    command = (
        'if [ "$DDSMON_EVENT_KIND" = collapse ]; then echo boom-from-hook >&2; exit 3; fi; '
        f"echo ran > {shlex.quote(str(ok))}"
    )
    sink = CommandHookSink(command)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sink.on_reading(reading(5), [event(5, "collapse"), event(5, "revival")])
        sink.close()
    assert ok.read_text() == "ran\n"
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert "status 3" in warnings[0] and "boom-from-hook" in warnings[0]
    assert "collapse event at step 5" in warnings[0]
    assert (sink.ran, sink.failed) == (2, 1)


def test_missing_program_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    sink = CommandHookSink("ddsmon-no-such-program-4711 --page-me")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sink.on_reading(reading(7), [event(7)])
        sink.close()
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "status 127" in message
    assert "not found" in message and "ddsmon-no-such-program-4711" in message


def test_hanging_hook_is_terminated_with_its_children(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "child.pid"
    # the shell backgrounds a child and waits: killing only the shell would orphan it
    sink = CommandHookSink(f"sleep 60 & echo $! > {shlex.quote(str(pidfile))}; wait", timeout=0.5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        started = time.monotonic()
        sink.on_reading(reading(9), [event(9)])
        assert time.monotonic() - started < 5  # the daemon does not wait for hooks
        assert sink.wait(20)
        sink.close()
    assert time.monotonic() - started < 20
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "timed out" in message and "after 0.5s" in message
    assert _gone(int(pidfile.read_text()), within=10)
    assert sink.failed == 1


def test_close_abandons_a_backlog_of_slow_hooks(caplog: pytest.LogCaptureFixture) -> None:
    sink = CommandHookSink("sleep 30", timeout=60, close_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sink.on_reading(reading(11), [event(11, k) for k in ("collapse", "transition", "revival")])
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 15
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("daemon closing" in m for m in messages) == 3
    assert (sink.ran, sink.failed, sink.skipped) == (1, 1, 2)
    sink.on_reading(reading(12), [event(12)])  # after close: dropped with a warning
    assert "sink closed" in caplog.records[-1].getMessage()


def test_bad_hook_settings() -> None:
    with pytest.raises(ConfigError, match="on-event"):
        CommandHookSink("   ")
    with pytest.raises(ConfigError, match="timeout"):
        CommandHookSink("true", timeout=0)


def test_hook_can_be_a_python_script(tmp_path: Path) -> None:
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        "rec = json.loads(os.environ['DDSMON_EVENT_JSON'])\n"
        "open(sys.argv[1], 'a').write(json.dumps(rec) + '\\n')\n"
    )
    out = tmp_path / "hook.jsonl"
    q = shlex.quote
    sink = CommandHookSink(f"{q(sys.executable)} {q(str(script))} {q(str(out))}")
    message = "quotes \" and ' and a\nnewline"
    sink.on_reading(reading(13), [event(13, "nonfinite", message=message, after=None)])
    sink.close()
    (rec,) = [strict_json(ln) for ln in out.read_text().splitlines()]
    assert rec["message"] == message and rec["kind"] == "nonfinite" and rec["after"] is None
