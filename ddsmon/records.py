"""What flows from the daemon to its sinks: one record per checkpoint read or failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddsmon.signature import Signatures

__all__ = ("CheckpointFailure", "CheckpointReading")


@dataclass(frozen=True)
class CheckpointReading:
    """One checkpoint read by the engine.

    step: the training step the readings are logged at (from the checkpoint's own
        ``step``/``global_step``/``iteration``, else the number in its name, else
        the order of arrival).
    path: the checkpoint file or folder.
    signatures: the engine's readings of every selected layer.
    fingerprint: ``(size, mtime_ns)`` of the checkpoint when it was read (a changed
        fingerprint means a new version of the file).
    meta: anything else the checkpoint carried that is worth showing (e.g. the
        trainer's ``val_acc``), scalar values only, at the checkpoint's own ``step``.
    load_seconds / read_seconds: wall time of loading and of the reading.
    trainer_log: what the trainer logged before this checkpoint, each entry at its own
        step: ``(step, {name: number})`` in step order, one entry per step (a Hugging
        Face ``trainer_state.json``'s ``log_history``; see
        :attr:`ddsmon.loading.LoadedCheckpoint.trainer_log`). Every checkpoint of a run
        repeats the whole history before it: a sink logs each ``(name, step)`` once.
    """

    step: int
    path: Path
    signatures: Signatures
    fingerprint: tuple[int, int] = (0, 0)
    meta: dict[str, float] = field(default_factory=dict)
    load_seconds: float = 0.0
    read_seconds: float = 0.0
    trainer_log: list[tuple[int, dict[str, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointFailure:
    """A checkpoint that could not be read: its path and the reason, in words."""

    path: Path
    reason: str
    step: int | None = None
