"""``load_checkpoint``: one checkpoint of any supported kind, loaded into its model on CPU;
``checkpoint_step``: the step it is logged under."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from ddsmon.checkpoints import (
    ADAPTER_WEIGHTS,
    HF_WEIGHTS_NAME,
    CheckpointRef,
    RefusedFile,
    accelerate_models,
)
from ddsmon.errors import CheckpointError, ConfigError, KeysMismatch
from ddsmon.loading.dcp import _load_dcp_folder
from ddsmon.loading.file_formats import _open, _safetensors_header, _safetensors_read, _torch_load
from ddsmon.loading.huggingface import (
    _choose_renamed,
    _hf_model_from_config,
    _load_adapter_folder,
    _load_hf_folder,
)
from ddsmon.loading.key_matching import (
    _apply,
    _Candidate,
    _candidates,
    _no_state_dict,
    _outside_state_dict,
)
from ddsmon.loading.loaded import (
    CHECKPOINT_KINDS,
    VANISHED,
    CheckpointLike,
    LoadedCheckpoint,
    _build,
)
from ddsmon.loading.step_and_meta import _lightning_meta, _meta_of, _step_of
from ddsmon.loading.wording import _describe


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
        if path.name in ADAPTER_WEIGHTS and kind in ("torch", "safetensors"):
            # a PEFT adapter saved into a folder of checkpoints (a Trainer's final
            # save_model): read with the adapter_config.json beside it, as a folder's
            model, source = _load_adapter_folder(path.parent, path.name, factory, trust)
            loaded = LoadedCheckpoint(model, None, {}, source=source)
        elif kind in ("torch", "lightning", "safetensors"):
            if factory is None and _beside_its_config(path):
                factory = functools.partial(_hf_model_from_config, path.parent)
            loaded = _load_file_or_sibling(path, kind, factory, trust)
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
    except RefusedFile as exc:  # a file no loader turned into a CheckpointError itself
        where = "" if exc.path == path else f"{exc.path.name}: "
        raise CheckpointError(path, where + exc.reason) from None
    except OSError as exc:  # EIO, ENOTDIR...: still a report naming the file
        raise CheckpointError(path, f"cannot be read ({_describe(exc)})") from None
    loaded.model.eval()
    return loaded


def builds_its_model(ref: CheckpointLike) -> bool:
    """Whether :func:`load_checkpoint` builds ``ref``'s model with no factory, as it
    dispatches: a Hugging Face folder (from its config.json), a Hugging Face weights
    file beside the config.json it was saved with (:func:`_beside_its_config`), a PEFT
    adapter's weights file (its base model from the adapter_config.json beside it).
    Anything else needs ``--model`` (or, trusted, holds the pickled model itself)."""
    path = Path(ref.path)
    if ref.kind == "hf":
        return True
    if ref.kind not in ("torch", "lightning", "safetensors"):
        return False
    return path.name in ADAPTER_WEIGHTS or _beside_its_config(path)


def _beside_its_config(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face weights file (``model.safetensors``,
    ``pytorch_model.bin``, a variant's) lying beside the ``config.json`` it was saved
    with, outside a Hugging Face folder: a Trainer's final ``save_model`` into its
    ``output_dir``, which holds ``checkpoint-N/`` folders too. Without ``--model`` its
    model is built from that config.json, as a folder's is."""
    return bool(HF_WEIGHTS_NAME.match(path.name)) and os.path.lexists(path.parent / "config.json")


def _load_file(
    path: Path, kind: str, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    if kind == "safetensors":
        return _load_safetensors_file(path, factory)
    return _load_torch_file(path, factory, trust)


def _load_file_or_sibling(
    path: Path, kind: str, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    """The file, or for the first model of an Accelerate ``save_state`` folder
    (:func:`~ddsmon.checkpoints.accelerate_models`) whose keys are not the model's, the
    first of the save's other models (``model_1.safetensors``...) that is: ``--model``
    says which of the models given to ``prepare`` is read, each save once at its step.
    The source says which was read and names the ones left beside it. Only a keys or
    shapes mismatch (:class:`~ddsmon.errors.KeysMismatch`) looks further: a first model
    that cannot be read (damaged, refused) is the save's failure, not a reason to log
    another model's readings at its step. When none fits, each one's reason is said."""
    models = accelerate_models(path) if factory is not None else []
    others = models[1:]
    try:
        loaded = _load_file(path, kind, factory, trust)
    except KeysMismatch as first:  # another model's weights; a damaged file is its own failure
        if not others:
            raise
        failures = []
        for other in others:
            try:
                loaded = _load_file(other, kind, factory, trust)
            except CheckpointError as exc:
                failures.append(f"{other.name}: {exc.reason}")
                continue
            left = [p.name for p in models if p != other]
            loaded.source += (
                f"; Accelerate's model {models.index(other)} of this save, as "
                f"{path.name} is not the model --model builds (not read: {', '.join(left)})"
            )
            return loaded
        raise CheckpointError(
            path,
            f"{first.reason}; nor is any other model of this Accelerate save the model "
            f"--model builds ({'; '.join(failures)})",
        ) from None
    if others:
        loaded.source += (
            f" (not read beside it: {', '.join(p.name for p in others)}, Accelerate's other "
            "models of this save; --model says which is read)"
        )
    return loaded


def _load_torch_file(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    if factory is None:
        # the path is not in a ConfigError's words: whoever reports it names the file
        obj = _torch_load(path, trust)
        if not isinstance(obj, nn.Module):
            if not _candidates(obj):  # no model's file (a tensor, an optimizer's state)
                raise CheckpointError(path, _no_state_dict(obj))
            raise ConfigError(
                "no model factory to load this state dict into; pass --model MODULE:FACTORY"
            )
        return LoadedCheckpoint(obj, None, {}, source="the pickled model itself (trusted)")
    built: list[nn.Module] = []

    def check_keys(skeleton: object) -> None:  # before any tensor data is read
        built.append(_build(factory))
        _choose_renamed(built[0], _candidates(skeleton), path, skeleton)

    obj = _torch_load(path, trust, before_data=check_keys)
    model = built[0] if built else _build(factory)
    match = _choose_renamed(model, _candidates(obj), path, obj)
    _apply(model, match, match.candidate.tensors, path)
    meta = _meta_of(_outside_state_dict(match, obj)) if isinstance(obj, Mapping) else {}
    if path.suffix.lower() == ".ckpt":
        meta = {**_lightning_meta(obj, path.stem), **meta}
    return LoadedCheckpoint(model, _step_of(obj), meta, source=match.source())


def _load_safetensors_file(path: Path, factory: Callable[[], nn.Module] | None) -> LoadedCheckpoint:
    """Header first, keys and shapes matched to the model (a transformers model's old
    keys renamed as its ``from_pretrained`` renames them, :func:`_choose_renamed`), then
    only its tensors read."""
    with _open(path) as handle:
        header = _safetensors_header(path, handle)
        if factory is None:
            raise ConfigError(
                "no model factory to load these weights into; pass --model MODULE:FACTORY"
            )
        model = _build(factory)
        match = _choose_renamed(model, [_Candidate("in the file", header.skeleton())], path)
        tensors = _safetensors_read(path, handle, header, sorted(match.file_keys()))
    _apply(model, match, match.keyed(tensors), path)
    return LoadedCheckpoint(
        model,
        _step_of(header.metadata),
        _meta_of(header.metadata),
        source=match.source(f"in {path.name}"),
    )


def checkpoint_step(ref: CheckpointRef, loaded: LoadedCheckpoint) -> int | None:
    """The training step of a loaded checkpoint, one rule for scan, watch and report: the
    step its content holds (``step``, ``global_step`` or ``iteration``, see
    :mod:`ddsmon.loading.step_and_meta`), else the one in its name or in the name of the
    step-named folder it lies in (:attr:`ddsmon.checkpoints.CheckpointRef.name_step`:
    ``step_100.pt`` -> 100, ``checkpoint_3/model.safetensors`` -> 3), else None."""
    return loaded.step if loaded.step is not None else ref.name_step
