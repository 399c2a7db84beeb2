"""The local history of one watched directory: every checkpoint's per-layer readings and
the trainer's scalars, and every event, kept in the state directory for the plots.

Files (JSONL, appended and fsynced with :func:`ddsmon.state.append_jsonl_lines`, so a
torn last line is cut off and never read):

``history.jsonl``
    One :class:`HistoryEntry` a line: ``{"step", "layers": {layer: {reading: value or
    null, ..., "finite": bool}}, "train": {key: value}}``. A later line for a step
    replaces an earlier one (a checkpoint read again).
``events.jsonl``
    One event (:meth:`ddsmon.events.Event.to_dict`) a line, each (step, layer, kind,
    reading) once: an event already there is not appended again. The MLflow sink uploads
    this file as the run's ``events.jsonl`` artifact.

The files are read once, on first use, and survive restarts, so the plots drawn after a
restart still show the whole run. They are a local copy, never the record of what MLflow
holds: which steps a run holds is asked of the run (:mod:`ddsmon.sinks.mlflow_run`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsmon.readings import SCALAR_READINGS
from ddsmon.state import StateDir, append_jsonl_lines, read_jsonl

if TYPE_CHECKING:
    from ddsmon.records import CheckpointReading

__all__ = ("HistoryEntry", "LocalHistory", "event_dict", "event_key", "finite")

HISTORY_FILE = "history.jsonl"
EVENTS_FILE = "events.jsonl"


def finite(value: Any) -> float | None:
    """``value`` as a finite float; None for None, booleans, non-numbers, NaN and inf."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def event_dict(event: Any) -> dict[str, Any]:
    """An event as a plain dict (an :class:`~ddsmon.events.Event` or a mapping)."""
    if hasattr(event, "to_dict"):
        return dict(event.to_dict())
    return dict(event)


def event_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes an event the same event: (step, layer, kind, reading)."""
    return (event.get("step"), event.get("layer"), event.get("kind"), event.get("reading"))


@dataclass(frozen=True)
class HistoryEntry:
    """One checkpoint in the history.

    layers: layer -> every :data:`~ddsmon.readings.SCALAR_READINGS` as a finite float or
        None (in table order), then ``"finite"``: whether the layer's reading was finite.
    train: the trainer's finite scalars (the checkpoint's ``meta``), in their order.
    """

    step: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, reading: CheckpointReading) -> HistoryEntry:
        """The entry of one checkpoint read by the engine."""
        layers: dict[str, dict[str, Any]] = {}
        for name, layer in reading.signatures.layers.items():
            values = layer.to_dict()
            row: dict[str, Any] = {k: finite(values.get(k)) for k in SCALAR_READINGS}
            row["finite"] = bool(layer.finite)
            layers[name] = row
        train: dict[str, float] = {}
        for key, value in reading.meta.items():
            v = finite(value)
            if v is not None:
                train[str(key)] = v
        return cls(step=int(reading.step), layers=layers, train=train)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "layers": self.layers, "train": self.train}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HistoryEntry:
        """Raises KeyError, TypeError or ValueError for a line that is no entry."""
        layers = {str(k): dict(v) for k, v in dict(data.get("layers", {})).items()}
        return cls(step=int(data["step"]), layers=layers, train=dict(data.get("train", {})))


class LocalHistory:
    """The ``history.jsonl`` / ``events.jsonl`` of one state directory (not thread-safe:
    the sink that owns it serialises its calls)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._entries: dict[int, HistoryEntry] | None = None
        self._event_keys: set[tuple[Any, ...]] = set()
        self._events: list[dict[str, Any]] = []

    @property
    def events_path(self) -> Path:
        """``events.jsonl`` (it may not exist yet)."""
        return self.state.root / EVENTS_FILE

    def load(self) -> None:
        """Read both files, once; damaged entries are skipped."""
        if self._entries is not None:
            return
        self._entries = {}
        for rec in read_jsonl(self.state.root / HISTORY_FILE):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                entry = HistoryEntry.from_json(rec)
                self._entries[entry.step] = entry
        self._event_keys = set()
        self._events = []
        for rec in read_jsonl(self.events_path):
            self._event_keys.add(event_key(rec))
            self._events.append(rec)

    def append(self, entry: HistoryEntry, events: Iterable[Mapping[str, Any]] = ()) -> None:
        """Add one checkpoint and the events not already kept; durable when this returns."""
        self.load()
        assert self._entries is not None
        self._entries[entry.step] = entry
        append_jsonl_lines(self.state.path(HISTORY_FILE), [json.dumps(entry.to_json())])
        fresh = [dict(e) for e in events if event_key(e) not in self._event_keys]
        if fresh:
            append_jsonl_lines(self.state.path(EVENTS_FILE), [json.dumps(e) for e in fresh])
            for e in fresh:
                self._event_keys.add(event_key(e))
                self._events.append(e)

    def layers(self) -> dict[str, list[tuple[int, dict[str, Any]]]]:
        """layer -> ``[(step, readings), ...]`` in step order (what the plots draw)."""
        self.load()
        assert self._entries is not None
        out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for step in sorted(self._entries):
            for layer, values in self._entries[step].layers.items():
                out.setdefault(layer, []).append((step, values))
        return out

    def train(self) -> dict[str, list[tuple[int, float]]]:
        """trainer scalar -> ``[(step, value), ...]`` in step order."""
        self.load()
        assert self._entries is not None
        out: dict[str, list[tuple[int, float]]] = {}
        for step in sorted(self._entries):
            for key, value in self._entries[step].train.items():
                out.setdefault(key, []).append((step, value))
        return out

    def events(self) -> list[dict[str, Any]]:
        """Every event kept, in the order first seen."""
        self.load()
        return list(self._events)
