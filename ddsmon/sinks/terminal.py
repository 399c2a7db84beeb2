"""The terminal view: a rich Live dashboard, or plain log lines when stdout is no terminal.

:func:`render_signatures_table` turns one :class:`~ddsmon.signature.Signatures` into a
rich table, one row per layer, at its natural width; :class:`SignaturesView` lays the
same table out for the width it is printed at (what ``ddsmon report`` prints and the live
view shows): split over several tables, each led by the layer column, when it is wider
than the terminal, so that every layer name and every value is shown whole at 80
columns too. :func:`render_dashboard` composes the whole live view from a
:class:`DashboardState`; :class:`TerminalSink` keeps that state up to date from the
daemon (from any thread) and shows it, and :func:`export_svg` writes any renderable as
an SVG picture.

How readings are shown:

* The columns are the readings of :data:`ddsmon.readings.READINGS` marked ``terminal``,
  in table order, headed by their side (or ``heading``) over their label; a reading with
  a ``pair`` shares its cell with it (``rank/dead``). The parameter side's (K) columns
  appear only when some layer has it.
* A reading below its trust floor is unresolved (``None`` in the signature). The table
  shows the floor it fell under instead (the row's ``floor``), as ``<5.2e-14``: "smaller
  than this, if anything" (``floor_x`` for sigma_min, ``floor_g`` for
  lambda_min/lambda_max, ``param_floor`` for the parameter side).
* Trend arrows compare each reading with the same layer's reading at the previous
  checkpoint. A resolved reading ``a`` (previous ``b``) has moved when
  ``|a - b| > rtol * max(|a|, |b|)`` (``rtol`` = :data:`TREND_RTOL`, 1%): ``↑`` when it
  rose, ``↓`` when it fell. A reading that fell under its floor counts as ``↓``, one that
  rose above it as ``↑``; ranks move on any change. Readings that did not move carry no
  arrow, so a quiet table is a still one.
* A layer whose activations or gradients held NaN/inf is shown in red with the reason;
  a checkpoint where every layer did is said to have diverged (:data:`_DIVERGED`).
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ddsmon.readings import READINGS, Reading
from ddsmon.readings import reading as _row
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.shown import shown as escaped
from ddsmon.signature import LayerSignature, Signatures

if TYPE_CHECKING:
    from ddsmon.events import Event
    from ddsmon.sinks import RunInfo

__all__ = (
    "EVENT_STYLES",
    "TREND_RTOL",
    "DashboardState",
    "SignaturesView",
    "TerminalSink",
    "export_svg",
    "render_dashboard",
    "render_signatures_table",
)

logger = logging.getLogger(__name__)

#: Relative change above which a reading gets a trend arrow.
TREND_RTOL: float = 0.01

#: Style of each event kind in the live view.
EVENT_STYLES: dict[str, str] = {
    "transition": "bold red",
    "collapse": "yellow",
    "revival": "green",
    "rank_change": "cyan",
    "nonfinite": "red",
    "dying": "magenta",
}
#: What the view says of a checkpoint where every layer read is non-finite.
_DIVERGED = (
    "every layer non-finite: the run diverged (NaN/inf weights or loss), or the probe holds NaN/inf"
)

UP, DOWN = "↑", "↓"


# --------------------------------------------------------------------------- formatting


def _num(x: float | int | None, spec: str = ".3g", none: str = "—") -> str:
    """A number for display: ints as they are, floats to ``spec`` (3 significant digits)."""
    if x is None:
        return none
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return format(x, spec)


def _floor_text(floor: float | None) -> str:
    """What an unresolved reading shows: ``<floor`` (or a dash when no floor is known)."""
    if floor is None or not math.isfinite(floor):
        return "—"
    return f"<{floor:.2g}"


def _trend(cur: float | int | None, prev: float | int | None, rtol: float) -> str:
    """``↑``/``↓`` when ``cur`` moved from ``prev`` by more than ``rtol`` relative, else ``""``.

    None means unresolved (below the floor): None -> value is ``↑``, value -> None ``↓``.
    Integers (ranks) move on any change.
    """
    if cur is None and prev is None:
        return ""
    if prev is None:
        return UP
    if cur is None:
        return DOWN
    if isinstance(cur, int) and isinstance(prev, int):
        return UP if cur > prev else DOWN if cur < prev else ""
    c, p = float(cur), float(prev)
    if not (math.isfinite(c) and math.isfinite(p)):
        return ""
    if abs(c - p) > rtol * max(abs(c), abs(p)):
        return UP if c > p else DOWN
    return ""


def _cell(
    value: float | int | None,
    prev_value: float | int | None,
    *,
    has_prev: bool,
    floor: float | None = None,
    floored: bool = False,
    rtol: float = TREND_RTOL,
) -> Text:
    """One reading's cell: the value (or ``<floor``) and its trend arrow."""
    if value is None:
        text = Text(_floor_text(floor) if floored else "—", style="dim")
    else:
        text = Text(_num(value))
    if has_prev:
        arrow = _trend(value, prev_value, rtol)
        if arrow:
            text.append(arrow, style="bold")
    return text


def _rank_cell(
    rank: int | None, dead: int | None, prev_rank: int | None, *, has_prev: bool
) -> Text:
    """``rank/dead`` with an arrow on the rank when it changed."""
    if rank is None:
        return Text("—", style="dim")
    text = Text(f"{rank}/{_num(dead)}")
    if has_prev and prev_rank is not None and rank != prev_rank:
        text.append(UP if rank > prev_rank else DOWN, style="bold")
    return text


# ------------------------------------------------------------------------ signatures table


#: The readings with a column of their own, in table order (a ``pair`` shares its cell).
_COLUMNS: tuple[Reading, ...] = tuple(r for r in READINGS if r.terminal)
#: The parameter side's columns, shown only when some layer has that side.
_PARAM_SIDE = "K"


def _header(r: Reading) -> str:
    """A column's two-line header: the side (or ``heading``) over the label."""
    label = r.label if r.pair is None else f"{r.label}/{_row(r.pair).label}"
    return f"{r.heading or r.side}\n{label}"


def _columns(params: bool) -> tuple[Reading, ...]:
    return tuple(r for r in _COLUMNS if params or r.side != _PARAM_SIDE)


def _has_param_side(signatures: Signatures) -> bool:
    shown = [r.name for r in _COLUMNS if r.side == _PARAM_SIDE]
    return any(
        s.param_count is not None or any(getattr(s, name) is not None for name in shown)
        for s in signatures.layers.values()
    )


@dataclass
class _TableParts:
    """A signatures table taken apart: each layer's name and row style, each value
    column's header and cells (in row order), and the caption under the table."""

    names: list[Text]
    styles: list[str | None]
    headers: list[str]
    columns: list[list[Text]]
    caption: Text | None

    def natural_widths(self) -> tuple[int, list[int]]:
        """The width of the layer column and of each value column with nothing folded
        or cut: the longest cell, header line included (cells measured as the terminal
        shows them, so ``σ``, ``λ``, ``—`` count one column each)."""
        layer = max([5, *(n.cell_len for n in self.names)])
        values = [
            max([*(Text(line).cell_len for line in header.split("\n")),
                 *(c.cell_len for c in cells)])
            for header, cells in zip(self.headers, self.columns, strict=True)
        ]  # fmt: skip
        return layer, values


def _signatures_parts(
    signatures: Signatures, previous: Signatures | None, rtol: float
) -> _TableParts:
    params = _has_param_side(signatures)
    columns = _columns(params)
    headers = ["\nd", "\nN", *(_header(r) for r in columns)]
    cells: list[list[Text]] = [[] for _ in headers]
    names: list[Text] = []
    styles: list[str | None] = []
    prev_layers = previous.layers if previous is not None else {}
    notes: list[Text] = []
    unresolved = False
    for name, sig in signatures.layers.items():
        if not sig.finite:
            row: list[Text] = [Text(str(sig.d)), Text(str(sig.N)), Text("non-finite", style="bold")]
            row += [Text("—") for _ in headers[3:]]
            reason = sig.nonfinite or "activations or gradients not finite"
            notes.append(Text(f"{name}: {reason}", style="red"))
            styles.append("red")
        else:
            row, floored = _layer_row(sig, prev_layers.get(name), columns, rtol=rtol)
            unresolved = unresolved or floored
            styles.append(None)
        names.append(Text(name))
        for column, cell in zip(cells, row, strict=True):
            column.append(cell)

    if notes and len(notes) == len(signatures.layers):
        notes.insert(0, Text(_DIVERGED, style="bold red"))
    legend: list[str] = []
    if unresolved:
        legend.append("<f: unresolved, below the trust floor f")
    if previous is not None:
        legend.append(f"↑ ↓: moved more than {rtol:.0%} since the previous checkpoint")
    caption = Text()
    for i, note in enumerate(notes):
        if i:
            caption.append("\n")
        caption.append_text(note)
    if legend:
        if notes:
            caption.append("\n")
        caption.append("\n".join(legend), style="dim")
    return _TableParts(names, styles, headers, cells, caption if caption.plain else None)


def _table(
    parts: _TableParts,
    chosen: Iterable[int],
    *,
    title: str | None,
    caption: bool,
    layer_width: int | None = None,
) -> Table:
    """The rich table of the layer column and the value columns ``chosen`` (indices into
    ``parts.columns``). Only the layer column may fold (at ``layer_width`` when given);
    numbers never wrap."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        caption_justify="left",
        title_justify="left",
    )
    table.add_column("\nlayer", overflow="fold", min_width=5, max_width=layer_width)
    chosen = list(chosen)
    for i in chosen:
        table.add_column(parts.headers[i], justify="right", no_wrap=True)
    for r, (name, style) in enumerate(zip(parts.names, parts.styles, strict=True)):
        if layer_width is not None and name.cell_len > layer_width:
            name = Text(_break_at_dots(name.plain, layer_width), style=name.style)
        table.add_row(name, *(parts.columns[i][r] for i in chosen), style=style)
    if caption and parts.caption is not None:
        table.caption = parts.caption
    return table


def render_signatures_table(
    signatures: Signatures,
    previous: Signatures | None = None,
    *,
    title: str | None = None,
    rtol: float = TREND_RTOL,
) -> Table:
    """One row per layer of ``signatures``, with trend arrows against ``previous``: the
    whole table at its natural width (:class:`SignaturesView` splits it to fit a
    narrower terminal).

    Columns: layer, d (output width), N (rows of X), then the readings marked
    ``terminal`` in :data:`ddsmon.readings.READINGS`: for X: σ_min (or ``<floor_x``) and
    rank/dead (``x_rank / x_dead``, ``x_dead = d - x_rank``); for the Fisher-Gram G:
    λ_min and λ_max (or ``<floor_g``), rank/dead, ``log det+ G``,
    ``log vol = log det+ G - g_rank log λ_max``, and the dead gain ``u^T G u`` at X's
    weakest direction ``u``; and, when the parameter side was read, for K: λ_min (or
    ``<param_floor``) and rank.
    See the module docstring for the arrows and the floors.
    """
    parts = _signatures_parts(signatures, previous, rtol)
    return _table(parts, range(len(parts.columns)), title=title, caption=True)


def _break_at_dots(name: str, width: int) -> str:
    """``name`` with line breaks after dots so that each line is at most ``width`` long
    where a dot allows it (``transformer.h.11.`` / ``mlp.c_proj``); a part longer than
    ``width`` is left for the column to fold. Joining the lines gives ``name`` back."""
    lines: list[str] = []
    line = ""
    for part in name.split(".")[:-1]:
        piece = part + "."
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    last = name.rsplit(".", 1)[-1] if "." in name else name
    if line and len(line) + len(last) > width:
        lines.append(line)
        line = ""
    lines.append(line + last)
    return "\n".join(lines)


#: Columns between two cells of a table row: the right padding and the column divider
#: (``padding=(0, 1)``, ``collapse_padding``, no edge, :data:`rich.box.SIMPLE_HEAD`).
_GAP = 2


def _split_columns(layer: int, values: list[int], width: int) -> tuple[int, list[list[int]]]:
    """How the table fits in ``width`` columns: the layer column's width and the groups
    of value columns (indices, in order), one table each.

    With ``layer`` the longest layer name and ``values`` the value columns' natural
    widths, a table of the layer column and the value columns ``g`` is
    ``layer + sum(values[i] + _GAP for i in g)`` wide. One group when the whole table
    fits. Otherwise the layer column keeps its natural width when that is at most half
    of ``width`` (else it folds at half, names wrapping onto a second line rather than
    being cut), and the value columns fill groups greedily in table order, each group
    as many as fit beside the layer column (at least one, so a column wider than the
    terminal still shows whole, on a line of its own width).
    """
    if layer + sum(v + _GAP for v in values) <= width:
        return layer, [list(range(len(values)))]
    layer = min(layer, max(5, width // 2))
    groups: list[list[int]] = [[]]
    used = layer
    for i, w in enumerate(values):
        if groups[-1] and used + w + _GAP > width:
            groups.append([])
            used = layer
        groups[-1].append(i)
        used += w + _GAP
    return layer, groups


class SignaturesView:
    """The readings table, laid out for the width it is printed at: what ``ddsmon
    report`` prints and the live view shows.

    Every layer name and every value is shown whole at any width: when the whole table
    (:func:`render_signatures_table`) is wider than the terminal, its value columns are
    split over several tables, each led by the layer column, the title above the first
    and the caption under the last (:func:`_split_columns` says how). A layer name
    longer than half the width folds onto further lines; a number never wraps and is
    never cut. :attr:`natural_width` is the width of the whole table, for output that
    has no width of its own (a pipe, a log file).
    """

    def __init__(
        self,
        signatures: Signatures,
        previous: Signatures | None = None,
        *,
        title: str | None = None,
        rtol: float = TREND_RTOL,
    ) -> None:
        self.title = title
        self._parts = _signatures_parts(signatures, previous, rtol)
        self._layer, self._values = self._parts.natural_widths()

    @property
    def natural_width(self) -> int:
        """Columns of the whole table, nothing folded, one row per layer."""
        widths = [self._layer + sum(v + _GAP for v in self._values)]
        if self.title:
            widths += [Text(line).cell_len for line in self.title.splitlines()]
        return max(widths)

    def tables(self, width: int) -> list[Table]:
        """The table(s) that show every layer and value within ``width`` columns (the
        caption under the last; the title is not in them)."""
        layer, groups = _split_columns(self._layer, self._values, width)
        last = len(groups) - 1
        return [
            _table(
                self._parts,
                group,
                title=None,
                caption=i == last,
                layer_width=layer if last else None,
            )
            for i, group in enumerate(groups)
        ]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title:  # a line of its own: wrapped when long, never padded out
            yield Text(self.title)
        for i, table in enumerate(self.tables(options.max_width)):
            if i:
                yield Text("")
            yield table

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(self._layer, options.max_width), self.natural_width)


def _layer_row(
    sig: LayerSignature,
    prev: LayerSignature | None,
    columns: tuple[Reading, ...],
    *,
    rtol: float,
) -> tuple[list[Text], bool]:
    """The value cells of one finite layer's row (d, N, then ``columns``), and whether
    any showed a floor."""
    has_prev = prev is not None and prev.finite
    floored_any = False

    def previous(reading: str) -> Any:
        return getattr(prev, reading) if prev is not None else None

    def cell(r: Reading) -> Text:
        nonlocal floored_any
        if r.pair is not None:
            return _rank_cell(
                getattr(sig, r.name), getattr(sig, r.pair), previous(r.name), has_prev=has_prev
            )
        value = getattr(sig, r.name)
        floor = getattr(sig, r.floor) if r.floor else None
        floored = floor is not None
        floored_any = floored_any or (value is None and floored)
        return _cell(
            value, previous(r.name), has_prev=has_prev, floor=floor, floored=floored, rtol=rtol
        )

    # a layer without the parameter side (no parameters, or not read) shows dashes there
    param_counts = [r.name for r in columns if r.side == _PARAM_SIDE and r.is_count]
    no_params = sig.param_count is None and all(getattr(sig, n) is None for n in param_counts)
    row: list[Text] = [Text(str(sig.d)), Text(str(sig.N))]
    for r in columns:
        if r.side == _PARAM_SIDE and no_params:
            row.append(Text("—", style="dim"))
        else:
            row.append(cell(r))
    return row, floored_any


# ------------------------------------------------------------------------------ dashboard


@dataclass
class DashboardState:
    """Everything the live view shows, as the daemon has reported it so far.

    ``recent`` holds the latest events and failures (:class:`CheckpointFailure`), oldest
    first; ``previous`` is the signatures of the checkpoint read before ``latest`` (what
    the trend arrows compare with).
    """

    directory: Path | None = None
    mode: str = "watch"
    params: dict[str, str] = field(default_factory=dict)
    latest: CheckpointReading | None = None
    previous: Signatures | None = None
    read: int = 0
    failed: int = 0
    queued: int = 0
    events: int = 0
    recent: deque[Any] = field(default_factory=lambda: deque(maxlen=8))


def _run_label(params: Mapping[str, str]) -> str | None:
    for key in ("run_id", "mlflow_run_id", "run"):
        if params.get(key):
            return params[key]
    return None


def _event_cells(event: Event) -> tuple[Text, Text, Text]:
    style = EVENT_STYLES.get(event.kind, "bold")
    detail = Text(f"'{escaped(event.layer)}'")  # quoted: a layer "1" is no count
    if event.kind != "nonfinite":  # its reading ("finite") and magnitude (1) say nothing
        detail.append(f" {event.reading} ")
        if event.before is not None or event.after is not None:
            detail.append(f"{_num(event.before)} → {_num(event.after)}", style=style)
        detail.append(f" (magnitude {_num(event.magnitude)})", style="dim")
    if event.message:
        detail.append(f"  {event.message}")
    return Text(f"step {event.step}", style="dim"), Text(event.kind.upper(), style=style), detail


def _failure_cells(failure: CheckpointFailure) -> tuple[Text, Text, Text]:
    step = "" if failure.step is None else f"step {failure.step}"
    detail = Text(f"{escaped(failure.path)}: ", style="red")
    detail.append(failure.reason)
    return Text(step, style="dim"), Text("FAILED", style="bold red"), detail


def render_dashboard(state: DashboardState, *, max_events: int | None = None) -> RenderableType:
    """The live view: header, progress line, recent events and failures, latest readings.

    The readings table comes last so that, when a model has more layers than the
    terminal has lines, cropping drops layers rather than events.
    """
    parts: list[RenderableType] = []

    header = Text()
    header.append(f"ddsmon {state.mode}", style="bold")
    if state.directory is not None:
        header.append(f"  {state.directory}")
    run = _run_label(state.params)
    if run:
        header.append(f"  run {run}", style="cyan")
    parts.append(header)
    shown = {str(state.directory), run}
    others = {k: v for k, v in state.params.items() if v not in shown}
    if others:
        line = "  ".join(f"{k}={v}" for k, v in others.items())
        parts.append(Text(line, style="dim", no_wrap=True, overflow="ellipsis"))

    done = state.read + state.failed
    total = done + state.queued
    progress = Table.grid(padding=(0, 1))
    progress.add_column(width=30)
    progress.add_column()
    counts = Text()
    counts.append(f"read {state.read}, queued {state.queued}, ")
    counts.append(f"failed {state.failed}", style="red" if state.failed else "")
    counts.append(f", events {state.events}", style="bold" if state.events else "")
    if state.queued == 0 and state.mode == "watch":
        counts.append("  waiting for checkpoints", style="dim")
    progress.add_row(ProgressBar(total=max(total, 1), completed=done if total else 1), counts)
    parts.append(progress)

    recent = list(state.recent)
    if max_events is not None:
        recent = recent[-max_events:] if max_events > 0 else []
    if recent:
        parts.append(Text("recent events", style="bold underline"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(justify="right", no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(ratio=1)  # details wrap under themselves
        for item in reversed(recent):  # newest first
            if isinstance(item, CheckpointFailure):
                grid.add_row(*_failure_cells(item))
            else:
                grid.add_row(*_event_cells(item))
        parts.append(grid)

    latest = state.latest
    if latest is None:
        parts.append(Text("no checkpoint read yet", style="dim"))
    else:
        title = f"step {latest.step}  {escaped(latest.path)}"
        if latest.meta:
            title += "  " + "  ".join(f"{k}={_num(v, '.4g')}" for k, v in latest.meta.items())
        title += f"  (read in {latest.read_seconds:.2f}s)"
        parts.append(SignaturesView(latest.signatures, state.previous, title=title))
    return Group(*parts)


def export_svg(
    path: Path | str,
    renderable: RenderableType,
    *,
    width: int = 120,
    title: str = "ddsmon",
) -> Path:
    """Render ``renderable`` on a recording console ``width`` columns wide into an SVG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True)
    console.print(renderable)
    console.save_svg(str(path), title=title)
    return path


# ---------------------------------------------------------------------------------- sink


class TerminalSink:
    """Shows the daemon's progress: a rich Live view on a terminal, plain lines elsewhere.

    ``live=None`` picks the Live view exactly when ``console.is_terminal``. The Live view
    refreshes at most ``refresh_per_second`` times a second from its own thread; every
    ``on_*`` method only updates shared state under a lock, so the daemon may call them
    from any thread. The plain mode writes one line per checkpoint, event and failure,
    flushed at once (for log files and ``| tee``)::

        step 1200  ckpt=ckpts/step_1200.pt  layers=4  lambda_min[fc1]=3.2e-07  read in 0.12s
        EVENT transition step=1200 layer=fc1 reading=lambda_min before=0.0012 after=3.2e-07 magnitude=3.6: ...
        FAILED ckpts/step_1300.pt: truncated zip archive

    The ``lambda_min`` on the checkpoint line is that of the layer with the smallest
    resolved ``lambda_min / lambda_max`` (the most nearly degenerate Fisher-Gram).
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        live: bool | None = None,
        max_events: int = 8,
        refresh_per_second: float = 4.0,
    ) -> None:
        self.console = console if console is not None else Console()
        self.live = self.console.is_terminal if live is None else bool(live)
        self.max_events = max_events
        self._refresh_per_second = refresh_per_second
        self._lock = threading.RLock()
        self._state = DashboardState(recent=deque(maxlen=max(max_events, 1)))
        self._version = 0
        self._cached: tuple[int, RenderableType] | None = None
        self._live: Live | None = None
        self._closed = False

    # -- state ----------------------------------------------------------------------

    def snapshot(self) -> DashboardState:
        """A copy of the current state (for tests and :meth:`export_svg`)."""
        with self._lock:
            s = self._state
            return DashboardState(
                directory=s.directory,
                mode=s.mode,
                params=dict(s.params),
                latest=s.latest,
                previous=s.previous,
                read=s.read,
                failed=s.failed,
                queued=s.queued,
                events=s.events,
                recent=deque(s.recent, maxlen=s.recent.maxlen),
            )

    def renderable(self) -> RenderableType:
        """The dashboard as it stands (built once per change, reused between refreshes)."""
        with self._lock:
            if self._cached is None or self._cached[0] != self._version:
                self._cached = (
                    self._version,
                    render_dashboard(self._state, max_events=self.max_events),
                )
            return self._cached[1]

    def export_svg(self, path: Path | str, *, width: int = 120, title: str = "ddsmon") -> Path:
        """Write the current dashboard as an SVG picture (for the README)."""
        return export_svg(path, self.renderable(), width=width, title=title)

    def log_handler(self, level: int = logging.INFO) -> logging.Handler:
        """A logging handler that prints on this sink's console.

        In Live mode, log records printed through it appear above the view instead of
        tearing it (a plain ``StreamHandler`` bound to the real stderr would).
        """
        from rich.logging import RichHandler

        handler = RichHandler(console=self.console, level=level, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        return handler

    def set_run(self, run: str) -> None:
        """Name the tracking run in the header (e.g. the MLflow run id, once it exists)."""
        with self._lock:
            self._state.params["run_id"] = run
            self._changed()

    def _changed(self) -> None:
        self._version += 1

    # -- Sink protocol --------------------------------------------------------------

    def start(self, info: RunInfo) -> None:
        with self._lock:
            self._state.directory = info.directory
            self._state.mode = info.mode
            self._state.params = dict(info.params)
            self._changed()
            if self.live:
                self._start_live()
            else:
                params = "  ".join(f"{k}={v}" for k, v in info.params.items())
                self._line(
                    f"ddsmon {info.mode} {info.directory}" + (f"  {params}" if params else "")
                )

    def on_queue(self, pending: int) -> None:
        with self._lock:
            if pending != self._state.queued:
                self._state.queued = pending
                self._changed()

    def on_reading(self, reading: CheckpointReading, events: list[Event]) -> None:
        with self._lock:
            s = self._state
            s.previous = s.latest.signatures if s.latest is not None else None
            s.latest = reading
            s.read += 1
            s.events += len(events)
            for event in events:
                s.recent.append(event)
            self._changed()
            if self.live:
                self._start_live()
            else:
                self._line(self._reading_line(reading))
                for event in events:
                    self._line(self._event_line(event))

    def on_failure(self, failure: CheckpointFailure) -> None:
        with self._lock:
            self._state.failed += 1
            self._state.recent.append(failure)
            self._changed()
            if self.live:
                self._start_live()
            else:
                self._line(f"FAILED {escaped(failure.path)}: {escaped(failure.reason)}")

    def close(self) -> None:
        """Stop the Live view (leaving its last frame on screen); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = self._live, None
            if not self.live:
                s = self._state
                self._line(
                    f"ddsmon {s.mode} done: read {s.read}, failed {s.failed}, events {s.events}"
                )
        if live is not None:
            # Outside the lock: Live.stop joins its refresh thread, which takes the lock.
            live.stop()

    # -- internals ------------------------------------------------------------------

    def _start_live(self) -> None:
        if self._live is not None or self._closed:
            return
        self._live = Live(
            console=self.console,
            get_renderable=self.renderable,
            auto_refresh=True,
            refresh_per_second=self._refresh_per_second,
            transient=False,
            redirect_stdout=True,  # stray print()s go above the view, not through it
            redirect_stderr=True,
        )
        self._live.start()

    def _line(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)
        try:
            self.console.file.flush()
        except (OSError, ValueError):  # a closed or unflushable stream: nothing to save
            pass

    @staticmethod
    def _reading_line(reading: CheckpointReading) -> str:
        layers = reading.signatures.layers
        parts = [f"step {reading.step}", f"ckpt={escaped(reading.path)}", f"layers={len(layers)}"]
        worst = _most_degenerate(layers.values())
        if worst is not None:
            parts.append(f"lambda_min[{worst.name}]={_num(worst.lambda_min, '.4g')}")
        bad = [name for name, s in layers.items() if not s.finite]
        if bad:
            parts.append(f"nonfinite=[{','.join(bad)}]")
        if bad and len(bad) == len(layers):
            parts.append(f"({_DIVERGED})")
        parts += [f"{k}={_num(v, '.4g')}" for k, v in reading.meta.items()]
        timing = f"read in {reading.read_seconds:.2f}s"
        if reading.load_seconds:
            timing += f" (load {reading.load_seconds:.2f}s)"
        parts.append(timing)
        return "  ".join(parts)

    @staticmethod
    def _event_line(event: Event) -> str:
        return (
            f"EVENT {event.kind} step={event.step} layer={event.layer} "
            f"reading={event.reading} before={_num(event.before, '.4g', 'none')} "
            f"after={_num(event.after, '.4g', 'none')} "
            f"magnitude={_num(event.magnitude, '.4g', 'none')}: "
            f"{event.message}"
        )


def _most_degenerate(layers: Iterable[LayerSignature]) -> LayerSignature | None:
    """The finite layer with the smallest resolved ``lambda_min / lambda_max``."""
    best: LayerSignature | None = None
    for s in layers:
        ratio = s.lambda_ratio if s.finite else None
        if ratio is None:
            continue
        if best is None or ratio < best.lambda_ratio:  # type: ignore[operator]
            best = s
    return best
