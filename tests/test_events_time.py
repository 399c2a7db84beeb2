"""Events in training steps: windows from the run's cadence, the same transitions at two
cadences, the previous version's saved state, transitions with their validation
context, and the dying-direction count."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
from event_helpers import layer_reading

from ddsmon.errors import ConfigError, DDSError
from ddsmon.events import (
    Event,
    EventConfig,
    EventDetector,
    _LevelScanner,
    detect_transitions,
    transition_label,
    validation_scalars,
)
from ddsmon.signature import LayerSignature

DATA = Path(__file__).parent / "data"


def phase_change(step: float, at: float, width: float) -> tuple[float, float]:
    """(lambda_ratio, log_volume) of a run whose readings fall 4 decades / 40 nats over
    ``width`` steps from step ``at``, with a small deterministic wobble."""
    x = min(max((step - at) / width, 0.0), 1.0)
    wobble = 0.05 * math.sin(step / 37.0)
    return 10 ** (-2.0 - 4.0 * x + wobble), -20.0 - 40.0 * x + wobble


def run_at(every: int, steps: int, cfg: EventConfig, at: float = 6000, width: float = 600):
    det = EventDetector(cfg)
    events = []
    for step in range(0, steps + 1, every):
        pts = {}
        for name, shift in (("a", 0.0), ("b", 150.0)):
            lam, vol = phase_change(step, at + shift, width)
            pts[name] = layer_reading(lam, vol)
        events += det.update(step, pts, {"val_acc": min(1.0, max(0.0, (step - at) / 800))})
    return det, events


# --------------------------------------------------------------------------- windows


def test_default_windows_grow_with_the_run_and_counts_follow_its_cadence() -> None:
    det = EventDetector()
    assert det.windows is None and det.cadence is None
    for step in (1000, 1100, 1200, 1300, 1400):
        det.update(step, {"fc": layer_reading(1e-2, -20.0)})
    win = det.windows
    assert win is not None and det.cadence == 100 and win.age == 400
    # fractions of the age (steps since the first checkpoint); the confirmation (2% of the
    # age) and the dying window are at least one and two checkpoints
    assert (win.reference_window, win.reference_lag, win.transition_window) == (200, 80, 200)
    assert win.confirm == 100 and win.dying_window == 200
    assert win.min_reference == 6 and win.warm_up == 80 + 5 * 100
    det.update(6000, {"fc": layer_reading(1e-2, -20.0)})
    win = det.windows
    assert win is not None and det.cadence == 100  # the median gap of the first 5 stays
    assert (win.reference_window, win.reference_lag, win.dying_window) == (2500, 1000, 500)
    assert EventConfig().windows(100, age=10000).confirm == 200  # 2% of the age, past one
    # the old keys count checkpoints at the cadence
    counts = EventConfig(
        reference_window=8, reference_lag=3, transition_window=8, dying_window=3, confirm=1
    )
    win = counts.windows(100, age=5000)
    assert (win.reference_window, win.reference_lag) == (800, 300)
    assert (win.transition_window, win.confirm, win.dying_window) == (800, 100, 300)
    # a pinned cadence and windows in steps win; a given window is cut to what it holds
    cfg = EventConfig(cadence_steps=50, reference_window_steps=120, confirm_steps=0)
    win = cfg.windows(50, age=1000)
    assert (win.reference_window, win.reference_lag, win.confirm) == (120, 200, 0)
    assert win.min_reference == 2  # 120 steps hold 2 checkpoints at a cadence of 50
    assert EventDetector(cfg).windows == cfg.windows(50, age=0)


def test_a_cadence_far_from_the_first_one_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    det = EventDetector()
    with caplog.at_level(logging.WARNING, logger="ddsmon.events"):
        for step in (0, 10, 20, 30, 40, 50, 1000, 2000, 3000):
            det.update(step, {"fc": layer_reading(1e-2, -20.0)})
    warned = [r for r in caplog.records if "cadence" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "950 steps apart" in warned[0].getMessage()
    assert "*_steps" in warned[0].getMessage()


def onsets_and_transitions(every: int, cfg: EventConfig) -> tuple[list[int], list[int]]:
    _, events = run_at(every, 12000, cfg)
    first = [e.step for e in events if e.kind == "collapse"][:1]
    return first, [e.step for e in events if e.kind == "transition"]


@pytest.mark.parametrize(
    "cfg",
    [
        EventConfig(),  # the defaults: fractions of the run's age
        EventConfig(
            reference_window_steps=2000,
            reference_lag_steps=1000,
            transition_window_steps=2000,
            confirm_steps=0,
        ),
    ],
    ids=["defaults", "steps"],
)
def test_one_run_at_cadences_100_and_500_gives_the_same_transition(cfg: EventConfig) -> None:
    (onset_fine, fine), (onset_coarse, coarse) = (
        onsets_and_transitions(every, cfg) for every in (100, 500)
    )
    assert len(fine) == len(coarse) == 1, (fine, coarse)
    # the coarser run sees the change up to one of its cadences late ...
    assert 0 <= onset_coarse[0] - onset_fine[0] <= 500, (onset_fine, onset_coarse)
    # ... and confirms it a checkpoint later (none asked: the same checkpoint)
    late = 500 if cfg.confirm_steps is None else 0
    assert 0 <= coarse[0] - fine[0] <= 500 + late, (fine, coarse)


def test_windows_counted_in_checkpoints_are_not_the_same_at_two_cadences() -> None:
    # the positive twin of the test above: with windows of 8 checkpoints behind a lag of
    # 3 the reference at a cadence of 100 trails an 8000-step fall too closely to see it
    counts = EventConfig(reference_window=8, reference_lag=3, transition_window=8)
    found = {}
    for every in (100, 500):
        _, events = run_at(every, 20000, counts, width=8000)
        found[every] = [e.step for e in events if e.kind == "transition"]
    assert found[100] == [] and len(found[500]) == 1, found
    found = {}
    for every in (100, 500):
        _, events = run_at(every, 20000, EventConfig(), width=8000)
        found[every] = [e.step for e in events if e.kind == "transition"]
    assert len(found[100]) == len(found[500]) == 1, found


def test_a_sparse_run_is_decided_on_what_the_window_holds() -> None:
    # every 500 steps against a 1000-step reference window: 2 values, not 6
    cfg = EventConfig(reference_window_steps=1000, reference_lag_steps=0, confirm_steps=0)
    det, events = run_at(500, 12000, cfg)
    assert det.windows is not None and det.windows.min_reference == 2
    assert [e.kind for e in events].count("transition") == 1


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("count", "steps"),
    [
        ("reference_window", "reference_window_steps"),
        ("reference_lag", "reference_lag_steps"),
        ("transition_window", "transition_window_steps"),
        ("confirm", "confirm_steps"),
        ("dying_window", "dying_window_steps"),
    ],
)
def test_a_window_given_twice_names_both_keys(count: str, steps: str) -> None:
    with pytest.raises(ConfigError) as info:
        EventConfig.from_dict({count: 6, steps: 400}, source="config file ddsmon.toml")
    message = str(info.value)
    assert f"[events] {count} and [events] {steps} are both set" in message
    assert "counts training steps" in message
    # either alone is fine, and the count keeps working as checkpoints at the cadence
    assert getattr(EventConfig.from_dict({count: 6}).windows(50), count) == 300
    assert getattr(EventConfig.from_dict({steps: 400}).windows(50), count) == 400
    # built directly, the steps win
    assert getattr(EventConfig(**{count: 6, steps: 400}).windows(50), count) == 400


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"reference_window_steps": 800.5}, "must be a whole number of steps, got float"),
        ({"confirm_steps": "100"}, "must be a whole number of steps, got str"),
        ({"transition_window_steps": 0}, "transition_window_steps must be positive"),
        ({"reference_lag_steps": -5}, "reference_lag_steps must be >= 0"),
        ({"cadence_steps": 0}, "cadence_steps must be positive"),
        ({"cadence_checkpoints": 1}, "cadence_checkpoints must be at least 2"),
        ({"dying_min": 0}, "dying_min must be positive"),
        ({"dying_decades": -1}, "dying_decades must be >= 0"),
        ({"fraction_change": 0}, "fraction_change must be positive"),
        (
            {"confirm_steps": 800, "transition_window_steps": 800},
            "confirm_steps (800) must be below transition_window_steps (800)",
        ),
        ({"readings": ["dying_directions"]}, "'dying_directions' is derived between checkpoints"),
        ({"rank_readings": ["dying_directions"]}, "'dying_directions' is derived"),
    ],
)
def test_new_keys_are_checked_and_named(values: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=r"^config file t\.toml: \[events\] ") as info:
        EventConfig.from_dict(values, source="config file t.toml")
    assert says in str(info.value)


def test_config_with_steps_round_trips() -> None:
    cfg = EventConfig.from_dict({"reference_window_steps": 2000, "readings": ["x_entropy"]})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert "confirm_steps" not in data  # unset keys are left out
    assert EventConfig.from_dict(data) == cfg
    assert EventConfig.from_dict({"confirm_steps": None}) == EventConfig()


# --------------------------------------------------------------------------- saved state


def v1_points(n: int = 40, collapse_at: int = 25, seed: int = 0) -> list[tuple[int, dict]]:
    """The history tests/data/events_state_v1.json was saved from (by the version-1
    detector, after step 200); the readings collapse at checkpoint 25 and hold."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pts = {}
        for name in ("a", "b"):
            low = i >= collapse_at
            lam = (1e-6 if low else 1e-2) * 10 ** rng.normal(0, 0.2)
            vol = (-60.0 if low else -20.0) + rng.normal(0, 0.5)
            pts[name] = {
                "name": name, "finite": True, "lambda_ratio": lam, "sigma_ratio": 0.1,
                "log_volume": vol, "x_rank": 10, "g_rank": 10,
                "lambda_min": lam, "lambda_max": 1.0, "logdet": vol,
            }  # fmt: skip
        out.append((i * 10, pts))
    return out


def test_a_state_saved_by_the_previous_version_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    saved = json.loads((DATA / "events_state_v1.json").read_text())
    assert saved["version"] == 1 and saved["last_step"] == 200
    with caplog.at_level(logging.WARNING, logger="ddsmon.events"):
        det = EventDetector.from_state(saved)
    assert "previous version" in caplog.text
    assert det.last_step == 200 and det.cadence == 10
    events = []
    for step, pts in v1_points()[21:]:
        events += det.update(step, pts)
    # what the version-1 detector itself said next (recorded when the file was saved)
    assert [(e.step, e.kind, e.layer, e.reading) for e in events] == [
        (250, "collapse", "a", "lambda_ratio"),
        (250, "collapse", "a", "log_volume"),
        (250, "collapse", "b", "lambda_ratio"),
        (250, "collapse", "b", "log_volume"),
        (260, "transition", "a,b", "lambda_ratio,log_volume"),
    ]
    # and it saves as the current version
    again = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
    assert again.to_state()["version"] == 2


@pytest.mark.parametrize(
    "state",
    [
        {"version": 99},
        {"version": 1, "config": {}},
        {"version": 1, "config": {}, "last_step": 5, "layers": {}, "transitions": {}},
        {"version": 2, "config": {}, "last_step": 5},
        "not a state",
    ],
)
def test_a_state_that_cannot_be_restored_is_a_clear_error(state: object) -> None:
    with pytest.raises(DDSError, match="event detector state"):
        EventDetector.from_state(state)  # type: ignore[arg-type]


def test_state_with_meta_and_dying_survives_a_restart() -> None:
    def run(stop: int | None) -> list[Event]:
        det = EventDetector(EventConfig(readings=("lambda_ratio", "log_volume")))
        events: list[Event] = []
        for step in range(0, 12001, 100):
            if stop is not None and step == stop:
                det = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
            lam, vol = phase_change(step, 6000, 1500)
            pts = {"a": layer_reading(lam, vol), "b": layer_reading(lam * 1.1, vol - 1.0)}
            events += det.update(step, pts, {"val_acc": min(1.0, max(0.0, (step - 5800) / 800))})
        return events

    whole = run(None)
    assert {"collapse", "transition", "dying"} <= {e.kind for e in whole}
    for stop in (6100, 6300, 6500, 6900):
        assert run(stop) == whole


# --------------------------------------------------------------------------- trainer context


def test_validation_scalars_under_their_usual_names() -> None:
    meta = {
        "val_acc": 0.5, "val/accuracy": 0.4, "eval_accuracy": 0.3, "eval_loss": 1.2,
        "val_loss_epoch": 2.0, "valid_loss": 3.0, "validation/top1": 0.2,
        "train_acc": 1.0, "loss": 0.1, "test_acc": 0.9, "best_metric": 0.5, "epoch": 3.0,
        "val_lr": 0.1, "val_acc_bad": float("nan"),
    }  # fmt: skip
    assert validation_scalars(meta) == {
        "val_acc": 0.5, "val/accuracy": 0.4, "eval_accuracy": 0.3, "eval_loss": 1.2,
        "val_loss_epoch": 2.0, "valid_loss": 3.0, "validation/top1": 0.2,
    }  # fmt: skip
    assert validation_scalars(None) == {}


@pytest.mark.parametrize(
    ("before", "after", "label"),
    [
        ({"val_acc": 0.02}, {"val_acc": 0.60}, "generalising"),
        ({"val_acc": 0.02}, {"val_acc": 0.025}, "not generalising"),
        ({"val_acc": 2.0}, {"val_acc": 2.5}, "not generalising"),  # percent: +0.5 points
        ({"val_acc": 2.0}, {"val_acc": 40.0}, "generalising"),
        # an accuracy decides where there is one; a loss only where there is none
        ({"val_acc": 0.5, "val_loss": 3.0}, {"val_acc": 0.5, "val_loss": 1.0}, "not generalising"),
        ({"eval_loss": 3.0}, {"eval_loss": 1.0}, "generalising"),
        ({"eval_loss": 3.0}, {"eval_loss": 2.9}, "not generalising"),
        ({"val_loss": 40.0}, {"val_loss": 67.0}, "not generalising"),
        ({}, {"val_acc": 0.9}, "unknown"),
        ({}, {}, "unknown"),
    ],
)
def test_transition_labels(before: dict, after: dict, label: str) -> None:
    assert transition_label(before, after) == label


def test_a_transition_carries_its_validation_window() -> None:
    _, events = run_at(100, 12000, EventConfig())
    transitions = [e for e in events if e.kind == "transition"]
    assert transitions, [e.kind for e in events]
    tr = transitions[0]
    assert tr.label == "generalising"
    after = (tr.step - 6000) / 800
    assert tr.trainer_before == {"val_acc": 0.0} and tr.trainer_after == {"val_acc": after}
    data = tr.to_dict()
    assert data["trainer_before"] == {"val_acc": 0.0} and data["label"] == "generalising"
    assert f"generalising: val_acc 0 -> val_acc {after:.4g}" in tr.message
    # without meta: unknown, and the message says so
    det = EventDetector()
    events = []
    for step in range(0, 12001, 100):
        lam, vol = phase_change(step, 6000, 600)
        events += det.update(step, {"a": layer_reading(lam, vol), "b": layer_reading(lam, vol)})
    tr = next(e for e in events if e.kind == "transition")
    assert tr.label == "unknown" and tr.trainer_before == {} and tr.trainer_after == {}
    assert "validation: unknown" in tr.message


def test_the_pure_transition_detector_takes_the_meta_too() -> None:
    det = EventDetector()
    steps, metas, found = [], [], []
    for step in range(0, 12001, 100):
        lam, vol = phase_change(step, 6000, 600)
        meta = {"eval_loss": 5.0 if step < 6000 else 0.5}
        steps.append(step)
        metas.append(meta)
        found += det.update(
            step, {"a": layer_reading(lam, vol), "b": layer_reading(lam, vol)}, meta
        )
    tr = [e for e in found if e.kind == "transition"]
    assert len(tr) == 1 and tr[0].label == "generalising"
    upto = steps.index(tr[0].step) + 1
    collapses = [e for e in found if e.kind in ("collapse", "revival") and e.step <= tr[0].step]
    assert detect_transitions(collapses, steps[:upto], EventConfig(), metas[:upto]) == tr
    with pytest.raises(DDSError, match="2 meta for 3 checkpoint steps"):
        detect_transitions([], [1, 2, 3], EventConfig(), [{}, {}])


# --------------------------------------------------------------------------- dying directions


def dying_path(r: int, n: int = 30, every: int = 100, scale_only: bool = False) -> list[dict]:
    """G of rank 10 whose r smallest eigenvalues fall 0.4 decades per checkpoint from
    checkpoint 10 on (the rest held): log det+ falls r times as fast as log lambda_min.
    ``scale_only``: every eigenvalue falls together instead (a loss that shrinks)."""
    out = []
    for i in range(n):
        k = max(0, i - 10) * 0.4
        spectrum = np.ones(10)
        if scale_only:
            spectrum = spectrum * 10.0 ** (-k)
        else:
            spectrum[10 - r :] = 10.0 ** (-2 - k)
        spectrum[0] = 10.0 ** (-k) * 2 if scale_only else 2.0
        lmin, lmax = float(spectrum.min()), float(spectrum.max())
        logdet = float(np.sum(np.log(spectrum)))
        out.append(
            LayerSignature(
                "fc", 64, 64, 16, lambda_min=lmin, lambda_max=lmax, g_rank=10, g_dead=6,
                logdet=logdet, log_volume=logdet - 10 * math.log(lmax),
                sigma_min=0.3, sigma_max=3.0, x_rank=10, x_dead=6,
            ).to_dict()
        )  # fmt: skip
    return out


@pytest.mark.parametrize("r", [1, 3])
def test_the_detector_counts_dying_directions_and_flags_them(r: int) -> None:
    det = EventDetector()
    events, counts = [], []
    for i, point in enumerate(dying_path(r)):
        events += det.update(i * 100, {"fc": point})
        counts.append(det.last_derived["fc"]["dying_directions"])
    assert counts[0] is None and counts[5] is None  # first checkpoint; lambda_min still
    assert counts[12] == pytest.approx(r) and counts[-1] == pytest.approx(r)
    dying = [e for e in events if e.kind == "dying"]
    assert len(dying) == 1  # once per stretch
    ev = dying[0]
    # the count held from checkpoint 10 (step 1000) over the window: two checkpoints
    assert ev.step == 1200 and ev.dying_directions == pytest.approx(r)
    assert f"about {r} direction{'s' if r > 1 else ''} dying at 'fc'" in ev.message
    collapses = [e for e in events if e.kind == "collapse"]
    assert collapses and all(e.dying_directions == pytest.approx(r) for e in collapses)
    assert all(f"about {r} direction" in e.message for e in collapses)


def test_a_loss_that_merely_shrinks_counts_the_rank_but_is_not_dying() -> None:
    det = EventDetector()
    events = []
    for i, point in enumerate(dying_path(3, scale_only=True)):
        events += det.update(i * 100, {"fc": point})
    # every eigenvalue falls together: the identity counts the whole rank ...
    assert det.last_derived["fc"]["dying_directions"] == pytest.approx(10)
    # ... but lambda_ratio stays, so nothing is dying and nothing collapsed
    assert events == []


def test_the_derived_count_reaches_the_signatures() -> None:
    from ddsmon.signature import Signatures

    det = EventDetector()
    path = dying_path(2)
    sigs = None
    for i in (11, 12):
        layer = LayerSignature(**{k: v for k, v in path[i].items() if k in _FIELDS})
        sigs = Signatures({"fc": layer}, n=64, device="cpu", forward_dtype="float64",
                          fisher="activation", loss="ce")  # fmt: skip
        det.update(i * 100, {"fc": layer.to_dict()})
        sigs = sigs.with_derived(det.last_derived)
    assert sigs is not None
    assert sigs.layers["fc"].dying_directions == pytest.approx(2)
    assert sigs.to_dict()["layers"]["fc"]["dying_directions"] == pytest.approx(2)
    with pytest.raises(KeyError, match="no derived readings"):
        sigs.with_derived({"fc": {"lambda_min": 1.0}})
    assert sigs.with_derived({"other": {"dying_directions": 1.0}}) == sigs


_FIELDS = set(LayerSignature.__dataclass_fields__)


def test_a_dense_run_keeps_a_small_state_and_the_same_transition() -> None:
    dense, events = run_at(5, 12000, EventConfig())
    found = [e.step for e in events if e.kind == "transition"]
    _, sparse = onsets_and_transitions(100, EventConfig())
    # seen up to a (coarser) cadence earlier, and confirmed a checkpoint sooner
    assert len(found) == 1 and 0 <= sparse[0] - found[0] <= 200, (found, sparse)
    state = dense.to_state()
    for layer in state["layers"].values():
        for level in layer["levels"].values():
            assert len(level["buffer"]) <= 128 + 16
    assert len(json.dumps(state)) < 40_000
    # the thinned reference spans the window evenly: its oldest value is near its start
    win = dense.windows
    assert win is not None
    buffer = state["layers"]["a"]["levels"]["log_volume"]["buffer"]
    start = 12000 - win.reference_lag - win.reference_window
    assert abs(buffer[0][0] - start) <= 2 * win.reference_window / 64


# --------------------------------------------------------------------------- the warm-up's
# departures, and where a transition completed


def early_then_late(step: int) -> dict:
    """Two layers: ``a``'s lambda_ratio falls 5 decades over steps 300-2800 (early
    training, then flat), ``b``'s log_volume 40 nats over 5000-5600 (one collapse alone,
    never a transition by itself)."""
    x = min(max((step - 300) / 2500, 0.0), 1.0)
    y = min(max((step - 5000) / 600, 0.0), 1.0)
    lam = 10 ** (-2.0 - 5.0 * x + 0.05 * math.sin(step / 37.0))
    vol = -20.0 - 40.0 * y + 0.05 * math.sin(step / 53.0)
    return {"a": layer_reading(lam, -20.0), "b": layer_reading(1e-2, vol)}


def run_early_then_late(every: int, stop: int | None = None) -> list[Event]:
    det = EventDetector(EventConfig())
    events: list[Event] = []
    for step in range(0, 10001, every):
        if stop is not None and step == stop:
            det = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
        events += det.update(step, early_then_late(step))
    return events


def test_a_fall_in_the_warm_up_is_no_collapse_at_a_coarse_cadence() -> None:
    # every 100 steps the early fall is decided on as it happens (a collapse at 2200 that
    # expires alone); every 500 the first decision comes at 3500, against a reference
    # reaching back to step 0: the fall was already there at 3000, so it is the
    # warm-up's, not news. Reported, it would sit in the transition window and make a
    # transition of b's lone collapse at 5500 (before: a transition at 6000, a,b).
    found = {}
    for every in (100, 500):
        events = run_early_then_late(every)
        found[every] = [(e.step, e.kind, e.layer) for e in events if e.kind != "rank_change"]
    assert "transition" not in {k for _, k, _ in found[100] + found[500]}, found
    assert [(k, layer) for _, k, layer in found[500]] == [("collapse", "b")], found
    assert ("collapse", "a") in [(k, layer) for _, k, layer in found[100]], found


def test_a_fall_after_the_first_decision_is_still_a_collapse() -> None:
    # the twin: the same fall starting once the coarse run decides is a collapse there
    det = EventDetector(EventConfig())
    events: list[Event] = []
    for step in range(0, 10001, 500):
        x = min(max((step - 4000) / 1000, 0.0), 1.0)
        events += det.update(step, {"a": layer_reading(10 ** (-2.0 - 5.0 * x), -20.0)})
    assert [(e.step, e.kind) for e in events if e.kind == "collapse"] == [(4500, "collapse")]


#: log_volume of bench_events.py's slow run (seed 6, layer unembed) read every 500 steps
#: from step 0, in decades: early training, a rise to a plateau, then the fall of grokking.
SLOW_RUN_DECADES = [
    -18.64, -25.91, -27.67, -27.94, -26.2, -25.34, -24.23, -24.12, -23.97, -24.52, -26.89,
    -30.41, -34.32, -42.46, -58.07, -95.67, -143.59, -191.72, -225.68, -242.79, -240.7,
]  # fmt: skip


def coarse_collapses(decades: list[float], steps: list[int] | None = None) -> list[int]:
    """The steps of ``fc``'s log_volume collapses, read at ``steps`` (every 500)."""
    det = EventDetector(EventConfig())
    found = []
    for i, level in enumerate(decades):
        step = 500 * i if steps is None else steps[i]
        events = det.update(step, {"fc": layer_reading(1e-2, level * math.log(10))})
        found += [e.step for e in events if e.kind == "collapse" and e.reading == "log_volume"]
    return found


def test_a_coarse_reference_is_its_window_once_decided_not_early_training() -> None:
    # At step 5500 the reference window (half the age, behind a fifth) is steps
    # 1650-4400: five checkpoints at this cadence, 2000-4000, plateau and rise, median
    # -24.2, MAD 0.26 decades, so the 4-decade floor is the threshold and the fall to
    # -30.4 is a collapse, where the run read every 100 steps saw it (5400). Reaching back
    # to the sixth value (1500, early training) moved the median to -24.8 and the
    # threshold to 11 decades, and the collapse waited for 6000.
    assert coarse_collapses(SLOW_RUN_DECADES)[:1] == [5500]


def test_a_jittered_coarse_reference_is_its_window_too() -> None:
    # each step moved by up to 100 (a fixed draw): the median gap then overstates what the
    # window holds, and a rule counting checkpoints from the cadence (max(4, window /
    # cadence) values) reached back into early training again: the collapse came at 6020
    rng = random.Random(3)
    moved = [rng.randint(-100, 100) for _ in SLOW_RUN_DECADES]
    steps = [0] + [500 * i + moved[i] for i in range(1, len(SLOW_RUN_DECADES))]
    found = coarse_collapses(SLOW_RUN_DECADES, steps)
    assert found[:1] == [5403], found


def test_only_after_its_first_decision_is_a_reading_read_on_fewer_values() -> None:
    # the warm-up's guard: the first decision still needs min_reference values
    scanner = _LevelScanner("fc", "log_volume", EventConfig())
    win = EventConfig().windows(cadence=500.0, age=5500.0, warm=True)
    assert win.min_reference == 6
    assert scanner.least_reference(win) == 6
    scanner.decided = True
    assert scanner.least_reference(win) == 4
    few = EventConfig(min_reference=3).windows(cadence=500.0, age=5500.0, warm=True)
    assert scanner.least_reference(few) == 3  # never more than min_reference
    det = EventDetector(EventConfig())  # and the warm-up itself is unchanged: until 3500
    for i, level in enumerate(SLOW_RUN_DECADES[:8]):
        det.update(500 * i, {"fc": layer_reading(1e-2, level * math.log(10))})
        if i:  # the cadence is known from the second checkpoint
            assert det.windows is not None and det.windows.in_warm_up == (i < 7), 500 * i


@pytest.mark.parametrize("stop", [3500, 4000, 5500, 6000])
def test_the_warm_up_state_survives_a_restart(stop: int) -> None:
    assert run_early_then_late(500, stop) == run_early_then_late(500)


def test_a_state_saved_before_the_warm_up_flags_loads() -> None:
    det = EventDetector(EventConfig())
    for step in range(0, 4001, 500):
        det.update(step, early_then_late(step))
    state = det.to_state()
    level = state["layers"]["a"]["levels"]["lambda_ratio"]
    assert level["decided"] is True and level["silent"] is True
    for layer in state["layers"].values():  # as the code before these keys saved it
        for saved in layer["levels"].values():
            del saved["decided"], saved["silent"]
    again = EventDetector.from_state(json.loads(json.dumps(state)))
    assert again.to_state()["layers"]["a"]["levels"]["lambda_ratio"]["decided"] is True
    assert again.to_state()["layers"]["a"]["levels"]["lambda_ratio"]["silent"] is False


def test_a_transition_says_where_it_completed() -> None:
    # two layers fall 150 steps apart: the transition completed at the second collapse
    # and was reported once both had held the confirmation (at least a checkpoint)
    done = {}
    for every in (100, 500):
        _, events = run_at(every, 12000, EventConfig())
        (tr,) = [e for e in events if e.kind == "transition"]
        collapses = sorted(e.step for e in events if e.kind == "collapse" and e.step <= tr.step)
        assert tr.completed_step == collapses[1], (tr, collapses)
        assert tr.step - tr.completed_step >= max(0.02 * tr.step, every)
        assert f"complete at step {tr.completed_step}," in tr.message
        data = json.loads(json.dumps(tr.to_dict()))
        assert data["completed_step"] == tr.completed_step and Event.from_dict(data) == tr
        done[every] = (tr.completed_step, tr.step)
    # where it completed is seen up to one coarse cadence late; where it was reported
    # trails that by the confirmation, longer at the coarse cadence
    assert 0 <= done[500][0] - done[100][0] <= 500, done
    assert done[500][1] - done[100][1] > done[500][0] - done[100][0], done


# ------------------------------------------------- a generalisation across the layers


#: Layers that fall one after another (step each starts falling): "a" first, "b" inside
#: the stretch that belongs to a's transition, "c" past that stretch's end as it was
#: measured from the report alone, but within the window of b's collapses.
STAGES = {"a": 6000.0, "b": 8500.0, "c": 11000.0}


def run_in_stages(
    every: int, val_rise: float, stop: int | None = None, steps: int = 14000
) -> list[Event]:
    """The transitions of a run whose layers fall at :data:`STAGES`, its validation
    accuracy rising over 800 steps from ``val_rise``; saved and restored at ``stop``."""
    det = EventDetector(EventConfig())
    found = []
    for step in range(0, steps + 1, every):
        pts = {}
        for name, at in STAGES.items():
            lam, vol = phase_change(step, at, 600)
            pts[name] = layer_reading(lam, vol)
        meta = {"val_acc": min(1.0, max(0.0, (step - val_rise) / 800))}
        found += [e for e in det.update(step, pts, meta) if e.kind == "transition"]
        if step == stop:
            det = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
    return found


@pytest.mark.parametrize("every", [100, 500])
def test_a_generalisation_that_reaches_the_layers_in_turn_is_one_transition(every: int) -> None:
    (tr,) = run_in_stages(every, val_rise=6000)
    assert tr.label == "generalising" and tr.layer == "a", tr.message
    assert 6000 <= tr.completed_step <= 6000 + 600 + every


@pytest.mark.parametrize("every", [100, 500])
def test_a_generalisation_after_a_collapse_without_one_is_its_own_transition(
    every: int,
) -> None:
    """The stretch after a "not generalising" transition is not extended by its own
    collapses: the later one, with validation rising, is reported as it comes."""
    first, second = run_in_stages(every, val_rise=11000)
    assert first.label == "not generalising" and first.layer == "a", first.message
    assert second.label == "generalising" and second.layer == "c", second.message
    assert 11000 <= second.completed_step <= 11000 + 600 + every


@pytest.mark.parametrize("stop", [8000, 9000])
def test_the_stretch_of_a_generalisation_survives_a_restart(stop: int) -> None:
    """Saved before b's collapse (8000: the label must survive, or b does not extend
    the stretch and c is a second transition) and after it (9000)."""
    whole = run_in_stages(100, val_rise=6000)
    assert [e.to_dict() for e in run_in_stages(100, 6000, stop=stop)] == [
        e.to_dict() for e in whole
    ]


def test_the_pairs_that_extended_a_stretch_are_saved() -> None:
    det = EventDetector(EventConfig())
    for step in range(0, 9001, 100):
        pts = {name: layer_reading(*phase_change(step, at, 600)) for name, at in STAGES.items()}
        det.update(step, pts, {"val_acc": min(1.0, max(0.0, (step - 6000) / 800))})
    saved = json.loads(json.dumps(det.to_state()))["transitions"]
    assert saved["last_label"] == "generalising"
    assert ["b", "lambda_ratio"] in saved["stretch_pairs"], saved["stretch_pairs"]
    again = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
    assert again.to_state()["transitions"] == det.to_state()["transitions"]


def test_a_reading_that_dips_and_recovers_does_not_hold_the_stretch_open() -> None:
    """After a generalisation at "a", layer "f" dips for one checkpoint again and again
    inside each stretch: revived, never held, it extends nothing, and "c" falling much
    later is a transition of its own."""
    flaps = (8000, 11000, 15000, 20000)
    det = EventDetector(EventConfig())
    found = []
    for step in range(0, 30001, 100):
        lam, vol = phase_change(step, 6000, 600)
        pts = {"a": layer_reading(lam, vol)}
        dip = 4.0 if step in flaps else 0.0
        pts["f"] = layer_reading(10 ** (-2.0 - dip), -20.0 - 10 * dip)
        lam, vol = phase_change(step, 26000, 600)
        pts["c"] = layer_reading(lam, vol)
        meta = {"val_acc": min(1.0, max(0.0, (step - 6000) / 800))}
        found += [e for e in det.update(step, pts, meta) if e.kind == "transition"]
    assert [e.layer for e in found] == ["a", "c"], [e.message for e in found]
