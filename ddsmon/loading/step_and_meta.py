"""The step and the scalar meta (``val_acc``, ``epoch`` ...) a checkpoint carries."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ddsmon.checkpoints import NAMED_VALUE

#: Where a checkpoint's content holds its step, in the order looked for: most trainers'
#: ``step`` / ``global_step`` (Lightning), Megatron's ``iteration``, DeepSpeed's
#: ``global_steps`` (``mp_rank_00_model_states.pt``).
_STEP_KEYS = ("step", "global_step", "iteration", "global_steps")


def _real(value: Any) -> numbers.Real | None:
    """A real scalar (int, float, one-element real tensor; never a bool), else None."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return value


def _as_step(value: Any) -> int | None:
    """A non-negative integral step from an int, float or one-element tensor, else None.

    A step beyond MLflow's range (int64) is returned as it is, for the daemon to refuse
    by name rather than take the checkpoint for one without a step."""
    value = _real(value)
    number = _as_number(value)
    if value is None or number is None:
        return None
    if isinstance(value, numbers.Integral):
        step = int(value)
    elif math.isfinite(number) and number.is_integer():
        step = int(number)
    else:
        return None
    return step if step >= 0 else None


def _as_number(value: Any) -> float | None:
    value = _real(value)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _step_of(obj: Any) -> int | None:
    if not isinstance(obj, Mapping):
        return None
    for key in _STEP_KEYS:
        if key in obj:
            value = obj[key]
            if isinstance(value, str):
                value = int(value) if value.strip().isdigit() else None
            step = _as_step(value)
            if step is not None:
                return step
    return None


def _meta_of(obj: Any) -> dict[str, float]:
    if not isinstance(obj, Mapping):
        return {}
    meta = {}
    for key, value in obj.items():
        if not isinstance(key, str) or key in _STEP_KEYS:
            continue  # the step is the reading's step, not a trainer scalar
        if isinstance(value, str):  # safetensors metadata holds strings
            try:
                value = float(value)
            except ValueError:
                continue
        number = _as_number(value)
        if number is not None:
            meta[key] = number
    return meta


def _lightning_meta(obj: Any, stem: str) -> dict[str, float]:
    """A Lightning checkpoint's validation scalars, which are not at its top level: the
    score each ``ModelCheckpoint`` callback monitors, from its saved state when the
    callback saved this very file (``callbacks[...]["best_k_models"]``, which maps the
    paths it saved to their scores, holds a path of this name), else the
    ``name=value`` pairs its file name carries (``stem``, the name without ``.ckpt``;
    ``save_weights_only=True`` saves no callback state, and the name then holds the
    only copy, rounded as the template says). A callback's ``current_score`` is not
    read: it is the score of the last file that callback saved, stale in a file it did
    not save (``last.ckpt`` after an epoch outside its top k, another callback's file).
    The step and the epoch are not meta here (the content holds them)."""
    meta: dict[str, float] = {}
    for name, text in NAMED_VALUE.findall(stem):
        if name not in _STEP_KEYS and name != "epoch":
            meta[name] = float(text)
    callbacks = obj.get("callbacks") if isinstance(obj, Mapping) else None
    if isinstance(callbacks, Mapping):
        for state in callbacks.values():
            if not isinstance(state, Mapping) or not isinstance(state.get("monitor"), str):
                continue
            saved = state.get("best_k_models")
            if not isinstance(saved, Mapping) or state["monitor"] in _STEP_KEYS:
                continue
            for path, value in saved.items():
                score = _as_number(value)
                if score is not None and _stem(path) == stem:
                    meta[state["monitor"]] = score
    return {k: v for k, v in meta.items() if math.isfinite(v)}


def _stem(path: Any) -> str | None:
    """The file name of a path a callback saved, without ``.ckpt`` (any separator)."""
    if not isinstance(path, str):
        return None
    name = re.split(r"[/\\]", path)[-1]
    return name[: -len(".ckpt")] if name.lower().endswith(".ckpt") else name
