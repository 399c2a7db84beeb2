"""The local history of one watched directory: every checkpoint's per-layer readings and
the trainer's scalars, and every event, kept in the state directory for the plots.

Files (JSONL, appended and fsynced with :func:`ddsmon.state.append_jsonl_lines`, so a
torn last line is cut off and never read):

``history.jsonl``
    One :class:`HistoryEntry` a line: ``{"step", "layers": {layer: {reading: value or
    null, ..., "finite": bool}}, "train": {key: value}}``. A later line for a step
    replaces an earlier one (a checkpoint read again). A line with ``"added": true``
    holds only ``{"step", "train"}``: an alias's scalars that the step lacked
    (:meth:`LocalHistory.add_train`), merged into that step's entry (never replacing a
    value it has), not replacing it.
``events.jsonl``
    One event (:meth:`ddsmon.events.Event.to_dict`) a line, each (step, layer, kind,
    reading) once: an event already there is not appended again. The MLflow sink uploads
    this file as the run's ``events.jsonl`` artifact.

``dashboard_spectra/step_<step>.json``
    The spectra of a few checkpoints for the dashboard (:mod:`ddsmon.dashboard`), each
    cut to at most :data:`SPECTRUM_POINTS` values (:func:`compact_spectra`: evenly
    spread, plus every value around the rank's cliff and the last ones) with its floor
    and rank. At most :data:`KEPT_SPECTRA` checkpoints are kept: always the first and the
    latest, the others thinned so that those left stay evenly spread over the steps.

The files are read once, on first use, and survive restarts, so the plots drawn after a
restart still show the whole run. In memory the history holds at most about
``2 * KEPT_ENTRIES`` checkpoints: past that the older ones are thinned to an even sample
of about :data:`KEPT_ENTRIES` over the steps (the newest :data:`KEEP_NEWEST` always kept
whole). A plot is a few hundred pixels wide, and a whole run held grew the daemon by
about 2 KB per layer and checkpoint (12.5 MB for 2000 checkpoints of 3 layers; a
100-layer model read 10000 times would hold 2 GB). The file is kept within the same
bound: once it holds more than ``4 * KEPT_ENTRIES`` lines it is rewritten, whole or not
at all (:func:`ddsmon.state.rewrite_jsonl_lines`), with what the memory holds, so a
daemon running for weeks neither fills its state directory nor reads gigabytes back at
a restart (the whole file is read then). They are a local copy, never the record of what MLflow
holds: which steps a run holds is asked of the run (:mod:`ddsmon.sinks.mlflow_run`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ddsmon.readings import SCALAR_READINGS, SPECTRA
from ddsmon.state import (
    StateDir,
    StateError,
    append_jsonl_lines,
    read_jsonl,
    rewrite_jsonl_lines,
)

if TYPE_CHECKING:
    from ddsmon.records import CheckpointReading
    from ddsmon.signature import Signatures

__all__ = (
    "KEEP_NEWEST",
    "KEPT_ENTRIES",
    "KEPT_SPECTRA",
    "SPECTRUM_POINTS",
    "HistoryEntry",
    "LocalHistory",
    "compact_spectra",
    "event_dict",
    "event_key",
    "finite",
    "thin_steps",
)

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
EVENTS_FILE = "events.jsonl"
SPECTRA_FOLDER = "dashboard_spectra"
#: Checkpoints whose spectra the dashboard keeps (the first, the latest, the rest thinned).
KEPT_SPECTRA = 16
#: Checkpoints the history holds in memory for the plots, after a thinning (see above).
KEPT_ENTRIES = 2048
#: The newest checkpoints a thinning always keeps.
KEEP_NEWEST = 64
#: Values kept of one spectrum of one layer.
SPECTRUM_POINTS = 160
_CLIFF = 12  # values kept on each side of the rank (where a spectrum falls to its floor)
_TAIL = 8  # the last values, always kept


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


def _pick(n: int, rank: int | None, points: int = SPECTRUM_POINTS) -> list[int]:
    """Indices (0-based, ascending) of at most about ``points`` of ``n`` values: evenly
    spread, plus the first, the last :data:`_TAIL` and :data:`_CLIFF` on each side of
    ``rank`` (the cliff where a dead direction shows)."""
    if n <= points:
        return list(range(n))
    keep = set(np.linspace(0, n - 1, max(points - 2 * _CLIFF - _TAIL, 2)).round().astype(int))
    keep.update(range(max(n - _TAIL, 0), n))
    if rank is not None:
        keep.update(range(max(rank - _CLIFF, 0), min(rank + _CLIFF, n)))
    return sorted(int(i) for i in keep)


def _short(value: float) -> float | None:
    """A finite value to 5 significant digits (what a plot can show); None otherwise."""
    return float(f"{value:.5g}") if math.isfinite(value) else None


def compact_spectra(signatures: Signatures, points: int = SPECTRUM_POINTS) -> dict[str, Any]:
    """One checkpoint's spectra, cut for the dashboard: layer -> ``{"finite": bool,
    "d": width or None, <side>: {"n": values in all, "i": indices kept (0-based),
    "v": their values (None where not finite), "floor": the side's floor or None,
    "rank": its rank or None}}`` for each side of :data:`~ddsmon.readings.SPECTRA`
    the layer has a spectrum of."""
    out: dict[str, Any] = {}
    for name, layer in signatures.layers.items():
        row: dict[str, Any] = {"finite": bool(layer.finite), "d": finite(getattr(layer, "d", None))}
        for spectrum in SPECTRA:
            values = getattr(layer, spectrum.field, None)
            if values is None:
                continue
            arr = np.asarray(values, dtype=np.float64).ravel()
            if arr.size == 0:
                continue
            rank = getattr(layer, spectrum.rank, None)
            rank = int(rank) if isinstance(rank, (int, np.integer)) else None
            idx = _pick(int(arr.size), rank, points)
            row[spectrum.side] = {
                "n": int(arr.size),
                "i": idx,
                "v": [_short(float(arr[i])) for i in idx],
                "floor": finite(getattr(layer, spectrum.floor, None)),
                "rank": rank,
            }
        out[name] = row
    return out


def thin_steps(steps: Iterable[int], keep: int) -> list[int]:
    """The steps to drop so that at most ``keep`` (at least 2) remain: never the first or
    the last; each time the one whose neighbours are closest, so that what is left
    stays evenly spread."""
    left = sorted(set(steps))
    keep = max(int(keep), 2)
    dropped: list[int] = []
    while len(left) > keep:
        i = min(range(1, len(left) - 1), key=lambda j: (left[j + 1] - left[j - 1], left[j]))
        dropped.append(left.pop(i))
    return dropped


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

    def __init__(self, state: StateDir, *, kept: int = KEPT_ENTRIES) -> None:
        self.state = state
        self.kept = max(int(kept), KEEP_NEWEST)
        self._entries: dict[int, HistoryEntry] | None = None
        self._lines = 0  # lines in history.jsonl: compacted past 4 * kept (_compact)
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
        self._lines = 0
        for rec in read_jsonl(self.state.root / HISTORY_FILE):
            self._lines += 1
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                entry = HistoryEntry.from_json(rec)
                if rec.get("added") is True:
                    self._merge_train(entry.step, entry.train)
                else:
                    self._entries[entry.step] = entry
                self._thin()
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
        self._thin()
        append_jsonl_lines(self.state.path(HISTORY_FILE), [json.dumps(entry.to_json())])
        self._lines += 1
        if self._lines > 4 * self.kept:
            self._compact()
        fresh = [dict(e) for e in events if event_key(e) not in self._event_keys]
        if fresh:
            append_jsonl_lines(self.state.path(EVENTS_FILE), [json.dumps(e) for e in fresh])
            for e in fresh:
                self._event_keys.add(event_key(e))
                self._events.append(e)

    def _compact(self) -> None:
        """Rewrite ``history.jsonl`` with the checkpoints held in memory (a thinned
        sample of the older, the newest whole), in step order; one line each."""
        assert self._entries is not None
        lines = [json.dumps(self._entries[step].to_json()) for step in sorted(self._entries)]
        try:
            rewrite_jsonl_lines(self.state.path(HISTORY_FILE), lines)
        except StateError as exc:  # the file stays whole, only longer: tried again later
            log.warning("%s; the local history stays uncompacted for now", exc)
            return
        self._lines = len(lines)

    def add_train(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
        """Add an alias's finite trainer scalars to ``step``'s entry, those of names it
        has no value for (a value it has is kept: the first file read at a step wins);
        the ones added, also appended as an ``"added"`` line (durable when this
        returns). A step not held in memory (thinned out, or read under another state
        directory) gets all of them: MLflow's own check keeps its values."""
        self.load()
        assert self._entries is not None
        held = self._entries.get(int(step))
        have = held.train if held is not None else {}
        added: dict[str, float] = {}
        for key, value in scalars.items():
            v = finite(value)
            if v is not None and str(key) not in have:
                added[str(key)] = v
        if not added:
            return {}
        self._merge_train(int(step), added)
        line = {"step": int(step), "train": added, "added": True}
        append_jsonl_lines(self.state.path(HISTORY_FILE), [json.dumps(line)])
        self._lines += 1
        return added

    def _merge_train(self, step: int, scalars: Mapping[str, float]) -> None:
        assert self._entries is not None
        held = self._entries.get(step)
        if held is None:
            self._entries[step] = HistoryEntry(step=step, train=dict(scalars))
            return
        train = {**held.train, **{k: v for k, v in scalars.items() if k not in held.train}}
        self._entries[step] = HistoryEntry(step=step, layers=held.layers, train=train)

    def _thin(self) -> None:
        """Past ``2 * kept`` checkpoints in memory, keep the first checkpoint of each of
        ``kept`` equal spans of the older steps, and the newest :data:`KEEP_NEWEST`."""
        entries = self._entries
        assert entries is not None
        if len(entries) <= 2 * self.kept:
            return
        steps = sorted(entries)
        old, newest = steps[:-KEEP_NEWEST], steps[-KEEP_NEWEST:]
        cell = max((old[-1] - old[0]) / self.kept, 1e-12)
        keep, seen = set(newest), set()
        for step in old:
            k = int((step - old[0]) // cell)
            if k not in seen:
                seen.add(k)
                keep.add(step)
        self._entries = {step: entries[step] for step in steps if step in keep}

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

    # ------------------------------------------------------------------ spectra
    @property
    def spectra_folder(self) -> Path:
        """``dashboard_spectra/`` (it may not exist yet)."""
        return self.state.root / SPECTRA_FOLDER

    def keep_spectra(self, step: int, signatures: Signatures, *, keep: int = KEPT_SPECTRA) -> None:
        """Keep ``step``'s spectra (:func:`compact_spectra`), written whole or not at all,
        and drop those of checkpoints :func:`thin_steps` thins out. Raises OSError."""
        folder = self.state.path(SPECTRA_FOLDER)
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{int(step)}.json"
        tmp = folder / f".{path.name}.tmp"
        tmp.write_text(json.dumps({"step": int(step), "layers": compact_spectra(signatures)}))
        os.replace(tmp, path)
        for old in thin_steps(self._spectra_steps(), keep):
            with contextlib.suppress(FileNotFoundError):
                (folder / f"step_{old}.json").unlink()

    def _spectra_steps(self) -> list[int]:
        steps = []
        if self.spectra_folder.is_dir():
            for p in self.spectra_folder.glob("step_*.json"):
                with contextlib.suppress(ValueError):
                    steps.append(int(p.stem.removeprefix("step_")))
        return sorted(steps)

    def spectra(self) -> dict[int, dict[str, Any]]:
        """step -> :func:`compact_spectra` of the checkpoints kept, in step order; a file
        that cannot be read is skipped."""
        out: dict[int, dict[str, Any]] = {}
        for step in self._spectra_steps():
            path = self.spectra_folder / f"step_{step}.json"
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                data = json.loads(path.read_text())
                out[int(data["step"])] = dict(data["layers"])
        return out
