"""The terminal view: tables, the Live dashboard and the plain log lines, compared as text.

Everything renders into a real rich Console writing to a StringIO (rich's own way of
testing, ``tests/test_table.py`` there) or to a real file.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from ddsmon.events import Event
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.signature import LayerSignature, Signatures
from ddsmon.sinks import RunInfo
from ddsmon.sinks.terminal import (
    TerminalSink,
    export_svg,
    render_dashboard,
    render_signatures_table,
)

# ----------------------------------------------------------------------------- helpers


def console(*, terminal: bool = True, color: bool = False, width: int = 120) -> Console:
    return Console(
        file=io.StringIO(),
        width=width,
        color_system="standard" if color else None,
        force_terminal=terminal,
        legacy_windows=False,
    )


def text_of(renderable: Any, **kw: Any) -> str:
    c = console(**kw)
    c.print(renderable)
    return c.file.getvalue()  # type: ignore[attr-defined]


def row(text: str, name: str) -> str:
    """The table line of layer ``name`` (first cell is the name, left-justified)."""
    lines = [ln for ln in text.splitlines() if ln.split()[:1] == [name]]
    assert len(lines) == 1, f"expected one row for {name!r} in:\n{text}"
    return lines[0]


def layer(name: str = "fc1", **kw: Any) -> LayerSignature:
    base: dict[str, Any] = dict(
        n=64, N=64, d=8,
        sigma_min=0.5, sigma_max=4.0, x_rank=8, x_dead=0, floor_x=4e-14,
        lambda_min=2e-3, lambda_max=0.25, g_rank=7, g_dead=1, floor_g=3e-16,
        logdet=-30.0, log_volume=-12.0, u_dead_gain=0.04,
    )  # fmt: skip
    base.update(kw)
    return LayerSignature(name=name, **base)


def sigs(*layers: LayerSignature) -> Signatures:
    return Signatures(
        layers={s.name: s for s in layers},
        n=64,
        device="cpu",
        forward_dtype="float64",
        fisher="activation",
        loss="ce",
    )


def reading(step: int, signatures: Signatures, **kw: Any) -> CheckpointReading:
    return CheckpointReading(
        step=step, path=Path(f"ckpts/step_{step}.pt"), signatures=signatures, **kw
    )


def event(step: int = 1200, kind: str = "transition", **kw: Any) -> Event:
    fields: dict[str, Any] = dict(
        layer="fc1",
        reading="lambda_min",
        before=1e-3,
        after=1e-7,
        magnitude=4.0,
        message=f"{kind} at {step}",
    )
    fields.update(kw)
    return Event(step=step, kind=kind, **fields)


# ------------------------------------------------------------------------------- table


def test_unresolved_readings_show_their_floor() -> None:
    sig = layer(
        sigma_min=None, x_rank=0, x_dead=8, floor_x=3.4e-13, lambda_min=None, floor_g=1.2e-14
    )
    out = text_of(render_signatures_table(sigs(sig, layer("fc2"))))
    fc1 = row(out, "fc1")
    assert "<3.4e-13" in fc1  # sigma_min under floor_x
    assert "<1.2e-14" in fc1  # lambda_min under floor_g
    assert "0/8" in fc1  # x rank / dead
    assert "<" not in row(out, "fc2")
    assert "unresolved, below the trust floor" in out


def test_arrows_only_for_readings_that_moved() -> None:
    prev = sigs(layer("fc1"), layer("fc2"))
    cur = sigs(
        layer(
            "fc1",
            lambda_min=1e-3,  # halved: down
            lambda_max=0.2501,  # 0.04%: still
            sigma_min=0.6,  # +20%: up
            g_rank=6,  # rank fell
            g_dead=2,
            logdet=-30.1,  # 0.3%: still
        ),
        layer("fc2", lambda_min=None),  # fell under the floor: down
    )
    out = text_of(render_signatures_table(cur, prev))
    fc1, fc2 = row(out, "fc1"), row(out, "fc2")
    assert "0.001↓" in fc1
    assert "0.6↑" in fc1
    assert "6/2↓" in fc1
    assert re.search(r"0\.25(?![↑↓])", fc1)  # lambda_max 0.2501 -> "0.25", no arrow
    assert re.search(r"-30\.1(?![↑↓])", fc1)
    assert fc1.count("↑") + fc1.count("↓") == 3
    assert "<3e-16↓" in fc2
    assert fc2.count("↑") + fc2.count("↓") == 1
    assert "since the previous checkpoint" in out

    # the same readings against themselves, or with no previous: no arrow anywhere
    for previous in (cur, None):
        same = text_of(render_signatures_table(cur, previous))
        body = [ln for ln in same.splitlines() if "moved more than" not in ln]
        assert not any("↑" in ln or "↓" in ln for ln in body), same


def test_nonfinite_layer_in_red_with_reason() -> None:
    bad = layer(
        "fc2", finite=False, nonfinite="gradients not finite",
        sigma_min=None, lambda_min=None, lambda_max=None, x_rank=None, g_rank=None,
    )  # fmt: skip
    table = render_signatures_table(sigs(layer("fc1"), bad))
    out = text_of(table)
    assert "non-finite" in row(out, "fc2")
    assert "fc2: gradients not finite" in out
    colored = text_of(table, color=True)
    line = next(ln for ln in colored.splitlines() if "non-finite" in ln)
    assert "\x1b[31m" in line or "\x1b[1;31m" in line
    assert "\x1b[31m" not in next(ln for ln in colored.splitlines() if "fc1" in ln)


def test_parameter_columns_only_when_read() -> None:
    out = text_of(render_signatures_table(sigs(layer("fc1")), title="step 7"))
    assert "step 7" in out
    assert "K" not in out.split("\n", 3)[1]
    with_params = layer(
        "fc1", param_count=40, param_lambda_min=None, param_floor=6e-16, param_rank=31
    )
    out = text_of(render_signatures_table(sigs(with_params, layer("relu"))))
    fc1 = row(out, "fc1")
    assert fc1.split()[-2:] == ["<6e-16", "31"]
    assert row(out, "relu").split()[-2:] == ["—", "—"]


def test_table_of_a_real_reading() -> None:
    from ddsmon import compute_signatures

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    signatures = compute_signatures(model, x, y, loss="ce")
    out = text_of(render_signatures_table(signatures))
    assert len(signatures.layers) >= 2
    for name, s in signatures.layers.items():
        line = row(out, name)
        assert f"{s.x_rank}/{s.x_dead}" in line
        assert f"{s.g_rank}/{s.g_dead}" in line
        for value in (s.lambda_min, s.lambda_max, s.logdet):
            assert value is not None
            assert format(value, ".3g") in line


# --------------------------------------------------------------------------- plain mode


def test_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    log = tmp_path / "ddsmon.log"
    with log.open("w", encoding="utf-8") as fh:
        c = Console(file=fh, width=80, force_terminal=False)
        sink = TerminalSink(c)
        assert sink.live is False
        sink.start(RunInfo(directory=Path("ckpts"), mode="scan", params={"device": "cpu"}))
        first = sigs(
            layer("fc1", lambda_min=3e-3, lambda_max=0.3),
            layer("fc2", lambda_min=2.5e-5, lambda_max=0.5),  # smallest ratio
        )
        sink.on_reading(reading(1200, first, read_seconds=0.123, meta={"val_acc": 0.5}), [])
        # flushed at once: readable before the sink is closed
        assert log.read_text().splitlines()[-1] == (
            "step 1200  ckpt=ckpts/step_1200.pt  layers=2  lambda_min[fc2]=2.5e-05"
            "  val_acc=0.5  read in 0.12s"
        )
        ev = event(1300, "transition", before=2.5e-5, after=None, magnitude=3.25)
        sink.on_reading(reading(1300, first, read_seconds=0.5), [ev])
        lines = log.read_text().splitlines()
        assert lines[-1] == (
            "EVENT transition step=1300 layer=fc1 reading=lambda_min before=2.5e-05 "
            "after=none magnitude=3.25: transition at 1300"
        )
        sink.on_failure(CheckpointFailure(Path("ckpts/step_1400.pt"), "truncated zip archive"))
        assert log.read_text().splitlines()[-1] == (
            "FAILED ckpts/step_1400.pt: truncated zip archive"
        )
        sink.close()
        sink.close()  # idempotent
    lines = log.read_text().splitlines()
    assert lines[0] == "ddsmon scan ckpts  device=cpu"
    assert lines[-1] == "ddsmon scan done: read 2, failed 1, events 1"
    assert not any("\x1b" in ln for ln in lines)


# ---------------------------------------------------------------------------- dashboard


def _dashboard_sink(c: Console, *, live: bool | None = False, max_events: int = 8) -> TerminalSink:
    sink = TerminalSink(c, live=live, max_events=max_events)
    sink.start(RunInfo(directory=Path("/runs/exp1/ckpts"), mode="watch", params={"run_id": "r42"}))
    return sink


def test_dashboard_shows_progress_events_failures_and_latest_table() -> None:
    c = console()
    sink = _dashboard_sink(c)
    sink.on_reading(reading(100, sigs(layer("fc1"))), [])
    sink.on_queue(3)
    sink.on_reading(
        reading(200, sigs(layer("fc1", lambda_min=1e-5), layer("fc2"))),
        [event(200, "collapse", message="lambda_min fell 2.3 decades")],
    )
    sink.on_failure(CheckpointFailure(Path("ckpts/step_300.pt"), "bad zip", step=300))
    out = text_of(sink.renderable())
    assert "ddsmon watch  /runs/exp1/ckpts  run r42" in out
    assert "read 2, queued 3, failed 1, events 1" in out
    lines = out.splitlines()
    failed = next(i for i, ln in enumerate(lines) if "FAILED" in ln)
    collapse = next(i for i, ln in enumerate(lines) if "COLLAPSE" in ln)
    assert failed < collapse  # newest first
    assert "ckpts/step_300.pt: bad zip" in lines[failed]
    assert "'fc1' lambda_min 0.001 → 1e-07" in lines[collapse]  # the layer quoted
    assert "lambda_min fell 2.3 decades" in lines[collapse]
    assert "step 200  ckpts/step_200.pt" in out
    assert "1e-05↓" in row(out, "fc1")  # arrows against the previous checkpoint
    assert "↑" not in row(out, "fc2") and "↓" not in row(out, "fc2")  # new layer: no trend


def test_dashboard_keeps_the_latest_events_and_highlights_kinds() -> None:
    sink = _dashboard_sink(console(), max_events=3)
    kinds = ["rank_change", "revival", "collapse", "transition", "nonfinite"]
    sink.on_reading(
        reading(10, sigs(layer())),
        [event(10, k, message=f"msg-{k}") for k in kinds],
    )
    out = text_of(sink.renderable(), color=True)
    for k in kinds[:2]:
        assert f"msg-{k}" not in out
    styles = {"collapse": "\x1b[33m", "transition": "\x1b[1;31m", "nonfinite": "\x1b[31m"}
    for k, code in styles.items():
        line = next(ln for ln in out.splitlines() if f"msg-{k}" in ln)
        assert code + k.upper() in line, repr(line)
    assert "events 5" in out


def test_dashboard_before_any_checkpoint() -> None:
    out = text_of(render_dashboard(_dashboard_sink(console()).snapshot()))
    assert "no checkpoint read yet" in out
    assert "read 0, queued 0, failed 0, events 0" in out


def test_renderable_is_rebuilt_only_after_a_change() -> None:
    sink = _dashboard_sink(console())
    first = sink.renderable()
    assert sink.renderable() is first
    sink.on_queue(0)  # unchanged
    assert sink.renderable() is first
    sink.on_queue(2)
    assert sink.renderable() is not first


def test_export_svg(tmp_path: Path) -> None:
    sink = _dashboard_sink(console())
    sink.on_reading(reading(5, sigs(layer("fc1"), layer("head"))), [event(5, "transition")])
    path = sink.export_svg(tmp_path / "pics" / "dashboard.svg", width=110)
    svg = path.read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<svg")
    assert "TRANSITION" in svg and "head" in svg
    other = export_svg(tmp_path / "table.svg", render_signatures_table(sigs(layer())))
    assert "fc1" in other.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------- live


def _refresh_threads(within: float = 5.0) -> list[threading.Thread]:
    """rich's Live refresh threads still alive after ``within`` seconds (they exit on stop)."""
    deadline = time.monotonic() + within
    while True:
        alive = [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"]
        if not alive or time.monotonic() > deadline:
            return alive
        alive[0].join(0.05)


def test_live_view_fed_from_other_threads() -> None:
    c = console()
    sink = TerminalSink(c, refresh_per_second=50)
    assert sink.live is True  # picked because the console is a terminal
    sink.start(RunInfo(directory=Path("ckpts"), mode="watch"))
    errors: list[BaseException] = []

    def feed(worker: int) -> None:
        try:
            for i in range(25):
                step = worker * 1000 + i
                time.sleep(0.001)  # interleave with the refresh thread
                sig = sigs(layer("fc1", lambda_min=1e-3 / (i + 1)), layer("fc2"))
                sink.on_queue(25 - i)
                sink.on_reading(
                    reading(step, sig), [event(step, "collapse", message=f"w{worker}-{i}")]
                )
                if i % 10 == 0:
                    sink.on_failure(CheckpointFailure(Path(f"w{worker}-{i}.pt"), "corrupt"))
                sink.renderable()
        except BaseException as exc:  # reported below
            errors.append(exc)

    fed = threading.Event()

    def draw() -> None:  # a second reader besides Live's own refresh thread
        try:
            while not fed.is_set():
                text_of(sink.renderable())
        except BaseException as exc:
            errors.append(exc)

    drawer = threading.Thread(target=draw)
    drawer.start()
    threads = [threading.Thread(target=feed, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    fed.set()
    drawer.join(30)
    sink.on_queue(0)
    sink.close()
    sink.close()
    assert not errors, errors
    assert not _refresh_threads()
    out = c.file.getvalue()  # type: ignore[attr-defined]
    # the last frame stays on screen and shows the final counts
    final = out[out.rfind("ddsmon watch") :]
    assert "read 100, queued 0, failed 12, events 100" in final
    assert "\x1b[" in out  # cursor control: it really was a Live display
    snap = sink.snapshot()
    assert (snap.read, snap.failed, snap.events) == (100, 12, 100)
    assert len(snap.recent) == 8


def test_live_close_without_start_and_no_readings() -> None:
    sink = TerminalSink(console(), live=True)
    sink.close()
    assert not _refresh_threads()


@pytest.mark.parametrize("terminal", [True, False])
def test_live_defaults_to_console_is_terminal(terminal: bool) -> None:
    assert TerminalSink(console(terminal=terminal)).live is terminal


def test_log_records_go_through_the_sink_console() -> None:
    c = console()
    sink = TerminalSink(c, live=True)
    sink.start(RunInfo(directory=Path("ckpts"), mode="watch"))
    log = logging.getLogger("ddsmon.test_terminal.handler")
    handler = sink.log_handler()
    log.addHandler(handler)
    try:
        log.warning("cannot read %s: %s", "ckpts/x.pt", "bad zip")
    finally:
        log.removeHandler(handler)
        sink.close()
    out = c.file.getvalue()  # type: ignore[attr-defined]
    assert "cannot read ckpts/x.pt: bad zip" in out
    assert out.index("cannot read") < out.rindex("ddsmon watch")  # above the last frame


def test_the_dying_count_and_the_entropy_are_columns() -> None:
    import numpy as np

    flat = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    plain = sigs(layer("fc1", x_spectrum=flat))
    text = text_of(render_signatures_table(plain))
    assert "entropy" in text and "dying" in text
    assert re.search(r"\b1\b", row(text, "fc1").split("0.04")[-1]), row(text, "fc1")
    # the engine leaves the count empty; the detector's, put in by with_derived, shows
    assert row(text, "fc1").rstrip().endswith("—")
    counted = plain.with_derived({"fc1": {"dying_directions": 3.04}})
    line = row(text_of(render_signatures_table(counted, plain)), "fc1")
    assert "3.04↑" in line, line


def test_a_transition_line_says_its_label_and_dying_directions(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    with path.open("w") as fh:
        sink = TerminalSink(Console(file=fh, width=200), live=False)
        sink.start(RunInfo(directory=tmp_path, mode="scan", params={}))
        tr = Event(
            1200, "fc1,fc2", "transition", "log_volume", None, None, 2.0,
            "transition: ...; about 3 directions dying at 'fc1'; generalising: "
            "val_acc 0.02 -> val_acc 0.6",
            trainer_before={"val_acc": 0.02}, trainer_after={"val_acc": 0.6},
            label="generalising",
        )  # fmt: skip
        dying = Event(1200, "fc1", "dying", "dying_directions", None, 3.0, 3.0,
                      "dying: about 3 directions dying at 'fc1' (...)", dying_directions=3.0)  # fmt: skip
        sink.on_reading(reading(1200, sigs(layer("fc1"), layer("fc2"))), [tr, dying])
        sink.close()
    text = path.read_text()
    assert "EVENT transition step=1200" in text and "generalising: val_acc 0.02" in text
    assert "about 3 directions dying at 'fc1'" in text
    assert "EVENT dying step=1200 layer=fc1 reading=dying_directions" in text


# ------------------------------------------------------------------- narrow terminals


_GPT_NAMES = [f"transformer.h.{i}.{p}" for i in (0, 11) for p in ("attn.c_attn", "mlp.c_proj")]


def _long_named() -> Signatures:
    """GPT-2-like layer names, every reading column (the parameter side's too)."""
    return sigs(
        *(
            layer(
                name,
                sigma_min=5.6123e-05 * (k + 1),
                lambda_min=None,
                floor_g=3.3e-16,
                lambda_max=0.123456,
                logdet=-123.456,
                log_volume=-45.6789,
                u_dead_gain=1.2345e-07,
                x_spectrum=None,
                param_count=4160,
                param_lambda_min=2.5e-09,
                param_floor=1e-20,
                param_rank=4096,
            )
            for k, name in enumerate(_GPT_NAMES)
        )
    )


@pytest.mark.parametrize("width", [80, 60])
def test_the_live_view_at_a_narrow_terminal_cuts_no_name_and_no_value(width: int) -> None:
    """The dashboard at 80 (and 60) columns: every layer's name on its rows, each value
    whole (``5.61e-05``, never ``5.61e…``), no line wider than the terminal; the table is
    split over several tables, each led by the layer column."""
    from rich.cells import cell_len

    sink = _dashboard_sink(console(width=width))
    sink.on_queue(0)
    sink.on_reading(reading(375, _long_named(), meta={"val_acc": 0.97}), [event(375)])
    out = text_of(sink.renderable(), width=width)
    lines = out.splitlines()
    assert max(cell_len(ln) for ln in lines) <= width, out
    assert "…" not in out
    for k, name in enumerate(_GPT_NAMES):
        rows = [ln.split()[1:] for ln in lines if ln.split()[:1] == [name]]
        assert len(rows) > 1, out  # one row per table
        cells = [c for r in rows for c in r]
        for value in (format(5.6123e-05 * (k + 1), ".3g"), "<3.3e-16", "0.123", "-123",
                      "-45.7", "1.23e-07", "2.5e-09", "4096", "7/1", "8/0"):  # fmt: skip
            assert value in cells, (name, value, rows)
    # 200 columns wide, the same readings are one table, one row per layer
    wide = text_of(render_dashboard(sink.snapshot()), width=200)
    assert (
        len([ln for ln in wide.splitlines() if ln.startswith("transformer.h.0.attn.c_attn")]) == 1
    )


def test_a_layer_name_wider_than_half_the_terminal_folds_whole() -> None:
    """A name longer than half the width wraps onto further lines of the layer column,
    broken after a dot: every character is there, in order; no value is cut."""
    from ddsmon.sinks.terminal import SignaturesView

    name = "model.encoder.layers.23.self_attention.output_projection.lora_B"
    out = text_of(SignaturesView(sigs(layer(name, sigma_min=1.2345e-05), layer("fc2"))), width=80)
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    first = next(i for i, ln in enumerate(lines) if ln.startswith("model."))
    assert lines[first].split()[0] == "model.encoder.layers.23.self_attention."
    assert lines[first + 1].strip() == "output_projection.lora_B"  # nothing else on it
    assert lines[first + 2].split()[0] == "fc2"
    assert "1.23e-05" in lines[first].split() and "…" not in out
