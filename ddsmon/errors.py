"""Errors ddsmon raises on bad input: each names the file, layer or key at fault."""

from __future__ import annotations

from pathlib import Path

__all__ = ("CheckpointError", "ConfigError", "DDSError", "KeysMismatch", "ProbeError")


class DDSError(Exception):
    """Base class of every error ddsmon raises on purpose."""


class ConfigError(DDSError):
    """A setting is wrong: a factory, probe, directory, option or config key."""


class ProbeError(DDSError):
    """The probe or the model cannot be read as asked (layers, shapes, loss)."""


class CheckpointError(DDSError):
    """A checkpoint could not be read. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class KeysMismatch(CheckpointError):
    """A checkpoint was read, but its state dict is not the model's (keys or shapes):
    another model's weights, not a damaged file."""
