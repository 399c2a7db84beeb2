"""What a reviewer reads first: metric names laid out for MLflow's chart sections, event
tags that say what happened, the layer x step heatmaps, the dashboard page, the spectra
the history keeps for it, and when they are drawn (no browser here: see
test_review_browser.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

import ddsmon.dashboard
import ddsmon.heatmaps
import ddsmon.plots
from ddsmon.dashboard import dashboard_data, write_dashboard
from ddsmon.events import Event
from ddsmon.heatmaps import MAX_HEIGHT_IN, event_layers, plot_heatmap, plot_heatmaps, reading_matrix
from ddsmon.readings import HEADLINE_READINGS, SCALAR_READINGS
from ddsmon.records import CheckpointReading
from ddsmon.signature import LayerSignature, Signatures
from ddsmon.sinks.history import (
    KEPT_SPECTRA,
    SPECTRUM_POINTS,
    HistoryEntry,
    LocalHistory,
    compact_spectra,
    thin_steps,
)
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    CHECKPOINT_METRICS,
    LEGACY_CHECKPOINT_METRIC,
    LIMITS,
    event_tag_value,
    reading_metric_key,
    review_url,
)
from ddsmon.sinks.mlflow_record import reading_record
from ddsmon.sinks.plot_schedule import DASHBOARD_FILE, HEATMAP_FOLDER, PlotScheduler
from ddsmon.state import StateDir


def _layer(name: str, d: int = 16, dead: int = 0, scale: float = 1.0) -> LayerSignature:
    x = np.concatenate([np.logspace(0, -3, d - dead), np.full(dead, 1e-20)]) * scale
    g = x**2
    return LayerSignature(
        name=name, n=32, N=32, d=d,
        sigma_min=float(x[d - dead - 1]), sigma_max=float(x[0]), x_rank=d - dead, x_dead=dead,
        floor_x=1e-12 * scale, lambda_min=float(g[d - dead - 1]), lambda_max=float(g[0]),
        g_rank=d - dead, g_dead=dead, floor_g=1e-24 * scale**2, logdet=-10.0, log_volume=-3.0,
        x_spectrum=x, g_spectrum=g,
    )  # fmt: skip


def _signatures(n_layers: int = 3, dead: int = 0, d: int = 16) -> Signatures:
    layers = {f"h.{i}": _layer(f"h.{i}", d=d, dead=dead if i == 1 else 0) for i in range(n_layers)}
    return Signatures(
        layers=layers, n=32, device="cpu", forward_dtype="float64", fisher="both", loss="ce"
    )


def _history(n_layers: int, steps: range) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    return {
        f"layer.{i}": [
            (s, {"lambda_ratio": 10.0 ** (-2 - (3 if s >= 50 and i == 1 else 0)), "x_dead": i % 3})
            for s in steps
        ]
        for i in range(n_layers)
    }


# ---------------------------------------------------------------------- metric names
def _section(key: str) -> str:
    """MLflow 3's chart section of a metric: its key up to the last "/" (what
    ``extractChartSectionName`` of the UI does), "Model metrics" without one."""
    return key.rsplit("/", 1)[0] if "/" in key else "Model metrics"


def test_headline_readings_are_one_section_each_and_sort_before_the_details() -> None:
    assert reading_metric_key("h.0.attn", "lambda_ratio") == "dds/lambda_ratio/h.0.attn"
    assert reading_metric_key("h.0.attn", "floor_g") == "dds_detail/floor_g/h.0.attn"
    assert reading_metric_key("h.0.attn", "finite") == "dds_detail/finite/h.0.attn"
    assert reading_metric_key("enc/attn:q", "x_dead") == "dds/x_dead/enc_attn_q"
    long = reading_metric_key("block." * 80, "lambda_ratio")  # cut to MLflow's length
    assert len(long) <= LIMITS["key"] and _section(long) == "dds/lambda_ratio"
    assert CHECKPOINT_METRIC == "ddsmon/checkpoint"
    assert CHECKPOINT_METRICS == (CHECKPOINT_METRIC, LEGACY_CHECKPOINT_METRIC)
    assert LEGACY_CHECKPOINT_METRIC == "dds/checkpoint"

    sig = _signatures()
    reading = CheckpointReading(
        step=5, path=Path("c.pt"), signatures=sig, meta={"val_acc": 0.5}, read_seconds=1.0
    )
    event = Event(5, "h.1", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "fell")
    rec = reading_record(reading, [event], entry=HistoryEntry.of(reading), timestamp=1)
    keys = [m.key for m in rec.metrics]
    sections = sorted({_section(k) for k in keys})  # the UI sorts its sections by name
    headline = [s for s in sections if s.startswith("dds/")]
    assert set(headline) == {"dds/events"} | {
        f"dds/{r}" for r in HEADLINE_READINGS if sig.layers["h.0"].to_dict().get(r) is not None
    }
    assert sections[: len(headline)] == headline  # events and headline first
    rest = sections[len(headline) :]
    assert all(s.startswith("dds_detail/") for s in rest[:-2]) and rest[-2:] == ["ddsmon", "train"]
    # every chart of a headline section is a layer
    assert {k.rsplit("/", 1)[1] for k in keys if _section(k) == "dds/lambda_ratio"} == set(
        sig.layers
    )


def test_reading_record_rows_headline_first_and_the_marker_last() -> None:
    sig = _signatures()
    reading = CheckpointReading(
        step=5, path=Path("c.pt"), signatures=sig, meta={"val_acc": 0.5}, load_seconds=0.1
    )
    events = [Event(5, "h.1", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "fell")]
    keys = [m.key for m in reading_record(reading, events, entry=HistoryEntry.of(reading),
                                          timestamp=1).metrics]  # fmt: skip
    kinds = [
        "headline" if k.startswith("dds/") and not k.startswith("dds/events/") else
        "events" if k.startswith("dds/events/") else k.split("/")[0]
        for k in keys
    ]  # fmt: skip
    order = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert order == ["headline", "events", "train", "dds_detail", "ddsmon"]
    assert keys[-1] == CHECKPOINT_METRIC and keys.count(CHECKPOINT_METRIC) == 1
    details = [k for k in keys if k.startswith("dds_detail/")]
    assert details[0] == "dds_detail/finite/h.0"
    assert not {k.split("/")[1] for k in details} & set(HEADLINE_READINGS)


def test_event_tag_values_say_what_when_where_and_how_much() -> None:
    assert event_tag_value(120, "h.3", "collapse", "lambda_ratio", 2.3141, "it fell") == (
        "collapse of lambda_ratio | step 120 | layer h.3 | magnitude 2.31 decades | it fell"
    )
    assert event_tag_value(7, "h.1", "rank_change", "g_rank", 2.0, "g_rank 8 -> 6") == (
        "rank_change of g_rank | step 7 | layer h.1 | magnitude 2 directions | g_rank 8 -> 6"
    )
    assert "magnitude 3 collapsed pairs" in event_tag_value(9, "a,b", "transition", "x", 3.0, "")
    assert event_tag_value(9, "", "nonfinite", "finite", None, "NaN") == (
        "nonfinite of finite | step 9 | layer (model) | NaN"
    )
    long = event_tag_value(1, "l", "collapse", "lambda_ratio", 1.0, "x" * 10 * LIMITS["tag_value"])
    assert len(long) == LIMITS["tag_value"] and long.endswith("...")


def test_review_url_opens_the_model_training_view_without_credentials() -> None:
    assert review_url("http://u:secret@127.0.0.1:5000/", "3", "r1", "model-metrics") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/r1/model-metrics?workflowType=machine_learning"
    )
    assert review_url("https://host/mlflow", "3") == (
        "https://host/mlflow/#/experiments/3?workflowType=machine_learning"
    )
    assert review_url("sqlite:///mlflow.db", "3") is None
    assert review_url(None, "3") is None


# ---------------------------------------------------------------------- heatmaps
def test_reading_matrix_is_layers_by_steps_on_the_readings_scale() -> None:
    history = {
        "a": [(0, {"lambda_ratio": 1e-2}), (10, {"lambda_ratio": None})],
        "b": [(10, {"lambda_ratio": 1e-5, "x_dead": 3})],
    }
    layers, steps, values = reading_matrix(history, "lambda_ratio")
    assert layers == ["a", "b"] and steps == [0, 10]
    np.testing.assert_allclose(values, [[-2.0, np.nan], [np.nan, -5.0]])
    _, _, dead = reading_matrix(history, "x_dead")  # counts as they are
    np.testing.assert_allclose(dead, [[np.nan, np.nan], [np.nan, 3.0]])


def test_event_layers_split_a_transition_only() -> None:
    assert event_layers({"kind": "transition", "layer": "h.1, h.2"}) == ["h.1", "h.2"]
    assert event_layers({"kind": "collapse", "layer": "0,blocks.2"}) == ["0,blocks.2"]
    assert event_layers({"kind": "transition", "layer": "0,blocks.2"}, ["0,blocks.2"]) == [
        "0,blocks.2"
    ]
    assert event_layers({"kind": "nonfinite", "layer": ""}) == [""]


def _orange(path: Path) -> int:
    """Pixels of the collapse marker's colour (#ff7f0e)."""
    img = imread(str(path))[..., :3]
    return int((np.abs(img - np.array([1.0, 127 / 255, 14 / 255])).max(axis=-1) < 0.03).sum())


def test_heatmaps_mark_events_and_stay_readable_at_hundreds_of_layers(tmp_path: Path) -> None:
    history = _history(300, range(0, 101, 10))
    events = [
        {"step": 50, "layer": "layer.1", "kind": "collapse", "reading": "lambda_ratio"},
        {"step": 60, "layer": "layer.1,layer.7", "kind": "transition", "reading": "lambda_ratio"},
    ]
    paths = plot_heatmaps(history, tmp_path / "big", events, title="run")
    assert [p.name for p in paths] == [f"{r}.png" for r in HEADLINE_READINGS]
    big = tmp_path / "big" / "lambda_ratio.png"
    height = imread(str(big)).shape[0]
    assert 0.9 * MAX_HEIGHT_IN * 90 <= height <= MAX_HEIGHT_IN * 90 + 1  # grows, capped
    assert _orange(big) > 10  # the collapse is drawn where it happened
    assert _orange(tmp_path / "big" / "x_dead.png") == 0  # not on another reading's panel
    small = plot_heatmap(_history(3, range(0, 31, 10)), tmp_path / "small.png", name="x_dead")
    assert imread(str(small)).shape[0] < 0.3 * height
    empty = plot_heatmap({}, tmp_path / "empty.png", name="lambda_ratio")
    assert empty.is_file()


# ---------------------------------------------------------------------- the dashboard
def test_dashboard_data_puts_headline_readings_first_and_thins_long_runs() -> None:
    history = _history(4, range(0, 1000, 1))
    events = [Event(500, "layer.1", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "fell")]
    data = dashboard_data(history, events, train={"val_acc": [(0, 0.1), (999, 0.9)]},
                          max_steps=100)  # fmt: skip
    names = [r["name"] for r in data["readings"]]
    assert names[: len(HEADLINE_READINGS)] == list(HEADLINE_READINGS)
    assert sorted(names) == sorted(SCALAR_READINGS)
    assert len(data["steps"]) == 100 and data["steps"][0] == 0 and data["steps"][-1] == 999
    assert data["thinned"] == 900
    assert np.diff(data["steps"]).max() <= 2 * 1000 / 100  # evenly spread
    assert len(data["values"]["lambda_ratio"]) == 4
    assert data["values"]["lambda_ratio"][1][-1] == pytest.approx(1e-5)
    assert data["events"][0]["step"] == 500 and data["events_total"] == 1
    assert data["train"]["val_acc"] == [[0, 0.1], [999, 0.9]]


def test_dashboard_page_is_one_self_contained_file(tmp_path: Path) -> None:
    hostile = "</script><script>alert(1)</script>"
    history = _history(2, range(0, 50, 10))
    history[hostile] = [(0, {"lambda_ratio": 0.5})]
    spectra = {40: compact_spectra(_signatures(2, dead=3))}
    path = write_dashboard(tmp_path / "d.html", history, [], spectra=spectra,
                           title="t <b>", source="/runs/x")  # fmt: skip
    page = path.read_text(encoding="utf-8")
    # the plotly bundle, the data and the app: three script elements, nothing fetched
    assert len(re.findall(r"<script\b", page)) == 3 and page.count("</script>") == 3
    assert not re.search(r"<script[^>]+src=", page)
    assert "Plotly" in page and len(page) > 1_000_000  # plotly.js inlined
    assert "<title>t &lt;b&gt;</title>" in page
    blob = re.search(r'<script type="application/json" id="ddsmon-data">(.*?)</script>', page, re.S)
    assert blob is not None
    data = json.loads(blob.group(1))
    assert hostile in data["layers"] and data["source"] == "/runs/x"
    assert data["spectra"]["40"]["h.1"]["G"]["rank"] == 13


def test_dashboard_without_plotly_is_an_import_error(tmp_path: Path, monkeypatch) -> None:
    def missing(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(ddsmon.dashboard.importlib, "import_module", missing)
    with pytest.raises(ImportError):
        write_dashboard(tmp_path / "d.html", {}, [])
    assert not (tmp_path / "d.html").exists()


# ---------------------------------------------------------------------- kept spectra
def test_compact_spectra_keep_the_cliff_and_the_floor() -> None:
    sig = _signatures(1, d=600)
    sig.layers["h.0"] = _layer("h.0", d=600, dead=200)
    side = compact_spectra(sig)["h.0"]["X"]
    assert side["n"] == 600 and side["rank"] == 400 and side["floor"] == pytest.approx(1e-12)
    assert len(side["i"]) <= SPECTRUM_POINTS + 4 and side["i"] == sorted(side["i"])
    assert set(range(390, 410)) <= set(side["i"]) and {0, 599} <= set(side["i"])
    x = sig.layers["h.0"].x_spectrum
    assert side["v"] == [pytest.approx(x[i], rel=1e-4) for i in side["i"]]


def test_thin_steps_keeps_the_ends_and_spreads_the_rest() -> None:
    steps = list(range(0, 1000, 10))
    dropped = thin_steps(steps, 10)
    left = sorted(set(steps) - set(dropped))
    assert len(left) == 10 and left[0] == 0 and left[-1] == 990
    assert max(np.diff(left)) <= 3 * min(np.diff(left))
    assert thin_steps([1, 2, 3], 5) == []


def test_history_keeps_a_bounded_set_of_spectra(tmp_path: Path) -> None:
    history = LocalHistory(StateDir(tmp_path / "st"))
    for step in range(0, 10 * (KEPT_SPECTRA + 10), 10):
        history.keep_spectra(step, _signatures(2))
    kept = history.spectra()
    assert len(kept) == KEPT_SPECTRA
    assert min(kept) == 0 and max(kept) == 10 * (KEPT_SPECTRA + 9)
    assert set(kept[0]) == {"h.0", "h.1"}
    (history.spectra_folder / "step_5.json").write_text("{torn")  # a damaged file is skipped
    assert set(LocalHistory(StateDir(tmp_path / "st")).spectra()) == set(kept)


# ---------------------------------------------------------------------- the schedule
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def drawn(monkeypatch) -> list[str]:
    """Every figure drawing replaced by one that notes its name."""
    calls: list[str] = []

    def fake(name: str) -> Any:
        def draw(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if name == "dashboard":  # write_dashboard(path, history, ...)
                Path(args[0]).write_text("<html>")
            elif name == "heatmaps":  # plot_heatmaps(history, folder, ...)
                Path(args[1]).mkdir(parents=True, exist_ok=True)
                (Path(args[1]) / "lambda_ratio.png").write_bytes(b"png")
            else:  # plot_trajectories(history, path, ...), plot_spectra(signatures, path)
                Path(args[1]).write_bytes(b"png")

        return draw

    monkeypatch.setattr(ddsmon.plots, "plot_trajectories", fake("trajectories"))
    monkeypatch.setattr(ddsmon.plots, "plot_spectra", fake("spectra"))
    monkeypatch.setattr(ddsmon.heatmaps, "plot_heatmaps", fake("heatmaps"))
    monkeypatch.setattr(ddsmon.dashboard, "write_dashboard", fake("dashboard"))
    return calls


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_heatmaps_and_dashboard_are_throttled_apart(tmp_path: Path, drawn: list[str]) -> None:
    clock = Clock()
    plots = PlotScheduler(
        LocalHistory(StateDir(tmp_path / "st")), interval=10.0, heavy_interval=60.0, clock=clock
    )
    uploads: list[set[str]] = []
    plots.refresh(lambda f: uploads.append(_files(f)) or True, force=True)
    assert uploads == []  # nothing noted yet
    plots.note(1, _signatures())
    plots.refresh(lambda f: uploads.append(_files(f)) or True)
    everything = {"trajectories.png", "spectra.png", f"{HEATMAP_FOLDER}/lambda_ratio.png",
                  DASHBOARD_FILE}  # fmt: skip
    assert uploads == [everything] and not plots.dirty
    assert set(plots.history.spectra()) == {1}  # kept for the dashboard
    plots.note(2, _signatures())
    clock.now += 11
    plots.refresh(lambda f: uploads.append(_files(f)) or True)
    assert uploads[-1] == {"trajectories.png", "spectra.png"}  # the heavy ones wait
    assert plots.dirty
    clock.now += 11
    plots.refresh(lambda f: uploads.append(_files(f)) or True)
    assert len(uploads) == 2  # nothing new for the light ones, the heavy ones not due
    clock.now += 60
    plots.refresh(lambda f: uploads.append(_files(f)) or False)  # refused
    assert uploads[-1] == {f"{HEATMAP_FOLDER}/lambda_ratio.png", DASHBOARD_FILE} and plots.dirty
    clock.now += 11
    plots.refresh(lambda f: uploads.append(_files(f)) or True)  # retried, not waiting 60 s
    assert uploads[-1] == {f"{HEATMAP_FOLDER}/lambda_ratio.png", DASHBOARD_FILE}
    assert not plots.dirty
    plots.note(3, _signatures())
    plots.refresh(lambda f: uploads.append(_files(f)) or True, force=True, down=True)  # close
    assert uploads[-1] == everything


def test_a_figure_that_cannot_be_drawn_leaves_the_others(
    tmp_path: Path, drawn: list[str], monkeypatch, caplog
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no font")

    monkeypatch.setattr(ddsmon.heatmaps, "plot_heatmaps", broken)
    plots = PlotScheduler(LocalHistory(StateDir(tmp_path / "st")), interval=0.0)
    plots.note(1, _signatures())
    uploads: list[set[str]] = []
    with caplog.at_level(logging.ERROR, logger="ddsmon.sinks"):
        plots.refresh(lambda f: uploads.append(_files(f)) or True)
    assert "could not draw the plots: heatmaps/" in caplog.text
    assert uploads == [{"trajectories.png", "spectra.png", DASHBOARD_FILE}]
    assert not plots.dirty  # given up until the next checkpoint


def test_no_plotly_is_said_once(tmp_path: Path, drawn: list[str], monkeypatch, caplog) -> None:
    def no_plotly(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("No module named 'plotly'")

    monkeypatch.setattr(ddsmon.dashboard, "write_dashboard", no_plotly)
    plots = PlotScheduler(LocalHistory(StateDir(tmp_path / "st")), interval=0.0, heavy_interval=0)
    with caplog.at_level(logging.WARNING, logger="ddsmon.sinks"):
        for step in (1, 2):
            plots.note(step, _signatures())
            plots.refresh(lambda f: True)
    said = [r for r in caplog.records if "plotly" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and not said[0].exc_info


def test_the_schedule_draws_real_heatmaps_and_dashboard(tmp_path: Path) -> None:
    history = LocalHistory(StateDir(tmp_path / "st"))
    for step in (0, 10, 20):
        sig = _signatures(dead=3 if step == 20 else 0)
        reading = CheckpointReading(step=step, path=Path("c.pt"), signatures=sig, meta={})
        history.append(HistoryEntry.of(reading))
    plots = PlotScheduler(history, interval=0.0)
    plots.directory = tmp_path / "ckpts"
    for step in (0, 10, 20):
        plots.note(step, _signatures(dead=3 if step == 20 else 0))
    got: list[set[str]] = []
    plots.refresh(lambda f: got.append(_files(f)) or True, force=True)
    assert got == [
        {"trajectories.png", "spectra.png", DASHBOARD_FILE}
        | {f"{HEATMAP_FOLDER}/{r}.png" for r in HEADLINE_READINGS}
    ]
