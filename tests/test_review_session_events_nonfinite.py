"""A layer non-finite at one checkpoint, finite again after: its collapses before are
held or revived as any other's. Only a layer that stays non-finite (a run diverging: the
loss blows up a checkpoint before the weights go NaN) takes its collapses out of a
transition. Before, one checkpoint with every layer NaN/inf in the middle of a phase
change (a bad batch at one save, a probe overflowing once) lost that transition for good,
and one layer's lost that layer from it."""

from __future__ import annotations

import json
import math

from ddsmon.events import Event, EventDetector, detect_transitions
from ddsmon.signature import LayerSignature

STEPS = list(range(0, 5001, 100))


def _point(name: str, step: int, broken: set[tuple[str, int]]) -> dict:
    if (name, step) in broken:
        return LayerSignature("fc", 64, 64, 16, finite=False, nonfinite="gradients").to_dict()
    x = min(max((step - 2000 - (100.0 if name == "b" else 0.0)) / 200, 0.0), 1.0)
    wobble = 0.05 * math.sin(step / 37.0)
    return LayerSignature(
        "fc", 64, 64, 16,
        sigma_min=0.3, sigma_max=3.0, x_rank=10, x_dead=6,
        lambda_min=10 ** (-2.0 - 4.0 * x + wobble), lambda_max=1.0, g_rank=10, g_dead=6,
        logdet=-20.0 - 40.0 * x, log_volume=-20.0 - 40.0 * x,
    ).to_dict()  # fmt: skip


def _run(broken: set[tuple[str, int]], restart: int | None = None) -> list[Event]:
    det = EventDetector()
    events: list[Event] = []
    for i, step in enumerate(STEPS):
        if i == restart:
            det = EventDetector.from_state(json.loads(json.dumps(det.to_state())))
        events += det.update(step, {n: _point(n, step, broken) for n in ("a", "b")})
    return events


def _transitions(events: list[Event]) -> list[tuple[int, str]]:
    return [(e.step, e.layer) for e in events if e.kind == "transition"]


def test_a_checkpoint_non_finite_once_does_not_lose_the_transition() -> None:
    assert _transitions(_run(set())) == [(2300, "a,b")]
    # every layer NaN at 2300 only: the collapses of 2100-2200 still hold after it
    once = _run({("a", 2300), ("b", 2300)})
    assert [e.step for e in once if e.kind == "nonfinite"] == [2300, 2300]
    assert [layer for _, layer in _transitions(once)] == ["a,b"], _transitions(once)
    # one layer NaN once: it is still part of the transition
    assert [layer for _, layer in _transitions(_run({("a", 2300)}))] == ["a,b"]
    # the same across a restart at the NaN checkpoint and the one after
    for restart in (23, 24):
        assert _run({("a", 2300), ("b", 2300)}, restart) == once


def test_a_layer_that_stays_non_finite_is_still_no_transition() -> None:
    diverged = {(n, s) for n in ("a", "b") for s in STEPS if s >= 2300}
    assert _transitions(_run(diverged)) == []
    a_only = {("a", s) for s in STEPS if s >= 2300}
    assert all("a" not in layer.split(",") for _, layer in _transitions(_run(a_only)))


def test_the_pure_function_agrees_when_told_which_layers_were_finite() -> None:
    broken = {("a", 2300), ("b", 2300)}
    events = _run(broken)
    finite = [{n: (n, s) not in broken for n in ("a", "b")} for s in STEPS]
    found = []
    for i in range(len(STEPS)):
        upto = [e for e in events if e.step <= STEPS[i]]
        found += detect_transitions(upto, STEPS[: i + 1], finite=finite[: i + 1])
    assert _transitions(found) == _transitions(events)
