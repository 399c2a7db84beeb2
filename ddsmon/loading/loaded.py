"""What loading produces: the loaded checkpoint, and the model built from its factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    try:
        model = factory()
    except DDSError:
        raise
    except Exception as exc:
        raise ConfigError(f"model factory {factory!r} raised {_describe(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory {factory!r} returned {type(model).__name__}, expected torch.nn.Module"
        )
    return model
