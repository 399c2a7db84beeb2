"""The live view's progress count, fed by a real daemon scanning a real directory (issue 13:
"when everything is read the progress bar still shows half full, queued 10").

An in-process ``Daemon.scan`` over ten checkpoints and a corrupt one, with a real
:class:`~ddsmon.sinks.terminal.TerminalSink` on a rich terminal console (the Live view,
as ``ddsmon watch`` shows it on a terminal). A second sink after it checks, at every
reading and failure the daemon reports, that the view counts each checkpoint once:
read + failed + queued is the number of checkpoints the scan found, not one more (read
and still queued). At the end nothing is queued and the bar is complete (rich
draws a complete bar in the ``bar.finished`` style, a partial one in
``bar.complete``/``bar.back``).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
from fixtures_models import mlp, mlp_probe
from rich.console import Console
from test_cli import write_run

from ddsmon.config import Config
from ddsmon.daemon import Daemon
from ddsmon.reader import Reader
from ddsmon.sinks import RunInfo
from ddsmon.sinks.terminal import TerminalSink, render_dashboard


class CountCheck:
    """A sink called after the terminal sink: its counts at each call, checked later."""

    def __init__(self, terminal: TerminalSink) -> None:
        self.terminal = terminal
        self.seen: list[tuple[str, int, int, int]] = []

    def _note(self, what: str) -> None:
        s = self.terminal.snapshot()
        self.seen.append((what, s.read, s.failed, s.queued))

    def start(self, info: RunInfo) -> None:
        pass

    def on_queue(self, pending: int) -> None:
        self._note("queue")

    def on_reading(self, reading: Any, events: Any) -> None:
        self._note("reading")

    def on_failure(self, failure: Any) -> None:
        self._note("failure")

    def close(self) -> None:
        pass


def _bar_styles(console: Console, sink: TerminalSink) -> set[str]:
    """The styles the progress bar of the sink's view is drawn in."""
    view = render_dashboard(sink.snapshot())
    return {
        str(seg.style)
        for line in console.render_lines(view, pad=False)
        for seg in line
        if "━" in seg.text or "╸" in seg.text or "╺" in seg.text
    }


def _scan(ckpts: Path, state: Path) -> tuple[Console, TerminalSink, CountCheck, Any]:
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="truecolor")
    terminal = TerminalSink(console, live=True, refresh_per_second=50)
    check = CountCheck(terminal)
    config = Config.for_directory(ckpts, probe="unused.pt", state_dir=state, fisher="activation")
    reader = Reader.from_parts(config.read, factory=mlp, probe=mlp_probe())
    summary = Daemon(config, sinks=[terminal, check], reader=reader).scan()
    return console, terminal, check, summary


def test_the_bar_is_full_and_nothing_queued_once_everything_is_read(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, list(range(0, 100, 10)))
    (ckpts / "step_000055.pt").write_bytes(b"PK\x03\x04 not a zip")  # refused unqueued
    torch.save({"model": {"other.weight": torch.zeros(2)}, "step": 65}, ckpts / "step_65.pt")
    console, terminal, check, summary = _scan(ckpts, tmp_path / "state")
    assert (summary.read, summary.failed) == (10, 2)

    whats = [what for what, *_ in check.seen]
    assert whats.count("reading") == 10 and whats.count("failure") == 2
    # discovery: each call one checkpoint more (11 queued, the incomplete one failed)
    first = whats.index("reading")
    assert [r + f + q for _, r, f, q in check.seen[:first]][:12] == list(range(1, 13))
    # reading: each checkpoint counted once when it is read or fails, queued only falls
    reading = check.seen[first:]
    assert all(r + f + q == 12 for what, r, f, q in reading if what != "queue"), reading
    queued = [q for *_, q in reading]
    assert queued == sorted(queued, reverse=True), queued

    terminal.close()
    final = terminal.snapshot()
    assert (final.read, final.failed, final.queued) == (10, 2, 0)
    frame = console.file.getvalue()  # type: ignore[attr-defined]
    last = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", frame[frame.rfind("ddsmon scan") :])
    assert "read 10, queued 0, failed 2" in last, last
    finished = str(console.get_style("bar.finished"))
    assert _bar_styles(console, terminal) == {finished}


def test_a_scan_with_everything_read_before_shows_a_full_bar(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20])
    _scan(ckpts, tmp_path / "state")
    console, terminal, _, summary = _scan(ckpts, tmp_path / "state")  # all done already
    assert (summary.read, summary.skipped) == (0, 3)
    terminal.close()
    assert terminal.snapshot().queued == 0
    assert _bar_styles(console, terminal) == {str(console.get_style("bar.finished"))}
    # and half way through a scan the bar is not drawn finished
    half = TerminalSink(console, live=False)
    half.start(RunInfo(directory=ckpts, mode="scan"))
    half.on_queue(5)
    assert str(console.get_style("bar.finished")) not in _bar_styles(console, half)
