"""Load models, checkpoints and probes safely.

Three entry points, each turning every failure into an error that names the file,
module, key or shape at fault (:mod:`ddsmon.errors`):

* :func:`resolve_factory` turns ``MODULE:CALLABLE`` (a dotted module, or
  ``path/to/file.py``) into a zero-argument callable returning the ``nn.Module``.
* :func:`load_probe` reads the probe: a torch (or safetensors) file holding
  ``{"inputs", "targets"}``, or ``MODULE:FUNCTION`` returning that pair.
* :func:`load_checkpoint` builds the model and loads one checkpoint into it, on CPU.

Safety
------
Nothing is unpickled beyond tensors and plain containers unless the caller trusts
the files (``--trust-checkpoints``): torch files are read with
``torch.load(..., weights_only=True)``; a torch.distributed.checkpoint folder's
``.metadata`` (a plain pickle) is read by an unpickler that admits only DCP's own
metadata classes, ``torch.Size``, dtypes and paths, and its non-tensor items are read
with ``weights_only=True`` too. Full unpickling runs whatever code the file names:
trust only files you wrote yourself. safetensors and JSON files hold no code.

Finding the state dict
----------------------
A checkpoint's *candidates* are the tensor-valued entries of its top level and of
every mapping (or pickled module, when trusted) below it, reached first through the
usual container keys ``state_dict``, ``model_state_dict``, ``model``, ``module``
(Lightning: ``{"state_dict": {"model.0.weight": ...}}``), then through any other key,
three levels deep at most. Keys are matched to the model's after dropping
``_orig_mod.`` segments (``torch.compile``) on both sides and stripping one *prefix*
``P`` from the checkpoint's keys: ``P`` is chosen among the checkpoint keys' dotted
heads (``module.``, ``model.``, ``model.module.`` ...) to maximise the number of model
keys ``k`` with ``P + k`` present, so a prefix is stripped only when doing so makes
keys match (ties: wrapper names such as ``model``/``module`` first, then the shortest).
Keys of the candidate that start with ``P`` but are not the model's are *unexpected*;
keys outside ``P`` belong to something else (a Lightning module's loss, an EMA copy)
and are ignored. The first candidate with no missing, unexpected or mis-shaped key is
loaded; otherwise the error reports the candidate that matched most keys. Where the
choice is a guess (two prefixes made of other names match equally well, or the model
matches under two keys that are not container keys: ``student``/``teacher``), the
error says so rather than loading either. A missing
key is excused only when it is tied to (shares its tensor with) a key that is present,
as Hugging Face checkpoints omit tied weights.

Step and meta
-------------
``step``: the checkpoint's own top-level ``step``, ``global_step`` or ``iteration`` (a
non-negative integer or an integral 0-dim tensor), in that order; for a Hugging Face
folder ``trainer_state.json``'s ``global_step``; else ``None`` (the caller falls back
to the number in the name). ``meta``: every top-level real scalar (``val_acc``,
``epoch``, ``loss`` ...; booleans excluded) as a float, and the numeric strings of a
safetensors file's ``__metadata__``; for Hugging Face, ``trainer_state.json``'s
``epoch``, ``global_step``, ``best_metric`` and the latest value of each number in its
``log_history`` (``loss``, ``eval_accuracy`` ...).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import numbers
import os
import pickle
import re
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ddsmon.errors import CheckpointError, ConfigError, DDSError

__all__ = (
    "CHECKPOINT_KINDS",
    "VANISHED",
    "CheckpointLike",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_probe",
    "resolve_callable",
    "resolve_factory",
)

log = logging.getLogger(__name__)

#: The ``reason`` of a CheckpointError for a checkpoint deleted before it was read
#: (the daemon skips these rather than reporting them as failures).
VANISHED = "vanished before it could be read"

#: Checkpoint kinds :func:`load_checkpoint` reads.
CHECKPOINT_KINDS = ("torch", "lightning", "safetensors", "hf", "dcp")

_STEP_KEYS = ("step", "global_step", "iteration")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_WRAPPER_SEGMENTS = frozenset({*_CONTAINER_KEYS, "_orig_mod"})
_MAX_DEPTH = 3
_MAX_CANDIDATES = 64
_LISTED = 5
_INT64_MAX = 2**63 - 1

_TRUST_HINT = (
    "pass --trust-checkpoints to load it anyway "
    "(unsafe for files from others: unpickling can run arbitrary code)"
)
_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointLike(Protocol):
    """What :func:`load_checkpoint` needs of a checkpoint reference (a CheckpointRef)."""

    @property
    def path(self) -> Path: ...

    @property
    def kind(self) -> str: ...


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into its model (on CPU, in eval mode).

    step: from the checkpoint's content (see the module docstring), or None.
    meta: real scalars the checkpoint carried (``val_acc``, ``epoch``, ...), as floats.
    """

    model: nn.Module
    step: int | None
    meta: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- factories


class _Factory:
    """Zero-argument callable that builds the model named by ``spec`` and checks it."""

    def __init__(self, spec: str, target: Any) -> None:
        self.spec = spec
        self._target = target

    def __call__(self) -> nn.Module:
        if isinstance(self._target, nn.Module):
            return copy.deepcopy(self._target)
        try:
            model = self._target()
        except DDSError:
            raise
        except Exception as exc:
            raise ConfigError(f"factory {self.spec!r} raised {_describe(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"factory {self.spec!r} returned {type(model).__name__}, expected torch.nn.Module"
            )
        return model

    def __repr__(self) -> str:
        return f"<model factory {self.spec!r}>"


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """The model factory named by ``spec``: ``"pkg.module:callable"`` or ``"file.py:callable"``.

    The callable is resolved now (importing the module, or executing the file as a
    module of its own) and called, with no arguments, each time the returned factory
    is; the factory checks that it returns an ``nn.Module``. ``callable`` may be
    dotted (``module:Class.build``); an ``nn.Module`` instance is deep-copied per call.
    Raises ConfigError naming the module or file and the attribute at fault.
    """
    return _Factory(spec, _resolve_callable(spec, "factory"))


def resolve_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """The callable named by ``MODULE:NAME`` (dotted module or ``file.py``), returned as is.

    For ``--loss MODULE:FUNCTION`` and the like, where the callable takes arguments.
    ``what`` names it in errors ("loss 'm:f' is not callable ..."). Raises ConfigError.
    """
    return _resolve_callable(spec, what)


def _resolve_callable(spec: str, what: str) -> Any:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part.strip() or not attr.strip():
        raise ConfigError(
            f"{what} {spec!r} is not MODULE:NAME (a dotted module or path/to/file.py, "
            "a colon, then the name of a callable in it)"
        )
    module, label = _import(module_part, what)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{label} has no attribute {attr!r}") from None
        except Exception as exc:
            raise ConfigError(f"{label}: reading {attr!r} raised {_describe(exc)}") from exc
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is not callable (it is {type(obj).__name__})")
    return obj


def _import(module_part: str, what: str) -> tuple[ModuleType, str]:
    """Import a dotted module, or execute a .py file as a module; (module, label)."""
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        return _import_file(Path(module_part).expanduser(), module_part, what), f"{module_part!r}"
    label = f"module {module_part!r}"
    if not all(part.isidentifier() for part in module_part.split(".")):
        raise ConfigError(f"{what} module {module_part!r} is not a dotted module name")
    try:
        return importlib.import_module(module_part), label
    except ModuleNotFoundError as exc:
        top = module_part.split(".")[0]
        cwd = os.getcwd()
        # An installed console script does not put the working directory on sys.path
        # as `python -m` does; add it when the module is there.
        in_cwd = (Path(cwd) / f"{top}.py").is_file() or (Path(cwd) / top).is_dir()
        if exc.name != top or not in_cwd or cwd in sys.path or "" in sys.path:
            raise ConfigError(f"cannot import {label} ({_describe(exc)})") from exc
        sys.path.append(cwd)
        log.info("added the working directory %s to sys.path to import %s", cwd, module_part)
        return _import(module_part, what)
    except Exception as exc:
        raise ConfigError(f"cannot import {label} ({_describe(exc)})") from exc


def _import_file(path: Path, shown: str, what: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"{what} file {shown!r} does not exist")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"_ddsmon_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {shown!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Siblings of the file import as they would when it runs as a script; appended,
    # so a user file never shadows the standard library.
    if str(resolved.parent) not in sys.path:
        sys.path.append(str(resolved.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception | SystemExit):
            raise
        raise ConfigError(f"cannot load {shown!r} ({_describe(exc)})") from exc
    return module


# --------------------------------------------------------------------------- probes


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
    if path.is_file():
        source = f"probe file {spec!r}"
        obj = _read_probe_file(path, source, trust)
    elif ":" in spec:
        source = f"probe function {spec!r}"
        fn = _resolve_callable(spec, "probe function")
        try:
            obj = fn()
        except DDSError:
            raise
        except Exception as exc:
            raise ConfigError(f"{source} raised {_describe(exc)}") from exc
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


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(
    ref: CheckpointLike,
    factory: Callable[[], nn.Module] | None,
    *,
    trust: bool = False,
) -> LoadedCheckpoint:
    """Load the checkpoint ``ref`` (``.path``, ``.kind`` in :data:`CHECKPOINT_KINDS`) on CPU.

    The model comes from ``factory()``; without a factory, from the checkpoint
    itself when it is a pickled module (``trust`` only) or, for a Hugging Face folder,
    from its ``config.json`` with transformers. See the module docstring for how the
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


# --------------------------------------------------------------------------- reading files


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` on CPU, ``weights_only`` unless ``trust``; CheckpointError on failure."""
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            tail = text.split("WeightsUnpickler error:", 1)[-1]
            what = _first_line(tail.split(" Please use")[0]) or "unsupported content"
            if "global" not in what.lower():  # a damaged pickle, not a disallowed object
                raise CheckpointError(path, f"corrupt pickle in the torch file ({what})") from None
            try:  # every offending global, read from the pickle's opcodes (nothing runs)
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:
                names = []
            if names:
                more = ", ..." if len(names) > _LISTED else ""
                shown = ", ".join(sorted(names)[:_LISTED]) + more
                what = f"the file holds {shown}: more than tensors and plain containers"
            raise CheckpointError(
                path, f"refused to unpickle with weights_only=True ({what}); {_TRUST_HINT}"
            ) from None
        raise CheckpointError(path, f"not a readable torch file ({_describe(exc)})") from None
    except Exception as exc:
        text = str(exc)
        if "PytorchStreamReader" in text or "zip archive" in text:
            raise CheckpointError(
                path, f"truncated or corrupt torch zip archive ({_first_line(text)})"
            ) from None
        raise CheckpointError(path, f"not a readable torch file ({_describe(exc)})") from None


_SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "C64": 8,
}  # fmt: skip


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file, header checked first.

    Layout: 8-byte little-endian header length N, N bytes of JSON mapping each name
    to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
    that follows), optional ``"__metadata__"`` (str -> str). The file is read into
    memory rather than memory-mapped, so a writer truncating it meanwhile cannot crash
    the reader.
    """
    data = path.read_bytes()
    if not data:
        raise CheckpointError(path, "empty file (0 bytes)")
    if len(data) < 8:
        raise CheckpointError(path, f"safetensors file too short ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(
            path,
            f"safetensors header claims {n} bytes but the file has {len(data) - 8} "
            "after the length (truncated or not safetensors)",
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"safetensors header is not JSON ({_describe(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "safetensors __metadata__ is not an object")
    available = len(data) - 8 - n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            numel = math.prod(int(s) for s in shape)
            width = _SAFETENSORS_DTYPES.get(dtype)
            ok = (
                isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
                and all(isinstance(s, int) and s >= 0 for s in shape)
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"safetensors header entry {name!r} is malformed") from None
        if not ok:
            raise CheckpointError(path, f"safetensors header entry {name!r} is malformed")
        if end > available:
            raise CheckpointError(
                path,
                f"safetensors tensor {name!r} ends at byte {end} of the data but the file "
                f"holds {available} (truncated)",
            )
        if width is not None and numel * width != end - begin:
            raise CheckpointError(
                path,
                f"safetensors tensor {name!r}: {dtype} {list(shape)} needs {numel * width} "
                f"bytes, the header gives {end - begin}",
            )
    try:
        from safetensors.torch import load as load_safetensors_bytes

        tensors = load_safetensors_bytes(data)
    except Exception as exc:
        raise CheckpointError(path, f"unreadable safetensors file ({_describe(exc)})") from None
    return tensors, {str(k): v for k, v in metadata.items() if isinstance(v, str)}


# --------------------------------------------------------------------------- Hugging Face


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


# --------------------------------------------------------------------------- DCP


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits only what a torch.distributed.checkpoint ``.metadata`` file is made of."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, torch.dtype):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif module == "pathlib" and name in (
            "PosixPath",
            "WindowsPath",
            "PurePosixPath",
            "PureWindowsPath",
            "Path",
        ):
            return getattr(importlib.import_module("pathlib"), name)
        elif (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def _dcp_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader whose ``.metadata`` goes through the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / ".metadata", "rb") as handle:
                metadata = _DCPMetadataUnpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _load_dcp_folder(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            TensorStorageMetadata,
        )
    except Exception as exc:  # a torch built without distributed
        raise CheckpointError(
            path, f"torch.distributed.checkpoint is unavailable ({_describe(exc)})"
        ) from None
    if factory is None:
        raise ConfigError(
            f"{path}: a torch.distributed.checkpoint folder needs a model factory; "
            "pass --model MODULE:FACTORY"
        )
    reader = dcp.FileSystemReader(path) if trust else _dcp_reader_class()(path)
    try:
        metadata = reader.read_metadata()
        items = dict(metadata.state_dict_metadata)
        storage = dict(metadata.storage_data)
    except FileNotFoundError:
        raise
    except Exception as exc:
        if "not allowed in DCP metadata" in str(exc):
            raise CheckpointError(
                path, f"refused to unpickle .metadata ({_first_line(str(exc))}); {_TRUST_HINT}"
            ) from None
        raise CheckpointError(path, f"unreadable .metadata ({_describe(exc)})") from None
    try:
        skeleton = _dcp_skeleton(items, storage, TensorStorageMetadata)
    except CheckpointError as exc:
        raise CheckpointError(path, exc.reason) from None
    except Exception as exc:
        raise CheckpointError(path, f"malformed .metadata ({_describe(exc)})") from None
    model = _build(factory)
    chosen = _choose(model, [_Candidate("in the DCP folder", skeleton)], path)
    wanted = set(chosen.mapping.values())
    wanted |= {k for k, t in skeleton.items() if "." not in k and t.numel() == 1}
    request = {k: torch.empty(skeleton[k].shape, dtype=skeleton[k].dtype) for k in sorted(wanted)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(request, storage_reader=reader)
    except FileNotFoundError:
        raise
    except (Exception, CheckpointException) as exc:
        # DCP wraps each rank's failure in a CheckpointException (a BaseException).
        failures = getattr(exc, "failures", None) or {}
        causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        if any(isinstance(c, FileNotFoundError) for c in causes):
            raise FileNotFoundError(path) from None
        cause = next((c for c in causes if isinstance(c, BaseException)), exc)
        raise CheckpointError(path, f"cannot read the DCP data ({_short(cause)})") from None

    top: dict[str, Any] = {k: v for k, v in request.items() if "." not in k}
    for fqn, item in items.items():
        if not isinstance(fqn, str) or "." in fqn or not isinstance(item, BytesStorageMetadata):
            continue
        value = _dcp_bytes_item(path, storage, fqn, trust)
        if value is not None:
            top[fqn] = value
    _apply(model, chosen, {**skeleton, **request}, path)
    return LoadedCheckpoint(model, _step_of(top), _meta_of(top))


def _dcp_skeleton(
    items: dict[str, Any], storage: dict[Any, Any], tensor_md: type
) -> dict[str, Tensor]:
    """Shape-only (meta) tensors for every tensor item; data files must be in the folder."""
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise CheckpointError("", f".metadata names a data file outside the folder: {rel!r}")
    skeleton: dict[str, Tensor] = {}
    for fqn, item in items.items():
        if isinstance(item, tensor_md):
            if not isinstance(fqn, str) or not isinstance(item.properties.dtype, torch.dtype):
                raise CheckpointError("", f".metadata item {fqn!r} is malformed")
            size = tuple(int(s) for s in item.size)
            skeleton[fqn] = torch.empty(size, dtype=item.properties.dtype, device="meta")
    return skeleton


def _dcp_bytes_item(path: Path, storage: dict[Any, Any], fqn: str, trust: bool) -> Any:
    """A small top-level non-tensor DCP item (``step``...), read with weights_only."""
    try:
        for index, info in storage.items():
            if getattr(index, "fqn", None) != fqn:
                continue
            if getattr(info, "transform_descriptors", None) or not 0 < info.length <= 1 << 20:
                return None
            with open(path / info.relative_path, "rb") as handle:
                handle.seek(info.offset)
                blob = handle.read(info.length)
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise
    except Exception as exc:
        log.info("%s: DCP item %r not read (%s)", path, fqn, _describe(exc))
    return None


# --------------------------------------------------------------------------- matching


@dataclass
class _Candidate:
    """A flat name -> tensor mapping found in the checkpoint; ``where`` says where."""

    where: str
    tensors: Mapping[str, Any]
    known: bool = True


@dataclass
class _Match:
    candidate: _Candidate
    prefix: str
    mapping: dict[str, str]  # model key -> checkpoint key
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    rivals: list[str] = field(default_factory=list)  # other prefixes matching as well

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes or self.rivals)


def _candidates(obj: Any) -> list[_Candidate]:
    """Every tensor mapping in ``obj``, container keys first (breadth first, 3 deep)."""
    found: list[_Candidate] = []
    queue: list[tuple[str, Any, bool, int]] = [("", obj, True, 0)]
    seen: set[int] = set()
    while queue and len(found) < _MAX_CANDIDATES:
        where, value, known, depth = queue.pop(0)
        if id(value) in seen:
            continue
        seen.add(id(value))
        phrase = f"under {where}" if where else "at the top level"
        if isinstance(value, nn.Module):
            found.append(_Candidate(phrase, dict(value.state_dict()), known))
            continue
        if not isinstance(value, Mapping):
            continue
        tensors = {
            k: v
            for k, v in value.items()
            if isinstance(k, str) and (isinstance(v, Tensor) or k.endswith("_extra_state"))
        }
        if tensors:
            found.append(_Candidate(phrase, tensors, known))
        if depth >= _MAX_DEPTH:
            continue
        children = [
            (k, v)
            for k, v in value.items()
            if isinstance(k, str) and isinstance(v, Mapping | nn.Module)
        ]
        children.sort(key=lambda kv: kv[0] not in _CONTAINER_KEYS)
        for key, child in children:
            queue.append((f"{where}[{key!r}]", child, known and key in _CONTAINER_KEYS, depth + 1))
    found.sort(key=lambda c: not c.known)  # stable: breadth-first order within each group
    return found


def _norm(key: str) -> str:
    """Drop ``_orig_mod`` segments (what torch.compile inserts)."""
    if "_orig_mod" not in key:
        return key
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state dict is loaded: inside torch.compile and (D)DP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _model_keys(model: nn.Module) -> tuple[dict[str, str], dict[str, Any], dict[str, set[str]]]:
    """(normalised key -> model key, model key -> value, model key -> keys tied to it)."""
    state = model.state_dict(keep_vars=True)
    by_id: dict[int, set[str]] = {}
    for k, v in state.items():
        by_id.setdefault(id(v), set()).add(k)
    tied = {k: by_id[id(v)] - {k} if isinstance(v, Tensor) else set() for k, v in state.items()}
    return {_norm(k): k for k in state}, dict(state), tied


def _prefix_rank(prefix: str, hits: int) -> tuple[int, bool, int, str]:
    """Most hits; then prefixes made of wrapper names only; then fewest segments."""
    segments = [s for s in prefix.split(".") if s]
    return (-hits, not all(s in _WRAPPER_SEGMENTS for s in segments), len(segments), prefix)


def _match(
    model_keys: dict[str, str],
    model_state: dict[str, Any],
    tied: dict[str, set[str]],
    cand: _Candidate,
) -> _Match:
    """Match one candidate to the model's keys through the best prefix (module docstring)."""
    ckpt: dict[str, str] = {}
    for key in cand.tensors:
        ckpt.setdefault(_norm(key), key)
    hits: Counter[str] = Counter()
    for nk in ckpt:
        parts = nk.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                hits[".".join(parts[:i]) + ("." if i else "")] += 1
    ranked = sorted(hits, key=lambda p: _prefix_rank(p, hits[p])) or [""]
    prefix = ranked[0]
    rank = _prefix_rank(prefix, hits[prefix])[:2]
    rivals = [p for p in ranked[1:] if rank[1] and _prefix_rank(p, hits[p])[:2] == rank]
    mapping = {mk: ckpt[prefix + nk] for nk, mk in model_keys.items() if prefix + nk in ckpt}
    unexpected = []
    for nk, key in ckpt.items():
        if not nk.startswith(prefix) or nk[len(prefix) :] in model_keys:
            continue
        value = cand.tensors[key]
        if prefix == "" and "." not in nk and isinstance(value, Tensor) and value.ndim == 0:
            continue  # a top-level scalar such as step: metadata, not a weight
        unexpected.append(key)
    missing = [
        mk for mk in model_keys.values() if mk not in mapping and not tied[mk] & mapping.keys()
    ]
    shapes = []
    for mk, ck in mapping.items():
        have, want = cand.tensors[ck], model_state[mk]
        if isinstance(have, Tensor) and isinstance(want, Tensor) and have.shape != want.shape:
            shapes.append((mk, tuple(have.shape), tuple(want.shape)))
    return _Match(cand, prefix, mapping, missing, unexpected, shapes, rivals)


def _choose(model: nn.Module, candidates: list[_Candidate], path: Path) -> _Match:
    """The first candidate that matches the model exactly, else a CheckpointError."""
    model_keys, model_state, tied = _model_keys(_unwrap(model))
    if not model_keys:
        return _Match(_Candidate("nowhere", {}), "", {})
    if not candidates:
        raise CheckpointError(
            path,
            "no state dict found: the checkpoint holds no tensors (looked under "
            f"{', '.join(_CONTAINER_KEYS)} and every other key, {_MAX_DEPTH} levels deep)",
        )
    matches = [_match(model_keys, model_state, tied, c) for c in candidates]
    good = [m for m in matches if m.ok]
    if good:
        first = good[0]
        others = [m.candidate.where for m in good[1:] if not m.candidate.known]
        if not first.candidate.known and others:
            raise CheckpointError(
                path,
                f"the model matches state dicts in several places ({first.candidate.where}, "
                f"{', '.join(others)}); cannot tell which to load",
            )
        if first.prefix:
            log.debug("%s: prefix %r stripped %s", path, first.prefix, first.candidate.where)
        return first
    best = max(matches, key=lambda m: len(m.mapping))  # first of the best, by priority
    raise CheckpointError(path, _mismatch_reason(best, list(model_keys.values())))


def _mismatch_reason(match: _Match, model_keys: list[str]) -> str:
    cand = match.candidate
    if not match.mapping:
        return (
            f"no key of the model in the checkpoint: the model expects "
            f"{_listing(model_keys, 'keys')}; the state dict {cand.where} has "
            f"{_listing(list(cand.tensors), 'keys')}"
        )
    if match.rivals:
        return (
            f"the state dict {cand.where} matches the model under several prefixes "
            f"({_listing([match.prefix, *match.rivals], '')}); cannot tell which to load"
        )
    parts = []
    if match.missing:
        parts.append(f"missing {_listing(match.missing, 'keys')}")
    if match.unexpected:
        parts.append(f"unexpected {_listing(match.unexpected, 'keys')}")
    if match.shapes:
        shown = ", ".join(
            f"{k!r}: checkpoint {list(have)} vs model {list(want)}"
            for k, have, want in match.shapes[:_LISTED]
        )
        more = f" and {len(match.shapes) - _LISTED} more" if len(match.shapes) > _LISTED else ""
        count = f"{len(match.shapes)} keys: " if len(match.shapes) > 1 else ""
        parts.append(f"shape mismatch at {count}{shown}{more}")
    stripped = f" (prefix {match.prefix!r} stripped)" if match.prefix else ""
    return f"state dict {cand.where}{stripped} does not match the model: " + "; ".join(parts)


def _apply(model: nn.Module, match: _Match, tensors: Mapping[str, Any], path: Path) -> None:
    """Copy the matched tensors into the model (tied keys may be absent)."""
    target = _unwrap(model)
    state = {mk: tensors[ck] for mk, ck in match.mapping.items()}
    try:
        result = target.load_state_dict(state, strict=False)
    except Exception as exc:
        raise CheckpointError(path, f"load_state_dict failed ({_short(exc)})") from None
    _, _, tied = _model_keys(target)
    left = [k for k in result.missing_keys if not (tied.get(k, set()) & match.mapping.keys())]
    if left or result.unexpected_keys:
        parts = [f"missing {_listing(left, 'keys')}"] if left else []
        if result.unexpected_keys:
            parts.append(f"unexpected {_listing(list(result.unexpected_keys), 'keys')}")
        raise CheckpointError(path, "load_state_dict reported " + "; ".join(parts))


def _load_into(model: nn.Module, candidates: list[_Candidate], path: Path) -> None:
    match = _choose(model, candidates, path)
    _apply(model, match, match.candidate.tensors, path)


# --------------------------------------------------------------------------- step, meta


def _as_step(value: Any) -> int | None:
    """A non-negative integral step from an int, float or one-element tensor, else None."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if isinstance(value, numbers.Integral):
        step = int(value)
    elif math.isfinite(number) and number.is_integer():
        step = int(number)
    else:
        return None
    return step if 0 <= step <= _INT64_MAX else None


def _as_number(value: Any) -> float | None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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


# --------------------------------------------------------------------------- wording


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(str(exc))}" if str(exc) else type(exc).__name__


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 300 else line[:297] + "..."


def _listing(items: list[Any], noun: str) -> str:
    """``"3 keys ('a', 'b', 'c')"``: the first few items, quoted, and the count."""
    shown = ", ".join(repr(i) for i in items[:_LISTED])
    more = ", ..." if len(items) > _LISTED else ""
    if not noun:
        return f"{shown}{more}"
    return f"{len(items)} {noun if len(items) != 1 else noun.rstrip('s')} ({shown}{more})"


def _kind_of(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {_listing(list(obj), '')}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"
