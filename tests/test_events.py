"""Event detectors on synthetic histories: what must and must not be flagged."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from ddsmon.errors import ConfigError, DDSError
from ddsmon.events import (
    EVENT_KINDS,
    Event,
    EventConfig,
    EventDetector,
    detect_dying,
    detect_level_shifts,
    detect_nonfinite,
    detect_rank_change,
    detect_transitions,
)
from ddsmon.signature import LayerSignature

#: The windows counted in checkpoints (at the run's cadence), as they were before they
#: were given in steps: these tests place events checkpoint by checkpoint.
COUNTS = {
    "reference_window": 8,
    "reference_lag": 3,
    "transition_window": 8,
    "dying_window": 3,
    "confirm": 1,
}
CFG = EventConfig(**COUNTS)
WARM = CFG.min_reference + 3  # checkpoints before anything is decided (min_reference + lag)
WINDOW = 8  # the transition window, in checkpoints


def point(
    name: str = "fc",
    *,
    lam: float = 1e-2,
    sig: float = 1e-1,
    vol: float = -20.0,
    x_rank: int = 10,
    g_rank: int = 10,
    scale: float = 1.0,
    finite: bool = True,
) -> dict:
    """A reading dict as the engine makes it: ``LayerSignature.to_dict()``.

    lam / sig: lambda_min/lambda_max and sigma_min/sigma_max; vol: log_volume (natural
    log); scale: lambda_max (every eigenvalue of G scales with it).
    """
    if not finite:
        return LayerSignature(name, 64, 64, 16, finite=False, nonfinite="gradients").to_dict()
    return LayerSignature(
        name,
        64,
        64,
        16,
        sigma_min=sig * 3.0,
        sigma_max=3.0,
        x_rank=x_rank,
        x_dead=16 - x_rank,
        lambda_min=lam * scale,
        lambda_max=scale,
        g_rank=g_rank,
        g_dead=16 - g_rank,
        logdet=vol + g_rank * math.log(scale),
        log_volume=vol,
    ).to_dict()


def noisy(n: int, seed: int = 0, **levels: float) -> list[dict]:
    """n points wobbling 0.2 decades around the given levels (log_volume by 0.5 nat)."""
    rng = np.random.default_rng(seed)
    lam, sig, vol = levels.get("lam", 1e-2), levels.get("sig", 1e-1), levels.get("vol", -20.0)
    return [
        point(
            lam=lam * 10 ** rng.normal(0, 0.2),
            sig=sig * 10 ** rng.normal(0, 0.2),
            vol=vol + rng.normal(0, 0.5),
        )
        for _ in range(n)
    ]


def feed(points_by_layer: dict[str, list[dict]], cfg: EventConfig = CFG, every: int = 10):
    """Run a detector over per-layer point lists (same length); return all events."""
    det = EventDetector(cfg)
    n = len(next(iter(points_by_layer.values())))
    events: list[Event] = []
    for i in range(n):
        events += det.update(i * every, {k: v[i] for k, v in points_by_layer.items()})
    return det, events


def kinds(events: list[Event]) -> list[tuple[int, str, str, str]]:
    return [(e.step, e.kind, e.layer, e.reading) for e in events]


# --------------------------------------------------------------------------- Event


def test_event_round_trips_through_json() -> None:
    ev = Event(120, "fc", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "collapse: fc ...")
    data = json.loads(json.dumps(ev.to_dict()))
    assert set(data) == {
        "step",
        "layer",
        "kind",
        "reading",
        "before",
        "after",
        "magnitude",
        "message",
    }
    assert Event.from_dict(data) == ev
    assert set(EVENT_KINDS) == {
        "rank_change",
        "collapse",
        "revival",
        "transition",
        "nonfinite",
        "dying",
    }
    # the optional fields travel when set
    tr = Event(
        300, "a,b", "transition", "log_volume", None, None, 2.0, "transition: ...",
        trainer_before={"val_acc": 0.01}, trainer_after={"val_acc": 0.6}, label="generalising",
    )  # fmt: skip
    data = json.loads(json.dumps(tr.to_dict()))
    assert data["trainer_before"] == {"val_acc": 0.01} and data["label"] == "generalising"
    assert Event.from_dict(data) == tr
    dying = Event(300, "fc", "dying", "dying_directions", None, 3.0, 3.0, "m", dying_directions=3.0)
    assert Event.from_dict(json.loads(json.dumps(dying.to_dict()))) == dying
    assert "label" not in dying.to_dict() and dying.to_dict()["dying_directions"] == 3.0


# --------------------------------------------------------------------------- negatives


def test_noise_around_a_level_is_no_event() -> None:
    _, events = feed({"fc": noisy(60)})
    assert events == []


def test_a_loss_that_merely_shrinks_is_no_event() -> None:
    # every eigenvalue of G falls 12 decades together, from just after the warm-up (a
    # fall under way before the first decision is the warm-up's, reported by no reading):
    # lambda_min, lambda_max, logdet all move, the ratios and log_volume do not
    pts = [point(scale=10.0 ** (-0.5 * max(0, i - WARM))) for i in range(WARM + 25)]
    assert pts[-1]["lambda_min"] / pts[0]["lambda_min"] == pytest.approx(1e-12)
    assert pts[-1]["logdet"] < pts[0]["logdet"] - 100
    _, events = feed({"fc": pts})
    assert events == []
    # the same history watched through an absolute reading does flag it (so the
    # scale-free readings are what keeps it quiet)
    _, absolute = feed({"fc": pts}, EventConfig(**COUNTS, readings=("lambda_min",)))
    assert [e.kind for e in absolute] == ["collapse"]


def test_a_transient_dip_is_collapse_then_revival_not_transition() -> None:
    dip = 18
    base = noisy(30, seed=1)
    base[dip] = point(lam=1e-6, vol=-40.0)  # one checkpoint, 4 decades down
    other = noisy(30, seed=2)
    other[dip] = point(lam=1e-6, vol=-40.0)  # a second layer dips at the same checkpoint
    _, events = feed({"a": base, "b": other})
    got = kinds(events)
    assert "transition" not in {k for _, k, _, _ in got}, got
    collapses = [g for g in got if g[1] == "collapse"]
    revivals = [g for g in got if g[1] == "revival"]
    assert {(s, lay, r) for s, _, lay, r in collapses} == {
        (dip * 10, lay, r) for lay in "ab" for r in ("lambda_ratio", "log_volume")
    }
    assert {(s, lay, r) for s, _, lay, r in revivals} == {
        ((dip + 1) * 10, lay, r) for lay in "ab" for r in ("lambda_ratio", "log_volume")
    }
    collapse = next(e for e in events if e.kind == "collapse" and e.reading == "lambda_ratio")
    assert collapse.magnitude == pytest.approx(4.0, abs=0.5)
    assert collapse.after == pytest.approx(1e-6)
    assert collapse.before == pytest.approx(1e-2, rel=0.6)


def test_the_same_dip_held_is_a_transition() -> None:
    # the positive twin of the test above: the dip does not recover
    a, b = noisy(30, seed=1), noisy(30, seed=2)
    for i in range(18, 30):
        a[i] = point(lam=1e-6, vol=-40.0)
        b[i] = point(lam=1e-6, vol=-40.0)
    _, events = feed({"a": a, "b": b})
    transitions = [e for e in events if e.kind == "transition"]
    assert len(transitions) == 1
    assert transitions[0].step == (18 + CFG.confirm) * 10
    assert not [e for e in events if e.kind == "revival"]


def test_rank_noise_at_the_floor_does_not_flap() -> None:
    ranks = [10] * 12 + [9] + [10] * 6 + [11] + [10] * 5 + [9, 10, 9, 10]
    pts = [point(x_rank=r, g_rank=r) for r in ranks]
    _, events = feed({"fc": pts})
    assert events == []


def test_warm_up_ignores_the_first_checkpoints() -> None:
    # a big move in the first checkpoints (memorisation) is not judged: once the
    # reference window fills, its median already sits at the new level
    pts = [point(lam=1e-1, vol=-5.0)] * (CFG.min_reference // 2 - 1)
    pts += [point(lam=1e-5, vol=-60.0)] * 30
    a = [dict(p) for p in pts]
    _, events = feed({"a": a, "b": [dict(p) for p in pts]})
    assert events == []
    # moved past the warm-up, the same fall is a transition
    late = [point(lam=1e-1, vol=-5.0)] * (WARM + 2) + [point(lam=1e-5, vol=-60.0)] * 10
    _, events = feed({"a": late, "b": [dict(p) for p in late]})
    assert [e.kind for e in events].count("transition") == 1


# --------------------------------------------------------------------------- positives


def test_a_collapse_in_two_layers_within_the_window_is_one_transition() -> None:
    a, b, c = noisy(40, seed=3), noisy(40, seed=4), noisy(40, seed=5)
    for i in range(20, 40):  # layer a collapses at checkpoint 20, b at 23; c stays
        a[i] = point(lam=1e-5 * 10 ** (-0.1 * (i - 20)), vol=-20.0)
    for i in range(23, 40):
        b[i] = point(lam=1e-2, vol=-45.0 - (i - 23))
    _, events = feed({"a": a, "b": b, "c": c})
    transitions = [e for e in events if e.kind == "transition"]
    assert len(transitions) == 1, kinds(events)
    tr = transitions[0]
    assert tr.step == (23 + CFG.confirm) * 10
    assert tr.layer == "a,b" and tr.reading == "lambda_ratio,log_volume"
    assert tr.magnitude == 2.0 and tr.before is None and tr.after is None
    assert "a lambda_ratio" in tr.message and "b log_volume" in tr.message
    assert not [e for e in events if e.layer == "c"]


def test_collapses_further_apart_than_the_window_are_no_transition() -> None:
    n = 20 + WINDOW + 15
    a, b = noisy(n, seed=6), noisy(n, seed=7)
    for i in range(20, n):
        a[i] = point(lam=1e-6)
    later = 20 + WINDOW + 2
    for i in range(later, n):
        b[i] = point(lam=1e-6)
    _, events = feed({"a": a, "b": b})
    assert [e.kind for e in events] == ["collapse", "collapse"]


def test_a_persistent_rank_change_is_one_event_with_before_and_after() -> None:
    ranks = [12] * 15 + [11] + [12] + [9] * 10  # a one-checkpoint flip, then a real drop
    pts = [point(x_rank=12, g_rank=r) for r in ranks]
    _, events = feed({"fc": pts})
    assert kinds(events) == [(18 * 10, "rank_change", "fc", "g_rank")]
    ev = events[0]
    assert (ev.before, ev.after, ev.magnitude) == (12.0, 9.0, 3.0)
    assert "12 -> 9" in ev.message


def test_a_reading_rising_to_a_new_level_is_one_revival() -> None:
    pts = noisy(15, seed=8, lam=1e-4) + [point(lam=0.5, vol=-20.0)] * 20
    _, events = feed({"fc": pts})
    assert kinds(events) == [(150, "revival", "fc", "lambda_ratio")]
    assert events[0].after == pytest.approx(0.5)


def test_a_collapse_that_stays_is_the_new_norm_and_can_collapse_again() -> None:
    pts = noisy(15, seed=9) + [point(lam=1e-5)] * 20 + [point(lam=1e-8)] * 10
    _, events = feed({"fc": pts})
    assert kinds(events) == [
        (150, "collapse", "fc", "lambda_ratio"),
        (350, "collapse", "fc", "lambda_ratio"),
    ]
    assert events[1].before == pytest.approx(1e-5)


def test_log_volume_threshold_follows_its_own_spread() -> None:
    rng = np.random.default_rng(10)
    # a wide-swinging log_volume (sigma 4 decades): a 6-decade step is within its spread
    wide = [point(vol=-100 + rng.normal(0, 4 * math.log(10))) for _ in range(20)]
    wide += [point(vol=-100 - 6 * math.log(10))] * 5
    _, events = feed({"fc": wide})
    assert events == []
    # a quiet one (sigma 0.05 decades): the same step is a collapse of about 6 decades
    quiet = [point(vol=-100 + rng.normal(0, 0.05 * math.log(10))) for _ in range(20)]
    quiet += [point(vol=-100 - 6 * math.log(10))] * 5
    _, events = feed({"fc": quiet})
    assert kinds(events) == [(200, "collapse", "fc", "log_volume")]
    assert events[0].magnitude == pytest.approx(6.0, abs=0.2)
    assert events[0].after == pytest.approx(-100 - 6 * math.log(10))


def test_nonfinite_is_reported_when_a_layer_turns_nonfinite() -> None:
    pts = noisy(20, seed=11)
    pts[12] = pts[13] = point(finite=False)
    pts[17] = point(finite=False)
    _, events = feed({"fc": pts})
    assert kinds(events) == [(120, "nonfinite", "fc", "finite"), (170, "nonfinite", "fc", "finite")]
    assert "gradients" in events[0].message


def test_unresolved_readings_are_skipped() -> None:
    pts = noisy(30, seed=12)
    for i in (14, 15, 16):
        pts[i] = dict(pts[i], lambda_ratio=None, log_volume=None, sigma_ratio=None)
    _, events = feed({"fc": pts})
    assert events == []


# --------------------------------------------------------------------------- pure == detector


def _random_history(seed: int, n: int = 60) -> list[dict]:
    """A random walk with jumps, dips, rank flips, a non-finite point, and a stretch
    (checkpoints 40-45) where 3 directions die at the rate of the smallest."""
    rng = np.random.default_rng(seed)
    lam, vol, rank = -2.0, -20.0, 10
    out = []
    for i in range(n):
        was = lam, vol, rank
        lam += rng.normal(0, 0.3) + (rng.random() < 0.08) * rng.choice([-4.0, 3.0])
        vol += rng.normal(0, 1.0) + (rng.random() < 0.08) * rng.choice([-30.0, 20.0])
        rank = rank + int(rng.integers(-1, 2)) if rng.random() < 0.2 else rank
        dying = 40 <= i < 46
        if dying:  # log det+ falls 3 times as fast as log lambda_min, the rank holds
            lam, vol, rank = was[0] - 0.4, was[1] - 3 * 0.4 * math.log(10), was[2]
        dip = rng.random() < 0.05 and not dying
        out.append(
            point(finite=False)
            if i == n // 2
            else point(
                lam=10 ** (lam - 4 * dip), vol=vol, x_rank=rank, g_rank=rank, sig=10 ** (lam / 2)
            )
        )
    return out


@pytest.mark.parametrize("seed", range(6))
def test_pure_functions_replayed_point_by_point_match_the_detector(seed: int) -> None:
    layers = {"a": _random_history(seed), "b": _random_history(seed + 100)}
    det, events = feed(layers)
    assert {e.kind for e in events} == set(EVENT_KINDS)  # the walks exercise every kind
    steps = [i * 10 for i in range(60)]
    replayed: list[Event] = []
    for i in range(len(steps)):
        at_step: list[Event] = []
        for name, pts in layers.items():
            hist = list(zip(steps[: i + 1], pts[: i + 1]))
            at_step += detect_nonfinite(hist, layer=name)
            if pts[i]["finite"]:
                at_step += detect_rank_change(hist, CFG, layer=name)
                at_step += detect_level_shifts(hist, CFG, layer=name)
                at_step += detect_dying(hist, CFG, layer=name)
        replayed += at_step
        finite = [{n: bool(pts[j]["finite"]) for n, pts in layers.items()} for j in range(i + 1)]
        replayed += detect_transitions(replayed, steps[: i + 1], CFG, finite=finite)
    assert replayed == events
    assert det.history("a") == list(zip(steps, layers["a"]))


def test_state_survives_a_restart_through_json() -> None:
    layers = {"a": _random_history(3), "b": _random_history(4)}
    _, uninterrupted = feed(layers)
    det = EventDetector(CFG)
    events: list[Event] = []
    for i in range(33):
        events += det.update(i * 10, {k: v[i] for k, v in layers.items()})
    state = json.loads(json.dumps(det.to_state(keep_history=5)))
    det = EventDetector.from_state(state)
    assert det.last_step == 320
    assert [s for s, _ in det.history("a")] == [280, 290, 300, 310, 320]
    for i in range(33, 60):
        events += det.update(i * 10, {k: v[i] for k, v in layers.items()})
    assert events == uninterrupted


# --------------------------------------------------------------------------- bad input


def test_a_step_that_does_not_advance_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    det = EventDetector()
    det.update(10, {"fc": point()})
    with caplog.at_level(logging.WARNING, logger="ddsmon.events"):
        assert det.update(10, {"fc": point(finite=False)}) == []
    assert "step 10 is not after the last step 10" in caplog.text
    assert len(det.history("fc")) == 1


def test_bad_readings_name_the_layer_and_key() -> None:
    det = EventDetector()
    with pytest.raises(DDSError, match=r"layer 'fc'.*'lambda_ratio'.*str"):
        det.update(0, {"fc": dict(point(), lambda_ratio="0.1")})
    with pytest.raises(DDSError, match=r"layer 'fc2': reading at step 1 must be a dict"):
        det.update(1, {"fc2": [1, 2]})
    with pytest.raises(DDSError, match=r"layer 'x': history steps must increase \(20 then 10\)"):
        detect_level_shifts([(20, point()), (10, point())], layer="x")
    with pytest.raises(DDSError, match=r"event at step 15 .*not one of the checkpoint steps"):
        detect_transitions([Event(15, "a", "collapse", "log_volume", 0.0, -1.0, 3.0, "")], [10, 20])
    with pytest.raises(KeyError, match="no history for layer 'nope'"):
        det.history("nope")


def test_config_is_validated_and_round_trips() -> None:
    with pytest.raises(ConfigError, match="ratio_decades must be positive"):
        EventConfig(ratio_decades=0)
    with pytest.raises(DDSError, match="min_reference"):
        EventConfig(min_reference=9, reference_window=8)
    with pytest.raises(DDSError, match="confirm"):
        EventConfig(confirm=8, transition_window=8)
    with pytest.raises(ConfigError, match=r"unknown reading\(s\) \['lamda_ratio'\]"):
        EventConfig(**COUNTS, readings=("lamda_ratio",))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ratio'\]"):
        EventConfig.from_dict({"ratio": 2})
    cfg = EventConfig(**COUNTS, readings=["lambda_ratio"], ratio_decades=3.0)  # a list is accepted
    assert EventConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(DDSError, match="version"):
        EventDetector.from_state({"version": 99})
    with pytest.raises(DDSError, match="malformed"):
        EventDetector.from_state({"version": 1, "config": {}})


def test_units_and_thresholds_follow_the_table_of_readings() -> None:
    # the same 3-decade fall of a positive value (u_dead_gain: log10, threshold
    # ratio_decades = 2) is a collapse; of a natural log (logdet: value / ln 10, threshold
    # at least volume_min_decades = 4) it is not
    from ddsmon.readings import reading

    assert (reading("u_dead_gain").unit, reading("logdet").unit) == ("value", "nats")
    cfg = EventConfig(**COUNTS, readings=("u_dead_gain", "logdet"))
    pts = [dict(point(), u_dead_gain=1e-2, logdet=-20.0) for _ in range(15)]
    pts += [dict(point(), u_dead_gain=1e-5, logdet=-20.0 - 3 * math.log(10))] * 5
    _, events = feed({"fc": pts}, cfg)
    assert kinds(events) == [(150, "collapse", "fc", "u_dead_gain")]
    assert events[0].magnitude == pytest.approx(3.0)
    assert events[0].before == pytest.approx(1e-2) and events[0].after == 1e-5
    # 5 decades of logdet clear the natural-log threshold; its message keeps 4 digits
    pts[15:] = [dict(point(), u_dead_gain=1e-2, logdet=-20.0 - 5 * math.log(10))] * 5
    _, events = feed({"fc": pts}, cfg)
    assert kinds(events) == [(150, "collapse", "fc", "logdet")]
    assert events[0].magnitude == pytest.approx(5.0)
    assert "(-20 -> -31.51)" in events[0].message


def test_a_g_side_transition_says_when_the_samples_g_resolves_moved() -> None:
    """Two layers' lambda_ratio collapse together (G side only). Where the output layer's
    samples_resolved jumps 126 -> 165 at the collapse, the transition's message says the
    collapses may be the loss's dynamic range; where it holds, it does not."""

    def run(jump: bool) -> Event:
        det = EventDetector(CFG)
        found = []
        for i in range(30):
            low = i >= 18
            a = point("a", lam=1e-6 if low else 1e-2)
            b = point("b", lam=1e-6 if low else 1e-2)
            b["samples_resolved"] = 165 if (jump and low) else 126
            found += det.update(i * 10, {"a": a, "b": b})
        (tr,) = [e for e in found if e.kind == "transition"]
        return tr

    assert "samples G resolves moved 126 -> 165" in run(jump=True).message
    assert "samples G resolves" not in run(jump=False).message
