"""Sinks: where readings and events go (MLflow, the terminal, alert hooks).

Every sink implements :class:`Sink`; the daemon calls them in order and a sink that
raises is reported and skipped for that record, never allowed to stop the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ddsmon.events import Event
    from ddsmon.records import CheckpointFailure, CheckpointReading

__all__ = ("RunInfo", "Sink")


@dataclass(frozen=True)
class RunInfo:
    """What a sink knows before the first checkpoint.

    directory: the watched directory (or the single checkpoint's parent for ``report``).
    mode: ``"watch"``, ``"scan"`` or ``"report"``.
    params: the run's settings as strings (probe size, layers, recipe, device, version),
        what the MLflow sink logs as params.
    automatic: the keys of ``params`` chosen by this process itself, not set by the
        user (``torch_threads`` without ``--threads``): a run that holds another value
        keeps it, with no warning of a changed setting.
    """

    directory: Path
    mode: str
    params: dict[str, str] = field(default_factory=dict)
    automatic: frozenset[str] = frozenset()


class Sink(Protocol):
    def start(self, info: RunInfo) -> None:
        """Called once before the first checkpoint."""

    def on_queue(self, pending: int) -> None:
        """Number of checkpoints waiting to be read (for progress displays)."""

    def on_reading(self, reading: CheckpointReading, events: list[Event]) -> None:
        """One checkpoint read, with the events it raised."""

    def on_failure(self, failure: CheckpointFailure) -> None:
        """One checkpoint that could not be read (path and reason)."""

    def close(self) -> None:
        """Flush and release; called on exit, SIGINT and SIGTERM."""
