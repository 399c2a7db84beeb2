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


#: One trainer log entry: the step it was logged at and its numbers (``loss``, ...).
TrainerLogEntry = tuple[int, dict[str, float]]


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into its model (on CPU, in eval mode).

    step: from the checkpoint's content (see the :mod:`ddsmon.loading` docstring), or None.
    meta: the real scalars of the checkpoint itself, at its own step (``val_acc``,
        ``epoch``, ...), as floats; never a tensor of the state dict.
    trainer_log: what the trainer logged before the checkpoint, each entry at its own
        step (a Hugging Face ``trainer_state.json``'s ``log_history``): ``(step,
        {name: number})``, in step order, one entry per step; empty for other kinds.
        Every checkpoint of a run repeats the history before it.
    source: which weights were loaded, in words: where the state dict was found, the
        prefix stripped and what was ignored beside it, e.g. ``under ['state_dict'],
        prefix 'model.' stripped (ignored: 'ema_model.' 4 keys, the model's keys again;
        'criterion.' 1 key)``.
    fingerprint: the checkpoint's ``(size, mtime_ns)`` taken just before it was loaded,
        when the caller took one (the daemon does): the version of the file this is,
        though the file may have been rewritten or deleted since.
    """

    model: nn.Module
    step: int | None
    meta: dict[str, float] = field(default_factory=dict)
    trainer_log: list[TrainerLogEntry] = field(default_factory=list)
    source: str = ""
    fingerprint: tuple[int, int] | None = None


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
