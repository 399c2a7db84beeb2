"""Hugging Face ``checkpoint-N/`` folders: weights (sharded or not), trainer_state.json, config.json."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

from ddsmon.errors import CheckpointError, ConfigError
from ddsmon.loading.file_formats import _read_safetensors, _torch_load
from ddsmon.loading.key_matching import _Candidate, _load_into
from ddsmon.loading.loaded import LoadedCheckpoint, _build
from ddsmon.loading.step_and_meta import _as_step, _meta_of
from ddsmon.loading.wording import _describe, _kind_of

_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _load_hf_folder(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    step, meta = _hf_trainer_state(path)
    tensors = _hf_weights(path, trust)
    model = _build(factory) if factory is not None else _hf_model_from_config(path)
    _load_into(model, [_Candidate("in the weights files", tensors)], path)
    return LoadedCheckpoint(model, step, meta)


def _hf_trainer_state(path: Path) -> tuple[int | None, dict[str, float]]:
    state_file = path / "trainer_state.json"
    if not state_file.exists():
        if not path.exists():
            raise FileNotFoundError(path)
        return None, {}
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"trainer_state.json is not JSON ({_describe(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "trainer_state.json is not a JSON object")
    meta: dict[str, float] = {}
    history = state.get("log_history")
    if isinstance(history, list):
        for entry in history:
            if isinstance(entry, dict):
                meta.update(_meta_of(entry))
    meta.pop("step", None)
    meta.update(_meta_of({k: state.get(k) for k in ("epoch", "best_metric")}))
    return _as_step(state.get("global_step")), meta


def _hf_weights(path: Path, trust: bool) -> dict[str, Tensor]:
    for name in _HF_WEIGHTS:
        weights = path / name
        if not weights.is_file():
            continue
        if name.endswith(".index.json"):
            return _hf_sharded(path, weights, trust)
        return _read_weights_file(weights, trust, path)
    if not path.exists():
        raise FileNotFoundError(path)
    raise CheckpointError(
        path, f"no weights file in the folder (looked for {', '.join(_HF_WEIGHTS)})"
    )


def _read_weights_file(weights: Path, trust: bool, folder: Path) -> dict[str, Tensor]:
    try:
        if weights.suffix == ".safetensors":
            return _read_safetensors(weights)[0]
        obj = _torch_load(weights, trust)
    except CheckpointError as exc:
        raise CheckpointError(folder, f"{weights.name}: {exc.reason}") from None
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise CheckpointError(folder, f"{weights.name} holds {_kind_of(obj)}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _hf_sharded(path: Path, index_file: Path, trust: bool) -> dict[str, Tensor]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            path, f"{index_file.name} is not a shard index ({_describe(exc)})"
        ) from None
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                path, f"{index_file.name} names a shard outside the folder: {shard!r}"
            )
        shard_path = path / shard
        if not shard_path.is_file():
            if not path.exists():
                raise FileNotFoundError(path)
            raise CheckpointError(path, f"shard {shard!r} named by {index_file.name} is missing")
        tensors.update(_read_weights_file(shard_path, trust, path))
    return tensors


def _hf_model_from_config(path: Path) -> nn.Module:
    """Build the model from the folder's config.json with transformers (random weights)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{path} is a Hugging Face checkpoint and no --model was given: building it "
            "from config.json needs transformers; pip install 'ddsmon[hf]', "
            "or pass --model MODULE:FACTORY"
        ) from None
    if not (path / "config.json").is_file():
        if not path.exists():
            raise FileNotFoundError(path)
        raise CheckpointError(path, "no config.json to build the model from; pass --model")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls(config)
        return transformers.AutoModel.from_config(config)
    except Exception as exc:
        raise CheckpointError(
            path, f"cannot build the model from config.json ({_describe(exc)}); pass --model"
        ) from None
