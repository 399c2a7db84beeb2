"""Make the README's picture of the terminal view from a real run's checkpoints.

Reads every checkpoint of a directory in step order exactly as ``ddsmon scan`` does
(the engine's :func:`~ddsmon.compute_signatures` on each, then
:class:`~ddsmon.events.EventDetector`), hands each :class:`~ddsmon.records.CheckpointReading`
and its events to a :class:`~ddsmon.sinks.terminal.TerminalSink`, and exports the
dashboard as an SVG (and, when Chromium is installed, a PNG beside it).

Nothing is made up: every number in the picture is a reading of a checkpoint, every
event one the detector raised. ``--at`` picks the moment shown: ``transition`` (the
default) stops right after the checkpoint at which the first transition is flagged, so
the picture shows the view as it stood then, the remaining checkpoints still queued;
``end`` reads everything; a number stops after the first checkpoint at or past that step.

The README's picture was made with (seed 0, checkpoints every 25 steps, from the repo root)::

    python examples/modular_addition/train.py --out /tmp/pics/ckpts \\
        --probe-out /tmp/pics/probe.pt --steps 2000 --every 25
    python docs/make_pictures.py /tmp/pics/ckpts --probe /tmp/pics/probe.pt \\
        --model examples/modular_addition/model.py:make_model --out docs/img/terminal.svg
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ddsmon import compute_signatures
from ddsmon.checkpoints import check_complete, discover, fingerprint
from ddsmon.errors import CheckpointError, ConfigError, DDSError
from ddsmon.events import EventDetector
from ddsmon.loading import load_checkpoint, load_probe, resolve_factory
from ddsmon.probe import probe_batch_size
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.sinks import RunInfo
from ddsmon.sinks.terminal import TerminalSink

__all__ = ("main", "make_terminal_picture")

log = logging.getLogger(__name__)


def make_terminal_picture(
    directory: Path,
    *,
    probe: str,
    model: str,
    out: Path,
    at: str = "transition",
    width: int = 120,
    loss: str = "ce",
    title: str = "ddsmon scan",
) -> tuple[Path, CheckpointReading | None]:
    """Read ``directory`` up to the moment ``at`` and export the dashboard to ``out`` (SVG).

    ``at``: ``"transition"``, ``"end"`` or a step number (see the module docstring).
    Returns the SVG's path and the last reading shown. Raises ConfigError for a bad
    ``at`` or a directory without checkpoints, and when ``at="transition"`` finds none.
    """
    if at not in ("transition", "end") and not at.isdigit():
        raise ConfigError(f"--at must be 'transition', 'end' or a step number, got {at!r}")
    refs = discover(directory)
    if not refs:
        raise ConfigError(f"no checkpoints in {directory}")
    factory = resolve_factory(model)
    inputs, targets = load_probe(probe)
    params = {
        "probe": probe,
        "probe_size": str(probe_batch_size(inputs, targets)),
        "model": model,
        "loss": loss,
        "fisher": "both",
        "device": "cpu",
    }
    sink = TerminalSink(Console(file=io.StringIO(), width=width), live=False)
    sink.start(RunInfo(directory=directory, mode="scan", params=params))
    detector = EventDetector()
    last: CheckpointReading | None = None
    stopped = False
    for i, ref in enumerate(refs):
        sink.on_queue(len(refs) - i - 1)
        reason = check_complete(ref)
        if reason is not None:
            sink.on_failure(CheckpointFailure(ref.path, f"incomplete: {reason}"))
            continue
        started = time.perf_counter()
        try:
            loaded = load_checkpoint(ref, factory)
        except CheckpointError as exc:
            sink.on_failure(CheckpointFailure(ref.path, exc.reason))
            continue
        load_seconds = time.perf_counter() - started
        step = loaded.step if loaded.step is not None else ref.name_step
        if step is None:
            step = i
        try:
            sig = compute_signatures(loaded.model, inputs, targets, loss=loss, device="cpu")
        except DDSError as exc:
            sink.on_failure(CheckpointFailure(ref.path, str(exc), step))
            continue
        events = detector.update(step, {name: s.to_dict() for name, s in sig.layers.items()})
        last = CheckpointReading(
            step=step,
            path=ref.path,
            signatures=sig,
            fingerprint=fingerprint(ref),
            meta=dict(loaded.meta),
            load_seconds=load_seconds,
            read_seconds=sig.seconds,
        )
        sink.on_reading(last, events)
        log.info("step %d read, %d event(s)", step, len(events))
        if (at == "transition" and any(e.kind == "transition" for e in events)) or (
            at.isdigit() and step >= int(at)
        ):
            stopped = True
            break
    if at == "transition" and not stopped:
        raise ConfigError(f"no transition was flagged in {directory}; try --at end")
    path = sink.export_svg(out, width=width, title=title)
    sink.close()
    return path, last


def _svg_size(svg: Path) -> tuple[int, int]:
    """Width and height of ``svg``'s viewBox, rounded up to whole pixels."""
    head = svg.read_text(encoding="utf-8")[:2000]
    match = re.search(r'viewBox="\s*[-\d.]+\s+[-\d.]+\s+([\d.]+)\s+([\d.]+)\s*"', head)
    if match is None:
        raise ConfigError(f"{svg}: no viewBox in the SVG header")
    return math.ceil(float(match.group(1))), math.ceil(float(match.group(2)))


def _to_png(svg: Path, chromium: str | None = None) -> Path | None:
    """``svg`` as a PNG beside it, rendered by headless Chromium (else None).

    Chromium, not rsvg-convert: rsvg ignores the runs of non-breaking spaces rich uses to
    right-justify table columns, and squeezes the numbers to the left.
    """
    tool = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if tool is None:
        log.warning("chromium not found (apt-get install chromium); no PNG made")
        return None
    width, height = _svg_size(svg)
    png = svg.with_suffix(".png")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(
            '<html><body style="margin:0;background:transparent">'
            f'<img src="{svg.resolve().as_uri()}" width="{width}" height="{height}">'
            "</body></html>",
            encoding="utf-8",
        )
        cmd = [tool, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        cmd += ["--disable-background-networking", "--disable-component-update"]
        cmd += ["--disable-sync", "--hide-scrollbars", "--default-background-color=00000000"]
        cmd += [f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}"]
        cmd += [f"--screenshot={png.resolve()}", page.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path, help="checkpoint directory of a finished run")
    ap.add_argument("--probe", required=True, help="probe file (inputs, targets)")
    ap.add_argument("--model", required=True, help="model factory, FILE.py:FUNCTION")
    ap.add_argument("--loss", default="ce")
    ap.add_argument("--out", type=Path, default=Path("docs/img/terminal.svg"))
    ap.add_argument("--at", default="transition", help="transition, end, or a step")
    ap.add_argument("--width", type=int, default=120, help="terminal columns")
    ap.add_argument("--no-png", action="store_true", help="skip the PNG (needs chromium)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        svg, last = make_terminal_picture(
            args.directory,
            probe=args.probe,
            model=args.model,
            out=args.out,
            at=args.at,
            width=args.width,
            loss=args.loss,
        )
    except DDSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {svg} (last step shown: {None if last is None else last.step})")
    if not args.no_png:
        png = _to_png(svg)
        if png is not None:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
