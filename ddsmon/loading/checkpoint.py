"""``load_checkpoint``: one checkpoint of any supported kind, loaded into its model on CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ddsmon.errors import CheckpointError, ConfigError
from ddsmon.loading.dcp import _load_dcp_folder
from ddsmon.loading.file_formats import _read_safetensors, _torch_load
from ddsmon.loading.huggingface import _load_hf_folder
from ddsmon.loading.key_matching import _Candidate, _candidates, _load_into
from ddsmon.loading.loaded import (
    CHECKPOINT_KINDS,
    VANISHED,
    CheckpointLike,
    LoadedCheckpoint,
    _build,
)
from ddsmon.loading.step_and_meta import _meta_of, _step_of


def load_checkpoint(
    ref: CheckpointLike,
    factory: Callable[[], nn.Module] | None,
    *,
    trust: bool = False,
) -> LoadedCheckpoint:
    """Load the checkpoint ``ref`` (``.path``, ``.kind`` in :data:`CHECKPOINT_KINDS`) on CPU.

    The model comes from ``factory()``; without a factory, from the checkpoint
    itself when it is a pickled module (``trust`` only) or, for a Hugging Face folder,
    from its ``config.json`` with transformers. See the :mod:`ddsmon.loading` docstring for how the
    state dict, step and meta are found. The model is returned in eval mode.

    Raises CheckpointError(path, reason) for anything wrong with the checkpoint (reason
    :data:`VANISHED` when it disappeared before it could be read), ConfigError for a
    missing factory, a factory that fails, or transformers missing.
    """
    path = Path(ref.path)
    kind = ref.kind
    try:
        if kind in ("torch", "lightning"):
            loaded = _load_torch_file(path, factory, trust)
        elif kind == "safetensors":
            loaded = _load_safetensors_file(path, factory)
        elif kind == "hf":
            loaded = _load_hf_folder(path, factory, trust)
        elif kind == "dcp":
            loaded = _load_dcp_folder(path, factory, trust)
        else:
            raise CheckpointError(
                path, f"unknown checkpoint kind {kind!r} (expected one of {CHECKPOINT_KINDS})"
            )
    except FileNotFoundError:
        raise CheckpointError(path, VANISHED) from None
    loaded.model.eval()
    return loaded


def _load_torch_file(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    obj = _torch_load(path, trust)
    if factory is None:
        if not isinstance(obj, nn.Module):
            raise ConfigError(
                f"{path}: no model factory to load this state dict into; "
                "pass --model MODULE:FACTORY"
            )
        return LoadedCheckpoint(obj, None, {})
    model = _build(factory)
    _load_into(model, _candidates(obj), path)
    return LoadedCheckpoint(model, _step_of(obj), _meta_of(obj))


def _load_safetensors_file(path: Path, factory: Callable[[], nn.Module] | None) -> LoadedCheckpoint:
    tensors, metadata = _read_safetensors(path)
    if factory is None:
        raise ConfigError(
            f"{path}: no model factory to load these weights into; pass --model MODULE:FACTORY"
        )
    model = _build(factory)
    _load_into(model, [_Candidate("in the file", tensors)], path)
    return LoadedCheckpoint(model, _step_of(metadata), _meta_of(metadata))
