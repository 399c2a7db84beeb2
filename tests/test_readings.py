"""The table of readings: every row is consistent, and the signature, the events, the
terminal and the plots take what a reading is from it."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ddsmon import readings as table
from ddsmon import signature
from ddsmon.readings import READINGS, SCALAR_READINGS, SPECTRA, Reading, reading
from ddsmon.signature import LayerSignature

REPO = Path(__file__).resolve().parents[1]
FIELDS = {f.name for f in dataclasses.fields(LayerSignature)}


def test_every_row_is_a_reading_of_the_signature() -> None:
    assert signature.SCALAR_READINGS is table.SCALAR_READINGS
    assert len(set(SCALAR_READINGS)) == len(SCALAR_READINGS)
    for row in READINGS:
        assert row.name in FIELDS or isinstance(getattr(LayerSignature, row.name), property), row
    sig = LayerSignature(
        "fc", 4, 4, 3, sigma_min=0.5, sigma_max=2.0, lambda_min=1e-3, lambda_max=0.1
    )
    out = sig.to_dict()
    assert set(SCALAR_READINGS) <= set(out)
    assert out["lambda_ratio"] == pytest.approx(1e-2) and out["sigma_ratio"] == 0.25
    # nothing but the fields and the table's readings
    assert set(out) == (FIELDS - {"x_spectrum", "g_spectrum", "param_spectrum"}) | set(
        SCALAR_READINGS
    )


def test_rows_refer_to_rows_of_the_right_kind() -> None:
    for row in READINGS:
        if row.floor is not None:
            floor = reading(row.floor)
            assert (floor.unit, floor.side) == ("floor", row.side), row
            assert row.unit in ("value", "floor"), f"{row.name}: a floor in other units"
        if row.pair is not None:
            pair = reading(row.pair)
            assert row.is_count and pair.is_count and pair.side == row.side, row
            assert row.terminal and not pair.terminal, row
        if row.unit in ("count", "floor", "nats"):
            assert row.floor is None, row
    # the floors each value is shown against (what the terminal prints as <floor)
    floors = {r.name: r.floor for r in READINGS if r.floor}
    assert floors == {
        "sigma_min": "floor_x",
        "sigma_max": "floor_x",
        "lambda_min": "floor_g",
        "lambda_max": "floor_g",
        "param_lambda_min": "param_floor",
        "param_lambda_max": "param_floor",
    }
    for spectrum in SPECTRA:
        assert spectrum.field in FIELDS
        assert reading(spectrum.floor).side == reading(spectrum.rank).side == spectrum.side
    assert [s.side for s in SPECTRA] == list(table.SIDES)


def test_units_in_decades() -> None:
    ratio, nats, count = reading("lambda_ratio"), reading("log_volume"), reading("g_rank")
    assert ratio.decades(1e-3) == pytest.approx(-3.0)
    assert ratio.decades(0.0) == -math.inf and ratio.decades(-1.0) == -math.inf
    assert nats.decades(-10 * math.log(10)) == pytest.approx(-10.0)
    assert nats.decades(-3.0) == -3.0 / math.log(10.0)
    assert reading("floor_g").decades(1e-16) == pytest.approx(-16.0)
    for row in READINGS:
        if row.in_decades:
            assert row.from_decades(row.decades(0.37)) == pytest.approx(0.37)
    with pytest.raises(ValueError, match=r"g_rank.*count"):
        count.decades(3)
    with pytest.raises(ValueError, match="g_rank"):
        count.from_decades(0.5)
    assert [r.name for r in READINGS if r.unit == "nats"] == [
        "logdet",
        "log_volume",
        "param_logdet",
        "param_log_volume",
    ]


def test_unknown_names_and_bad_rows() -> None:
    with pytest.raises(KeyError, match=r"unknown reading 'lamda_min'; known: sigma_min, "):
        reading("lamda_min")
    with pytest.raises(ValueError, match="side 'Y'"):
        Reading("r", "Y", "value", None, "r", False, "")
    with pytest.raises(ValueError, match="unit 'decibel'"):
        Reading("r", "X", "decibel", None, "r", False, "")
    with pytest.raises(ValueError, match="'lambda_min' is no floor of G"):
        table.Spectrum("G", "g_spectrum", "lambda_min", "g_rank", "lambda(G)", "d")


def test_headline_readings() -> None:
    assert table.HEADLINE_READINGS == (
        "x_dead",
        "g_dead",
        "log_volume",
        "lambda_ratio",
        "sigma_ratio",
        "x_entropy",
        "dying_directions",
    )
    assert all(reading(n).scale_free or reading(n).is_count for n in table.HEADLINE_READINGS)


# --------------------------------------------------------------- the views follow the table


def test_terminal_columns_come_from_the_table() -> None:
    from ddsmon.sinks import terminal

    headers = [terminal._header(r) for r in terminal._columns(params=True)]
    assert headers == [
        "X\nσ_min",
        "X\nrank/dead",
        "G\nλ_min",
        "G\nλ_max",
        "G\nrank/dead",
        "G\nlog det",
        "G\nlog vol",
        "G at u\ndead gain",
        "X\nentropy",
        "G\ndying",
        "K\nλ_min",
        "K\nrank",
    ]
    assert [r.name for r in terminal._columns(params=False)] == [
        r.name for r in READINGS if r.terminal and r.side != "K"
    ]


def test_a_new_row_is_drawn_in_its_panel() -> None:
    from ddsmon.plots import _trajectory_panels

    panels = _trajectory_panels()
    assert [p.title for p in panels] == [
        reading("lambda_ratio").description,
        reading("sigma_ratio").description,
        reading("log_volume").description,
        "ranks (solid: g_rank, dashed: x_rank)",
        reading("x_entropy").description,
        reading("dying_directions").description,
    ]
    assert [p.series for p in panels][:3] == [
        (("lambda_ratio", True, "-"),),
        (("sigma_ratio", True, "-"),),
        (("log_volume", False, "-"),),
    ]
    extra = Reading("param_log_volume", "K", "nats", None, "log vol", False, "K volume", panel=2)
    rows = [dataclasses.replace(r, panel=None) if r.name == extra.name else r for r in READINGS]
    shared = _trajectory_panels([*rows, extra])
    assert shared[2].series == (("log_volume", False, "-"), ("param_log_volume", False, ":"))
    assert shared[2].title == "G log vol, K log vol (solid: log_volume, dotted: param_log_volume)"
    assert shared[2].ylabel == "nats"


def test_event_kinds_are_styled_everywhere() -> None:
    from ddsmon.events import EVENT_KINDS
    from ddsmon.plots import EVENT_STYLE
    from ddsmon.sinks.terminal import EVENT_STYLES

    assert EVENT_KINDS == (
        "rank_change",
        "collapse",
        "revival",
        "transition",
        "nonfinite",
        "dying",
    )
    assert set(EVENT_STYLES) == set(EVENT_KINDS)
    assert set(EVENT_STYLE) == set(EVENT_KINDS)


def test_events_and_the_table_import_without_torch() -> None:
    # ddsmon/__init__ imports the engine (torch); the modules themselves must not
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"
        "pkg = types.ModuleType('ddsmon'); pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['ddsmon'] = pkg\n"
        "from ddsmon.events import EVENT_KINDS, EventConfig\n"
        "from ddsmon.readings import READINGS\n"
        "EventConfig.from_dict({'ratio_decades': 3})\n"
        "print(len(EVENT_KINDS), len(READINGS))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "ddsmon")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", str(len(READINGS))]


# --------------------------------------------------------------- regime and derived readings


def test_fractions_are_compared_as_they_are() -> None:
    entropy = reading("x_entropy")
    assert entropy.unit == "fraction" and entropy.scale_free and not entropy.in_decades
    assert entropy.has_level and entropy.level(0.7) == 0.7 and entropy.from_level(0.7) == 0.7
    with pytest.raises(ValueError, match="not measured in decades"):
        entropy.decades(0.7)
    assert reading("lambda_ratio").level(1e-3) == pytest.approx(-3.0)
    assert not reading("x_rank").has_level


def test_derived_readings_are_the_detectors() -> None:
    assert table.DERIVED_READINGS == ("dying_directions",)
    row = reading("dying_directions")
    assert row.derived and row.is_count and row.terminal and row.panel is not None
    # a signature fresh from the engine holds None there
    assert LayerSignature("fc", 4, 4, 3).to_dict()["dying_directions"] is None


def _spectral(values: list[float], floor: float = 1e-12) -> LayerSignature:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return LayerSignature(
        "fc", 8, 8, len(values), floor_x=floor, x_spectrum=arr, floor_g=floor, g_spectrum=arr**2
    )


def test_spectral_entropy_of_the_activations() -> None:
    flat = _spectral([1.0, 1.0, 1.0, 1.0])
    assert flat.x_entropy == pytest.approx(1.0)
    # p = (0.8, 0.2) over two resolved values: H = -(0.8 ln 0.8 + 0.2 ln 0.2) / ln 2
    two = _spectral([2.0, 1.0, 1e-20, 0.0])
    expected = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2)
    assert two.x_entropy == pytest.approx(expected)
    assert two.to_dict()["x_entropy"] == pytest.approx(expected)
    # one value carrying (nearly) everything: near 0; exactly one resolved: 0
    assert _spectral([1.0, 1e-4, 1e-4, 1e-4]).x_entropy < 0.01
    assert _spectral([1.0, 1e-20, 0.0]).x_entropy == 0.0
    # nothing resolved, or a non-finite layer: None
    assert _spectral([0.0, 0.0], floor=1e-12).x_entropy is None
    assert LayerSignature("fc", 4, 4, 3, finite=False).x_entropy is None
    assert signature.spectral_entropy([math.nan, 1.0], 0.0) is None


def test_gradient_dominance_is_the_top_share_of_g() -> None:
    # g_spectrum = (4, 1, 1, 1) over the resolved eigenvalues: 4 / 7
    sig = _spectral([2.0, 1.0, 1.0, 1.0])
    assert sig.g_dominance == pytest.approx(4 / 7)
    assert _spectral([1.0, 1.0]).g_dominance == pytest.approx(0.5)
    assert _spectral([1.0, 1e-20]).g_dominance == pytest.approx(1.0)
    assert LayerSignature("fc", 4, 4, 3).g_dominance is None


def test_dying_directions_reads_signatures_and_their_dicts_alike() -> None:
    prev = LayerSignature("fc", 4, 4, 3, lambda_min=1e-2, logdet=-10.0, g_rank=3)
    cur = LayerSignature("fc", 4, 4, 3, lambda_min=1e-3, logdet=-10.0 - 3 * math.log(10), g_rank=3)
    assert signature.dying_directions(prev, cur) == pytest.approx(3.0)
    assert signature.dying_directions(prev.to_dict(), cur.to_dict()) == pytest.approx(3.0)
    assert signature.dying_directions(cur, prev) is None  # lambda_min rose
    other_rank = dataclasses.replace(cur, g_rank=2)
    assert signature.dying_directions(prev, other_rank) is None
    assert signature.dying_directions(prev.to_dict(), dict(cur.to_dict(), finite=False)) is None


def test_dying_directions_is_a_count_within_zero_and_the_rank() -> None:
    """The volume identity's estimate is a count only within [0, g_rank]: None where
    log det+ rose while lambda_min fell, the rank where the spectrum fell faster than its
    smallest (before: -269 and 183-of-128 were logged and shown as counts)."""
    dying_directions = signature.dying_directions
    prev = {"lambda_min": 1e-3, "logdet": -10.0, "g_rank": 5}

    def cur(dying: float) -> dict[str, float]:
        return {"lambda_min": 1e-4, "logdet": -10.0 - dying * math.log(10), "g_rank": 5}

    assert dying_directions(prev, cur(2.0)) == pytest.approx(2.0, rel=1e-12)
    assert dying_directions(prev, cur(-3.0)) is None
    assert dying_directions(prev, cur(8.0)) == 5.0
    assert dying_directions(prev, cur(0.0)) == 0.0
