"""Finding the state dict in a checkpoint and matching its keys to the model's (see the package docstring)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ddsmon.errors import CheckpointError, KeysMismatch
from ddsmon.loading.wording import _LISTED, _listing, _short

log = logging.getLogger(__name__)

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_WRAPPER_SEGMENTS = frozenset({*_CONTAINER_KEYS, "_orig_mod"})
_MAX_DEPTH = 3
_MAX_CANDIDATES = 64


@dataclass
class _Candidate:
    """A flat name -> tensor mapping found in the checkpoint; ``where`` says where.

    top: the mapping is the checkpoint's top level itself (a bare state dict), so its
    keys are also the checkpoint's top-level keys (see :func:`_weight_keys`).

    renamed_from: for a candidate whose keys were renamed (transformers' conversion
    mapping, :func:`ddsmon.loading.huggingface._choose_renamed`), each key -> the key the
    checkpoint stores its tensor under; None for the checkpoint's own keys.

    joined: the state dicts of a mapping's keys together, each key under its key's name
    (``{"encoder": sd1, "decoder": sd2}`` -> ``encoder.*``, ``decoder.*``, see
    :func:`_joined`): matched with no prefix stripped, so it matches only a model whose
    keys are exactly theirs."""

    where: str
    tensors: Mapping[str, Any]
    known: bool = True
    top: bool = False
    renamed_from: Mapping[str, str] | None = None
    joined: bool = False

    def file_key(self, key: str) -> str:
        """The key the checkpoint stores the candidate's ``key`` under."""
        return key if self.renamed_from is None else self.renamed_from.get(key, key)


@dataclass
class _Match:
    candidate: _Candidate
    prefix: str
    mapping: dict[str, str]  # model key -> checkpoint key
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    rivals: list[str] = field(default_factory=list)  # other prefixes matching as well
    #: keys outside the prefix, by dotted head ("ema_model." -> its keys): not loaded
    ignored: dict[str, list[str]] = field(default_factory=dict)
    #: heads of ``ignored`` under which every model key is present (an EMA copy...)
    copies: set[str] = field(default_factory=set)
    #: other candidates that match the model as well, not loaded (``where`` of each)
    others: list[str] = field(default_factory=list)
    #: the model's keys, normalised (no ``_orig_mod.``)
    model_keys: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes or self.rivals)

    def file_keys(self) -> set[str]:
        """The checkpoint's keys of the tensors loaded, as the checkpoint names them
        (before any renaming: what to read from the file)."""
        return {self.candidate.file_key(k) for k in self.mapping.values()}

    def keyed(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """``tensors`` read by :meth:`file_keys`, under the keys ``mapping`` names."""
        return {ck: tensors[self.candidate.file_key(ck)] for ck in self.mapping.values()}

    def source(self, where: str | None = None) -> str:
        """Which weights were loaded, in words: the candidate, the prefix stripped, and
        what was ignored beside them, e.g. ``under ['state_dict'], prefix 'model.'
        stripped (ignored: 'ema_model.' 4 keys, the model's keys again; 'criterion.'
        1 key)``. ``where`` replaces the candidate's own wording."""
        text = where if where is not None else self.candidate.where
        if self.candidate.renamed_from is not None and where is not None:
            text += ", keys renamed by transformers' conversion mapping"
        if self.prefix:
            text += f", prefix {self.prefix!r} stripped"
        ignored = []
        for head, keys in self.ignored.items():
            count = f"{len(keys)} key{'s' if len(keys) != 1 else ''}"
            again = ", the model's keys again" if head in self.copies else ""
            ignored.append(f"{head!r} {count}{again}")
        if ignored:
            text += f" (ignored: {'; '.join(ignored)})"
        if self.others:
            text += f"; also matching the model, not loaded: {', '.join(self.others)}"
        return text


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
            found.append(_Candidate(phrase, tensors, known, top=depth == 0))
        if depth >= _MAX_DEPTH:
            continue
        children = [
            (k, v)
            for k, v in value.items()
            if isinstance(k, str) and isinstance(v, Mapping | nn.Module)
        ]
        children.sort(key=lambda kv: kv[0] not in _CONTAINER_KEYS)
        joined = _joined(where, children)
        if joined is not None:
            found.append(joined)
        for key, child in children:
            queue.append((f"{where}[{key!r}]", child, known and key in _CONTAINER_KEYS, depth + 1))
    found.sort(key=lambda c: not c.known)  # stable: breadth-first order within each group
    return found


def _tensors_of(value: Mapping[Any, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _joined(where: str, children: list[tuple[str, Any]]) -> _Candidate | None:
    """The state dicts under two or more keys of one mapping, joined as one candidate
    whose keys are ``KEY.name`` (a model saved by its parts: ``{"encoder":
    enc.state_dict(), "decoder": dec.state_dict()}`` is the state dict of a model whose
    submodules ``encoder`` and ``decoder`` they are), or None where fewer than two keys
    hold tensors. Not a container key's (``known``): where another candidate matches as
    well, :func:`_choose` loads neither."""
    parts = [(k, _tensors_of(v)) for k, v in children if isinstance(v, Mapping)]
    parts = [(k, t) for k, t in parts if t]
    if len(parts) < 2:
        return None
    tensors = {f"{k}.{name}": t for k, part in parts for name, t in part.items()}
    named = " and ".join(f"{where}[{k!r}]" for k, _ in parts)
    where = f"under {named} together, each key under its name"
    return _Candidate(where, tensors, known=False, joined=True)


def _unsearched(obj: Any, where: str = "", depth: int = 0) -> list[str]:
    """Where ``obj`` holds tensors that no candidate is made of, in words: a bare tensor,
    an optimizer's state (``state`` and ``param_groups``: its tensors are keyed by
    parameter numbers), a list or tuple (not searched), a mapping keyed by other than
    strings; looked for under string keys, :data:`_MAX_DEPTH` levels deep."""
    at = f" under {where}" if where else ""
    if isinstance(obj, Tensor):
        return [f"a bare tensor{at} (shape {list(obj.shape)}), not a state dict of named tensors"]
    if isinstance(obj, list | tuple):
        if not _holds_tensors(obj):
            return []
        items = f"{len(obj)} item{'s' if len(obj) != 1 else ''}"
        return [f"a {type(obj).__name__} of {items}{at} (lists and tuples are not searched)"]
    if not isinstance(obj, Mapping):
        return []
    if "state" in obj and "param_groups" in obj:
        if where and not _holds_tensors(obj):
            return []
        return [f"an optimizer's state (state, param_groups){at}, not a model's state dict"]
    found = []
    odd = [k for k, v in obj.items() if not isinstance(k, str) and _holds_tensors(v)]
    if odd:
        found.append(f"a dict{at} under keys that are not strings ({_listing(odd, '')})")
    if depth < _MAX_DEPTH:
        for key, value in obj.items():
            if isinstance(key, str):
                found += _unsearched(value, f"{where}[{key!r}]", depth + 1)
    return found


def _holds_tensors(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, Tensor):
        return True
    if depth >= _MAX_DEPTH:
        return False
    values = (
        obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, list | tuple) else []
    )
    return any(_holds_tensors(v, depth + 1) for v in values)


def _no_state_dict(contents: Any) -> str:
    """The error for a checkpoint in which no state dict was found: what it is, or where
    its tensors are, instead (:func:`_unsearched`); else that it holds no tensors."""
    looked = (
        f"looked under {', '.join(_CONTAINER_KEYS)} and every other key, {_MAX_DEPTH} levels deep"
    )
    found = _unsearched(contents)
    if not found:
        return f"no state dict found: the checkpoint holds no tensors ({looked})"
    whole = isinstance(contents, Tensor | list | tuple) or (
        isinstance(contents, Mapping) and "state" in contents and "param_groups" in contents
    )
    if whole:
        return f"no state dict found: the checkpoint is {found[0]}"
    return f"no state dict found ({looked}); its tensors are in {'; '.join(found[:_LISTED])}"


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
    """Match one candidate to the model's keys through the best prefix (see :mod:`ddsmon.loading`)."""
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
    if cand.joined:
        ranked = [""]  # its keys are the model's as they are, or it is not the model
    prefix = ranked[0]
    rank = _prefix_rank(prefix, hits[prefix])[:2]
    rivals = [p for p in ranked[1:] if rank[1] and _prefix_rank(p, hits[p])[:2] == rank]
    mapping = {mk: ckpt[prefix + nk] for nk, mk in model_keys.items() if prefix + nk in ckpt}
    unexpected = []
    ignored: dict[str, list[str]] = {}
    for nk, key in ckpt.items():
        if not nk.startswith(prefix):
            if not _is_metadata(nk, cand.tensors[key]):
                ignored.setdefault(_head(nk, prefix), []).append(key)
            continue
        if nk[len(prefix) :] in model_keys:
            continue
        value = cand.tensors[key]
        if prefix == "" and _is_metadata(nk, value):
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
    copies = {
        head
        for head in ignored
        for p, n in hits.items()
        if p.startswith(head) and n == len(model_keys)
    }
    return _Match(
        cand,
        prefix,
        mapping,
        missing,
        unexpected,
        shapes,
        rivals,
        ignored=ignored,
        copies=copies,
        model_keys=frozenset(model_keys),
    )


def _is_metadata(norm_key: str, value: Any) -> bool:
    """A dotless 0-dim tensor (``step``, ``val_acc``) beside the weights: the
    checkpoint's metadata, neither a weight nor something else's key."""
    return "." not in norm_key and isinstance(value, Tensor) and value.ndim == 0


def _head(norm_key: str, prefix: str) -> str:
    """The dotted head naming what a key outside ``prefix`` belongs to: its segments up
    to the first one that differs from the prefix's (``ema_model.``, ``model.criterion.``
    beside ``model.module.``; a dotless key is its own head)."""
    parts, want = norm_key.split("."), prefix.split(".")[:-1]
    i = next((i for i, (a, b) in enumerate(zip(parts, want)) if a != b), min(len(parts), len(want)))
    i = min(i, len(parts) - 1)
    return ".".join(parts[: i + 1]) + ("." if i + 1 < len(parts) else "")


def _outside_state_dict(match: _Match, top: Mapping[Any, Any]) -> dict[Any, Any]:
    """The entries of the checkpoint's top level ``top`` that are not weights, where
    trainer scalars may be found. Weights: every key of the state dict loaded when
    that is the top level itself, but the dotless 0-dim metadata the matching set aside
    (so ``4.bias``, an EMA copy's ``ema_model.4.bias`` and the model's own dotless keys
    are weights), and anywhere a key naming one of the model's keys."""
    cand = match.candidate
    loaded = match.file_keys()
    stored = {cand.file_key(k) for k in cand.tensors}

    def weight(key: Any, value: Any) -> bool:
        if not isinstance(key, str):
            return False
        nk = _norm(key)
        if key in loaded or nk in match.model_keys:
            return True
        if (
            match.prefix
            and nk.startswith(match.prefix)
            and nk[len(match.prefix) :] in match.model_keys
        ):
            return True
        return cand.top and key in stored and not _is_metadata(nk, value)

    return {k: v for k, v in top.items() if not weight(k, v)}


def _choose(
    model: nn.Module, candidates: list[_Candidate], path: Path, contents: Any = None
) -> _Match:
    """The first candidate that matches the model exactly, else a CheckpointError
    (:class:`~ddsmon.errors.KeysMismatch` where state dicts are there but none is the
    model's). ``contents``: the checkpoint the candidates were found in, for an error
    saying what it holds where there is none (:func:`_no_state_dict`)."""
    model_keys, model_state, tied = _model_keys(_unwrap(model))
    if not model_keys:
        return _Match(_Candidate("nothing (the model has no parameters or buffers)", {}), "", {})
    if not candidates:
        raise CheckpointError(path, _no_state_dict(contents))
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
        first.others = [m.candidate.where for m in good[1:]]
        log.debug("%s: loaded the state dict %s", path, first.source())
        return first
    best = max(matches, key=lambda m: len(m.mapping))  # first of the best, by priority
    raise KeysMismatch(path, _mismatch_reason(best, list(model_keys.values())))


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
    _check_dtypes(target, state, match, path)
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


def _check_dtypes(model: nn.Module, state: Mapping[str, Any], match: _Match, path: Path) -> None:
    """Refuse a copy that would change the weights' values, not only their precision:
    a complex tensor into a real parameter (``copy_`` drops the imaginary part, with a
    warning nobody reads). Other casts (float16 or bfloat16 into float32, integers into
    floats) keep the values, as load_state_dict does them."""
    own = _unwrap(model).state_dict(keep_vars=True)
    for key, value in state.items():
        target = own.get(key)
        dtype = getattr(value, "dtype", None)
        if target is None or dtype is None or not hasattr(target, "dtype"):
            continue
        if dtype.is_complex and not target.dtype.is_complex:
            raise CheckpointError(
                path,
                f"key {match.mapping[key]!r} is {str(dtype).removeprefix('torch.')} in the "
                f"checkpoint and {str(target.dtype).removeprefix('torch.')} in the model: "
                "copying it would drop the imaginary part",
            )
