"""What loading produces: the loaded checkpoint, and the model built from its factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ddsmon.errors import ConfigError, DDSError
from ddsmon.loading.wording import _describe

#: The ``reason`` of a CheckpointError for a checkpoint deleted before it was read
#: (the daemon skips these rather than reporting them as failures).
VANISHED = "vanished before it could be read"

#: Checkpoint kinds :func:`load_checkpoint` reads.
CHECKPOINT_KINDS = ("torch", "lightning", "safetensors", "hf", "dcp")


class CheckpointLike(Protocol):
    """What :func:`load_checkpoint` needs of a checkpoint reference (a CheckpointRef)."""

    @property
    def path(self) -> Path: ...

    @property
    def kind(self) -> str: ...


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into its model (on CPU, in eval mode).

    step: from the checkpoint's content (see the :mod:`ddsmon.loading` docstring), or None.
    meta: real scalars the checkpoint carried (``val_acc``, ``epoch``, ...), as floats.
    """

    model: nn.Module
    step: int | None
    meta: dict[str, float] = field(default_factory=dict)


def _call_user(fn: Callable[[], Any], label: str) -> Any:
    """``fn()``, a callable the user named: ddsmon's own errors pass through, anything
    else becomes a ConfigError saying ``label`` raised it."""
    try:
        return fn()
    except DDSError:
        raise
    except Exception as exc:
        raise ConfigError(f"{label} raised {_describe(exc)}") from exc


def _build_module(fn: Callable[[], Any], label: str) -> nn.Module:
    """:func:`_call_user`, then a ConfigError unless the result is an ``nn.Module``."""
    model = _call_user(fn, label)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{label} returned {type(model).__name__}, expected torch.nn.Module")
    return model


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    return _build_module(factory, f"model factory {factory!r}")
