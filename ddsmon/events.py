"""Events: what changed in a layer's readings, decided from its history of checkpoints.

Each detector reads one layer's history, a list of ``(step, reading)`` pairs in step
order where ``reading`` is :meth:`ddsmon.signature.LayerSignature.to_dict` (unresolved
readings are ``None``; ``finite`` is False for a non-finite layer), and says what
happened at the *newest* point, so replaying a history point by point reports each event
exactly once. :class:`EventDetector` is the stateful wrapper the daemon feeds one
checkpoint at a time; it runs the same scanners incrementally and can be saved to JSON
(:meth:`EventDetector.to_state`) and restored after a restart.

Kinds (every :class:`Event` has step, layer, kind, reading, before, after, magnitude,
message):

``rank_change``
    ``x_rank`` or ``g_rank`` moved from its previous *stable* value by at least
    ``rank_min_change``, where a value is stable once it held for ``rank_hysteresis``
    consecutive checkpoints (default 2), so a rank flipping at the trust floor for a
    single checkpoint does not flap. ``before``/``after``: the two stable ranks;
    ``magnitude``: ``|after - before|``.

``collapse`` / ``revival``
    A watched scale-free reading left its trailing reference. All values are compared
    in decades: a ratio ``r`` (``lambda_ratio = lambda_min / lambda_max``,
    ``sigma_ratio = sigma_min / sigma_max``) as ``log10 r``; a natural-log reading
    (``log_volume = log det+(G) - rank * log lambda_max``) as ``value / ln 10``.

    The reference ``ref`` is the median of the ``reference_window`` values before the
    ``reference_lag`` checkpoints that precede the newest one. The lag matters: a phase change
    spread over a few checkpoints is compared with where the reading stood before it
    began, not with its own first steps. The threshold ``thr`` is ``ratio_decades``
    (default 2) for ratios and, for natural-log readings (whose scale grows with the
    rank they sum over), ``max(volume_min_decades, volume_mad_k * 1.4826 * MAD)`` of the
    same reference window: the reading's own robust spread. Per reading:

    * ``collapse``: ``value <= ref - thr`` from the normal state. The reading then stays
      *collapsed* until it recovers to ``anchor - thr / 2`` (``anchor`` being the
      reference at the collapse), which is a ``revival``; or until the reference has
      caught up (``value > ref - thr / 2``), after which the new level is the norm and
      nothing is reported.
    * ``revival``: that recovery, or ``value >= ref + thr`` from the normal state (a
      reading rising to a new level). A rise is reported once, its return not at all.

    Nothing is decided before ``min_reference`` values are in the reference window, so
    the first ``min_reference + reference_lag`` checkpoints (9 by default) are a
    warm-up: early training (memorisation) moves every reading by decades. ``before``
    is the reference and ``after`` the value, both in the reading's own units;
    ``magnitude`` is the departure in decades.

``transition``
    Collapses of at least ``min_collapses`` (default 2) distinct (layer, reading) pairs
    within the last ``transition_window`` checkpoints, each of which has held (no
    revival of the same pair) for at least ``confirm`` checkpoints: a grokking-like
    phase change, the headline alert. A transient dip that recovers within ``confirm``
    checkpoints is a collapse and a revival, never part of a transition; a collapse
    counts toward one transition only, and collapses in the ``transition_window``
    checkpoints after a transition belong to it (one alert per phase change).
    ``layer`` and ``reading`` list the layers and readings involved (comma-separated,
    in order of collapse), the message each pair with its depth and step,
    ``before``/``after`` are None, and ``magnitude`` is the number of collapsed pairs.

``nonfinite``
    The layer's activations or gradients held NaN/inf (``finite`` False), reported
    when the layer turns non-finite (not again while it stays so).

A loss that merely shrinks scales every eigenvalue of G together: ratios, log_volume and
ranks do not move, so it is no event at all. Absolute readings (``lambda_min``,
``logdet``) can be watched too by naming them in ``EventConfig.readings``, but they then
move with the loss scale.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import numbers
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ddsmon.errors import ConfigError, DDSError
from ddsmon.readings import READINGS, SCALAR_READINGS, Reading
from ddsmon.readings import reading as _row

__all__ = (
    "EVENT_KINDS",
    "Event",
    "EventConfig",
    "EventDetector",
    "detect_level_shifts",
    "detect_nonfinite",
    "detect_rank_change",
    "detect_transitions",
)

log = logging.getLogger(__name__)

#: Every kind an :class:`Event` can have.
EVENT_KINDS: tuple[str, ...] = ("rank_change", "collapse", "revival", "transition", "nonfinite")

_MAD_TO_SIGMA = 1.4826  # MAD of a normal sample times this estimates its sigma
_STATE_VERSION = 1

History = Sequence[tuple[int, Mapping[str, Any]]]


@dataclass(frozen=True)
class Event:
    """One thing that happened to a layer at a checkpoint (see the module docstring)."""

    step: int
    layer: str
    kind: str
    reading: str
    before: float | None
    after: float | None
    magnitude: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The event as a plain JSON-ready dict (one line of ``--events-json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Inverse of :meth:`to_dict`."""
        return cls(
            step=int(data["step"]),
            layer=str(data["layer"]),
            kind=str(data["kind"]),
            reading=str(data["reading"]),
            before=None if data.get("before") is None else float(data["before"]),
            after=None if data.get("after") is None else float(data["after"]),
            magnitude=float(data["magnitude"]),
            message=str(data["message"]),
        )


@dataclass(frozen=True)
class EventConfig:
    """Thresholds of the event detectors.

    The defaults were tuned on ``examples/modular_addition`` (seeds 0-2; checkpoints
    every 10, 25 and 50 steps; two probes; a weight-decay-free control): the transition
    falls between 10% and 95% validation accuracy and the control has none. Around
    them: ``volume_mad_k`` 6 or ``volume_min_decades`` 2-3 flag the slow drift of
    log_volume that precedes grokking (the "hidden progress" before validation accuracy
    moves); ``min_reference`` below 6 lets the memorisation of the first checkpoints
    through; the lag and windows count checkpoints, so for checkpoints much denser than
    about 40 per phase change raise ``reference_lag`` and ``reference_window``.

    readings: scale-free readings watched for collapse/revival, any reading of
        :data:`ddsmon.readings.READINGS` but a count. Each is compared in decades as its
        unit says (:meth:`ddsmon.readings.Reading.decades`): a natural log (``"nats"``)
        as ``value / ln 10``, a positive value or ratio as ``log10``.
    ratio_decades: collapse/revival threshold of readings that are not natural logs, in
        decades.
    volume_mad_k: robust threshold of natural-log readings, in units of the trailing
        window's MAD-based sigma (``1.4826 * MAD``).
    volume_min_decades: the least threshold of natural-log readings, in decades (so a
        very quiet window does not turn noise into events).
    reference_window: checkpoints in the trailing reference (median) window.
    reference_lag: newest checkpoints left out of the reference window, so a collapse
        spread over a few checkpoints is measured from where it began.
    min_reference: values needed in the reference window before anything is decided
        (a warm-up of ``min_reference + reference_lag`` checkpoints).
    rank_readings: count readings (unit ``"count"``) watched for rank changes.
    rank_hysteresis: consecutive checkpoints a rank must hold to be stable.
    rank_min_change: least difference between stable ranks that is reported.
    transition_window: checkpoints within which the collapses of one transition fall.
    min_collapses: distinct (layer, reading) collapses that make a transition.
    confirm: checkpoints a collapse must hold, unrevived, to count toward a transition.

    Building one checks every value (:meth:`from_dict` is the parser of the ``[events]``
    table): a wrong type or an out-of-range value is a :class:`~ddsmon.errors.ConfigError`
    naming the key.
    """

    readings: tuple[str, ...] = ("lambda_ratio", "sigma_ratio", "log_volume")
    ratio_decades: float = 2.0
    volume_mad_k: float = 10.0
    volume_min_decades: float = 4.0
    reference_window: int = 8
    reference_lag: int = 3
    min_reference: int = 6
    rank_readings: tuple[str, ...] = ("x_rank", "g_rank")
    rank_hysteresis: int = 2
    rank_min_change: int = 1
    transition_window: int = 8
    min_collapses: int = 2
    confirm: int = 1

    def __post_init__(self) -> None:
        checked = _checked_values({f.name: getattr(self, f.name) for f in fields(self)}, None)
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["readings"] = list(self.readings)
        out["rank_readings"] = list(self.rank_readings)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> EventConfig:
        """The config of an ``[events]`` table (or :meth:`to_dict`'s output); missing keys
        keep their defaults.

        Unknown keys, values of the wrong type (a string or a bool for a number, a float
        for a whole number, anything but a list of names for ``readings`` and
        ``rank_readings``) and out-of-range values raise
        :class:`~ddsmon.errors.ConfigError` naming the key; ``source`` (e.g.
        ``"config file ddsmon.toml"``) starts the message when given.
        """
        where = _Where(source)
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where.prefix}{where.table} must be a table, got {type(data).__name__}"
            )
        known = sorted(f.name for f in fields(cls))
        unknown = [k for k in data if k not in known]
        if unknown and source is None:
            raise ConfigError(
                f"event config: unknown key(s) {sorted(unknown, key=str)}; known: {known}"
            )
        if unknown:
            keys = ", ".join(repr(k) for k in unknown)
            raise ConfigError(
                f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {keys} in [events] "
                f"(known: {', '.join(known)})"
            )
        return cls(**_checked_values(data, source))


class _Where:
    """How a config message says where a value came from: ``source: [events] key`` when
    the source (e.g. ``"config file ddsmon.toml"``) is known, else ``event config: key``."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.prefix = f"{source}: " if source else "event config: "
        self.table = "[events]" if source else "the event config"

    def key(self, key: str) -> str:
        return f"[events] {key}" if self.source else key


def _field_kinds() -> dict[str, type]:
    """Each EventConfig field's kind, from its default: float, int or tuple (of names)."""
    return {f.name: type(f.default) for f in fields(EventConfig)}


def _checked_values(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """``data``'s values, type-checked, normalised (floats, ints, tuples of names) and
    range-checked against each other (missing keys taking their defaults)."""
    where = _Where(source)
    kinds = _field_kinds()
    out: dict[str, Any] = {}
    for key, value in data.items():
        kind = kinds[key]
        name = where.key(key)
        if kind is tuple:
            out[key] = _names(where, key, value)
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            what = "a whole number" if kind is int else "a number"
            raise ConfigError(
                f"{where.prefix}{name} must be {what}, got {type(value).__name__} {value!r}"
            )
        elif kind is int:
            if not isinstance(value, numbers.Integral):
                raise ConfigError(
                    f"{where.prefix}{name} must be a whole number, "
                    f"got {type(value).__name__} {value!r}"
                )
            out[key] = int(value)
        else:
            if not math.isfinite(value):
                raise ConfigError(f"{where.prefix}{name} must be a finite number, got {value!r}")
            out[key] = float(value)
    values: dict[str, Any] = {f.name: f.default for f in fields(EventConfig)}
    values.update(out)
    positive = (
        "ratio_decades",
        "volume_min_decades",
        "reference_window",
        "min_reference",
        "rank_hysteresis",
        "rank_min_change",
        "transition_window",
        "min_collapses",
    )
    for key in positive:
        if not values[key] > 0:
            raise ConfigError(
                f"{where.prefix}{where.key(key)} must be positive, got {values[key]!r}"
            )
    for key in ("volume_mad_k", "confirm", "reference_lag"):
        if values[key] < 0:
            raise ConfigError(f"{where.prefix}{where.key(key)} must be >= 0, got {values[key]!r}")
    if values["min_reference"] > values["reference_window"]:
        raise ConfigError(
            f"{where.prefix}{where.key('min_reference')} ({values['min_reference']}) cannot "
            f"exceed reference_window ({values['reference_window']})"
        )
    if values["confirm"] >= values["transition_window"]:
        raise ConfigError(
            f"{where.prefix}{where.key('confirm')} ({values['confirm']}) must be below "
            f"transition_window ({values['transition_window']})"
        )
    return values


def _names(where: _Where, key: str, value: Any) -> tuple[str, ...]:
    """``readings`` / ``rank_readings`` as a tuple of known names of the right unit."""
    name = where.key(key)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{where.prefix}{name} must be a list of reading names, "
            f"got {type(value).__name__} {value!r}"
        )
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise ConfigError(
            f"{where.prefix}{name} must be a list of reading names, got {bad[0]!r} in {list(names)}"
        )
    unknown = [r for r in names if r not in SCALAR_READINGS]
    if unknown:
        raise ConfigError(
            f"{where.prefix}{name}: unknown reading(s) {unknown}; "
            f"known: {', '.join(SCALAR_READINGS)}"
        )
    counts = [r.name for r in READINGS if r.is_count]
    for r in names:
        unit = _row(r).unit
        if key == "rank_readings" and unit != "count":
            raise ConfigError(
                f"{where.prefix}{name}: {r!r} is not a count ({unit}); counts: {', '.join(counts)}"
            )
        if key != "rank_readings" and unit == "count":
            raise ConfigError(
                f"{where.prefix}{name}: {r!r} is a count, not measured in decades "
                "(watch it in rank_readings)"
            )
    return names


# --------------------------------------------------------------------------- helpers


def _number(layer: str, reading: str, value: Any) -> float | None:
    """A reading as a float (None when unresolved); a clear error for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DDSError(
            f"layer {layer!r}: reading {reading!r} must be a number or None, "
            f"got {type(value).__name__} {value!r}"
        )
    return float(value)


def _decades(layer: str, row: Reading, value: Any) -> float | None:
    """The value compared in decades, as its unit says (None when unresolved, non-finite,
    or a positive quantity at or below 0)."""
    x = _number(layer, row.name, value)
    if x is None or not math.isfinite(x):
        return None
    out = row.decades(x)
    return out if math.isfinite(out) else None


def _median(values: Iterable[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _fmt(row: Reading, value: float) -> str:
    return f"{value:.4g}" if row.unit == "nats" else f"{value:.3g}"


def _is_finite_point(reading: Mapping[str, Any]) -> bool:
    return reading.get("finite", True) is not False


# --------------------------------------------------------------------------- scanners
# Each scanner holds the incremental state of one detector for one (layer, reading); a
# pure detect_* function replays a whole history through a fresh scanner and keeps the
# newest point's events, so the daemon's incremental path and the pure path agree.


class _LevelScanner:
    """Collapse/revival state machine of one (layer, reading); see the module docstring."""

    def __init__(self, layer: str, reading: str, cfg: EventConfig) -> None:
        self.layer = layer
        self.reading = reading
        self.row = _row(reading)
        self.cfg = cfg
        # the last reference_window + reference_lag values, in decades
        self.buffer: deque[float] = deque(maxlen=cfg.reference_window + cfg.reference_lag)
        self.state = "normal"  # normal | low | high
        self.anchor = 0.0  # reference (decades) when the state left normal
        self.thr = 0.0  # the threshold it left by

    def _reference(self) -> list[float]:
        """The reference window: the values before the last ``reference_lag`` ones."""
        values = list(self.buffer)
        lag = self.cfg.reference_lag
        return values[: len(values) - lag] if lag else values

    def _threshold(self, values: list[float], centre: float) -> float:
        if self.row.unit != "nats":
            return self.cfg.ratio_decades
        mad = _median(abs(v - centre) for v in values)
        return max(self.cfg.volume_min_decades, self.cfg.volume_mad_k * _MAD_TO_SIGMA * mad)

    def push(self, step: int, raw: Any) -> Event | None:
        value = _decades(self.layer, self.row, raw)
        if value is None:
            return None
        event = None
        values = self._reference()
        if len(values) >= self.cfg.min_reference:
            event = self._decide(step, value, float(raw), values)
        self.buffer.append(value)
        return event

    def _decide(self, step: int, value: float, raw: float, values: list[float]) -> Event | None:
        ref = _median(values)
        if self.state == "low":
            if value >= self.anchor - self.thr / 2:
                self.state = "normal"
                return self._event(step, "revival", self.anchor, raw, value - self.anchor, True)
            if value > ref - self.thr / 2:
                self.state = "normal"  # the reference caught up: the new level is the norm
            return None
        if self.state == "high":
            if value < ref + self.thr / 2:
                self.state = "normal"
            return None
        thr = self._threshold(values, ref)
        if value <= ref - thr:
            self.state, self.anchor, self.thr = "low", ref, thr
            return self._event(step, "collapse", ref, raw, ref - value)
        if value >= ref + thr:
            self.state, self.anchor, self.thr = "high", ref, thr
            return self._event(step, "revival", ref, raw, value - ref)
        return None

    def _event(
        self, step: int, kind: str, ref: float, raw: float, delta: float, recovered: bool = False
    ) -> Event:
        before = self.row.from_decades(ref)
        mag = abs(delta)
        r, row = self.reading, self.row
        if recovered:
            what = (
                f"recovered to {_fmt(row, raw)} (reference before the collapse {_fmt(row, before)})"
            )
        else:
            verb = "fell below" if kind == "collapse" else "rose above"
            what = (
                f"{verb} its trailing reference by {mag:.2f} decades "
                f"({_fmt(row, before)} -> {_fmt(row, raw)})"
            )
        return Event(
            step, self.layer, kind, r, before, raw, mag, f"{kind}: {self.layer} {r} {what}"
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "buffer": list(self.buffer),
            "state": self.state,
            "anchor": self.anchor,
            "thr": self.thr,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.buffer.clear()
        self.buffer.extend(float(v) for v in state["buffer"])
        self.state = str(state["state"])
        self.anchor = float(state["anchor"])
        self.thr = float(state["thr"])


class _RankScanner:
    """Stable-value tracker of one integer reading with hysteresis."""

    def __init__(self, layer: str, reading: str, cfg: EventConfig) -> None:
        self.layer = layer
        self.reading = reading
        self.cfg = cfg
        self.stable: int | None = None
        self.run_value: int | None = None
        self.run_length = 0

    def push(self, step: int, raw: Any) -> Event | None:
        x = _number(self.layer, self.reading, raw)
        if x is None or not math.isfinite(x):
            return None
        value = round(x)
        if value == self.run_value:
            self.run_length += 1
        else:
            self.run_value, self.run_length = value, 1
        if self.run_length != self.cfg.rank_hysteresis:
            return None
        before, self.stable = self.stable, value
        if before is None or abs(value - before) < self.cfg.rank_min_change:
            return None
        change = value - before
        return Event(
            step,
            self.layer,
            "rank_change",
            self.reading,
            float(before),
            float(value),
            float(abs(change)),
            f"rank_change: {self.layer} {self.reading} {before} -> {value} "
            f"({change:+d}, held {self.cfg.rank_hysteresis} checkpoints)",
        )

    def to_state(self) -> dict[str, Any]:
        return {"stable": self.stable, "run_value": self.run_value, "run_length": self.run_length}

    def load(self, state: Mapping[str, Any]) -> None:
        self.stable = state["stable"]
        self.run_value = state["run_value"]
        self.run_length = int(state["run_length"])


class _NonfiniteScanner:
    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.was_finite = True

    def push(self, step: int, reading: Mapping[str, Any]) -> Event | None:
        finite = _is_finite_point(reading)
        entered = self.was_finite and not finite
        self.was_finite = finite
        if not entered:
            return None
        what = reading.get("nonfinite") or "activations or gradients"
        return Event(
            step,
            self.layer,
            "nonfinite",
            "finite",
            None,
            None,
            1.0,
            f"nonfinite: {self.layer} {what} held NaN/inf",
        )


class _TransitionScanner:
    """Groups collapses across readings and layers into transitions.

    ``ledger`` holds the collapses of the last ``transition_window`` checkpoints (dicts
    with index, step, layer, reading, magnitude, revived, claimed); ``index`` counts
    checkpoints; collapses up to ``quiet_until`` belong to the transition just reported.
    """

    def __init__(self, cfg: EventConfig) -> None:
        self.cfg = cfg
        self.index = -1
        self.quiet_until = -1
        self.ledger: list[dict[str, Any]] = []

    def push(self, step: int, events: Sequence[Event]) -> list[Event]:
        self.index += 1
        for ev in events:
            if ev.kind == "collapse":
                self.ledger.append(
                    {
                        "index": self.index,
                        "step": ev.step,
                        "layer": ev.layer,
                        "reading": ev.reading,
                        "magnitude": ev.magnitude,
                        "revived": False,
                        "claimed": self.index <= self.quiet_until,
                    }
                )
            elif ev.kind == "revival":
                for entry in self.ledger:
                    if entry["layer"] == ev.layer and entry["reading"] == ev.reading:
                        entry["revived"] = True
        oldest = self.index - self.cfg.transition_window + 1
        self.ledger = [e for e in self.ledger if e["index"] >= oldest]
        ready = [
            e
            for e in self.ledger
            if not (e["revived"] or e["claimed"]) and e["index"] <= self.index - self.cfg.confirm
        ]
        chosen: dict[tuple[str, str], dict[str, Any]] = {}
        for e in ready:
            chosen.setdefault((e["layer"], e["reading"]), e)
        if len(chosen) < self.cfg.min_collapses:
            return []
        for e in self.ledger:
            e["claimed"] = True
        self.quiet_until = self.index + self.cfg.transition_window - 1
        picked = list(chosen.values())
        layers = ",".join(dict.fromkeys(e["layer"] for e in picked))
        readings = ",".join(dict.fromkeys(e["reading"] for e in picked))
        parts = ", ".join(
            f"{e['layer']} {e['reading']} -{e['magnitude']:.1f} dec @ {e['step']}" for e in picked
        )
        msg = (
            f"transition: {len(picked)} collapses within {self.cfg.transition_window} "
            f"checkpoints, held {self.cfg.confirm}+: {parts}"
        )
        return [Event(step, layers, "transition", readings, None, None, float(len(picked)), msg)]

    def to_state(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "quiet_until": self.quiet_until,
            "ledger": [dict(e) for e in self.ledger],
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])
        self.quiet_until = int(state["quiet_until"])
        self.ledger = [dict(e) for e in state["ledger"]]


# --------------------------------------------------------------------------- pure API


def _check_history(layer: str, history: History) -> None:
    last = None
    for i, point in enumerate(history):
        if not (isinstance(point, (tuple, list)) and len(point) == 2):
            raise DDSError(f"layer {layer!r}: history[{i}] is not a (step, reading) pair")
        step, reading = point
        if not isinstance(reading, Mapping):
            raise DDSError(
                f"layer {layer!r}: reading at step {step} must be a dict, "
                f"got {type(reading).__name__}"
            )
        if last is not None and step <= last:
            raise DDSError(f"layer {layer!r}: history steps must increase ({last} then {step})")
        last = step


def _layer_name(history: History, layer: str | None) -> str:
    if layer is not None:
        return layer
    return str(history[-1][1].get("name", "?")) if history else "?"


def detect_rank_change(
    history: History, cfg: EventConfig = EventConfig(), layer: str | None = None
) -> list[Event]:
    """``rank_change`` events at the newest point of one layer's history.

    For each of ``cfg.rank_readings``: the stable value is the latest one held for
    ``cfg.rank_hysteresis`` consecutive checkpoints; an event is reported at the point
    where a new value becomes stable and differs from the previous stable one by at
    least ``cfg.rank_min_change``.
    """
    name = _layer_name(history, layer)
    _check_history(name, history)
    out: list[Event] = []
    for reading in cfg.rank_readings:
        scanner = _RankScanner(name, reading, cfg)
        event = None
        for step, point in history:
            event = scanner.push(step, point.get(reading)) if _is_finite_point(point) else None
        if event is not None:
            out.append(event)
    return out


def detect_level_shifts(
    history: History, cfg: EventConfig = EventConfig(), layer: str | None = None
) -> list[Event]:
    """``collapse`` / ``revival`` events at the newest point of one layer's history.

    Replays the state machine of the module docstring over the whole history for each of
    ``cfg.readings`` (unresolved values and non-finite points are skipped).
    """
    name = _layer_name(history, layer)
    _check_history(name, history)
    out: list[Event] = []
    for reading in cfg.readings:
        scanner = _LevelScanner(name, reading, cfg)
        event = None
        for step, point in history:
            event = scanner.push(step, point.get(reading)) if _is_finite_point(point) else None
        if event is not None:
            out.append(event)
    return out


def detect_nonfinite(history: History, layer: str | None = None) -> list[Event]:
    """A ``nonfinite`` event when the newest point is non-finite and the one before was not."""
    name = _layer_name(history, layer)
    _check_history(name, history)
    if not history:
        return []
    scanner = _NonfiniteScanner(name)
    event = None
    for step, point in history:
        event = scanner.push(step, point)
    return [] if event is None else [event]


def detect_transitions(
    events: Iterable[Event], steps: Sequence[int], cfg: EventConfig = EventConfig()
) -> list[Event]:
    """``transition`` events at the newest checkpoint ``steps[-1]``.

    ``events`` are the collapse/revival events so far (any others are ignored), across
    every layer; ``steps`` the checkpoint steps so far in order (one per checkpoint, the
    unit of ``cfg.transition_window`` and ``cfg.confirm``). A collapse counts when it
    lies within the last ``transition_window`` checkpoints, has not been followed by a
    revival of the same (layer, reading), has held at least ``confirm`` checkpoints, and
    did not already count toward an earlier transition.
    """
    if not steps:
        return []
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise DDSError("detect_transitions: checkpoint steps must increase")
    by_index: list[list[Event]] = [[] for _ in steps]
    for ev in events:
        if ev.kind not in ("collapse", "revival"):
            continue
        i = bisect.bisect_left(steps, ev.step)
        if i == len(steps) or steps[i] != ev.step:
            raise DDSError(
                f"detect_transitions: event at step {ev.step} ({ev.layer} {ev.reading}) "
                "is not one of the checkpoint steps"
            )
        by_index[i].append(ev)
    scanner = _TransitionScanner(cfg)
    found: list[Event] = []
    for step, evs in zip(steps, by_index):
        found = scanner.push(step, evs)
    return found


# --------------------------------------------------------------------------- detector


class _LayerState:
    """Every scanner of one layer."""

    def __init__(self, name: str, cfg: EventConfig) -> None:
        self.levels = {r: _LevelScanner(name, r, cfg) for r in cfg.readings}
        self.ranks = {r: _RankScanner(name, r, cfg) for r in cfg.rank_readings}
        self.nonfinite = _NonfiniteScanner(name)


class EventDetector:
    """Feeds checkpoints' readings through the detectors, one checkpoint at a time.

    ``update(step, {layer: LayerSignature.to_dict()})`` appends to each layer's history
    and returns the events at this step (per layer: non-finite, rank changes,
    collapses/revivals; then any transition). They equal the pure ``detect_*``
    functions' answers on the same histories. Steps must increase: a step at or before
    the last one seen is ignored with a warning (a re-read checkpoint must not repeat
    its events). ``keep_history`` bounds the points kept per layer for :meth:`history`
    (None keeps all): the detectors themselves need only their scanners' state, which
    is small and bounded, so a long run does not grow the daemon's memory.
    """

    def __init__(self, config: EventConfig = EventConfig(), keep_history: int | None = 256) -> None:
        if keep_history is not None and keep_history < 0:
            raise DDSError(f"keep_history must be >= 0 or None, got {keep_history}")
        self.config = config
        self.keep_history = keep_history
        self._layers: dict[str, _LayerState] = {}
        self._history: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._transitions = _TransitionScanner(config)
        self._last_step: int | None = None

    @property
    def last_step(self) -> int | None:
        """The newest checkpoint step seen (None before the first)."""
        return self._last_step

    def layers(self) -> list[str]:
        """Layers seen so far, in order of first appearance."""
        return list(self._history)

    def history(self, layer: str) -> list[tuple[int, dict[str, Any]]]:
        """The layer's ``(step, reading)`` pairs seen so far (the kept tail after a restore)."""
        if layer not in self._history:
            raise KeyError(f"no history for layer {layer!r}; layers: {list(self._history)}")
        return list(self._history[layer])

    def _layer(self, name: str) -> _LayerState:
        st = self._layers.get(name)
        if st is None:
            st = self._layers[name] = _LayerState(name, self.config)
            self._history[name] = []
        return st

    def update(self, step: int, readings: Mapping[str, Mapping[str, Any]]) -> list[Event]:
        """Add one checkpoint's readings (layer -> reading dict); return its new events."""
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            log.warning(
                "event detector: step %d is not after the last step %d; ignored",
                step,
                self._last_step,
            )
            return []
        for name, reading in readings.items():
            if not isinstance(reading, Mapping):
                raise DDSError(
                    f"layer {name!r}: reading at step {step} must be a dict, "
                    f"got {type(reading).__name__}"
                )
        events: list[Event] = []
        for name, reading in readings.items():
            st = self._layer(name)
            point = dict(reading)
            hist = self._history[name]
            hist.append((step, point))
            if self.keep_history is not None and len(hist) > self.keep_history:
                del hist[: len(hist) - self.keep_history]
            found = [st.nonfinite.push(step, point)]
            if _is_finite_point(point):
                found += [sc.push(step, point.get(r)) for r, sc in st.ranks.items()]
                found += [sc.push(step, point.get(r)) for r, sc in st.levels.items()]
            events.extend(ev for ev in found if ev is not None)
        events.extend(self._transitions.push(step, events))
        self._last_step = step
        for ev in events:
            log.info("%s", ev.message)
        return events

    def to_state(self, keep_history: int | None = 8) -> dict[str, Any]:
        """JSON-able state: the config, every scanner's state and the last
        ``keep_history`` points of each layer's history (None: all of it). The scanners
        alone decide future events, so a restored detector continues exactly."""
        layers = {}
        for name, st in self._layers.items():
            hist = self._history[name]
            kept = (
                hist if keep_history is None else hist[len(hist) - min(keep_history, len(hist)) :]
            )
            layers[name] = {
                "levels": {r: sc.to_state() for r, sc in st.levels.items()},
                "ranks": {r: sc.to_state() for r, sc in st.ranks.items()},
                "was_finite": st.nonfinite.was_finite,
                "history": [[s, p] for s, p in kept],
            }
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "last_step": self._last_step,
            "transitions": self._transitions.to_state(),
            "layers": layers,
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], config: EventConfig | None = None
    ) -> EventDetector:
        """Restore a detector saved by :meth:`to_state` (``config`` defaults to the saved
        one; with a different one, saved scanner state is kept for the readings both
        watch and reference windows are cut to the new length)."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else None
            raise DDSError(
                f"event detector state has version {version!r}, expected {_STATE_VERSION}"
            )
        try:
            det = cls(config or EventConfig.from_dict(state["config"]))
            det._last_step = None if state["last_step"] is None else int(state["last_step"])
            det._transitions.load(state["transitions"])
            for name, saved in state["layers"].items():
                st = det._layer(name)
                for r, sc_state in saved["levels"].items():
                    if r in st.levels:
                        st.levels[r].load(sc_state)
                for r, sc_state in saved["ranks"].items():
                    if r in st.ranks:
                        st.ranks[r].load(sc_state)
                st.nonfinite.was_finite = bool(saved["was_finite"])
                det._history[name] = [(int(s), dict(p)) for s, p in saved["history"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DDSError(f"event detector state is malformed: {exc!r}") from exc
        return det
