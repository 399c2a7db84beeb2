"""PEFT adapters (LoRA and the other peft tuners): a fine-tune's checkpoint that holds
the adapter's weights alone (``adapter_model.safetensors`` beside ``adapter_config.json``,
in a Trainer's ``checkpoint-N/`` or a ``PeftModel.save_pretrained`` folder), put into a
model with peft's own API.

The model the adapter goes into is, in order:

* the ``PeftModel`` ``--model`` builds: the adapter is loaded into its active adapter;
* the model ``--model`` builds, any other ``nn.Module`` (the base model, with its
  pretrained weights): wrapped in a ``PeftModel`` made from ``adapter_config.json``, as
  ``PeftModel.from_pretrained`` does;
* without ``--model``, the base model named by ``adapter_config.json``'s
  ``base_model_name_or_path`` when that is a local folder (built and loaded by the
  Hugging Face folder loader), wrapped in the same way.

Then ``set_peft_model_state_dict`` loads the adapter's tensors (read by ddsmon's own
readers: regular files, bounded, ``weights_only``); an adapter key the model lacks, one
of the model's adapter keys the file lacks (the filter of peft's ``load_adapter``) or a
shape that differs is a CheckpointError naming it. The layers are named as the
``PeftModel``'s ``named_modules()`` gives them: ``base_model.model.`` before the base
model's names, and the adapter's own modules told apart by name (LoRA's
``...c_attn.base_layer``, ``...c_attn.lora_A.default``, ``...c_attn.lora_B.default``).

peft's prompt learning (prompt tuning, p-tuning, prefix tuning: ``prompt_embeddings``)
is refused in one line naming the file (:func:`_refuse_prompt_learning`): it trains
virtual tokens fed to the model, not weights of the model's layers, so no layer of the
model changes and the adapter has no layer of its own to read.

peft is imported only when an adapter is met; without it, the error says to install it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ddsmon.errors import CheckpointError, ConfigError
from ddsmon.loading.wording import _describe

__all__ = ("base_model_folder", "load_adapter_into", "require_peft")


def require_peft(path: Path, weights: str) -> Any:
    """The peft module; a ConfigError saying to install it when it is missing."""
    try:
        import peft
    except ImportError:
        raise ConfigError(
            f"{path} is a PEFT adapter checkpoint ({weights} beside adapter_config.json): "
            "reading it needs peft; pip install peft (or 'ddsmon[hf]')"
        ) from None
    return peft


def base_model_folder(config: Mapping[str, Any], path: Path) -> Path:
    """The local folder ``adapter_config.json``'s ``base_model_name_or_path`` names
    (absolute, or relative to the current directory, as peft and transformers take it);
    a ConfigError saying what to pass when it names none or no local folder (a Hub id:
    ddsmon downloads nothing)."""
    name = config.get("base_model_name_or_path")
    how = (
        "pass --model MODULE:FACTORY returning the base model with its pretrained weights "
        "(ddsmon puts each checkpoint's adapter into it) or the PeftModel"
    )
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{path}: adapter_config.json names no base model (base_model_name_or_path is "
            f"{name!r}); {how}"
        )
    folder = Path(name).expanduser()
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f", looked for in {Path.cwd()}"
        raise ConfigError(
            f"{path}: the base model adapter_config.json names, {name!r}, is not a local "
            f"folder{where} (ddsmon downloads nothing from the Hub); {how}, or save the "
            "base model with save_pretrained and run ddsmon where that path is found"
        )
    return folder


def load_adapter_into(
    model: nn.Module,
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    path: Path,
    weights: str,
    whose: str,
) -> tuple[nn.Module, str]:
    """``model`` with the adapter ``tensors`` (the keys ``PeftModel.save_pretrained``
    writes) loaded: the PeftModel itself, or ``model`` wrapped in one made from
    ``config`` (``adapter_config.json``'s content); and what was loaded where, in words,
    ``whose`` saying where ``model`` came from
    (``in adapter_model.safetensors: a LORA adapter (r=4, 4 tensors) put onto
    GPT2LMHeadModel, the model --model builds``)."""
    peft = require_peft(path, weights)
    if isinstance(model, peft.PeftModel):
        adapter = model.active_adapter
        peft_config = model.peft_config[adapter]
        saved = str(config.get("peft_type"))
        if saved != str(peft_config.peft_type.value):
            raise CheckpointError(
                path,
                f"adapter_config.json's adapter is {saved}, the PeftModel --model builds has "
                f"a {peft_config.peft_type.value} adapter {adapter!r}",
            )
        into = f"loaded into adapter {adapter!r} of {whose}, a PeftModel"
        _refuse_prompt_learning(peft_config, path, weights)
    else:
        adapter = "default"
        peft_config = _peft_config(peft, config, path)
        _refuse_prompt_learning(peft_config, path, weights)
        into = f"put onto {type(model).__name__}, {whose}"
        model = _wrap(peft, model, peft_config, path)
    try:
        result = peft.set_peft_model_state_dict(model, dict(tensors), adapter_name=adapter)
    except (RuntimeError, ValueError, KeyError) as exc:  # a shape, a key peft cannot place
        raise CheckpointError(path, f"{weights} does not fit the model: {_mismatch(exc)}") from None
    _check_keys(peft, model, adapter, result, path, weights)
    kind = str(peft_config.peft_type.value)
    rank = getattr(peft_config, "r", None)
    shape = (f"r={rank}, " if isinstance(rank, int) else "") + f"{len(tensors)} tensors"
    return model, f"in {weights}: a {kind} adapter ({shape}) {into}"


def _refuse_prompt_learning(peft_config: Any, path: Path, weights: str) -> None:
    """A CheckpointError for an adapter of peft's prompt learning (``is_prompt_learning``:
    prompt tuning, p-tuning, prefix tuning), which ddsmon does not read."""
    if getattr(peft_config, "is_prompt_learning", False):
        kind = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
        raise CheckpointError(
            path,
            f"{weights}: a {kind} adapter (peft's prompt learning: prompt tuning, p-tuning, "
            "prefix tuning) is not supported: it trains virtual tokens fed to the model, "
            "not weights of its layers, so it has no layer of its own to read",
        )


def _keys(n: int) -> str:
    """``1 key``, ``2 keys``."""
    return f"{n} key" if n == 1 else f"{n} keys"


def _mismatch(exc: BaseException) -> str:
    """The first of load_state_dict's ``size mismatch for KEY: ...`` lines (and how many
    more), else the exception's first line."""
    sizes = [line.strip().rstrip(".") for line in str(exc).splitlines() if "size mismatch" in line]
    if not sizes:
        return _describe(exc)
    more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
    return f"{sizes[0]}{more}; is the adapter's r or target_modules not the model's?"


def _peft_config(peft: Any, config: Mapping[str, Any], path: Path) -> Any:
    """The PeftConfig of ``adapter_config.json``'s content, as ``PeftConfig.from_pretrained``
    makes it (the class of its ``peft_type``, ``check_kwargs``, ``from_peft_type``)."""
    try:
        cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
        made = cls.from_peft_type(**cls.check_kwargs(**config))
    except Exception as exc:
        raise CheckpointError(
            path, f"adapter_config.json is not a peft adapter's settings ({_describe(exc)})"
        ) from None
    made.inference_mode = True
    return made


def _wrap(peft: Any, model: nn.Module, peft_config: Any, path: Path) -> Any:
    """``model`` in the PeftModel class of the adapter's ``task_type``, as
    ``PeftModel.from_pretrained`` chooses it, its adapter still at its initial weights."""
    cls = peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, peft.PeftModel)
    try:
        return cls(model, peft_config, "default")
    except Exception as exc:
        raise CheckpointError(
            path,
            f"cannot put adapter_config.json's adapter onto {type(model).__name__} "
            f"({_describe(exc)})",
        ) from None


def _check_keys(peft: Any, model: Any, adapter: str, result: Any, path: Path, weights: str) -> None:
    """A CheckpointError for a key of the file the model lacks, or an adapter key of the
    model (one with the tuner's prefix and the adapter's name, as peft's ``load_adapter``
    filters them) the file lacks: that one would stay at its initial value."""
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise CheckpointError(
            path,
            f"{weights}: {_keys(len(unexpected))} the model has no place for "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})",
        )
    peft_type = model.peft_config[adapter].peft_type
    prefixes = getattr(peft.mapping, "PEFT_TYPE_TO_PREFIX_MAPPING", {})  # peft >= 0.14
    prefix = prefixes.get(peft_type, "")
    missing = [k for k in getattr(result, "missing_keys", []) if prefix in k and adapter in k]
    if missing:
        raise CheckpointError(
            path,
            f"{weights} lacks {len(missing)} of the model's adapter keys "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
        )
