"""The probe batch: a torch or safetensors file of ``{inputs, targets}``, or a function returning them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddsmon.errors import CheckpointError, ConfigError
from ddsmon.loading.factories import _resolve_callable
from ddsmon.loading.file_formats import _read_safetensors, _torch_load
from ddsmon.loading.loaded import _call_user
from ddsmon.loading.wording import _describe, _kind_of, _listing


def load_probe(spec: str, *, trust: bool = False) -> tuple[Any, Any]:
    """The probe ``(inputs, targets)`` named by ``spec``.

    ``spec`` is a file (torch.save'd, read with ``weights_only`` unless ``trust``, or
    ``.safetensors``) holding ``{"inputs": ..., "targets": ...}``, or ``MODULE:FUNCTION``
    (dotted module or ``file.py``) whose zero-argument function returns that dict or an
    ``(inputs, targets)`` pair. ``inputs`` is a tensor or a (nested) tuple/list/dict of
    tensors, as the model is called with it; ``targets`` likewise. Every tensor with a
    batch axis must have the same number of rows n > 0. Raises ConfigError naming the
    file or function and the key at fault.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"probe {spec!r} is a directory; expected a file holding "
            "{'inputs', 'targets'} or MODULE:FUNCTION"
        )
    if os.path.lexists(path):  # a FIFO, a device or a dangling link is refused when read
        source = f"probe file {spec!r}"
        obj = _read_probe_file(path, source, trust)
    elif ":" in spec:
        source = f"probe function {spec!r}"
        fn = _resolve_callable(spec, "probe function")
        obj = _call_user(fn, source)
    else:
        raise ConfigError(f"probe file {spec!r} does not exist")
    inputs, targets = _probe_pair(obj, source)
    _check_probe(inputs, targets, source)
    return inputs, targets


def _read_probe_file(path: Path, source: str, trust: bool) -> Any:
    try:
        if path.suffix == ".safetensors":
            tensors, _ = _read_safetensors(path)
            return tensors
        return _torch_load(path, trust)
    except CheckpointError as exc:
        raise ConfigError(f"{source}: {exc.reason}") from exc
    except FileNotFoundError:
        raise ConfigError(f"probe file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({_describe(exc)})") from None


def _probe_pair(obj: Any, source: str) -> tuple[Any, Any]:
    if isinstance(obj, Mapping):
        missing = [key for key in ("inputs", "targets") if key not in obj]
        if missing:
            held = _listing(list(obj), "") if obj else "nothing"
            raise ConfigError(
                f"{source} lacks the key{'s' if len(missing) > 1 else ''} "
                f"{' and '.join(repr(m) for m in missing)} (it holds {held})"
            )
        return obj["inputs"], obj["targets"]
    if isinstance(obj, tuple | list) and len(obj) == 2:
        return obj[0], obj[1]
    raise ConfigError(
        f"{source} holds {_kind_of(obj)}; expected a dict with 'inputs' and 'targets' "
        "or an (inputs, targets) pair"
    )


def _check_probe(inputs: Any, targets: Any, source: str) -> None:
    rows: list[tuple[str, int]] = []
    for name, value in (("inputs", inputs), ("targets", targets)):
        tensors = _probe_tensors(value, name, source, 0)
        if not tensors:
            raise ConfigError(f"{source}: {name} holds no tensor (it is {_kind_of(value)})")
        rows += [(where, t.shape[0]) for where, t in tensors if t.ndim > 0]
    if not any(where.startswith("inputs") for where, _ in rows):
        raise ConfigError(f"{source}: inputs have no tensor with a batch axis (all 0-dim)")
    n = rows[0][1]
    if any(r != n for _, r in rows):
        listing = ", ".join(f"{where} has {r}" for where, r in rows[:8])
        raise ConfigError(f"{source}: batch sizes disagree: {listing} rows")
    if n == 0:
        raise ConfigError(f"{source}: the probe is empty (0 rows)")


def _probe_tensors(value: Any, where: str, source: str, depth: int) -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        if value.layout != torch.strided:
            raise ConfigError(f"{source}: {where} is a {value.layout} tensor; expected dense")
        return [(where, value)]
    if depth > 8:
        raise ConfigError(f"{source}: {where} is nested too deeply")
    if isinstance(value, Mapping):
        out = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: {where} has a non-string key {key!r}")
            out += _probe_tensors(item, f"{where}[{key!r}]", source, depth + 1)
        return out
    if isinstance(value, tuple | list):
        out = []
        for i, item in enumerate(value):
            out += _probe_tensors(item, f"{where}[{i}]", source, depth + 1)
        return out
    if value is None or isinstance(value, bool | int | float | str):
        return []
    raise ConfigError(f"{source}: {where} is {_kind_of(value)}; expected tensors")
