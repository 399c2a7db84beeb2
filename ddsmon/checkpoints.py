"""Checkpoints on disk: which paths are checkpoints, their step, whether they are complete.

Pure functions over the filesystem (no watchdog, no torch). The watcher
(:mod:`ddsmon.watcher`) and the daemon use them to decide what to read.

Recognised kinds (:data:`KINDS`):

    torch        a torch.save file: ``*.pt``, ``*.pth``, ``*.bin``
    lightning    a Lightning checkpoint: ``*.ckpt`` (a torch.save file too)
    safetensors  ``*.safetensors``
    hf           a Hugging Face folder: a Trainer's ``checkpoint-<step>/``, or a
                 ``save_pretrained`` folder of any name (``config.json`` beside the
                 weights of :data:`HF_WEIGHTS`, or a variant's (``model.ema.safetensors``),
                 and nothing else:
                 :func:`is_pretrained_folder`; e.g. ``step_500/``); either may hold a
                 PEFT adapter instead of the model's weights (``adapter_config.json``
                 beside ``adapter_model.safetensors``: :func:`adapter_weights`)
    dcp          a torch.distributed.checkpoint folder (holds a ``.metadata`` file)

Never checkpoints: temporary names (``*.tmp``, ``*.partial``, ``*.part``, ``*.temp``,
``*~``, dot-files, Hugging Face's ``tmp-checkpoint-<step>/``), anything inside a
dot-directory or a temporary folder (such as the daemon's own ``.ddsmon/`` state
directory), files inside an hf/dcp folder (they belong to the folder), a PEFT adapter's weights
(``adapter_model.safetensors``) until its ``adapter_config.json`` is beside it, the Trainer's
side files that hold no weights (:data:`SIDE_FILES`: ``training_args.bin``,
``optimizer.pt``, ...), and, when a root is given, symbolic links that point back
into the root (aliases such as Lightning's ``last.ckpt`` link).

Completeness (:func:`check_complete`) is a format check, because torch.save writes in
place and events alone cannot tell a finished file from a paused writer:

    torch zip     the zip end-of-central-directory record is there and the central
                  directory it points to is consistent (every member ends before it),
                  and the archive holds torch's ``data.pkl``.
    torch legacy  (pre-1.6, non-zip ``torch.save``): its five pickles end and its
                  storages end at the file's end (:func:`legacy_torch_problem`).
    safetensors   size == 8 + N + max(data_offsets end), N the little-endian u64
                  header length, and the N header bytes are a JSON object.
    hf            a weights file (:data:`HF_WEIGHTS`, else the one variant's: :func:`hf_weights`)
                  is there and itself complete
                  (every shard of a sharded index), and ``trainer_state.json``
                  parses as JSON: a Trainer writes it last, so a ``checkpoint-<step>/``
                  folder holding the Trainer's files waits for it
                  (:func:`awaits_trainer_state`); a ``save_pretrained`` folder (which
                  has none, whatever its name) needs its ``config.json`` to parse
                  instead; a PEFT adapter folder, its ``adapter_config.json`` (peft
                  writes it after the adapter's weights) and the adapter's weights.
    dcp           a non-empty ``.metadata`` (torch writes it last).

Only regular files are ever opened (:func:`open_regular`: the type is checked with
``os.stat`` after resolving symbolic links, and the file is opened ``O_NONBLOCK`` and
checked again with ``fstat``, so a FIFO, a device such as ``/dev/zero``, a socket or a
directory is refused before anything is read and nothing ever blocks), and every read is
bounded: by the zip's central directory, by the safetensors header's own length (at most
100 MB), and JSON side files (``trainer_state.json``, ``config.json``, shard indexes) by
:data:`JSON_LIMIT`. A refused file is a :class:`RefusedFile` (an OSError) whose
``reason`` says why, e.g. ``not a regular file (FIFO)``; :func:`check_complete` returns
that reason.

>>> step_from_name(Path("epoch=3-step=1200.ckpt"))
1200
>>> step_from_name(Path("checkpoint-500"))
500
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import logging
import os
import pickle
import re
import stat
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from ddsmon.errors import ConfigError
from ddsmon.shown import shown

__all__ = (
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FSDP_SHARDED",
    "HF_SHARD",
    "HF_WEIGHTS",
    "HF_WEIGHTS_NAME",
    "JSON_LIMIT",
    "KINDS",
    "NAMED_VALUE",
    "SAFETENSORS_MAX_HEADER",
    "SIDE_FILES",
    "CheckpointRef",
    "HfWeights",
    "Kind",
    "RefusedFile",
    "UnsearchableFolder",
    "accelerate_models",
    "adapter_weights",
    "awaits_trainer_state",
    "check_complete",
    "checkpoint_for",
    "classify",
    "compressed_member",
    "discover",
    "excluded",
    "fingerprint",
    "folder_step",
    "hf_weights",
    "is_hf_folder_name",
    "is_pretrained_folder",
    "is_temporary",
    "legacy_torch_problem",
    "linked_folders",
    "list_folder",
    "named_adapters",
    "open_regular",
    "read_regular",
    "stat_regular",
    "step_from_name",
    "where_checkpoints_are",
    "zip_listing_problem",
)

log = logging.getLogger(__name__)

Kind = Literal["torch", "lightning", "safetensors", "hf", "dcp"]
KINDS: tuple[Kind, ...] = ("torch", "lightning", "safetensors", "hf", "dcp")

_SUFFIX_KIND: dict[str, Kind] = {
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "lightning",
    ".safetensors": "safetensors",
}
_TEMP_SUFFIXES = frozenset({".tmp", ".partial", ".part", ".temp", ".swp"})
_HF_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_FOLDER = re.compile(r"^(?:tmp|temp)[-_]", re.IGNORECASE)
_STEP_TAG = re.compile(r"(?<![a-z])(?:global_?)?step[=_\-]?(\d+)", re.IGNORECASE)
_LIGHTNING_VERSION = re.compile(r"-v\d+$")
_DIGITS = re.compile(r"\d+")
#: Numbers in a name that are never its step: a rank (``mp_rank_00``, ``rank3``) and a
#: shard count (``00001-of-00002``).
_NOT_STEP = re.compile(r"(?<![a-z])(?:[a-z]{2}_)?rank[_\-]?\d+|\d+-of-\d+", re.IGNORECASE)
#: A ``name=value`` pair of a name, as Lightning's ``ModelCheckpoint(filename=
#: "{epoch}-{step}-{val_loss:.2f}")`` writes them (``epoch=2-step=24-val_loss=0.61.ckpt``):
#: between the name's start or a ``-`` / ``_`` and the next ``-`` / ``_`` or its end.
NAMED_VALUE = re.compile(
    r"(?:(?<=^)|(?<=[-_]))([A-Za-z][A-Za-z0-9_]*)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?=[-_]|$)"
)
#: The names of such pairs whose value may be a name's step (when no ``step`` tag is
#: there): an epoch counts in step order; a metric's value never does.
_ORDINAL_NAMES = frozenset({"epoch", "iter", "iteration", "global_step", "step"})

HF_WEIGHTS: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Weights files of a Hugging Face checkpoint folder, in the order they are looked for."""

ADAPTER_WEIGHTS: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")
"""A PEFT adapter's weights (a LoRA fine-tune's ``checkpoint-N/``, ``PeftModel.save_pretrained``),
in the order they are looked for: read only where the folder holds no model weights."""

FSDP_SHARDED = "pytorch_model_fsdp_0"
"""The torch.distributed.checkpoint folder inside a Hugging Face Trainer's ``checkpoint-N/``
run under FSDP with sharded state dicts (accelerate's ``save_fsdp_model``: ``dist_cp.save(
{"model": state_dict}, FileSystemWriter(...))``; its optimizer in ``optimizer_0/``), where
the folder holds no model weights file: read only then."""

ADAPTER_CONFIG = "adapter_config.json"
"""The PEFT adapter's settings beside :data:`ADAPTER_WEIGHTS` (peft writes it after them)."""

#: The HF Trainer's own files in ``checkpoint-N/`` (see :func:`awaits_trainer_state`).
_TRAINER_NAMES = (
    r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(?:_\d+)?\.pth"
)
#: DeepSpeed ZeRO-3's model partitions (see :func:`where_checkpoints_are`).
_ZERO3_NAMES = r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt"

SIDE_FILES = re.compile(
    rf"^(?:{_TRAINER_NAMES}"
    r"|(?:optimizer|scheduler|sampler|scaler|dl_state_dict)(?:_\d+)?\.(?:bin|pt)"
    r"|.*optim_states\.pt|layer_\d+-model_\d+-model_states\.pt"
    rf"|{_ZERO3_NAMES})$"
)
"""Names of torch files trainers write beside the weights; they hold no model: the HF
Trainer's ``training_args.bin``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state.pth``; Accelerate's ``save_state`` files (``optimizer.bin``,
``scheduler.bin``, ``sampler.bin``, numbered ``_1``, ``_2`` for more than one);
Accelerate's dataloader state ``dl_state_dict.bin``; DeepSpeed's optimizer partitions
(``zero_pp_rank_0_mp_rank_00_optim_states.pt``,
``bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt``), its pipeline-parallel layer files
(``layer_01-model_00-model_states.pt``) and its ZeRO-3 model partitions
(``zero_pp_rank_0_mp_rank_00_model_states.pt``: no whole weights in them; DeepSpeed's
``zero_to_fp32.py`` or ``stage3_gather_16bit_weights_on_model_save`` makes a file ddsmon
can read)."""

_FOLDER_STEP = re.compile(
    r"^(?:checkpoint|ckpt|step|global_step|iter|iteration)[-_=]?(\d+)$", re.IGNORECASE
)
"""Folder names that are a step: ``checkpoint_3`` (Accelerate's ``save_state``),
``step_500``, ``global_step800``, ``iter-20``. A weights file with no number of its own
directly inside such a folder takes the folder's (:attr:`CheckpointRef.name_step`)."""

#: A weights variant's name (``save_pretrained(..., variant="ema")``): ``ema``, ``fp16``,
#: ``non_ema``; no dot, and no hyphen (a shard's ``-00001-of-00002`` follows it).
_VARIANT = r"[A-Za-z0-9_]+"

HF_WEIGHTS_NAME = re.compile(
    rf"^(?:model(?:\.(?P<st>{_VARIANT}))?\.safetensors"
    rf"|model\.safetensors\.index(?:\.(?P<sti>{_VARIANT}))?\.json"
    rf"|pytorch_model(?:\.(?P<pt>{_VARIANT}))?\.bin"
    rf"|pytorch_model\.bin\.index(?:\.(?P<pti>{_VARIANT}))?\.json)$"
)
"""A weights file or shard index of a Hugging Face folder, of :data:`HF_WEIGHTS` or a
variant of one, named as transformers' ``_add_variant`` does (the variant before the
last suffix): ``model.ema.safetensors``, ``pytorch_model.ema.bin``,
``model.safetensors.index.ema.json``, ``pytorch_model.bin.index.fp16.json``."""

HF_SHARD = re.compile(
    rf"^(?:model|pytorch_model)(?:\.(?P<variant>{_VARIANT}))?-\d{{5}}-of-\d{{5}}\.(?:safetensors|bin)$"
)
"""A shard of a sharded Hugging Face save (``model-00001-of-00002.safetensors``, a
variant's ``model.ema-00001-of-00002.safetensors``): part of its folder, never a
checkpoint of its own (``save_pretrained`` writes the index last)."""


#: Why a Hugging Face folder holding shards and no index of theirs is not read yet.
SHARDS_WITHOUT_INDEX = "weight shards without their index yet (still being written)"


@dataclass(frozen=True)
class HfWeights:
    """The weights a Hugging Face folder is read from (:func:`hf_weights`).

    name: the weights file or shard index to read, or None (none there, or no choice).
    variant: its variant (``ema``), None for the plain weights.
    beside: the other variants' files there, not read.
    problem: why none is chosen though weights are there (several variants, none plain).
    """

    name: str | None
    variant: str | None = None
    beside: tuple[str, ...] = ()
    problem: str | None = None


def _weights_variant(name: str) -> tuple[int, str | None] | None:
    """``(rank in HF_WEIGHTS, variant)`` of a weights file or index name, else None."""
    if HF_SHARD.match(name):
        return None
    match = HF_WEIGHTS_NAME.match(name)
    if match is None:
        return None
    for rank, group in enumerate(("st", "sti", "pt", "pti")):
        if match.group(group) is not None:
            return rank, match.group(group)
    return HF_WEIGHTS.index(name), None


def hf_weights(names: list[str] | tuple[str, ...] | set[str]) -> HfWeights:
    """Which of a Hugging Face folder's entries (``names``) its weights are read from:
    the plain weights (:data:`HF_WEIGHTS`, in that order) when there are any, else those
    of the one variant there (``model.ema.safetensors``, or ``model.safetensors.index.ema.json``
    and its shards). Files of other variants are ``beside`` (not read); several variants
    and no plain weights is a ``problem``, as ddsmon does not guess which was meant, and
    so are plain shards without their index beside a variant (the plain weights, which
    would be read, are still being written)."""
    found: dict[str | None, list[tuple[int, str]]] = {}
    shard_variants: set[str | None] = set()
    for name in names:
        ranked = _weights_variant(name)
        if ranked is not None:
            found.setdefault(ranked[1], []).append((ranked[0], name))
        elif shard := HF_SHARD.match(name):
            shard_variants.add(shard.group("variant"))
    if not found:
        return HfWeights(None)
    if None in found:
        chosen: str | None = None
    elif len(found) == 1:
        chosen = next(iter(found))
        if None in shard_variants:  # the plain weights, which win, are still being written
            return HfWeights(None, problem=SHARDS_WITHOUT_INDEX)
    else:
        variants = ", ".join(sorted(str(v) for v in found))
        return HfWeights(
            None,
            problem=f"weights of several variants ({variants}) and none without a variant: "
            "ddsmon does not guess which to read (keep one variant per folder)",
        )
    name = min(found[chosen])[1]
    beside = tuple(sorted(n for v, files in found.items() if v != chosen for _, n in files))
    return HfWeights(name, chosen, beside)


def adapter_weights(names: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """The PEFT adapter weights file among a Hugging Face folder's entries (``names``)
    (:data:`ADAPTER_WEIGHTS`, in that order) when the folder holds no model weights (no
    file :func:`hf_weights` would read, no shard), else None: a folder holding the
    model's weights is read from them, whatever adapter lies beside them."""
    if hf_weights(names).name is not None or any(HF_SHARD.match(n) for n in names):
        return None
    return next((n for n in ADAPTER_WEIGHTS if n in names), None)


def named_adapters(path: Path, names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """The subfolders of a Hugging Face folder (entries ``names``) holding a PEFT adapter
    saved under a name of its own (``PeftModel.save_pretrained`` writes an adapter not
    named ``default`` into ``<name>/``: ``checkpoint-N/my_lora/adapter_config.json``),
    sorted, when the folder holds no weights of its own (no model weights, no shard, no
    adapter's), else none."""
    if hf_weights(names).name is not None or any(HF_SHARD.match(n) for n in names):
        return []
    if any(n in ADAPTER_WEIGHTS for n in names):
        return []
    return sorted(n for n in names if os.path.lexists(path / n / ADAPTER_CONFIG))


_ACCELERATE_MODEL = re.compile(r"^(model|pytorch_model)(?:_(\d+))?\.(safetensors|bin)$")
_ACCELERATE_STATE = re.compile(r"^random_states_\d+\.pkl$")


def accelerate_models(path: Path | str) -> list[Path]:
    """The models of an Accelerate ``save_state`` folder that ``path`` is one of, in
    order (``model.safetensors``, ``model_1.safetensors``, ... or ``pytorch_model.bin``,
    ``pytorch_model_1.bin``, ...: one per model given to ``prepare``), when its folder
    is one (named as a step, as Accelerate's ``checkpoint_<i>``, or holding Accelerate's
    ``random_states_<rank>.pkl``, which it writes last, and holding a first model);
    else []. The first is the checkpoint; the others are the other models of the same
    save (a second model, an EMA copy), read in its place only when the first is not
    the model ``--model`` builds."""
    path = Path(path)
    match = _ACCELERATE_MODEL.match(path.name)
    if match is None:
        return []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    if folder_step(path.parent.name) is None and not any(_ACCELERATE_STATE.match(n) for n in names):
        return []
    base, suffix = match.group(1), match.group(3)
    first = f"{base}.{suffix}"
    if first not in names:
        return []
    others = []
    for name in names:
        other = _ACCELERATE_MODEL.match(name)
        if other and other.group(2) and (other.group(1), other.group(3)) == (base, suffix):
            others.append((int(other.group(2)), name))
    return [path.parent / first, *(path.parent / n for _, n in sorted(others))]


SAFETENSORS_MAX_HEADER = 100_000_000
"""The longest safetensors header read (the safetensors library's own limit)."""

JSON_LIMIT = 64 * 2**20
"""The largest JSON side file read (``trainer_state.json``, ``config.json``, a shard index)."""

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # a pickle's first opcode: a file of torch's legacy format


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint on disk: a file, or a folder for ``hf`` / ``dcp``.

    name_step: the step its name gives (:func:`step_from_name`), or None; for a file in
    a step-named folder (``folder_step``) the folder's step, unless the file's own name
    has a ``step`` tag: a bare number in such a file's name is a rank or a shard
    (DeepSpeed's ``global_step800/mp_rank_00_model_states.pt`` is step 800, not 0;
    Accelerate's ``checkpoint_3/model_1.safetensors`` step 3).
    folder_step: for a file directly inside a subfolder of the watched directory whose
    name is a step (``checkpoint_3/``, ``step_500/``, ``global_step800/``; see
    :data:`_FOLDER_STEP`), that step; set by :func:`classify` (without a root, from the
    folder the file lies in, as ``report`` sees it). Not part of the ref's identity.
    """

    path: Path
    kind: Kind
    folder_step: int | None = field(default=None, compare=False)

    @property
    def name_step(self) -> int | None:
        name = self.path.name
        if self.kind == "hf" and not is_hf_folder_name(name):
            # a save_pretrained folder: a step-shaped name only (``step_500``), never a
            # number that names the model (``Llama-3.2-1B``, ``Qwen2.5-0.5B``)
            shaped = folder_step(name)
            return shaped if shaped is not None else _step_tag(name)
        if self.folder_step is not None and _step_tag(name) is None:
            return self.folder_step  # a bare number in the file's name is a rank, a shard
        return step_from_name(self.path)


# --------------------------------------------------------------------------- names


def is_hf_folder_name(name: str) -> bool:
    """True for a Hugging Face Trainer folder's name, ``checkpoint-<step>``."""
    return _HF_NAME.match(name) is not None


def is_pretrained_folder(path: Path | str) -> bool:
    """True for what ``save_pretrained`` writes: a folder holding ``config.json`` and
    the model's weights (a file of :data:`HF_WEIGHTS`, or shards still waiting for their
    index: :data:`HF_SHARD`; present, not necessarily complete), or a PEFT adapter's
    (``adapter_config.json`` and a file of :data:`ADAPTER_WEIGHTS`), and nothing that makes
    it something else: no subfolder (a Trainer's ``output_dir`` holds ``checkpoint-N/``
    folders beside the final model's files) and no checkpoint file of another name (a
    custom loop's folder of ``step_N.pt`` files beside a ``config.json``). No check that
    ``path`` is a folder."""
    path = Path(path)
    model = os.path.lexists(path / "config.json")
    adapter = os.path.lexists(path / ADAPTER_CONFIG)
    if not model and not adapter:
        return False
    try:
        with os.scandir(path) as entries:
            names = []
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and not is_temporary(entry.name):
                    return False
                names.append(entry.name)
    except OSError:
        return False
    weights = False
    for name in names:
        if (model and (HF_WEIGHTS_NAME.match(name) or HF_SHARD.match(name))) or (
            adapter and name in ADAPTER_WEIGHTS
        ):
            weights = True
        elif (
            os.path.splitext(name)[1].lower() in _SUFFIX_KIND
            and not SIDE_FILES.match(name)
            and not is_temporary(name)
        ):
            return False
    return weights


#: Files the HF Trainer writes into ``checkpoint-N/`` beside the model (and before its
#: trainer_state.json); a folder of that name without any is not a Trainer's.
_TRAINER_FILES = re.compile(rf"^(?:{_TRAINER_NAMES})$")


def awaits_trainer_state(path: Path | str) -> bool:
    """Whether ``path`` is a Trainer's ``checkpoint-N/`` still to get its
    ``trainer_state.json`` (the Trainer writes it last): so named, holding a file only the
    Trainer writes (``training_args.bin``, ``optimizer.pt``, ...), and no trainer state
    yet. A ``checkpoint-N/`` without Trainer files (``save_pretrained`` into such a
    name) is complete without one, as any ``save_pretrained`` folder."""
    path = Path(path)
    if not is_hf_folder_name(path.name) or os.path.lexists(path / "trainer_state.json"):
        return False
    try:
        return any(_TRAINER_FILES.match(name) for name in os.listdir(path))
    except OSError:
        return False


def folder_step(name: str) -> int | None:
    """The step a folder's name is (:data:`_FOLDER_STEP`), or None."""
    match = _FOLDER_STEP.match(name)
    return int(match.group(1)) if match else None


def step_from_name(path: Path | str) -> int | None:
    """The training step written in a checkpoint's name, or None.

    A ``step`` tag wins (``step_00420.pt`` -> 420, ``epoch=3-step=1200.ckpt`` -> 1200,
    ``global_step800`` -> 800; the last tag if several); otherwise the last integer
    of the name without its suffix (``checkpoint-500`` -> 500, ``ckpt_7.pt`` -> 7),
    never one in a metric's ``name=value`` pair (``sample-epoch=05-val_loss=1.35.ckpt``
    -> 5, its epoch, in step order as epochs are; ``val_loss=0.25.ckpt`` -> None).
    Lightning's collision suffix ``-v<n>`` is not a step (``last-v1.ckpt`` -> None), nor
    is a rank or a shard count (``mp_rank_00_model_states.pt`` -> None,
    ``ema_rank1_500.pt`` -> 500).
    """
    stem = _stem(Path(path).name)
    tagged = _step_tag(stem)
    if tagged is not None:
        return tagged
    numbers = _DIGITS.findall(_NOT_STEP.sub("", _LIGHTNING_VERSION.sub("", _no_metrics(stem))))
    return int(numbers[-1]) if numbers else None


def _no_metrics(stem: str) -> str:
    """``stem`` without its metrics' ``name=value`` pairs (:data:`NAMED_VALUE`), which
    are no step: Lightning's ``sample-{epoch:02d}-{val_loss:.2f}`` writes
    ``sample-epoch=05-val_loss=1.35``, whose last integer is the loss's 35. A pair is
    judged by the last ``_`` part of its name, and only that part goes with its value:
    ``model_epoch=3`` is an epoch (3), ``ckpt_500_loss=0.25`` keeps ``ckpt_500_``."""

    def strip(match: re.Match[str]) -> str:
        name = match.group(1)
        last = name.rsplit("_", 1)[-1]
        return match.group(0) if last.lower() in _ORDINAL_NAMES else name[: -len(last)]

    return NAMED_VALUE.sub(strip, stem)


def _stem(name: str) -> str:
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in _SUFFIX_KIND else name


def _step_tag(name: str) -> int | None:
    """The last ``step`` tag of a name (``step_420``, ``global_step800``), or None."""
    tags = _STEP_TAG.findall(_stem(name))
    return int(tags[-1]) if tags else None


def is_temporary(name: str) -> bool:
    """Whether a file or folder name marks something still being written or hidden:
    dot-names, ``*.tmp`` ``*.partial`` ``*.part`` ``*.temp`` ``*.swp`` (anywhere in the
    suffixes, e.g. ``a.tmp.pt``), ``*~``, and ``tmp-``/``temp-`` prefixed names."""
    if not name or name.startswith(".") or name.endswith("~") or _TMP_FOLDER.match(name):
        return True
    return any(s.lower() in _TEMP_SUFFIXES for s in Path(name).suffixes)


def _folder_kind(path: Path) -> Kind | None:
    """The kind of a folder checkpoint: dcp when ``.metadata`` is in it, hf when it is
    named ``checkpoint-<step>`` or holds what ``save_pretrained`` writes
    (:func:`is_pretrained_folder`). No filesystem check that ``path`` is a folder. A
    ``.metadata`` that is there but not a regular file (a FIFO, a dangling link) still
    makes a dcp folder, so that the completeness check reports it."""
    if os.path.lexists(path / ".metadata"):
        return "dcp"
    if is_hf_folder_name(path.name) or is_pretrained_folder(path):
        return "hf"
    return None


def _within(path: Path, root: Path) -> Path | None:
    try:
        return path.relative_to(root)
    except ValueError:
        return None


def classify(
    path: Path | str, root: Path | str | None = None, *, named: bool = False
) -> CheckpointRef | None:
    """The checkpoint ``path`` is, or None when it is not one.

    Files are recognised by suffix (they need not exist, so a vanished path can still be
    classified); folders must exist (hf by name, dcp by their ``.metadata``).

    root: the watched directory ``path`` lies in. With a root, every folder between
    the root and ``path`` is considered: anything inside a dot-directory, a temporary
    folder or an hf/dcp checkpoint folder is not a checkpoint of its own, and a symlink
    pointing back into the root is an alias, not a checkpoint. Without one only the
    immediate parent folder is considered (so ``ddsmon report ~/.cache/x.pt`` works).

    named: the user named this file (``report``): the other models of an Accelerate
    save (``checkpoint_3/model_1.safetensors``, see :func:`accelerate_models`) are
    checkpoints then.
    """
    path = Path(path)
    name = path.name
    rel: Path | None = None
    if root is not None:
        root = Path(root)
        rel = _within(path, root)
        if rel is None or not rel.parts:
            return None
        folders = [root.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
        if any(is_temporary(f.name) for f in folders):
            return None
        if any(_folder_kind(f) is not None for f in folders):
            return None
        # Path.is_symlink (lstat) raises where ``path``'s own folder cannot be searched:
        # the watcher takes that PermissionError as "this folder cannot be read" and
        # lists it again until it can (a root made unreadable for a while)
        if path.is_symlink() and _points_into(path, root):
            return None
    elif _folder_kind(path.parent) is not None and path.parent != path:
        return None
    if is_temporary(name):
        return None
    if os.path.isdir(path):  # False where a link's target cannot be looked up (an r-- folder)
        kind = _folder_kind(path)
        return CheckpointRef(path, kind) if kind is not None else None
    file_kind = _SUFFIX_KIND.get(path.suffix.lower())
    if file_kind is None or SIDE_FILES.match(name) or HF_SHARD.match(name):
        return None
    if name in ADAPTER_WEIGHTS and not os.path.lexists(path.parent / ADAPTER_CONFIG):
        return None  # a PEFT adapter's weights, read once peft has written its config
    # model_1 of an Accelerate save (a subfolder of the root: never a file directly in
    # the root, so that a flat folder of model_<N> files costs no listing per file)
    if rel is not None and len(rel.parts) > 1 and not named:
        models = accelerate_models(path)
        if models and models[0] != path:
            return None
    if rel is not None:  # a file directly in a subfolder of the root takes its step
        stepped_by = _step_of_folder(rel.parts[0], name) if len(rel.parts) == 2 else None
    else:  # report: the folder it lies in, as scan and watch would see it
        stepped_by = _step_of_folder(path.parent.name, name)
    return CheckpointRef(path, file_kind, stepped_by)


def _step_of_folder(folder: str, name: str) -> int | None:
    """The step a file named ``name`` takes from the ``folder`` it lies in: the
    folder's own when its name is a step (:data:`_FOLDER_STEP`); else the folder's
    ``step`` tag, when the file's name has no step of its own. Lightning splits a
    filename template at a ``/`` in a metric's name: ``"{epoch}-{step}-{val/loss:.3f}"``
    saves ``epoch=0-step=4-val/loss=1.377.ckpt``, whose step is its folder's."""
    shaped = folder_step(folder)
    if shaped is not None:
        return shaped
    return _step_tag(folder) if step_from_name(name) is None else None


def _points_into(link: Path, root: Path) -> bool:
    try:
        target = link.resolve()
        real_root = root.resolve()
    except (OSError, RuntimeError):
        return False
    return target == real_root or real_root in target.parents


def checkpoint_for(path: Path | str, root: Path | str, *, depth: int = 2) -> CheckpointRef | None:
    """The checkpoint a changed ``path`` under ``root`` belongs to, or None.

    That is the hf/dcp folder holding it (``checkpoint-500/model.safetensors`` ->
    ``checkpoint-500/``; ``step9/.metadata`` -> ``step9/``), else ``path`` itself when it
    is a checkpoint no deeper than ``depth`` levels below the root (the depth
    :func:`discover` looks at); a PEFT ``adapter_config.json`` outside such a folder maps
    to the adapter weights beside it (a Trainer's final ``save_model`` into the watched
    folder). Used by the watcher to map filesystem events.
    """
    path, root = Path(path), Path(root)
    rel = _within(path, root)
    if rel is None or not rel.parts:
        return None
    for i in range(1, min(len(rel.parts), depth + 1)):
        folder = root.joinpath(*rel.parts[:i])
        if is_temporary(folder.name):
            return None
        if _folder_kind(folder) is not None:
            return classify(folder, root)
    if len(rel.parts) > depth:
        return None
    if path.name == ADAPTER_CONFIG:  # written after the adapter's weights, which it completes
        for weights in ADAPTER_WEIGHTS:
            if os.path.lexists(path.parent / weights):
                return classify(path.parent / weights, root)
    return classify(path, root)


def excluded(path: Path | str, root: Path | str, patterns: Sequence[str]) -> bool:
    """Whether the checkpoint at ``path`` (below ``root``) is left out by one of
    ``patterns`` (``--exclude``): shell globs (:func:`fnmatch.fnmatchcase`, ``*`` also
    across ``/``) matched against its path relative to ``root`` (``run1/ema_10.pt``,
    ``/``-separated) and against its name alone (``ema_*``). A path not below ``root``
    is matched by its name."""
    if not patterns:
        return False
    path = Path(path)
    rel = _within(path, Path(root))
    names = [path.name] if rel is None else [rel.as_posix(), path.name]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def discover(directory: Path | str, exclude: Sequence[str] = ()) -> list[CheckpointRef]:
    """The checkpoints in ``directory`` now: its entries and those of its subfolders
    (one level), sorted by :func:`step_from_name` (unnumbered last), then by path;
    none that ``exclude`` leaves out (:func:`excluded`).

    Raises ConfigError when ``directory`` is not a directory. Entries that vanish
    while the directory is listed are skipped.
    """
    directory = Path(directory)
    try:
        is_folder = directory.is_dir()
    except PermissionError:
        raise ConfigError(
            f"{directory}: permission denied looking it up (a folder above it cannot be searched)"
        ) from None
    if not is_folder:
        raise ConfigError(f"{directory}: not a directory (checkpoint directory to watch)")
    try:
        names = _listdir(directory, refuse=True)
    except UnsearchableFolder:
        raise ConfigError(
            f"{directory}: permission denied reading the checkpoint directory's entries "
            "(it can be listed but not searched: no execute permission)"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{directory}: permission denied listing the checkpoint directory"
        ) from None
    found: list[CheckpointRef] = []
    for entry in names:
        path = directory / entry
        ref = classify(path, directory)
        if ref is not None:
            found.append(ref)
        elif not is_temporary(entry) and os.path.isdir(path) and not os.path.islink(path):
            found.extend(
                sub for name in _listdir(path) if (sub := classify(path / name, directory))
            )
    if exclude:
        found = [ref for ref in found if not excluded(ref.path, directory, exclude)]
    return sorted(found, key=_order)


def linked_folders(directory: Path | str) -> list[tuple[Path, Path]]:
    """The symbolic links to folders in ``directory`` that :func:`discover` does not
    look into (a link is followed to a checkpoint folder, never into a folder of
    checkpoints: it may lead back up the tree, and the watcher's events do not follow
    it) and that hold checkpoints: ``(link, target)`` each, to say so."""
    directory = Path(directory)
    found = []
    for entry in _listdir(directory):
        path = directory / entry
        if is_temporary(entry) or not os.path.islink(path) or not os.path.isdir(path):
            continue
        if classify(path, directory) is not None:
            continue  # a linked checkpoint folder: read
        try:
            target = path.resolve()
        except (OSError, RuntimeError):
            continue
        root = directory.resolve()
        if target == root or target in root.parents or target.is_relative_to(root):
            continue  # the tree's own folder (read under its own name) or one above it
        try:
            if discover(target):
                found.append((path, target))
        except ConfigError:
            continue
    return found


_ZERO3_PARTITION = re.compile(rf"^{_ZERO3_NAMES}$")


def where_checkpoints_are(directory: Path | str, limit: int = 3) -> str | None:
    """Why :func:`discover` found nothing in ``directory``, when a look below says so;
    else None. Two layouts: checkpoints a level deeper than discover looks (Accelerate's
    ``project_dir`` holds them in ``checkpoints/checkpoint_<i>/``: watch
    ``project_dir/checkpoints``), up to ``limit`` such folders named; DeepSpeed ZeRO-3
    partitions alone (``zero_pp_rank_<r>_mp_rank_00_model_states.pt``), which hold no
    whole weights."""
    directory = Path(directory)
    deeper: list[Path] = []
    zero3 = False
    for entry in _listdir(directory):
        sub = directory / entry
        if is_temporary(entry) or not os.path.isdir(sub) or os.path.islink(sub):
            continue
        for name in _listdir(sub):
            zero3 = zero3 or bool(_ZERO3_PARTITION.match(name))
            inner = sub / name
            if not is_temporary(name) and os.path.isdir(inner) and not os.path.islink(inner):
                zero3 = zero3 or any(_ZERO3_PARTITION.match(n) for n in _listdir(inner))
                if len(deeper) < limit and sub not in deeper and discover(inner):
                    deeper.append(sub)
    if deeper:
        shown_dirs = ", ".join(str(d) for d in deeper)
        return (
            f"no checkpoint directly in {directory} or its subfolders, but there are "
            f"some one level deeper: watch {shown_dirs} instead"
        )
    if zero3:
        return (
            f"{directory} holds DeepSpeed ZeRO-3 partitions only "
            "(zero_pp_rank_*_model_states.pt), which hold no whole weights: write a file "
            "ddsmon can read with DeepSpeed's zero_to_fp32.py, or save with "
            "stage3_gather_16bit_weights_on_model_save"
        )
    return None


def _order(ref: CheckpointRef) -> tuple[bool, int, str]:
    step = ref.name_step
    return (step is None, step or 0, str(ref.path))


#: Each folder that could not be read, with the message last said of it.
_UNLISTABLE: dict[str, str] = {}


class UnsearchableFolder(PermissionError):
    """A folder that can be listed but not searched (read without execute permission,
    ``r--``): every entry's ``lstat`` fails with EACCES, so nothing in it can be read."""


def list_folder(folder: Path) -> list[str]:
    """The sorted names in ``folder``, each of which can be looked up.

    Raises what :func:`os.listdir` raises (FileNotFoundError when it is gone,
    PermissionError when it cannot be listed, another OSError for an I/O error), and
    :class:`UnsearchableFolder` when it can be listed but not searched (its first
    entry's ``lstat`` is refused; an entry gone meanwhile says nothing).
    """
    names = sorted(os.listdir(folder))
    if names:
        try:
            os.lstat(folder / names[0])
        except PermissionError as exc:
            raise UnsearchableFolder(exc.errno, exc.strerror, str(folder)) from exc
        except OSError:
            pass
    return names


def _say_unreadable(directory: Path, message: str, exc: OSError) -> None:
    """Log ``message`` (``%s`` the folder, then the reason) once per folder and message,
    until the folder is listed again (:func:`_listdir`): a folder that could not be
    listed and then could but not be searched (``---`` then ``r--``) is said both times."""
    if _UNLISTABLE.get(str(directory)) != message:
        _UNLISTABLE[str(directory)] = message
        log.warning(message, shown(directory), shown(exc.strerror or exc))


def _listdir(directory: Path, refuse: bool = False) -> list[str]:
    """The sorted names in ``directory`` (:func:`list_folder`); [] when it is gone, or
    cannot be listed or searched (said once per folder until it is listed again: its
    checkpoints cannot be read, and a shared cluster's folder of another user's, or a
    network filesystem's I/O error, is no reason to stop). ``refuse``: a permission
    refused (PermissionError, :class:`UnsearchableFolder`) is raised instead."""
    try:
        names = list_folder(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except UnsearchableFolder as exc:
        if refuse:
            raise
        _say_unreadable(
            directory,
            "cannot read the entries of %s (%s: it can be listed but not searched, no "
            "execute permission): checkpoints in it are not read",
            exc,
        )
        return []
    except OSError as exc:
        if refuse and isinstance(exc, PermissionError):
            raise
        _say_unreadable(directory, "cannot list %s (%s): checkpoints in it are not read", exc)
        return []
    _UNLISTABLE.pop(str(directory), None)  # listed again: a later failure is said again
    return names


# --------------------------------------------------------------------------- safe reads


class RefusedFile(OSError):
    """A file ddsmon will not read, and why (``reason``): not a regular file (a FIFO, a
    device, a socket, a directory), a dangling symbolic link, not readable, or larger
    than its format allows."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


_FILE_TYPES = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISDIR, "directory"),
)


def _not_regular(path: str | os.PathLike[str], mode: int) -> RefusedFile:
    what = next((name for test, name in _FILE_TYPES if test(mode)), "not a plain file")
    if os.path.islink(path):
        what += f", through the symbolic link to {os.path.realpath(path)}"
    return RefusedFile(path, f"not a regular file ({what})")


def _refused_os_error(path: str | os.PathLike[str], exc: OSError) -> OSError:
    """The RefusedFile an OSError of stat/open means, or the error itself (missing...)."""
    if isinstance(exc, PermissionError):
        return RefusedFile(path, "permission denied (cannot be opened for reading)")
    if exc.errno == errno.ELOOP:
        return RefusedFile(path, "a loop of symbolic links")
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            return exc
        return RefusedFile(path, f"dangling symbolic link (to {target!r}, which does not exist)")
    return exc


def stat_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat(path)`` (symbolic links resolved) when it is a regular file.

    Raises RefusedFile (not a regular file, a dangling link, permission denied, a loop of
    links), FileNotFoundError when nothing is there, another OSError otherwise.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _refused_os_error(path, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """Open ``path`` for binary reading, only if it is a regular file (after symlinks).

    Checked twice: with ``os.stat`` before opening (so no device or FIFO is ever
    opened), then with ``fstat`` on the open descriptor (so a file swapped for a FIFO in
    between is refused too). The open is ``O_NONBLOCK``, so it never waits for a FIFO's
    writer. Raises as :func:`stat_regular`.
    """
    stat_regular(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _refused_os_error(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def read_regular(path: str | os.PathLike[str], limit: int = JSON_LIMIT) -> bytes:
    """The bytes of the regular file ``path``, refused (RefusedFile) when it holds more
    than ``limit`` bytes. Raises as :func:`open_regular`."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise RefusedFile(
                path, f"{size} bytes, more than the {_mib(limit)} ddsmon reads of such a file"
            )
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise RefusedFile(path, f"grew past {_mib(limit)} while it was read")
    return data


# --------------------------------------------------------------------------- fingerprints


def fingerprint(ref: CheckpointRef) -> tuple[int, int]:
    """``(size, mtime_ns)`` of the checkpoint: of the file, or for a folder the total
    size of its files and the latest mtime of anything in it (files and subfolders,
    so an added or removed file changes it too).

    Raises FileNotFoundError (an OSError) when the checkpoint is gone; files that
    vanish while a folder is walked are skipped.
    """
    st = os.stat(ref.path)
    if ref.kind not in ("hf", "dcp"):
        return st.st_size, st.st_mtime_ns
    size, mtime = 0, st.st_mtime_ns
    for folder, dirs, files in os.walk(ref.path):
        for name in dirs + files:
            try:
                sub = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            mtime = max(mtime, sub.st_mtime_ns)
            if name in files:
                size += sub.st_size
    return size, mtime


# --------------------------------------------------------------------------- completeness


def check_complete(ref: CheckpointRef) -> str | None:
    """None when the checkpoint is complete, else the reason in words (see the module
    docstring for the check of each kind). Never raises for a bad or missing file, never
    blocks (only regular files are opened) and reads a bounded amount."""
    try:
        if ref.kind in ("torch", "lightning"):
            return _check_torch_zip(ref.path)
        if ref.kind == "safetensors":
            return _check_safetensors(ref.path)
        if ref.kind == "hf":
            return _check_hf(ref.path)
        if ref.kind == "dcp":
            return _check_dcp(ref.path)
        return f"unknown checkpoint kind {ref.kind!r} (expected one of {KINDS})"
    except RefusedFile as exc:
        if exc.path == ref.path:
            return exc.reason
        return f"{exc.path.name}: {exc.reason}"
    except FileNotFoundError:
        return "vanished (no such file or folder)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"


def zip_listing_problem(handle: BinaryIO, size: int) -> str | None:
    """None when the open torch zip ``handle`` (``size`` bytes) has a consistent central
    directory whose members end before it, none compressed (see
    :func:`compressed_member`), and a ``data.pkl``; else the reason. Reads only the
    zip's directory records. A file of torch's legacy format (it starts with a pickle)
    is checked by :func:`legacy_torch_problem`."""
    handle.seek(0)
    head = handle.read(4)
    if head[:1] == _PICKLE_PROTO:
        return legacy_torch_problem(handle, size)
    if head != _ZIP_MAGIC:
        return "not a torch file (neither a zip archive nor torch's legacy format)"
    try:
        with zipfile.ZipFile(handle) as zf:
            infos = zf.infolist()
            start_dir = getattr(zf, "start_dir", size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        # NotImplementedError: a record claiming a zip version or feature zipfile lacks
        return (
            f"no valid zip end-of-central-directory record ({exc}); "
            f"still being written or truncated at {size} bytes"
        )
    for info in infos:
        if info.header_offset + info.compress_size > start_dir:
            return f"zip member {info.filename!r} runs past the central directory (truncated?)"
    reason = compressed_member(infos)
    if reason is not None:
        return reason
    if not any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
        return "zip archive without data.pkl (not a torch.save file)"
    return None


class _Stub:
    """What a class or function named in a legacy file's pickles unpickles to here: a
    stand-in that takes any arguments and state, so that the pickles are walked
    without importing or running anything they name."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _Walker(pickle._Unpickler):
    """An unpickler that builds stubs (:class:`_Stub`) for every global and records the
    persistent ids (a legacy file's storages) instead of loading them.

    Python's own (pure) unpickler, whose memo is a dict: the C one grows its memo to
    twice any index a PUT names, so a 10-byte file asked for gigabytes. Its memory is
    bounded by the bytes walked (:data:`_LEGACY_PICKLES_LIMIT`)."""

    def __init__(self, handle: BinaryIO, storages: list[tuple[object, ...]]) -> None:
        super().__init__(handle)
        self.memo: dict[int, object] = {}
        self.storages = storages

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Stub,), {})

    def persistent_load(self, pid: object) -> None:
        if isinstance(pid, tuple):
            self.storages.append(pid)


#: Bytes per element of the storage types a legacy torch file names.
_LEGACY_ELEMENT = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
    "ByteStorage": 1, "BoolStorage": 1, "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8, "QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4,
}  # fmt: skip
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
#: The most of a legacy file's start its pickles are walked in (a model's object pickle
#: is about a hundred bytes a tensor: 8 MiB is some 80000 tensors); past it, the check is
#: left to the load.
_LEGACY_PICKLES_LIMIT = 8 * 2**20


def legacy_torch_problem(handle: BinaryIO, size: int) -> str | None:
    """None when the open ``handle`` (``size`` bytes) is a whole file of torch's legacy
    format, ``torch.save(..., _use_new_zipfile_serialization=False)`` (torch before 1.6
    wrote nothing else); else the reason.

    The format (``torch.serialization._legacy_save``): five pickles (the magic number
    ``0x1950a86a20f9469cfc6c``, the protocol version, the system's sizes, the object,
    whose tensors name their storages by persistent id ``('storage', type, key,
    location, numel, ...)``, and the list of storage keys), then each storage in that
    order as an 8-byte element count and its bytes. Complete means every pickle ends
    and the storages end exactly at ``size``. The pickles are walked with stubs for every
    class they name (:class:`_Walker`: nothing is imported or run); the storages are
    skipped, not read. A storage of a type not in :data:`_LEGACY_ELEMENT`, or pickles
    longer than :data:`_LEGACY_PICKLES_LIMIT`, leave the file unchecked (its load decides).
    """
    handle.seek(0)
    head = io.BytesIO(handle.read(_LEGACY_PICKLES_LIMIT))  # no pickle reads past it
    storages: list[tuple[object, ...]] = []
    try:  # one unpickler a pickle, as torch loads them (a memo is a pickle's own)
        if _Walker(head, storages).load() != _LEGACY_MAGIC_NUMBER:
            return "not a torch file (a pickle, not torch's legacy format)"
        for _ in range(3):  # the protocol version, the system's sizes, the object
            _Walker(head, storages).load()
        keys = _Walker(head, storages).load()
    except Exception as exc:  # a pickle cut short raises EOFError or UnpicklingError
        if size > _LEGACY_PICKLES_LIMIT:
            return None  # pickles this long are not walked here: its load decides
        return f"torch legacy file cut short or damaged at {size} bytes ({type(exc).__name__})"
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return "torch legacy file without its list of storages"
    element: dict[str, int] = {}
    for pid in storages:
        if len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
            if not isinstance(pid[2], str):
                return "torch legacy file whose storages are not named by strings (damaged)"
            width = _LEGACY_ELEMENT.get(getattr(pid[1], "__name__", ""))
            if width is None:
                return None  # a type this check does not know: its load decides
            element[pid[2]] = width
    offset = head.tell()
    for key in keys:
        handle.seek(offset)
        count = handle.read(8)
        if len(count) < 8:
            return f"torch legacy file cut short at {size} bytes (storage {key!r} missing)"
        width = element.get(key)
        if width is None:
            return None  # a storage no tensor named: its load decides
        offset += 8 + width * int.from_bytes(count, "little")
    if offset != size:
        return f"torch legacy file of {size} bytes, its storages end at {offset}" + (
            " (still being written or truncated)" if offset > size else ""
        )
    return None


def compressed_member(infos: list[zipfile.ZipInfo]) -> str | None:
    """The reason to refuse a torch zip with a compressed member, else None.

    torch.save stores members uncompressed, so reading one is bounded by the file's
    size; a compressed member would be inflated to the size its header declares,
    whatever the file's size (a zip bomb), so it is refused.
    """
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            return (
                f"zip member {info.filename!r} is compressed ({info.compress_size} bytes "
                f"stored, {info.file_size} declared); torch.save never compresses"
            )
    return None


def _check_torch_zip(path: Path) -> str | None:
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return "empty file (0 bytes)"
        return zip_listing_problem(handle, size)


def _check_safetensors(path: Path) -> str | None:
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "empty file (0 bytes)"
        if size < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        (n,) = struct.unpack("<Q", f.read(8))
        if n > SAFETENSORS_MAX_HEADER:
            return f"header length {n} is implausible (not a safetensors file?)"
        if 8 + n > size:
            return f"header of {n} bytes runs past the end of the file ({size} bytes): truncated"
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "header is not valid JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            return f"tensor {key!r} has no valid data_offsets in the header"
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size < expected:
        return (
            f"{size} bytes, expected {expected} (8 + header {n} + data {end}): "
            "truncated or still being written"
        )
    if size > expected:
        return f"{size} bytes, expected {expected} (8 + header {n} + data {end}): trailing bytes"
    return None


def _check_json(path: Path) -> tuple[object, str | None]:
    if not os.path.lexists(path):
        return None, f"no {path.name} yet"
    try:
        return json.loads(read_regular(path, JSON_LIMIT).decode("utf-8")), None
    except FileNotFoundError:
        return None, f"no {path.name} yet"
    except (UnicodeDecodeError, ValueError):
        return None, f"{path.name} is not valid JSON (still being written?)"


def _check_folder(path: Path) -> str | None:
    if os.path.isdir(path):
        try:
            list_folder(path)
        except UnsearchableFolder:
            return "permission denied: the folder can be listed but not searched (no execute permission)"
        except PermissionError:
            return "permission denied listing the folder"
        except OSError:
            return None  # gone meanwhile, or an I/O error: the checks after this say it
        return None
    return "vanished (no such folder)" if not os.path.lexists(path) else "not a folder"


def _check_hf(path: Path) -> str | None:
    reason = _check_folder(path)
    if reason is not None:
        return reason
    trainer_state = path / "trainer_state.json"
    reason = None
    if os.path.lexists(trainer_state) or awaits_trainer_state(path):
        _, reason = _check_json(trainer_state)
    elif os.path.lexists(path / "config.json"):  # save_pretrained: config.json, then weights
        _, reason = _check_json(path / "config.json")
        reason = None if reason is None else f"config.json: {reason}"
    if reason is not None:
        return reason
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return "vanished (no such folder)"
    chosen = hf_weights(names)
    if chosen.problem is not None:
        return chosen.problem
    adapter = adapter_weights(names)
    if adapter is not None:  # peft writes its adapter_config.json after the weights
        _, reason = _check_json(path / ADAPTER_CONFIG)
        if reason is not None:
            return reason
        reason = _check_weights_file(path / adapter)
        return f"{adapter}: {reason}" if reason else None
    if chosen.name is not None:
        weights = path / chosen.name
        if chosen.name.endswith(".json"):
            return _check_shards(path, weights)
        reason = _check_weights_file(weights)
        return f"{chosen.name}: {reason}" if reason else None
    if _has_shards(path):
        return SHARDS_WITHOUT_INDEX
    named = named_adapters(path, names)
    if len(named) == 1:  # peft writes the adapter's weights, then its config
        try:
            inside = os.listdir(path / named[0])
        except (FileNotFoundError, NotADirectoryError):
            return f"{named[0]}/ vanished"
        adapter = adapter_weights(inside)
        if adapter is None:
            return f"{named[0]}/: {ADAPTER_CONFIG} without the adapter's weights"
        reason = _check_weights_file(path / named[0] / adapter)
        return f"{named[0]}/{adapter}: {reason}" if reason else None
    if named:
        return None  # read, and refused with what it holds
    if FSDP_SHARDED in names:  # FSDP's sharded state dict: its .metadata is written last
        reason = _check_dcp(path / FSDP_SHARDED)
        return f"{FSDP_SHARDED}/: {reason}" if reason else None
    return (
        f"no weights file (looked for {', '.join(HF_WEIGHTS)}, or a variant of one: "
        f"model.<variant>.safetensors ..., or a PEFT adapter's {' / '.join(ADAPTER_WEIGHTS)}, "
        f"or FSDP's sharded {FSDP_SHARDED}/)"
    )


def _has_shards(path: Path) -> bool:
    try:
        return any(HF_SHARD.match(name) for name in os.listdir(path))
    except OSError:
        return False


def _check_weights_file(weights: Path) -> str | None:
    try:
        if weights.suffix == ".safetensors":
            return _check_safetensors(weights)
        return _check_torch_zip(weights)
    except RefusedFile as exc:
        return exc.reason


def _check_shards(folder: Path, index_file: Path) -> str | None:
    index, reason = _check_json(index_file)
    if reason is not None:
        return reason
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return f"{index_file.name} has no weight_map"
    for shard in sorted({str(v) for v in weight_map.values()}):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            return f"{index_file.name} names a shard outside the folder: {shard!r}"
        if not os.path.lexists(folder / shard):
            return f"shard {shard} named in {index_file.name} is missing"
        reason = _check_weights_file(folder / shard)
        if reason is not None:
            return f"{shard}: {reason}"
    return None


def _check_dcp(path: Path) -> str | None:
    reason = _check_folder(path)
    if reason is not None:
        return reason
    metadata = path / ".metadata"
    if not os.path.lexists(metadata):
        return "no .metadata yet (still being written)"
    with open_regular(metadata) as handle:  # a regular file ddsmon may open
        if os.fstat(handle.fileno()).st_size == 0:
            return ".metadata is empty (still being written)"
    return None
