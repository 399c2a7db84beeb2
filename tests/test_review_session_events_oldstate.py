"""A daemon restarted from a state.json the previous release wrote, in a run whose
cadence changed before the restart (every 50 steps, then every 500): that release froze
the cadence at the median gap of the first 5 checkpoints, and saved those steps. The
restored detector takes the newest gaps from the history the state holds (the newest 8
checkpoints of each layer), so it carries on at the run's cadence now, as this release
run uninterrupted does. From the first 5's gaps, its windows stayed at 50 steps for the
next checkpoints: a transition window of 6 checkpoints was 300 steps, which dropped the
collapses of the step before and lost the phase change's transition."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from ddsmon.events import Event, EventConfig, EventDetector
from ddsmon.signature import LayerSignature

STEPS = [*range(0, 1000, 50), *range(1000, 8001, 500)]
CFG = EventConfig(reference_window=8, reference_lag=2, confirm=2, transition_window=6)


def _points(step: int) -> dict:
    out = {}
    for name, shift in (("a", 0.0), ("b", 100.0)):
        x = min(max((step - 3000 - shift) / 200, 0.0), 1.0)
        lam = 10 ** (-2.0 - 4.0 * x + 0.05 * math.sin(step / 37.0))
        out[name] = LayerSignature(
            "fc", 64, 64, 16,
            sigma_min=0.3, sigma_max=3.0, x_rank=10, x_dead=6,
            lambda_min=lam, lambda_max=1.0, g_rank=10, g_dead=6,
            logdet=-20.0 - 40.0 * x, log_volume=-20.0 - 40.0 * x,
        ).to_dict()  # fmt: skip
    return out


def _previous_release(state: dict) -> dict:
    """The state as the previous release saved it: its cadence the first 5 checkpoints'
    steps and their median gap, frozen (``git show 7866ed7:ddsmon/events.py``)."""
    first = STEPS[:5]
    gaps = [b - a for a, b in itertools.pairwise(first)]
    cadence = state["cadence"]
    state["cadence"] = {
        "steps": first,
        "value": float(sorted(gaps)[len(gaps) // 2]),
        "frozen": True,
        "first": cadence["first"],
        "last": cadence["last"],
        "warned": cadence["warned"],
    }
    return state


def _run(stop: int | None) -> list[Event]:
    det = EventDetector(CFG)
    events: list[Event] = []
    for i, step in enumerate(STEPS):
        if i == stop:
            cadence = det.cadence  # the newest gaps' median: 50 at stop 22, then 500
            saved = _previous_release(json.loads(json.dumps(det.to_state())))
            det = EventDetector.from_state(saved)
            assert det.cadence == cadence
        events += det.update(step, _points(step))
    return events


@pytest.mark.parametrize("stop", [22, 25, 26])
def test_a_restart_from_the_previous_release_follows_the_run_cadence_now(stop: int) -> None:
    whole = _run(None)
    assert [e.step for e in whole if e.kind == "transition"] == [4500]
    assert _run(stop) == whole


def test_a_short_previous_release_state_counts_its_checkpoints() -> None:
    det = EventDetector(CFG)
    det.update(0, _points(0))
    state = json.loads(json.dumps(det.to_state()))
    state["cadence"] = {
        "steps": [0], "value": None, "frozen": False, "first": 0, "last": 0, "warned": False,
    }  # fmt: skip
    back = EventDetector.from_state(state)
    assert back.to_state()["cadence"] == det.to_state()["cadence"]
