"""Figures a reviewer reads without the code: spectra of one checkpoint, readings over steps.

Both functions draw with matplotlib's object API on the Agg canvas (no pyplot, no
global state, safe off the main thread and without a display) and write a PNG.

:func:`plot_spectra`
    One panel per layer: ``log10`` of every value of the three spectra the engine
    decomposes, in descending order, against their index: the singular values of the
    layer outputs ``X`` (sigma), the eigenvalues of the Fisher-Gram
    ``G = Delta^T Delta / n`` (lambda) and of the parameter-side Gram ``K = J J^T / n``.
    Each spectrum's trust floor is a dashed line in the same colour: values below it
    are numerically unresolved, and the count above it is the rank in the panel title.
    A dead direction shows as the cliff where a spectrum falls to its floor.

:func:`plot_trajectories`
    The scale-free readings of every layer over training steps: ``log10(lambda_min /
    lambda_max)``, ``log10(sigma_min / sigma_max)``, ``log_volume = log det+(G) -
    rank * log lambda_max`` (natural log), and the ranks (``g_rank`` solid, ``x_rank``
    dashed), with the trainer's own scalars (e.g. ``val_acc``) in a last panel when
    given. Events are vertical lines across all panels (colour by kind); a
    ``transition`` (the grokking-like phase change) is the thick red one.

What is drawn comes from :mod:`ddsmon.readings`: the spectra, floors, ranks and legend
labels from :data:`~ddsmon.readings.SPECTRA`; the trajectory panels from the readings'
``panel`` (titled by their description, the y axis by their unit: log10 for values and
ratios, as they are for natural logs and counts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ddsmon.readings import READINGS, SPECTRA, Reading
from ddsmon.signature import Signatures

__all__ = ("EVENT_STYLE", "plot_spectra", "plot_trajectories")

log = logging.getLogger(__name__)

#: Line style of each event kind in :func:`plot_trajectories`.
EVENT_STYLE: dict[str, dict[str, Any]] = {
    "transition": {"color": "#d62728", "linestyle": "-", "linewidth": 2.2, "alpha": 0.9},
    "collapse": {"color": "#ff7f0e", "linestyle": "--", "linewidth": 1.0, "alpha": 0.8},
    "revival": {"color": "#2ca02c", "linestyle": "--", "linewidth": 1.0, "alpha": 0.8},
    "rank_change": {"color": "#9467bd", "linestyle": ":", "linewidth": 1.2, "alpha": 0.8},
    "nonfinite": {"color": "#000000", "linestyle": "-.", "linewidth": 1.2, "alpha": 0.8},
    "dying": {"color": "#e377c2", "linestyle": ":", "linewidth": 1.0, "alpha": 0.8},
}
_OTHER_EVENT = {"color": "#7f7f7f", "linestyle": ":", "linewidth": 1.0, "alpha": 0.8}

#: Colour of each side's spectrum (and of its floor line) in :func:`plot_spectra`.
_SIDE_COLOR = {"X": "#1f77b4", "G": "#ff7f0e", "K": "#2ca02c"}

#: Panels drawn per layer; beyond this the figure names the layers left out.
MAX_PANELS = 48
#: Layers given a legend entry in the trajectories figure.
MAX_LEGEND = 16
_DPI = 90


def plot_spectra(signatures: Signatures, path: Path | str, *, title: str | None = None) -> Path:
    """Write a PNG of every layer's log10 spectra with their trust floors; return ``path``.

    ``signatures``: one checkpoint's :class:`~ddsmon.signature.Signatures`. Values that are
    zero or negative (below any floor) cannot be drawn on a log axis and are left out;
    a non-finite layer gets a panel saying so.
    """
    path = Path(path)
    layers = list(signatures.layers.values())
    shown = layers[:MAX_PANELS]
    n = max(1, len(shown))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.4 * ncols, 2.9 * nrows + 0.8), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, sig in zip(axes, shown):
        ax.set_title(_spectra_title(sig), fontsize=8.5)
        ax.set_xlabel("index (descending)", fontsize=8)
        ax.set_ylabel("log10 value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.25)
        if not sig.finite:
            ax.text(
                0.5,
                0.5,
                f"non-finite\n{sig.nonfinite or ''}",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#d62728",
            )
            continue
        drawn = False
        for spectrum in SPECTRA:
            color, label = _SIDE_COLOR[spectrum.side], spectrum.label
            values = getattr(sig, spectrum.field)
            if values is None or len(values) == 0:
                continue
            values = np.asarray(values, dtype=np.float64)
            idx = np.arange(1, values.size + 1)
            keep = np.isfinite(values) & (values > 0)
            if keep.any():
                ax.plot(
                    idx[keep],
                    np.log10(values[keep]),
                    marker=".",
                    markersize=3,
                    linewidth=1.0,
                    color=color,
                    label=label,
                )
                drawn = True
            floor = getattr(sig, spectrum.floor)
            if floor is not None and floor > 0 and math.isfinite(floor):
                ax.axhline(math.log10(floor), color=color, linestyle="--", linewidth=0.9)
        if drawn:
            ax.legend(fontsize=6.5, loc="lower left", framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no positive value", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    if not layers:
        axes[0].text(0.5, 0.5, "no layers", ha="center", va="center", transform=axes[0].transAxes)
    heading = title or "Spectra per layer (dashed: trust floor; values below it are unresolved)"
    if len(layers) > len(shown):
        heading += f"; {len(layers) - len(shown)} more layers not drawn"
    fig.suptitle(heading, fontsize=10)
    fig.savefig(path, format="png")
    return path


def _spectra_title(sig: Any) -> str:
    parts = [sig.name or "(model)"]
    for spectrum in SPECTRA:
        rank = getattr(sig, spectrum.rank)
        if rank is not None:
            bound = f"/{getattr(sig, spectrum.bound)}" if spectrum.bound else ""
            parts.append(f"{spectrum.rank} {rank}{bound}")
    return "  ".join(parts)


#: Line style of each side where readings share a panel of :func:`plot_trajectories`.
_SIDE_STYLE = {"G": "-", "X": "--", "K": ":"}
_STYLE_NAME = {"-": "solid", "--": "dashed", ":": "dotted"}
#: The y axis of each unit: its label, and whether values are drawn as log10.
_UNIT_AXIS = {
    "ratio": ("log10 ratio", True),
    "value": ("log10 value", True),
    "floor": ("log10 value", True),
    "nats": ("nats", False),
    "count": ("count", False),
    "fraction": ("fraction", False),
}


@dataclass(frozen=True)
class _Panel:
    title: str
    ylabel: str
    series: tuple[tuple[str, bool, str], ...]  # (reading, drawn as log10, line style)


def _trajectory_panels(rows: Sequence[Reading] = READINGS) -> list[_Panel]:
    """The panels of :func:`plot_trajectories`, from the readings' ``panel``: one
    reading's panel is titled by its description; readings sharing a panel (the ranks)
    are told apart by their side's line style, G solid."""
    by_panel: dict[int, list[Reading]] = {}
    for r in rows:
        if r.panel is not None:
            by_panel.setdefault(r.panel, []).append(r)
    panels = []
    for _, members in sorted(by_panel.items()):
        ylabel, log10 = _UNIT_AXIS[members[0].unit]
        if len(members) == 1:
            r = members[0]
            panels.append(_Panel(r.description, ylabel, ((r.name, log10, "-"),)))
            continue
        members.sort(key=lambda r: list(_SIDE_STYLE).index(r.side))
        series = tuple((r.name, _UNIT_AXIS[r.unit][1], _SIDE_STYLE[r.side]) for r in members)
        ranks = all(r.name.endswith("rank") for r in members)
        if ranks:
            heading = "ranks"
        elif all(r.is_count for r in members):
            heading = "counts"
        else:
            heading = ", ".join(r.title for r in members)
        what = ", ".join(f"{_STYLE_NAME[style]}: {name}" for name, _, style in series)
        panels.append(_Panel(f"{heading} ({what})", "rank" if ranks else ylabel, series))
    return panels


def plot_trajectories(
    history: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]],
    path: Path | str,
    events: Iterable[Any] = (),
    *,
    train: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of every layer's scale-free readings over steps; return ``path``.

    ``history``: layer -> ``[(step, reading), ...]`` with ``reading`` a
    :meth:`~ddsmon.signature.LayerSignature.to_dict` (or any mapping with those keys;
    missing or ``None`` values leave a gap). ``events``: :class:`ddsmon.events.Event`
    objects or their ``to_dict()``; each is a vertical line at its step.
    ``train``: optional trainer scalars, name -> ``[(step, value), ...]``.
    """
    path = Path(path)
    panels = _trajectory_panels()
    scalars: Mapping[str, Sequence[tuple[int, float]]] = train or {}
    has_train = any(len(v) for v in scalars.values())
    nrows = len(panels) + (1 if has_train else 0)
    fig = Figure(figsize=(10.5, 2.3 * nrows + 0.9), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False).ravel()
    cmap = _colors(len(history))
    layer_handles = []
    for color, (layer, points) in zip(cmap, history.items()):
        pts = sorted(points, key=lambda p: p[0])
        steps = np.array([p[0] for p in pts], dtype=np.float64)
        for ax, panel in zip(axes, panels):
            for reading, log10, style in panel.series:
                y = np.array([_num(p[1].get(reading)) for p in pts], dtype=np.float64)
                if log10:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
                if np.isfinite(y).any():
                    ax.plot(
                        steps,
                        y,
                        linestyle=style,
                        marker=".",
                        markersize=3,
                        linewidth=1.1,
                        color=color,
                    )
        layer_handles.append(Line2D([], [], color=color, label=layer or "(model)"))
    for ax, panel in zip(axes, panels):
        ax.set_title(panel.title, fontsize=9, loc="left")
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.25)
    if has_train:
        ax = axes[len(panels)]
        # accuracies (0..1) on the left axis; losses and other scalars on a log right axis
        other_ax = None
        for color, (name, scalar) in zip(_colors(len(scalars)), scalars.items()):
            by_step = sorted(scalar, key=lambda p: p[0])
            values = [_num(p[1]) for p in by_step]
            target = ax
            if "acc" not in name.lower():
                if other_ax is None:
                    other_ax = ax.twinx()
                    other_ax.tick_params(labelsize=7)
                target = other_ax
                if values and all(v is not None and v > 0 for v in values):
                    other_ax.set_yscale("log")
            target.plot(
                [p[0] for p in by_step],
                values,
                color=color,
                marker=".",
                markersize=3,
                label=name,
                linestyle="-" if target is ax else "--",
            )
        ax.set_title(
            "trainer scalars (accuracies left; other scalars dashed, right axis)",
            fontsize=9,
            loc="left",
        )
        handles, labels = ax.get_legend_handles_labels()
        if other_ax is not None:
            more = other_ax.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize=7, loc="best")
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("training step", fontsize=8)

    kinds_seen = _draw_events(list(axes), events)
    legend = layer_handles[:MAX_LEGEND]
    if len(layer_handles) > MAX_LEGEND:
        legend.append(
            Line2D([], [], color="none", label=f"+{len(layer_handles) - MAX_LEGEND} more layers")
        )
    legend += [
        Line2D([], [], **{**EVENT_STYLE.get(k, _OTHER_EVENT), "label": f"event: {k}"})
        for k in kinds_seen
    ]
    if legend:
        fig.legend(handles=legend, loc="outside right upper", fontsize=7, frameon=False)
    if not history:
        axes[0].text(
            0.5, 0.5, "no readings yet", ha="center", va="center", transform=axes[0].transAxes
        )
    fig.suptitle(title or "Dead-direction readings over training", fontsize=10)
    fig.savefig(path, format="png")
    return path


def _draw_events(axes: Sequence[Any], events: Iterable[Any]) -> list[str]:
    """Vertical lines at event steps (one per step and kind); kinds in order of first use."""
    seen: set[tuple[int, str]] = set()
    kinds: list[str] = []
    for event in events:
        step, kind = _event_field(event, "step"), _event_field(event, "kind")
        if step is None or kind is None or (int(step), str(kind)) in seen:
            continue
        seen.add((int(step), str(kind)))
        if kind not in kinds:
            kinds.append(str(kind))
        style = EVENT_STYLE.get(str(kind), _OTHER_EVENT)
        for ax in axes:
            ax.axvline(float(step), **style)
        if kind == "transition":
            axes[0].annotate(
                "transition",
                xy=(float(step), 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -10),
                textcoords="offset points",
                color=style["color"],
                fontsize=7,
            )
    return kinds


def _event_field(event: Any, name: str) -> Any:
    if isinstance(event, Mapping):
        return event.get(name)
    return getattr(event, name, None)


def _num(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(max(n, 1))]
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
