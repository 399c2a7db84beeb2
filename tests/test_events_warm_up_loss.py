"""Two rules that make the events the same at any checkpoint schedule, in steps:

* the warm-up lasts while the trainer's training loss is still in its first fall
  (``warm_up_loss_fall``), so a run read every 5 steps does not report its memorisation
  as a transition where the same run read every 25 steps is still warming up;
* the reference is a median over time (each value weighted by the span of training it
  stands for), so a window straddling a switch from every 5 steps to every 50 is not the
  level of its dense stretch.

The real-run counterpart is in ``tests/test_adversary_dynamics_cadence.py``
(``test_a_fine_start_is_a_warm_up_through_memorisation``)."""

from __future__ import annotations

import json
import math

import pytest
from event_helpers import layer_reading
from hypothesis import given, settings
from hypothesis import strategies as st

from ddsmon.errors import ConfigError
from ddsmon.events import (
    Event,
    EventConfig,
    EventDetector,
    _median,
    _time_weights,
    _weighted_median,
    training_loss,
)

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("meta", "found"),
    [
        ({"loss": 0.5, "val_loss": 0.9}, ("loss", 0.5)),
        ({"train_loss": 0.4, "loss": 0.5}, ("train_loss", 0.4)),
        ({"loss": 0.5, "train/loss": 0.4}, ("train/loss", 0.4)),
        ({"train_loss_epoch": 0.3}, ("train_loss_epoch", 0.3)),
        ({"Training-Loss": 2.0}, ("Training-Loss", 2.0)),
        ({"val_loss": 0.9, "eval_loss": 0.8}, None),
        ({"loss": True}, None),
        ({"loss": float("nan"), "train_loss": float("inf")}, None),
        ({"loss": "0.5"}, None),
        ({"lossy": 0.5, "loss_scale": 65536.0}, None),
        (None, None),
    ],
)
def test_the_training_loss_is_found_under_its_usual_names(meta: dict | None, found) -> None:
    assert training_loss(meta) == found


def test_the_loss_rule_is_a_checked_config_key() -> None:
    assert EventConfig.from_dict({"warm_up_loss_fall": 0}).warm_up_loss_fall == 0.0
    with pytest.raises(ConfigError, match="warm_up_loss_fall must be >= 0"):
        EventConfig.from_dict({"warm_up_loss_fall": -0.1}, source="config file d.toml")
    with pytest.raises(ConfigError, match="warm_up_loss_fall"):
        EventConfig.from_dict({"warm_up_loss_fall": "a lot"})


# --------------------------------------------------------------------------- warm-up


def memorising(step: int) -> tuple[dict, dict]:
    """A run that memorises as the modular-addition control does (its seed-2 loss, read
    every step: 4.0 flat to step 15, 0.1 by step 70): the readings flat to step 25, then
    3 decades / 40 nats lower by step 55, in both layers; then flat. The training loss
    falls with them."""
    x = min(max((step - 25) / 30, 0.0), 1.0)
    wobble = 0.02 * math.sin(step / 7.0)
    points = {
        name: layer_reading(10 ** (-2.0 - 3.0 * x + wobble), -20.0 - 40.0 * x + wobble)
        for name in ("a", "b")
    }
    loss = 0.1 + 3.9 / (1.0 + math.exp((step - 40) / 6.0))
    return points, {"loss": loss, "val_acc": 0.0}


def feed(steps, make, cfg: EventConfig | None = None, *, with_loss: bool = True, stop=None):
    det = EventDetector(cfg or EventConfig())
    events: list[Event] = []
    for i, step in enumerate(steps):
        if i == stop:
            det = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
        points, meta = make(step)
        events += det.update(step, points, meta if with_loss else {"val_acc": meta["val_acc"]})
    return det, events


FINE = list(range(0, 301, 5))


def test_memorisation_read_every_5_steps_is_a_warm_up() -> None:
    det, events = feed(FINE, memorising)
    assert [e for e in events if e.kind in ("collapse", "transition")] == [], events
    assert det.windows is not None and not det.windows.in_warm_up


@pytest.mark.parametrize("off", ["no loss carried", "rule off"])
def test_without_the_loss_rule_the_same_run_reports_a_transition(off: str) -> None:
    # what the run read every 5 steps said before: the warm-up passed its age (the lag
    # and 5 cadences: 31 steps) at step 35, with the readings in mid-fall
    cfg = EventConfig(warm_up_loss_fall=0.0) if off == "rule off" else EventConfig()
    _, events = feed(FINE, memorising, cfg, with_loss=off != "no loss carried")
    transitions = [e for e in events if e.kind == "transition"]
    assert transitions and transitions[0].step <= 60
    assert transitions[0].label == "not generalising"


def test_the_warm_up_ends_when_the_loss_fall_is_over_not_at_a_checkpoint_count() -> None:
    # read every 5 steps: held past the age rule (step 35) while the loss falls by more
    # than 2% of 4.0 over the last fifth of the age; over once it does not
    det = EventDetector()
    ended = None
    for step in FINE:
        points, meta = memorising(step)
        det.update(step, points, meta)
        win = det.windows
        if ended is None and win is not None and not win.in_warm_up:
            ended = step
    assert ended is not None and 60 <= ended <= 100, ended
    # read every 25, the age rule alone holds it longer (the lag and 5 cadences)
    _, coarse = feed(list(range(0, 301, 25)), memorising)
    assert [e for e in coarse if e.kind in ("collapse", "transition")] == []


def test_a_loss_on_a_plateau_does_not_hold_the_warm_up() -> None:
    # sparse parity's loss sits at ln 2 for thousands of steps before its transition:
    # the warm-up ends by the age rule, and a later fall is reported
    def plateau(step: int) -> tuple[dict, dict]:
        x = min(max((step - 2000) / 200, 0.0), 1.0)
        wobble = 0.02 * math.sin(step / 37.0)
        points = {
            name: layer_reading(10 ** (-2.0 - 3.0 * x + wobble), -20.0 - 40.0 * x + wobble)
            for name in ("a", "b")
        }
        return points, {"loss": 0.693 - 0.6 * x + 0.005 * math.sin(step), "val_acc": 0.5 + x / 2}

    det = EventDetector()
    events: list[Event] = []
    ended = None
    for step in range(0, 3001, 50):
        events += det.update(step, *plateau(step))
        if ended is None and det.windows is not None and not det.windows.in_warm_up:
            ended = step
    assert ended == 350  # the age rule's: the lag (a fifth of the age) and 5 cadences
    transitions = [e for e in events if e.kind == "transition"]
    assert transitions and 2000 <= transitions[0].step <= 2500
    assert transitions[0].label == "generalising"


def test_a_falling_loss_that_appears_late_does_not_restart_the_warm_up() -> None:
    def late_loss(step: int) -> tuple[dict, dict]:
        points, meta = memorising(step)
        return points, meta if step >= 200 else {"val_acc": 0.0}

    det = EventDetector()
    for step in range(0, 200, 25):
        det.update(step, *late_loss(step))
    assert det.windows is not None and not det.windows.in_warm_up
    det.update(225, *late_loss(225))
    assert not det.windows.in_warm_up


@pytest.mark.parametrize("stop", [3, 8, 11, 15, 30])
def test_the_loss_rule_survives_a_restart(stop: int) -> None:
    _, whole = feed(FINE, memorising, EventConfig(ratio_mad_k=0.0))
    _, restarted = feed(FINE, memorising, EventConfig(ratio_mad_k=0.0), stop=stop)
    assert restarted == whole


def test_a_state_saved_before_the_loss_rule_loads() -> None:
    det = EventDetector()
    for step in range(0, 50, 5):
        det.update(step, *memorising(step))
    state = json.loads(json.dumps(det.to_state()))
    for key in ("loss_key", "loss_first", "losses", "loss_falling"):
        del state["cadence"][key]
    again = EventDetector.from_state(state)
    again.update(50, *memorising(50))  # the loss is then tracked from here
    assert again._cadence.loss_key == "loss"


# --------------------------------------------------------------------------- time-weighted reference


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.integers(1, 6)),
        min_size=1,
        max_size=30,
    )
)
def test_the_weighted_median_is_the_median_of_the_values_repeated_by_weight(pairs) -> None:
    values = [v for v, _ in pairs]
    weights = [float(w) for _, w in pairs]
    expanded = [v for v, w in pairs for _ in range(w)]
    assert _weighted_median(values, weights) == _median(expanded)
    assert _weighted_median(values, [2.5] * len(values)) == _median(values)


def test_time_weights_are_the_cadence_at_a_regular_cadence() -> None:
    assert _time_weights([0, 25, 50, 75]) == [25.0, 25.0, 25.0, 25.0]
    assert _time_weights([0, 5, 10, 60, 110]) == [5.0, 5.0, 27.5, 50.0, 50.0]
    assert _time_weights([7]) == [1.0]


def drifting(rate: float):
    """A steady run: log_volume drifting down by ``rate`` nats a step (a small learning
    rate), the ratios still, the loss flat."""

    def make(step: int) -> tuple[dict, dict]:
        wobble = 0.01 * math.sin(step / 11.0)
        vol = -20.0 - rate * step + wobble
        points = {name: layer_reading(10 ** (-2.0 + wobble), vol) for name in "ab"}
        return points, {"loss": 1e-5, "val_acc": 1.0}

    return make


def test_a_drift_is_judged_the_same_read_fine_then_coarse() -> None:
    # every 5 steps for the first 600, then every 50 (bench_events.py's fine-then-
    # coarse schedule, 30% of the run fine): at step 1450 the reference window
    # [435, 1160) held 33 values of the dense stretch and 12 of the rest, so its plain
    # median was the level near step 545, not the window's middle (near 800), and the
    # value 900 steps below it passed the threshold: a "collapse" in both layers and a
    # transition, at any drift rate; read every 25 steps, nothing
    regular = list(range(0, 2001, 25))
    fine_then_coarse = [*range(0, 600, 5), *range(600, 2001, 50)]
    for rate in (0.03, 0.3):
        make = drifting(rate)
        _, every_25 = feed(regular, make)
        _, switched = feed(fine_then_coarse, make)
        assert [e for e in every_25 if e.kind in ("collapse", "transition")] == []
        assert [e for e in switched if e.kind in ("collapse", "transition")] == []


# --------------------------------------------------------------------------- the probe's loss


def feed_probe_loss(steps, meta_of=lambda meta: {"val_acc": meta["val_acc"]}):
    det = EventDetector()
    events: list[Event] = []
    for step in steps:
        points, meta = memorising(step)
        events += det.update(step, points, meta_of(meta), probe_loss=meta["loss"])
    return det, events


def test_the_probe_loss_stands_in_where_the_checkpoints_carry_no_training_loss() -> None:
    # a Lightning checkpoint carries no training loss by default: the daemon passes the
    # probe's fitted loss, and the warm-up follows it as it follows the trainer's
    det, events = feed_probe_loss(FINE)
    assert [e for e in events if e.kind in ("collapse", "transition")] == [], events
    assert det._cadence.warm


def test_the_trainer_loss_wins_over_the_probe_loss() -> None:
    # a trainer's loss already flat (1e-3) holds nothing, whatever the probe's does
    det, events = feed_probe_loss(FINE, lambda meta: {"loss": 1e-3, "val_acc": 0.0})
    assert any(e.kind == "transition" for e in events)
    assert det._cadence.loss_key == "loss"


def test_the_fitted_loss_is_the_10th_percentile_of_the_per_sample_losses() -> None:
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    from ddsmon import compute_signatures

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    by_loop = [F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).item() for i in range(40)]
    # numpy's default (linear) quantile: between the 4th and 5th smallest of 40
    ranked = sorted(by_loop)
    expected = ranked[3] + 0.9 * (ranked[4] - ranked[3])
    assert sig.fitted_loss == pytest.approx(expected, rel=1e-10)
    assert sig.fitted_loss == pytest.approx(float(np.quantile(by_loop, 0.1)), rel=1e-10)
    assert compute_signatures(model, x, y, loss="ce", fisher="none").fitted_loss is None


# --------------------------------------------------------------------------- the hold's limits


def test_a_loss_that_never_stops_falling_holds_the_warm_up_four_ages_at_most() -> None:
    # a - b ln t (a language model's curve) falls by b ln 1.25 every fifth of the age,
    # for good: without a bound the warm-up never ended and a real phase change at
    # 3000-3200 went unreported
    def log_curve(step: int) -> tuple[dict, dict]:
        x = min(max((step - 3000) / 200, 0.0), 1.0)
        wobble = 0.02 * math.sin(step / 37.0)
        points = {
            name: layer_reading(10 ** (-2.0 - 3.0 * x + wobble), -20.0 - 40.0 * x + wobble)
            for name in ("a", "b")
        }
        return points, {"loss": 3.0 - 0.3 * math.log1p(step / 10), "val_acc": x}

    det = EventDetector()
    events: list[Event] = []
    ended = None
    for step in range(0, 5001, 50):
        events += det.update(step, *log_curve(step))
        if ended is None and det.windows is not None and not det.windows.in_warm_up:
            ended = step
    age_rule = 350  # the lag and 5 cadences of 50 (test_a_loss_on_a_plateau_...)
    assert ended is not None and age_rule < ended <= 4 * age_rule + 50, ended
    transitions = [e for e in events if e.kind == "transition"]
    assert transitions and 3000 <= transitions[0].step <= 3500, events


def test_a_lag_that_grows_still_finds_the_loss_it_reaches_back_to() -> None:
    from ddsmon.events import _Cadence

    cadence = _Cadence(EventConfig(min_reference=30))  # still warming up at step 100
    for step in range(0, 101, 5):
        cadence.push(step, {"loss": 4.0 - 0.01 * step})
    # a lag of 5 steps, then one of 80 (the cadence grew): the loss 80 steps back is kept
    assert cadence._loss_falling(100, 5.0) is False  # 0.05 < 2% of 4.0
    assert cadence._loss_falling(100, 80.0) is True  # 0.8


def test_one_loss_under_two_suffixes_is_one_source() -> None:
    # two ModelCheckpoint callbacks in one folder: train_loss_step and train_loss_epoch
    det = EventDetector(EventConfig(min_reference=30))  # still warming up at step 95
    for step in FINE[:20]:
        points, meta = memorising(step)
        key = "train_loss_step" if step % 10 else "train/loss_epoch"
        det.update(step, points, {key: meta["loss"], "val_acc": 0.0})
    assert det._cadence.loss_key == "train_loss"
    assert len(det._cadence.losses) == 20
