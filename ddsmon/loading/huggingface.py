"""Hugging Face folders (a Trainer's ``checkpoint-N/``, a ``save_pretrained`` folder): weights
(sharded or not), trainer_state.json when there is one, config.json."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ddsmon.checkpoints import (
    ADAPTER_CONFIG,
    FSDP_SHARDED,
    HF_SHARD,
    HF_WEIGHTS,
    JSON_LIMIT,
    RefusedFile,
    adapter_weights,
    hf_weights,
    named_adapters,
    read_regular,
    stat_regular,
)
from ddsmon.errors import CheckpointError, ConfigError, KeysMismatch
from ddsmon.loading.adapters import base_model_folder, load_adapter_into, require_peft
from ddsmon.loading.dcp import _load_dcp_folder
from ddsmon.loading.file_formats import (
    _open,
    _safetensors_header,
    _safetensors_read,
    _torch_load,
    _torch_skeleton,
)
from ddsmon.loading.key_matching import _apply, _Candidate, _choose, _Match
from ddsmon.loading.loaded import LoadedCheckpoint, TrainerLogEntry, _build
from ddsmon.loading.step_and_meta import _as_step, _meta_of
from ddsmon.loading.wording import _describe, _kind_of

log = logging.getLogger(__name__)


def _load_hf_folder(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    """trainer_state.json, then every weights file's keys and shapes (safetensors headers,
    torch files unpickled onto meta), matched to the model before any weights are read.

    A folder deleted while it is read (a Trainer's ``save_total_limit`` rotating it
    away: ``config.json`` or the weights gone, the folder still there for a moment) is
    FileNotFoundError (vanished), not a report of a missing file: a failure counts as
    that when a file the folder held when the read began is gone when it failed."""
    if os.path.lexists(path) and not path.is_dir():
        raise CheckpointError(path, "not a folder (a Hugging Face checkpoint is a folder)")
    before = _entries(path)
    try:
        return _load_hf_contents(path, factory, trust)
    except CheckpointError:
        if before is not None and _lost_entries(path, before):
            raise FileNotFoundError(path) from None
        raise


def _entries(path: Path) -> set[str] | None:
    """The names in the folder (FileNotFoundError when it is gone), None when unlistable."""
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        raise
    except OSError:
        return None


def _lost_entries(path: Path, before: set[str]) -> bool:
    """Whether the folder, or any of the names it held (``before``), is gone now."""
    try:
        return bool(before - set(os.listdir(path)))
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _load_hf_contents(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool, *, adapters: bool = True
) -> LoadedCheckpoint:
    """adapters: whether a PEFT adapter folder is read (:func:`_load_adapter_folder`); not
    for a base model an adapter names (an adapter is never the base of another)."""
    step, meta, trainer_log = _hf_trainer_state(path)
    adapter = adapter_weights(_listing(path))
    if adapter is not None:
        if not adapters:
            raise CheckpointError(path, f"a PEFT adapter ({adapter}), not a model's weights")
        model, source = _load_adapter_folder(path, adapter, factory, trust)
        return LoadedCheckpoint(model, step, meta, trainer_log, source=source)
    sharded = _fsdp_sharded(path)
    if sharded is not None:
        built = factory if factory is not None else _config_factory(path, sharded)
        loaded = _load_dcp_folder(sharded, built, trust)
        source = f"{loaded.source} (FSDP's sharded state dict, {sharded.name}/)"
        return LoadedCheckpoint(
            loaded.model, step, {**loaded.meta, **meta}, trainer_log, source=source
        )
    named = named_adapters(path, _listing(path))
    if named:
        if not adapters:
            raise CheckpointError(path, f"a PEFT adapter ({named[0]}/), not a model's weights")
        return _load_named_adapter(path, named, factory, trust, (step, meta, trainer_log))
    weights_files, note = _hf_weights_files(path)
    files = [_WeightsFile.open(f, trust, path) for f in weights_files]
    model = _build(factory) if factory is not None else _hf_model_from_config(path)
    skeleton = {k: t for f in files for k, t in f.skeleton.items()}
    match = _choose_renamed(model, [_Candidate("in the weights files", skeleton)], path)
    wanted = match.file_keys()
    tensors: dict[str, Tensor] = {}
    for f in files:
        names = sorted(wanted & f.skeleton.keys())
        if names:
            tensors.update(f.read(names, trust, path))
    _apply(model, match, match.keyed(tensors), path)
    names = [f.path.name for f in files]
    where = f"in {names[0]}" if len(names) == 1 else f"in {len(names)} shards ({', '.join(names)})"
    return LoadedCheckpoint(model, step, meta, trainer_log, source=match.source(where + note))


def _load_named_adapter(
    path: Path,
    named: list[str],
    factory: Callable[[], nn.Module] | None,
    trust: bool,
    state: tuple[int | None, dict[str, float], list[TrainerLogEntry]],
) -> LoadedCheckpoint:
    """The adapter a folder holds in its one subfolder ``named[0]`` (an adapter saved
    under a name of its own), read as :func:`_load_adapter_folder` reads a folder
    (PeftModel.from_pretrained of the subfolder); a CheckpointError names the adapters
    when there are several (one model per checkpoint: which one ran is not saved)."""
    if len(named) > 1:
        listed = ", ".join(f"{n}/" for n in named)
        raise CheckpointError(
            path,
            f"holds {len(named)} PEFT adapters, each in its subfolder ({listed}); ddsmon "
            "reads one model per checkpoint, and which adapter was active is not saved: "
            "save the one to monitor (save_pretrained(..., selected_adapters=[NAME]))",
        )
    folder = path / named[0]
    try:
        adapter = adapter_weights(os.listdir(folder))
    except NotADirectoryError:
        adapter = None
    if adapter is None:
        raise CheckpointError(path, f"{named[0]}/ holds {ADAPTER_CONFIG} without adapter weights")
    model, source = _load_adapter_folder(folder, adapter, factory, trust)
    step, meta, trainer_log = state
    where = f"{source} (the adapter {named[0]!r}, saved in {named[0]}/)"
    return LoadedCheckpoint(model, step, meta, trainer_log, source=where)


def _fsdp_sharded(path: Path) -> Path | None:
    """The folder's ``pytorch_model_fsdp_0/`` (a Trainer's checkpoint under FSDP with
    sharded state dicts: a torch.distributed.checkpoint of ``{"model": state_dict}``) when
    the folder holds no model weights file of its own, else None."""
    names = _listing(path)
    if FSDP_SHARDED not in names or hf_weights(names).name is not None:
        return None
    if any(HF_SHARD.match(n) for n in names):
        return None
    return path / FSDP_SHARDED


def _config_factory(path: Path, sharded: Path) -> Callable[[], nn.Module]:
    """The model of the folder's config.json, built as a factory would be; without one
    (a Trainer saves none beside FSDP's sharded state dict), a ConfigError saying to
    pass --model."""
    if not os.path.lexists(path / "config.json"):
        raise ConfigError(
            f"{path}: its weights are FSDP's sharded state dict ({sharded.name}/, a "
            "torch.distributed.checkpoint) and the folder has no config.json to build the "
            "model from; pass --model MODULE:FACTORY"
        )
    model = _hf_model_from_config(path)
    return lambda: model


def _listing(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except NotADirectoryError:
        raise CheckpointError(
            path, "not a folder (a Hugging Face checkpoint is a folder)"
        ) from None


def _load_adapter_folder(
    path: Path, adapter: str, factory: Callable[[], nn.Module] | None, trust: bool
) -> tuple[nn.Module, str]:
    """A PEFT adapter folder (``adapter_config.json`` and ``adapter``, no model weights):
    the adapter's tensors read, then put into the model :mod:`ddsmon.loading.adapters`
    chooses; the base model without ``--model`` is the folder ``adapter_config.json``
    names, read as a Hugging Face folder (its config.json, its weights)."""
    require_peft(path, adapter)  # before a base model is read for nothing
    config_file = path / ADAPTER_CONFIG
    if not os.path.lexists(config_file):
        raise CheckpointError(path, f"{adapter} without its {ADAPTER_CONFIG}")
    try:
        config = _read_json(config_file, path)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"{ADAPTER_CONFIG} is not JSON ({_describe(exc)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"{ADAPTER_CONFIG} is not a JSON object")
    weights = _WeightsFile.open(path / adapter, trust, path)
    tensors = weights.read(sorted(weights.skeleton), trust, path)
    if factory is not None:
        model = _build(factory)
        whose = "the model --model builds"
    else:
        folder = base_model_folder(config, path)
        try:
            loaded = _load_hf_contents(folder, None, trust, adapters=False)
        except FileNotFoundError:
            raise CheckpointError(
                path, f"the base model {folder} ({ADAPTER_CONFIG}) vanished while it was read"
            ) from None
        except CheckpointError as exc:
            raise CheckpointError(
                path, f"the base model {folder} ({ADAPTER_CONFIG}): {exc.reason}"
            ) from None
        model = loaded.model
        whose = f"the base model {folder} {ADAPTER_CONFIG} names (its weights {loaded.source})"
    return load_adapter_into(model, config, tensors, path, adapter, whose)


def _choose_renamed(
    model: nn.Module, candidates: list[_Candidate], path: Path, contents: Any = None
) -> _Match:
    """:func:`~ddsmon.loading.key_matching._choose` for any model, a transformers
    ``PreTrainedModel`` (built from config.json or by ``--model``) included: where no
    candidate is the model's (a KeysMismatch), each candidate whose keys the model's
    conversion mapping renames (:func:`_renamed_keys`: ViT's old names, which
    ``save_pretrained`` still writes) is tried again under the renamed keys, after all
    the checkpoint's own. The match then reads the checkpoint's keys
    (``_Match.file_keys``) and loads them under the new ones (``_Match.keyed``). A
    checkpoint that matches under its own keys is never renamed; where none matches
    either way, the error is the best match's of all."""
    try:
        return _choose(model, candidates, path, contents)
    except KeysMismatch:
        renamed = [r for c in candidates if (r := _renamed_candidate(model, c, path)) is not None]
        if not renamed:
            raise
        return _choose(model, [*candidates, *renamed], path)


def _renamed_candidate(model: nn.Module, cand: _Candidate, path: Path) -> _Candidate | None:
    """``cand`` under the keys :func:`_renamed_keys` gives, or None where none is renamed."""
    renamed = _renamed_keys(model, cand.tensors, path)
    if renamed is None:
        return None
    return _Candidate(
        f"{cand.where}, keys renamed by transformers' conversion mapping of {type(model).__name__}",
        {new: cand.tensors[old] for new, old in renamed.items()},
        cand.known,
        top=cand.top,
        renamed_from=renamed,
    )


def _renamed_keys(
    model: nn.Module, skeleton: Mapping[str, Any], path: Path
) -> dict[str, str] | None:
    """The checkpoint's keys as transformers >= 5 loads them into a model built from
    config.json: new key -> key in the files, or None where nothing is renamed.

    transformers 5 renamed the modules of some architectures (ViT's
    ``vit.encoder.layer.0.attention.attention.query`` is now ``vit.layers.0.attention.
    q_proj``) and ``save_pretrained`` still writes the old keys; its ``from_pretrained``
    renames them with the model's conversion mapping, and so does this (its
    ``WeightRenaming`` entries, by transformers' own ``rename_source_key``). A mapping
    that also *converts* tensors (``WeightConverter``: fused or split weights, stacked
    experts) and matches a key of the checkpoint is a CheckpointError saying so: the
    weights are not the model's without that conversion."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # transformers < 5: no conversion mappings
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception as exc:
        log.debug("%s: no conversion mapping for %s (%s)", path, type(model).__name__, exc)
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not transforms:
        return None
    meta = {k: v for k, v in model.state_dict().items()}
    renamed: dict[str, str] = {}
    converted: list[str] = []
    for old in skeleton:
        try:
            new, source = rename_source_key(
                old, renamings, converters, getattr(model, "base_model_prefix", None), meta
            )
        except Exception as exc:
            log.debug("%s: key %r not renamed (%s)", path, old, exc)
            return None
        if source is not None:
            converted.append(old)
        renamed[new] = old
    if converted:
        raise CheckpointError(
            path,
            f"{len(converted)} keys ({', '.join(converted[:3])}, ...) need transformers' "
            f"weight conversion for {type(model).__name__} (tensors fused or split on "
            "load), which ddsmon does not apply; pass --model with a factory of the model "
            "these keys are of",
        )
    if len(renamed) < len(skeleton) or all(new == old for new, old in renamed.items()):
        return None  # two keys renamed onto one, or nothing renamed
    return renamed


def _read_json(path: Path, folder: Path) -> Any:
    """A JSON side file of the folder: a regular file of at most JSON_LIMIT bytes."""
    try:
        raw = read_regular(path, JSON_LIMIT)
    except RefusedFile as exc:
        raise CheckpointError(folder, f"{path.name}: {exc.reason}") from None
    return json.loads(raw.decode("utf-8"))


def _hf_trainer_state(path: Path) -> tuple[int | None, dict[str, float], list[TrainerLogEntry]]:
    """``(global_step, meta, trainer_log)`` from trainer_state.json (see :func:`_trainer_log`)."""
    state_file = path / "trainer_state.json"
    if not os.path.lexists(state_file):
        if not path.exists():
            raise FileNotFoundError(path)
        return None, {}, []
    try:
        state = _read_json(state_file, path)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"trainer_state.json is not JSON ({_describe(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "trainer_state.json is not a JSON object")
    step = _as_step(state.get("global_step"))
    trainer_log = _trainer_log(state.get("log_history"))
    meta: dict[str, float] = {}
    for entry_step, numbers in trainer_log:
        if entry_step == step:
            meta.update(numbers)
    meta.update(_meta_of({k: state.get(k) for k in ("epoch", "best_metric")}))
    return step, meta, trainer_log


def _trainer_log(history: Any) -> list[TrainerLogEntry]:
    """``log_history``'s entries, each at its own ``step``: the numbers of each entry
    (no bools, no strings, not the step itself), the entries of one step merged (a later
    one's value wins), in step order. An entry without a step cannot be placed: left out."""
    if not isinstance(history, list):
        return []
    by_step: dict[int, dict[str, float]] = {}
    for entry in history:
        if not isinstance(entry, dict):
            continue
        step = _as_step(entry.get("step"))
        if step is None:
            continue
        numbers = _meta_of({k: v for k, v in entry.items() if not isinstance(v, str)})
        if numbers:
            by_step.setdefault(step, {}).update(numbers)
    return sorted(by_step.items())


def _hf_weights_files(path: Path) -> tuple[list[Path], str]:
    """The weights files of the folder (the file :func:`~ddsmon.checkpoints.hf_weights`
    chooses, or the shards its index names) and a note on the variant read or left
    beside them, for the load's ``source``."""
    try:
        chosen = hf_weights(os.listdir(path))
    except NotADirectoryError:
        raise CheckpointError(
            path, "not a folder (a Hugging Face checkpoint is a folder)"
        ) from None
    if chosen.problem is not None:
        raise CheckpointError(path, chosen.problem)
    if chosen.name is None:
        raise CheckpointError(
            path,
            f"no weights file in the folder (looked for {', '.join(HF_WEIGHTS)}, or a "
            "variant of one: model.<variant>.safetensors ...)",
        )
    note = f", weights variant {chosen.variant!r}" if chosen.variant is not None else ""
    if chosen.beside:
        shown_beside = ", ".join(chosen.beside[:4]) + (", ..." if len(chosen.beside) > 4 else "")
        note += f" (not read beside it: {shown_beside})"
    weights = path / chosen.name
    if chosen.name.endswith(".json"):
        return _hf_shards(path, weights), note
    return [weights], note


def _hf_shards(path: Path, index_file: Path) -> list[Path]:
    try:
        index = _read_json(index_file, path)
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            path, f"{index_file.name} is not a shard index ({_describe(exc)})"
        ) from None
    files = []
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                path, f"{index_file.name} names a shard outside the folder: {shard!r}"
            )
        shard_path = path / shard
        if not os.path.lexists(shard_path):
            if not path.exists():
                raise FileNotFoundError(path)
            raise CheckpointError(path, f"shard {shard!r} named by {index_file.name} is missing")
        files.append(shard_path)
    return files


@dataclass
class _WeightsFile:
    """One weights file: its keys' shapes and dtypes (``skeleton``), read before its data.

    loaded: the file's tensors when they had to be read to learn the keys (a legacy,
    non-zip torch file), else None.
    """

    path: Path
    skeleton: Mapping[str, Tensor]
    loaded: Mapping[str, Tensor] | None = None

    @classmethod
    def open(cls, weights: Path, trust: bool, folder: Path) -> _WeightsFile:
        try:
            if weights.suffix == ".safetensors":
                with _open(weights) as handle:
                    return cls(weights, _safetensors_header(weights, handle).skeleton())
            obj, on_meta = _torch_skeleton(weights, trust)
        except CheckpointError as exc:
            raise CheckpointError(folder, f"{weights.name}: {exc.reason}") from None
        tensors = _state_of(obj, weights, folder)
        return cls(weights, tensors, None if on_meta else tensors)

    def read(self, names: list[str], trust: bool, folder: Path) -> dict[str, Tensor]:
        """The tensors ``names`` (keys of the skeleton), read from the file now."""
        if self.loaded is not None:
            return {k: self.loaded[k] for k in names}
        try:
            if self.path.suffix == ".safetensors":
                with _open(self.path) as handle:
                    header = _safetensors_header(self.path, handle)
                    if not set(names) <= header.entries.keys():
                        raise CheckpointError(self.path, "changed while it was read")
                    return _safetensors_read(self.path, handle, header, names)
            tensors = _state_of(_torch_load(self.path, trust), self.path, folder)
        except CheckpointError as exc:
            raise CheckpointError(folder, f"{self.path.name}: {exc.reason}") from None
        if not set(names) <= tensors.keys():
            raise CheckpointError(folder, f"{self.path.name}: changed while it was read")
        return {k: tensors[k] for k in names}


def _state_of(obj: Any, weights: Path, folder: Path) -> dict[str, Tensor]:
    """The state dict a torch weights file holds (a mapping or a pickled module)."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise CheckpointError(folder, f"{weights.name} holds {_kind_of(obj)}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _hf_model_from_config(path: Path) -> nn.Module:
    """Build the model from the folder's config.json with transformers (random weights).

    The class is the first of config.json's ``architectures`` (``save_pretrained`` writes
    ``type(model).__name__`` there), looked up in transformers. One transformers does not
    have (a user's subclass, ``MyBertClassifier``; a remote-code class) is a
    CheckpointError naming it and saying to pass --model: no other model (the headless
    ``AutoModel``) is built in its place, whose keys would match the checkpoint's with
    its head dropped. Without ``architectures``, ``AutoModel.from_config``.

    config.json is checked first (a regular file of at most JSON_LIMIT bytes, JSON), so
    transformers never opens a FIFO or a device in its place.
    """
    config_file = path / "config.json"
    if not os.path.lexists(config_file):
        if not path.exists():
            raise FileNotFoundError(path)
        raise CheckpointError(path, "no config.json to build the model from; pass --model")
    try:
        _read_json(config_file, path)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"config.json is not JSON ({_describe(exc)})") from None
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{path} is a Hugging Face checkpoint and no --model was given: building it "
            "from config.json needs transformers; pip install 'ddsmon[hf]', "
            "or pass --model MODULE:FACTORY"
        ) from None
    try:
        stat_regular(config_file)  # still the regular file checked above
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        _no_cache(config)
        arch = (getattr(config, "architectures", None) or [None])[0]
        if arch is None:
            return transformers.AutoModel.from_config(config)
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls(config)
    except RefusedFile as exc:
        raise CheckpointError(path, f"config.json: {exc.reason}") from None
    except Exception as exc:
        raise CheckpointError(
            path, f"cannot build the model from config.json ({_describe(exc)}); pass --model"
        ) from None
    raise CheckpointError(
        path,
        f"{config_file.name} names the architecture {arch!r}, which is not a model class of "
        "transformers (a class of your own?): ddsmon builds no other model in its place; "
        "pass --model MODULE:FACTORY returning it",
    )


def _no_cache(config: Any) -> None:
    """``use_cache = False`` on ``config`` and its sub-configs (a composite model keeps
    its decoder's in ``text_config``): the probe pass never decodes, and a key/value
    cache would be built, and held, in every pass."""
    subs = getattr(config, "sub_configs", None) or {}
    for part in [config, *(getattr(config, key, None) for key in subs)]:
        if part is not None and getattr(part, "use_cache", None):
            part.use_cache = False
