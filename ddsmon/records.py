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
        trainer's ``val_acc``), scalar values only.
    load_seconds / read_seconds: wall time of loading and of the reading.
    """

    step: int
    path: Path
    signatures: Signatures
    fingerprint: tuple[int, int] = (0, 0)
    meta: dict[str, float] = field(default_factory=dict)
    load_seconds: float = 0.0
    read_seconds: float = 0.0


@dataclass(frozen=True)
class CheckpointFailure:
    """A checkpoint that could not be read: its path and the reason, in words."""

    path: Path
    reason: str
    step: int | None = None
