"""What the MLflow sink sends: one typed, immutable record per message, and its JSON.

A record is everything one message to the run holds, built once, then sent as it is or
spooled (:mod:`ddsmon.sinks.mlflow_outbox`) and sent later, identical:

:class:`StartRecord`
    The run's start: the watched directory and the daemon's settings (params). Sent
    with the run's identifying tags and its note (:mod:`ddsmon.sinks.mlflow_writer`).
:class:`ReadingRecord`
    One checkpoint: every metric row (key, value, step, timestamp), the event tags, the
    artifact files (kept in the state directory's outbox until delivered) and how many
    events it raised. The timestamps are fixed when the record is built, so a record
    sent twice (a crash between delivery and acknowledgement) stores identical metric
    rows. :data:`~ddsmon.sinks.mlflow_keys.CHECKPOINT_METRIC` is the last row: a step is
    in the run only once its whole record is. The readings are at the checkpoint's step;
    the trainer's log (``train/<name>``, :func:`trainer_rows`) at the steps it was logged
    at, only the rows the run does not hold yet.
:class:`ScalarsRecord`
    The trainer's scalars of an alias (``best-epoch=1-val_loss=1.389.ckpt`` holding
    the weights of ``epoch=1-step=8.ckpt``, read already) that its step lacked:
    ``train/<name>`` rows at that step (:func:`alias_record`). At delivery a row whose
    (key, step) the run holds already is left out
    (:meth:`~ddsmon.sinks.mlflow_writer.MlflowWriter.write_scalars`): a scalar a step
    has is never overwritten, and a record sent twice adds nothing the second time.
:class:`TagsRecord`
    Tags only (a checkpoint that could not be read: ``ddsmon.failure.<file>``).
:class:`DeleteTagsRecord`
    Tags to delete (a checkpoint that failed and was read since: its
    ``ddsmon.failure.<file>``). Deleting a tag the run does not hold is no error, so
    the record can be sent twice (a crash between delivery and acknowledgement).

``to_json()`` / :func:`record_from_json` are the spool's line format, one JSON object
with a ``"kind"`` (``"start"``, ``"reading"``, ``"scalars"``, ``"tags"`` or
``"delete_tags"``);
``from_json(to_json())``
gives the record back. A line that is no record raises :class:`RecordFormatError`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from ddsmon.readings import HEADLINE_READINGS, READINGS, SCALAR_READINGS
from ddsmon.sinks.history import HistoryEntry, finite
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    LIMITS,
    event_tag_keys,
    event_tag_value,
    failure_tag_key,
    metric_key,
    reading_metric_key,
    truncate,
)

if TYPE_CHECKING:
    from ddsmon.events import Event
    from ddsmon.records import CheckpointFailure, CheckpointReading
    from ddsmon.signature import Signatures

__all__ = (
    "FLOOR_READINGS",
    "ArtifactFile",
    "DeleteTagsRecord",
    "MetricRow",
    "ReadingRecord",
    "Record",
    "RecordFormatError",
    "ScalarsRecord",
    "StartRecord",
    "TagsRecord",
    "alias_record",
    "failure_cleared_record",
    "failure_record",
    "reading_record",
    "record_from_json",
    "start_record",
    "trainer_rows",
    "write_spectra",
)

#: The trust floors (``Reading.unit == "floor"``), stored beside the spectra.
FLOOR_READINGS: tuple[str, ...] = tuple(r.name for r in READINGS if r.unit == "floor")


class RecordFormatError(ValueError):
    """A spooled line that is no record (damaged, or from an incompatible version)."""


class MetricRow(NamedTuple):
    """One metric value: MLflow's (key, value, step, timestamp in ms)."""

    key: str
    value: float
    step: int
    timestamp: int


class ArtifactFile(NamedTuple):
    """A local file and the run's artifact folder it goes into."""

    local: str
    artifact_dir: str


@dataclass(frozen=True)
class StartRecord:
    """The run's start: the watched directory (absolute) and the params, as strings;
    ``automatic``: the params the daemon chose itself (a run holding another value of
    one keeps it, unwarned: :meth:`~ddsmon.sinks.mlflow_writer.MlflowWriter.write_start`)."""

    kind: ClassVar[str] = "start"
    directory: str
    params: Mapping[str, str] = field(default_factory=dict)
    automatic: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "directory": self.directory,
            "params": dict(self.params),
            "automatic": list(self.automatic),
        }


@dataclass(frozen=True)
class ReadingRecord:
    """One checkpoint: metric rows (the checkpoint marker last), tags, files, events."""

    kind: ClassVar[str] = "reading"
    step: int
    path: str
    metrics: tuple[MetricRow, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    files: tuple[ArtifactFile, ...] = ()
    events: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "path": self.path,
            "metrics": [list(m) for m in self.metrics],
            "tags": dict(self.tags),
            "files": [list(f) for f in self.files],
            "events": self.events,
        }


@dataclass(frozen=True)
class ScalarsRecord:
    """An alias's trainer scalars at the step it aliases: ``train/<name>`` rows only."""

    kind: ClassVar[str] = "scalars"
    step: int
    path: str
    metrics: tuple[MetricRow, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "path": self.path,
            "metrics": [list(m) for m in self.metrics],
        }


@dataclass(frozen=True)
class TagsRecord:
    """Tags only."""

    kind: ClassVar[str] = "tags"
    tags: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tags": dict(self.tags)}


@dataclass(frozen=True)
class DeleteTagsRecord:
    """Tag keys to delete from the run (those it does not hold are left alone)."""

    kind: ClassVar[str] = "delete_tags"
    keys: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "keys": list(self.keys)}


Record = StartRecord | ReadingRecord | ScalarsRecord | TagsRecord | DeleteTagsRecord


def record_from_json(data: Mapping[str, Any]) -> Record:
    """The record of one spool line; :class:`RecordFormatError` when it is none."""
    kind = data.get("kind")
    try:
        if kind == StartRecord.kind:
            return StartRecord(
                directory=_text(data["directory"]),
                params=_strings(data["params"]),
                automatic=tuple(_text(k) for k in data.get("automatic", [])),
            )
        if kind == ReadingRecord.kind:
            return ReadingRecord(
                step=int(data["step"]),
                path=str(data.get("path", "")),
                metrics=tuple(
                    MetricRow(_text(k), float(v), int(s), int(ts))
                    for k, v, s, ts in data["metrics"]
                ),
                tags=_strings(data.get("tags", {})),
                files=tuple(ArtifactFile(_text(f), _text(d)) for f, d in data.get("files", [])),
                events=int(data.get("events") or 0),
            )
        if kind == ScalarsRecord.kind:
            return ScalarsRecord(
                step=int(data["step"]),
                path=str(data.get("path", "")),
                metrics=tuple(
                    MetricRow(_text(k), float(v), int(s), int(ts))
                    for k, v, s, ts in data["metrics"]
                ),
            )
        if kind == TagsRecord.kind:
            return TagsRecord(tags=_strings(data["tags"]))
        if kind == DeleteTagsRecord.kind:
            keys = data["keys"]
            if not isinstance(keys, list):
                raise TypeError(f"expected a list, got {type(keys).__name__}")
            return DeleteTagsRecord(keys=tuple(_text(k) for k in keys))
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordFormatError(f"{kind} record: {type(exc).__name__}: {exc}") from exc
    raise RecordFormatError(f"unknown record kind {kind!r}")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return {_text(k): _text(v) for k, v in value.items()}


# ---------------------------------------------------------------------- building records
def start_record(
    directory: Path, params: Mapping[Any, Any], *, automatic: Iterable[str] = ()
) -> StartRecord:
    """The start record of a run over ``directory`` with the daemon's ``params``, those
    named in ``automatic`` chosen by the daemon itself."""
    return StartRecord(
        directory=str(directory),
        params={str(k): str(v) for k, v in params.items()},
        automatic=tuple(sorted(str(k) for k in automatic)),
    )


def trainer_rows(
    reading: CheckpointReading,
    meta: Mapping[str, float],
    logged: Mapping[str, int] | None = None,
) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` of the trainer's finite scalars of one checkpoint that the
    run does not hold yet, in step order, keys ``train/<name>``
    (:func:`~ddsmon.sinks.mlflow_keys.metric_key`):

    * every entry of ``reading.trainer_log`` at its own step, unless its key was logged
      up to that step already (``logged``: key -> the highest step the run holds or will
      hold, of the rows sent or spooled). A trainer's log grows by appending, and every
      checkpoint repeats all of it: the entries of a key at steps up to the highest one
      logged were all logged, by an earlier checkpoint.
    * ``meta`` (the checkpoint's own scalars, finite) at ``reading.step``, except the
      names the trainer's log holds at that step (its values win: what an earlier
      checkpoint's log logged there). The others (``epoch`` of the trainer's state,
      ``best_metric``, or any checkpoint without a log) are logged whatever ``logged``
      says: the step is not in the run yet (a step the run holds is not logged again),
      so no earlier checkpoint put them there.

    One row per (key, step), whatever names sanitise to the same key."""
    step = int(reading.step)
    marks = logged or {}
    by_step: dict[int, dict[str, float]] = {}
    for entry_step, numbers in reading.trainer_log:
        row = by_step.setdefault(int(entry_step), {})
        for name, value in numbers.items():
            v = finite(value)
            if v is not None:
                row[str(name)] = v
    out: list[tuple[str, float, int]] = []
    seen: set[tuple[str, int]] = set()

    def add(key: str, value: float, at: int) -> None:
        if (key, at) not in seen:
            seen.add((key, at))
            out.append((key, value, at))

    for at in sorted(set(by_step) | {step}):
        numbers = by_step.get(at, {})
        for name, value in numbers.items():
            key = metric_key("train", name)
            if key not in marks or at > marks[key]:
                add(key, value, at)
            else:
                seen.add((key, at))  # in the run already: not from meta either
        if at == step:
            for name, value in meta.items():
                if name not in numbers:
                    add(metric_key("train", name), value, at)
    return out


def reading_record(
    reading: CheckpointReading,
    events: Sequence[Event],
    *,
    entry: HistoryEntry,
    timestamp: int,
    files: Iterable[ArtifactFile] = (),
    logged: Mapping[str, int] | None = None,
) -> ReadingRecord:
    """The record of one checkpoint, its metric rows in the order a reviewer reads them
    (MLflow's run overview lists a run's metrics as first logged): every layer's finite
    headline readings (``dds/<reading>/<layer>``, :data:`HEADLINE_READINGS` order),
    ``dds/events/<kind>`` (the largest magnitude of each kind, 1 where none is finite),
    ``train/<name>`` (:func:`trainer_rows` of ``entry.train`` and ``logged``: the
    trainer's log at its own steps, the checkpoint's scalars at its step; the only rows
    at other steps than the checkpoint's), then every layer's
    ``dds_detail/finite/<layer>`` and its other finite readings
    (``dds_detail/<reading>/<layer>``, :data:`SCALAR_READINGS` order),
    ``ddsmon/load_seconds`` / ``read_seconds``, and last
    :data:`~ddsmon.sinks.mlflow_keys.CHECKPOINT_METRIC` (``ddsmon/checkpoint``) = 1.
    The names are :func:`~ddsmon.sinks.mlflow_keys.reading_metric_key`'s. An event's tag
    (:func:`~ddsmon.sinks.mlflow_keys.event_tag_keys`: two readings of one layer with
    an event of one kind at one step keep a tag each) says its kind, reading, step,
    layer and magnitude, then its message
    (:func:`~ddsmon.sinks.mlflow_keys.event_tag_value`). ``entry`` is the checkpoint's
    :meth:`HistoryEntry.of`; ``timestamp`` (ms) is that of every row; ``logged``: each
    ``train/*`` key's highest step already sent or spooled (None: none)."""
    step = int(reading.step)
    ts = int(timestamp)
    metrics: list[MetricRow] = []

    def add(key: str, value: float) -> None:
        metrics.append(MetricRow(key, value, step, ts))

    for name, values in entry.layers.items():
        for reading_name in HEADLINE_READINGS:
            value = values.get(reading_name)
            if value is not None:
                add(reading_metric_key(name, reading_name), value)
    tags: dict[str, str] = {}
    by_kind: dict[str, float] = {}
    keys = event_tag_keys((e.step, e.layer, e.kind, e.reading) for e in events)
    for key, event in zip(keys, events, strict=True):
        mag = finite(event.magnitude)
        tags[key] = event_tag_value(
            event.step, event.layer, event.kind, event.reading, mag, event.message
        )
        mag = 1.0 if mag is None else mag
        by_kind[event.kind] = max(by_kind.get(event.kind, -math.inf), mag)
    for kind, mag in by_kind.items():
        add(metric_key("dds", "events", kind), mag)
    for key, scalar, at in trainer_rows(reading, entry.train, logged):
        metrics.append(MetricRow(key, scalar, at, ts))
    for name, values in entry.layers.items():
        add(reading_metric_key(name, "finite"), float(values["finite"]))
        for reading_name in SCALAR_READINGS:
            value = values.get(reading_name)
            if value is not None and reading_name not in HEADLINE_READINGS:
                add(reading_metric_key(name, reading_name), value)
    for key, seconds in (
        ("load_seconds", reading.load_seconds),
        ("read_seconds", reading.read_seconds),
    ):
        v = finite(seconds)
        if v is not None:
            add(metric_key("ddsmon", key), v)
    metrics.append(MetricRow(CHECKPOINT_METRIC, 1.0, step, ts))  # last: the record is complete
    return ReadingRecord(
        step=step,
        path=str(reading.path),
        metrics=tuple(metrics),
        tags=tags,
        files=tuple(files),
        events=len(events),
    )


def alias_record(
    step: int, path: Path | str, scalars: Mapping[str, float], *, timestamp: int
) -> ScalarsRecord:
    """The record of an alias's trainer scalars that its step lacks: ``train/<name>``
    (:func:`~ddsmon.sinks.mlflow_keys.metric_key`) = the finite value, at ``step``, one
    row per key, in ``scalars``' order."""
    rows: dict[str, MetricRow] = {}
    for name, value in scalars.items():
        v = finite(value)
        key = metric_key("train", name)
        if v is not None and key not in rows:
            rows[key] = MetricRow(key, v, int(step), int(timestamp))
    return ScalarsRecord(step=int(step), path=str(path), metrics=tuple(rows.values()))


def failure_record(failure: CheckpointFailure) -> TagsRecord:
    """``ddsmon.failure.<file name>`` = the reason, so failed checkpoints show in the UI."""
    key = failure_tag_key(Path(failure.path).name)
    return TagsRecord(tags={key: truncate(failure.reason, LIMITS["tag_value"])})


def failure_cleared_record(path: Path | str) -> DeleteTagsRecord:
    """The deletion of the :func:`failure_record` tag of the checkpoint at ``path``, once
    it was read: ``ddsmon.failure.<file name>``."""
    return DeleteTagsRecord(keys=(failure_tag_key(Path(path).name),))


def write_spectra(signatures: Signatures, path: Path) -> None:
    """``<layer>/x_spectrum``, ``g_spectrum``, ``param_spectrum`` (when read) and the
    floors (:data:`FLOOR_READINGS`, where known) into a compressed ``.npz``, atomically."""
    arrays: dict[str, Any] = {}  # Any: numpy's stub types **kwds like allow_pickle
    for name, layer in signatures.layers.items():
        arrays[f"{name}/x_spectrum"] = np.asarray(layer.x_spectrum, dtype=np.float64)
        arrays[f"{name}/g_spectrum"] = np.asarray(layer.g_spectrum, dtype=np.float64)
        if layer.param_spectrum is not None:
            arrays[f"{name}/param_spectrum"] = np.asarray(layer.param_spectrum, dtype=np.float64)
        for floor in FLOOR_READINGS:
            value = getattr(layer, floor)
            if value is not None:
                arrays[f"{name}/{floor}"] = np.asarray(float(value))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
