"""Layer x step heatmaps of the headline readings, events marked: readable at hundreds of
layers, where one line per layer is not.

:func:`plot_heatmap` draws one reading: a row per layer (in the model's order, top to
bottom), a column per checkpoint (as wide as its share of the steps, so uneven
checkpointing is drawn as it is), the colour the reading's value on the scale the
readings table gives it (``log10`` of a ratio or value, nats and counts and fractions as
they are; :func:`level`). A cell the checkpoint left unresolved (``None``: below its
trust floor, or a non-finite layer) is grey. Events are drawn where they happened, at
their step and layer: a ``collapse`` as a downward triangle, a ``revival`` as an upward
one, a ``rank_change`` as a diamond, ``dying`` as a dot, ``nonfinite`` as a cross, each on
the panel of its own reading (rank changes on the side's dead count, the kinds not tied
to one reading on every panel); a ``transition`` is a red vertical line across the panel
with its layers ringed. With many layers the y axis names every k-th layer (at most
:data:`MAX_LAYER_LABELS`), and the figure grows with the layers up to
:data:`MAX_HEIGHT_IN` inches.

:func:`plot_heatmaps` writes one PNG per headline reading into a folder
(``<reading>.png``), what the MLflow sink uploads as ``plots/heatmaps/``. Like
:mod:`ddsmon.plots`, matplotlib's object API on the Agg canvas (no pyplot, no global
state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ddsmon.readings import HEADLINE_READINGS, reading

__all__ = (
    "EVENT_MARKERS",
    "MAX_HEIGHT_IN",
    "MAX_LAYER_LABELS",
    "event_layers",
    "level",
    "level_label",
    "plot_heatmap",
    "plot_heatmaps",
    "reading_matrix",
)

#: Marker of each event kind (``transition`` is a vertical line instead).
EVENT_MARKERS: dict[str, dict[str, Any]] = {
    "collapse": {"marker": "v", "color": "#ff7f0e", "edgecolor": "black"},
    "revival": {"marker": "^", "color": "#2ca02c", "edgecolor": "black"},
    "rank_change": {"marker": "D", "color": "#9467bd", "edgecolor": "white"},
    "dying": {"marker": "o", "color": "#e377c2", "edgecolor": "black"},
    "nonfinite": {"marker": "X", "color": "#000000", "edgecolor": "white"},
}
_OTHER_MARKER = {"marker": "s", "color": "#7f7f7f", "edgecolor": "black"}
_TRANSITION_COLOR = "#d62728"
#: Event kinds not tied to one reading: drawn on every panel.
_EVERY_PANEL = ("nonfinite", "transition", "dying")
#: Layers named on the y axis at most (every k-th beyond).
MAX_LAYER_LABELS = 60
#: The tallest figure, in inches (at 90 dpi).
MAX_HEIGHT_IN = 26.0
_DPI = 90


def level(name: str, value: Any) -> float:
    """``value`` of reading ``name`` on the scale it is drawn on: ``log10`` for a ratio,
    a value or a floor (NaN at or below 0), as it is for nats, counts and fractions;
    NaN for None or a non-number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    if not math.isfinite(v):
        return math.nan
    if _log10(name):
        return math.log10(v) if v > 0 else math.nan
    return v


def _log10(name: str) -> bool:
    try:
        return reading(name).unit in ("ratio", "value", "floor")
    except KeyError:
        return False


def level_label(name: str) -> str:
    """The colour bar's label: ``log10 <name>`` or ``<name> (<unit>)``."""
    try:
        unit = reading(name).unit
    except KeyError:
        return name
    if _log10(name):
        return f"log10 {name}"
    return f"{name} ({unit})"


def reading_matrix(
    history: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]], name: str
) -> tuple[list[str], list[int], np.ndarray]:
    """``(layers, steps, values)``: the layers in the history's order, every step any
    layer has, ascending, and ``values[layer, step]`` at :func:`level` (NaN where the
    layer has no finite value at that step)."""
    layers = list(history)
    steps = sorted({int(s) for points in history.values() for s, _ in points})
    col = {s: j for j, s in enumerate(steps)}
    out = np.full((len(layers), len(steps)), np.nan)
    for i, layer in enumerate(layers):
        for s, values in history[layer]:
            out[i, col[int(s)]] = level(name, values.get(name))
    return layers, steps, out


def event_layers(event: Any, known: Iterable[str] = ()) -> list[str]:
    """The layers an event is about: its ``layer``; a ``transition`` lists several,
    comma-separated (a layer of ``known`` whose own name holds a comma stays whole)."""
    layer = _field(event, "layer")
    if layer is None:
        return []
    text = str(layer)
    if _field(event, "kind") != "transition" or text in set(known):
        return [text]
    return [p.strip() for p in text.split(",") if p.strip()]


def _field(event: Any, key: str) -> Any:
    if isinstance(event, Mapping):
        return event.get(key)
    return getattr(event, key, None)


def _on_panel(event: Any, name: str) -> bool:
    """Whether ``event`` is drawn on the panel of reading ``name``."""
    kind = str(_field(event, "kind"))
    if kind in _EVERY_PANEL:
        return True
    about = str(_field(event, "reading") or "")
    if about == name:
        return True
    try:
        this, that = reading(name), reading(about)
    except KeyError:
        return False
    return kind == "rank_change" and this.is_count and that.is_count and this.side == that.side


def _edges(steps: Sequence[int]) -> np.ndarray:
    """Column edges: halfway between checkpoints, half a gap beyond the ends."""
    s = np.asarray(steps, dtype=np.float64)
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def plot_heatmap(
    history: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]],
    path: Path | str,
    events: Iterable[Any] = (),
    *,
    name: str,
    title: str | None = None,
) -> Path:
    """Write a PNG of reading ``name`` over layers and steps, events marked; return
    ``path``. ``history``: layer -> ``[(step, readings), ...]``
    (:meth:`~ddsmon.sinks.history.LocalHistory.layers`); ``events``:
    :class:`~ddsmon.events.Event` objects or their ``to_dict()``."""
    path = Path(path)
    layers, steps, values = reading_matrix(history, name)
    n = max(len(layers), 1)
    height = min(MAX_HEIGHT_IN, max(3.6, 1.9 + 0.13 * n))
    fig = Figure(figsize=(11.5, height), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    try:
        row = reading(name)
        what = row.description
        count = row.is_count
    except KeyError:
        what, count = name, False
    fig.suptitle(title or f"{name} per layer and step", fontsize=11)
    ax.set_title(f"{what}  ({len(layers)} layers, {len(steps)} checkpoints)", fontsize=8.5)
    if not layers or not steps:
        ax.text(0.5, 0.5, "no readings yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        fig.savefig(path, format="png")
        return path
    from matplotlib import colormaps

    cmap = colormaps["magma_r" if count else "viridis"].with_extremes(bad="#d9d9d9")
    shown = values[np.isfinite(values)]
    if shown.size:
        lo, hi = (
            (float(shown.min()), float(shown.max()))
            if count
            else (float(np.percentile(shown, 1)), float(np.percentile(shown, 99)))
        )
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
    else:
        lo, hi = 0.0, 1.0
    y_edges = np.arange(len(layers) + 1) - 0.5
    mesh = ax.pcolormesh(
        _edges(steps),
        y_edges,
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=lo,
        vmax=hi,
        shading="flat",
        rasterized=True,
    )
    ax.set_ylim(len(layers) - 0.5, -0.5)  # the model's first layer on top
    label_every = max(1, math.ceil(len(layers) / MAX_LAYER_LABELS))
    ticks = list(range(0, len(layers), label_every))
    ax.set_yticks(ticks)
    fontsize = 7.5 if len(layers) <= 30 else 6.0
    ax.set_yticklabels([layers[i] or "(model)" for i in ticks], fontsize=fontsize)
    ax.set_ylabel(
        "layer" if label_every == 1 else f"layer (every {label_every}th named)", fontsize=8
    )
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    bar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label(level_label(name) + "  (grey: unresolved)", fontsize=8)
    bar.ax.tick_params(labelsize=7)

    kinds = _draw_events(ax, events, name, layers)
    if kinds:
        handles = []
        for kind in kinds:
            if kind == "transition":
                handles.append(Line2D([], [], color=_TRANSITION_COLOR, linewidth=2, label=kind))
                continue
            style = EVENT_MARKERS.get(kind, _OTHER_MARKER)
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker=style["marker"],
                    markerfacecolor=style["color"],
                    markeredgecolor=style["edgecolor"],
                    label=kind,
                )
            )
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.savefig(path, format="png")
    return path


def _draw_events(ax: Any, events: Iterable[Any], name: str, layers: Sequence[str]) -> list[str]:
    """Markers at (step, layer), transitions as vertical lines; the kinds drawn."""
    row_of = {layer: i for i, layer in enumerate(layers)}
    points: dict[str, list[tuple[float, int]]] = {}
    kinds: list[str] = []
    transitions: set[float] = set()
    for event in events:
        step, kind = _field(event, "step"), _field(event, "kind")
        if step is None or kind is None or not _on_panel(event, name):
            continue
        kind = str(kind)
        rows = [row_of[la] for la in event_layers(event, row_of) if la in row_of]
        if kind == "transition":
            if float(step) not in transitions:
                transitions.add(float(step))
                ax.axvline(float(step), color=_TRANSITION_COLOR, linewidth=2.0, alpha=0.85)
            points.setdefault(kind, []).extend((float(step), r) for r in rows)
        elif rows:
            points.setdefault(kind, []).extend((float(step), r) for r in rows)
        else:
            continue
        if kind not in kinds:
            kinds.append(kind)
    size = 42 if len(layers) <= 60 else 32
    for kind, pts in points.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if kind == "transition":
            ax.scatter(
                xs,
                ys,
                s=size * 1.6,
                facecolors="none",
                edgecolors=_TRANSITION_COLOR,
                linewidths=1.4,
                zorder=3,
            )
            continue
        style = EVENT_MARKERS.get(kind, _OTHER_MARKER)
        ax.scatter(
            xs,
            ys,
            s=size,
            marker=style["marker"],
            c=style["color"],
            edgecolors=style["edgecolor"],
            linewidths=0.6,
            zorder=4,
        )
    return kinds


def plot_heatmaps(
    history: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]],
    folder: Path | str,
    events: Iterable[Any] = (),
    *,
    readings: Sequence[str] = HEADLINE_READINGS,
    title: str | None = None,
) -> list[Path]:
    """One :func:`plot_heatmap` per reading (default: the headline readings) into
    ``folder/<reading>.png``; the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kept = list(events)
    out = []
    for name in readings:
        heading = f"{name} per layer and step" + (f": {title}" if title else "")
        out.append(plot_heatmap(history, folder / f"{name}.png", kept, name=name, title=heading))
    return out
