"""Events on checkpoint cadences nobody tuned on: a log-spaced start (Pythia-style: steps
0, 1, 2, 4, ... then a regular cadence), a cadence that changes mid-run, checkpoints
rotated away before they were read, jittered steps.

The runs are the modular-addition example trained by its own ``train`` (every step
saved, then the checkpoints off the schedule removed, as a trainer's rotation does), read
in-process by the engine and the detector, and once through ``ddsmon scan`` with
``--events-json`` and the MLflow store read back.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from event_helpers import layer_reading
from modular_addition_helpers import example_module, scan_with_events

from ddsmon import compute_signatures
from ddsmon.events import Event, EventConfig, EventDetector

ROOT = Path(__file__).resolve().parents[1]

#: Pythia's schedule at this run's scale: log-spaced to 64, then every 25 steps.
LOG_SPACED = [0, 1, 2, 4, 8, 16, 32, 64, *range(75, 201, 25)]


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The weight-decay-free control (memorises within ~60 steps, never generalises),
    200 steps, the checkpoints of :data:`LOG_SPACED` kept."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("control")
    try:
        example_module("train").train(
            run / "ckpts", steps=200, every=1, weight_decay=0.0, probe_out=run / "probe.pt"
        )
    finally:
        torch.set_num_threads(threads)
    for path in (run / "ckpts").glob("step_*.pt"):
        if int(path.stem.split("_")[1]) not in LOG_SPACED:
            path.unlink()  # rotated away before anything read it
    yield run


def _read(run: Path) -> list[tuple[int, dict, dict]]:
    factory = example_module("model").make_model
    probe = torch.load(run / "probe.pt", weights_only=True)
    rows = []
    for path in sorted((run / "ckpts").glob("step_*.pt")):
        ck = torch.load(path, weights_only=True)
        model = factory()
        model.load_state_dict(ck["model"])
        sig = compute_signatures(model, probe["inputs"], probe["targets"], loss="ce", device="cpu")
        meta = {k: float(v) for k, v in ck.items() if k not in ("model", "step")}
        rows.append((int(ck["step"]), meta, {k: s.to_dict() for k, s in sig.layers.items()}))
    return rows


def test_a_log_spaced_start_is_a_warm_up_not_a_transition(
    control: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The cadence was the median gap of the first 5 checkpoints (1.5 steps here) for
    # good: the warm-up was over at the 8th checkpoint, step 64, in the middle of
    # memorisation, which collapsed two readings against steps 1-32 and made a
    # "not generalising" transition at step 75; and a gap of 8 steps was warned about
    # as if the user had set the windows wrong. Now the cadence follows the newest gaps
    # and the warm-up lasts until the checkpoints are as far apart as the later ones.
    rows = _read(control)
    assert [s for s, _, _ in rows] == LOG_SPACED
    det = EventDetector()
    events: list[Event] = []
    with caplog.at_level(logging.WARNING, logger="ddsmon.events"):
        for step, meta, layers in rows:
            events += det.update(step, layers, meta)
    assert [e for e in events if e.kind in ("collapse", "transition")] == [], events
    assert det.cadence == 25
    assert "steps apart" not in caplog.text


@pytest.fixture(scope="module")
def fine_control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The control of seed 2 (``bench_events.py --cadences``), 150 steps, a checkpoint
    every 5 steps kept: the fine start of its fine-then-coarse schedule."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("fine_control")
    try:
        example_module("train").train(
            run / "ckpts",
            steps=150,
            every=5,
            weight_decay=0.0,
            seed=2,
            probe_out=run / "probe.pt",
        )
    finally:
        torch.set_num_threads(threads)
    yield run


def test_a_fine_start_is_a_warm_up_through_memorisation(fine_control: Path) -> None:
    # Read every 5 steps, the warm-up passed its age (the lag and 5 cadences) at step
    # 35, while the loss was falling from 4.0 to 0.01 (steps 15-60): the memorisation's
    # collapses made a "not generalising" transition at step 45, where the run read
    # every 25 was still warming up. The warm-up now lasts while the training loss is
    # in its first fall (warm_up_loss_fall), so it ends after memorisation, in steps.
    rows = _read(fine_control)
    assert [s for s, _, _ in rows] == list(range(0, 151, 5))
    assert rows[0][1]["loss"] > 3.5 and rows[-1][1]["loss"] < 0.05  # it memorised

    def events(cfg: EventConfig) -> list[Event]:
        det = EventDetector(cfg)
        return [e for step, meta, layers in rows for e in det.update(step, layers, meta)]

    before = [e for e in events(EventConfig(warm_up_loss_fall=0.0)) if e.kind == "transition"]
    assert before and before[0].step <= 60 and before[0].label == "not generalising"
    now = events(EventConfig())
    assert [e for e in now if e.kind in ("collapse", "transition")] == [], now


def _feed(steps: Sequence[int], fall_at: float, cfg: EventConfig | None = None):
    """Two layers whose lambda_ratio and log_volume fall 4 decades / 40 nats over 200
    steps from ``fall_at`` (``b`` 100 steps later), with a small wobble."""
    det = EventDetector(cfg or EventConfig())
    events = []
    for step in steps:
        pts = {}
        for name, shift in (("a", 0.0), ("b", 100.0)):
            x = min(max((step - fall_at - shift) / 200, 0.0), 1.0)
            wobble = 0.05 * math.sin(step / 37.0)
            pts[name] = layer_reading(10 ** (-2.0 - 4.0 * x + wobble), -20.0 - 40.0 * x + wobble)
        events += det.update(step, pts)
    return det, events


def test_the_cadence_follows_the_run_when_it_changes() -> None:
    # Pythia-style: log-spaced to 512, then every 1000; windows counted in checkpoints
    # span checkpoints of the cadence now, not of the first five (1.5 steps: a window
    # of 8 "checkpoints" was 12 steps, holding none of them)
    pythia = [0, *[2**k for k in range(10)], *range(1000, 20001, 1000)]
    det, _ = _feed(pythia, 1e9, EventConfig(reference_window=8, reference_lag=2))
    assert det.cadence == 1000
    assert det.windows is not None and det.windows.reference_window == 8000
    # every 50 steps, then every 500: the new cadence holds after a few checkpoints
    det, _ = _feed([*range(0, 1000, 50), *range(1000, 8001, 500)], 1e9)
    assert det.cadence == 500
    # a few checkpoints rotated away, or steps jittered, do not move it
    gaps = [s for s in range(0, 5001, 100) if not 2000 <= s <= 2300]
    assert _feed(gaps, 1e9)[0].cadence == 100
    jittered = [s + (7 * s // 100) % 21 - 10 for s in range(100, 5001, 100)]
    assert 90 <= (_feed(jittered, 1e9)[0].cadence or 0) <= 110


def test_a_cadence_that_grows_after_the_warm_up_does_not_start_it_again() -> None:
    # every 50 to step 1000, then every 500: at the new cadence the warm-up would reach
    # to age 3125 (the lag plus 5 cadences), but it ended at step ~350 and stays ended,
    # so a phase change at 2000-2300 is seen as it happens
    steps = [*range(0, 1000, 50), *range(1000, 8001, 500)]
    _, events = _feed(steps, 2000)
    transitions = [e for e in events if e.kind == "transition"]
    assert len(transitions) == 1 and transitions[0].step <= 3500, events
    # and a steady run on that schedule stays quiet
    _, quiet = _feed(steps, 1e9)
    assert [e for e in quiet if e.kind != "rank_change"] == []


@pytest.mark.slow  # about 13 s: a scan's start-up (MLflow's store) on the shared 2 cores
def test_a_log_spaced_start_is_quiet_through_scan(control: Path, tmp_path: Path) -> None:
    proc, uri, events_json = scan_with_events(control, tmp_path, COLUMNS="120")
    assert proc.returncode == 0, proc.stderr
    assert f"read {len(LOG_SPACED)}, failed 0, events 0" in proc.stdout, proc.stdout
    assert "steps apart" not in proc.stderr, proc.stderr
    assert not events_json.exists() or events_json.read_text() == ""
    from fault_helpers import logged_steps, runs_of

    (run,) = runs_of(uri)
    assert logged_steps(uri, run.info.run_id) == LOG_SPACED
    assert [k for k in run.data.tags if k.startswith("dds.event.")] == []
    assert [k for k in run.data.metrics if k.startswith("dds/events/")] == []


@pytest.mark.slow  # about 15 s: a scan's start-up (MLflow's store) on the shared 2 cores
def test_a_fine_start_without_a_training_loss_warms_up_on_the_probe_loss(
    fine_control: Path, tmp_path: Path
) -> None:
    # checkpoints that carry no training loss (a Lightning checkpoint's, by default):
    # the daemon passes the probe's fitted loss (the 10th percentile of its per-sample
    # losses) to the detector, whose warm-up follows it; with nothing passed, or the
    # probe's mean loss (it rises: half the probe is held out), this run's memorisation
    # was a "not generalising" transition at step 45
    run = tmp_path / "run"
    (run / "ckpts").mkdir(parents=True)
    shutil.copy(fine_control / "probe.pt", run / "probe.pt")
    for path in sorted((fine_control / "ckpts").glob("step_*.pt")):
        ck = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in ck.items() if k != "loss"}, run / "ckpts" / path.name)
    proc, _, events_json = scan_with_events(run, tmp_path, COLUMNS="120")
    assert proc.returncode == 0, proc.stderr
    assert "read 31, failed 0" in proc.stdout, proc.stdout
    told = (
        [json.loads(line) for line in events_json.read_text().splitlines()]
        if (events_json.exists())
        else []
    )
    assert [e for e in told if e["kind"] in ("collapse", "transition")] == [], told


def test_messages_say_their_units_and_a_pinned_cadence_in_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a log_volume collapse is measured in decades, its values are nats: "5.79 decades
    # (-83.15 -> -96.49)" left the reader to guess why the two disagree
    _, events = _feed([*range(0, 1000, 50), *range(1000, 8001, 500)], 2000)
    volume = [e for e in events if e.kind == "collapse" and e.reading == "log_volume"]
    assert volume and all(" log_volume (nats) fell" in e.message for e in volume), volume
    (transition,) = [e for e in events if e.kind == "transition"]
    assert "collapses within 1500 steps, complete at step 2500, each held 500+ steps: " in (
        transition.message
    ), transition.message  # "held 500+:" said neither what held nor in what unit
    ratio = [e for e in events if e.kind == "collapse" and e.reading == "lambda_ratio"]
    assert ratio and not any("nats" in e.message for e in ratio)
    with caplog.at_level(logging.WARNING, logger="ddsmon.events"):
        _feed(range(0, 5001, 500), 1e9, EventConfig(cadence_steps=25))
    assert "checkpoints 500 steps apart while cadence_steps pins the cadence at 25 steps" in (
        caplog.text
    )
    # a checkpoint saved a step after a periodic one (a trainer's final or best save) is
    # no drift: it was warned about as "checkpoints missing", and used up the one warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddsmon.events"):
        det, _ = _feed([*range(0, 1001, 100), 1001, *range(1100, 3001, 100)], 1e9)
    assert "steps apart" not in caplog.text and det.cadence == 100


@pytest.mark.parametrize("stop", [3, 9, 14, 25, 28, 30])
def test_a_restart_anywhere_in_a_changing_cadence_changes_nothing(stop: int) -> None:
    # the cadence's newest gaps and the warm-up's end travel in the saved state: at 30
    # (after step 2500, gaps 50, 500, 500, 500) the warm-up at the cadence now would
    # reach to 3000, though it ended long before
    steps = [0, 1, 2, 4, 8, 16, 32, 64, *range(100, 1000, 50), *range(1000, 8001, 500)]

    def run(restart: int | None) -> list[Event]:
        det = EventDetector()
        events: list[Event] = []
        for i, step in enumerate(steps):
            if i == restart:
                saved = json.loads(json.dumps(det.to_state()))
                det = EventDetector.from_state(saved)
                assert json.loads(json.dumps(det.to_state())) == saved  # nothing lost
            pts = {}
            for name, shift in (("a", 0.0), ("b", 100.0)):
                x = min(max((step - 2000 - shift) / 200, 0.0), 1.0)
                pts[name] = layer_reading(10 ** (-2.0 - 4.0 * x), -20.0 - 40.0 * x)
            events += det.update(step, pts)
        return events

    whole = run(None)
    assert any(e.kind == "transition" for e in whole)
    assert run(stop) == whole


def test_the_bench_schedules_are_what_they_say() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_events

    got = bench_events.schedules(0, 1000, 25)
    assert got["regular"] == list(range(0, 1001, 25))
    assert got["log-spaced"][:8] == [0, 1, 2, 4, 8, 16, 32, 64]
    assert got["log-spaced"][8:] == list(range(75, 1001, 25))
    fine = got["fine-then-coarse"]
    assert fine[:3] == [0, 5, 10] and fine[-2:] == [950, 1000]
    assert sorted(set(got["regular"]) - set(got["gaps"])) == [400, 425, 450, 475]
    jittered = got["jittered"]
    assert len(jittered) == len(got["regular"]) and jittered == sorted(jittered)
    assert all(abs(j - r) <= 8 for j, r in zip(jittered, got["regular"], strict=True))
    steady = bench_events.schedules(1000, 2000, 25)
    assert all(1000 <= s <= 2000 for v in steady.values() for s in v)
