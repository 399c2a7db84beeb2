"""Load models, checkpoints and probes safely.

Modules: ``factories`` (``MODULE:NAME`` specs), ``probes`` (the probe batch),
``checkpoint`` (``load_checkpoint``, dispatching on the kind), ``file_formats`` (torch
and safetensors files), ``huggingface`` and ``dcp`` (the two folder kinds), ``adapters``
(a PEFT adapter put into its model with peft's API, for Hugging Face folders holding
one), ``key_matching`` (finding the state dict and matching its keys), ``step_and_meta``,
``loaded`` (the result, and building the model from its factory), ``wording`` (errors).

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
trust only files you wrote yourself. safetensors and JSON files hold no code. A file
refused under ``weights_only`` is reported with the globals its pickle would import
(``posix.system``...), read from its opcodes, never run.

Only regular files are read (:func:`ddsmon.checkpoints.open_regular`): a FIFO, a
device (a link to ``/dev/zero``), a socket, a directory, a dangling link or a file
that cannot be opened is refused by name before anything is read, and nothing blocks.
Reads are bounded by the format: JSON side files by ``JSON_LIMIT`` (64 MiB),
safetensors headers by 100 MB, tensor data by the header's offsets, DCP data files by
the slices ``.metadata`` gives (checked against their sizes first), and a torch zip
with a compressed member is refused. Where a model is given, its keys and shapes are
matched *before* any tensor data is read: from the safetensors header, from the torch
zip unpickled onto the ``meta`` device, from DCP's ``.metadata``; then only the
tensors the model takes are read (a torch file is read whole on CPU, not
memory-mapped, so a writer truncating it cannot crash the reader with SIGBUS).

Finding the state dict
----------------------
A checkpoint's *candidates* are the tensor-valued entries of its top level and of
every mapping (or pickled module, when trusted) below it, reached first through the
usual container keys ``state_dict``, ``model_state_dict``, ``model``, ``module``
(Lightning: ``{"state_dict": {"model.0.weight": ...}}``), then through any other key,
three levels deep at most; and, where two or more keys of one mapping hold state dicts
(``{"encoder": enc.state_dict(), "decoder": dec.state_dict()}``: a model saved by its
parts), those together, each key under its key's name, matched with no prefix stripped
(so only a model whose keys are exactly theirs). Lists and tuples are not searched; a
checkpoint with no candidate is an error saying what it holds instead (an optimizer's
state, a bare tensor, a list or tuple). Keys are matched to the model's after dropping
``_orig_mod.`` segments (``torch.compile``) on both sides and stripping one *prefix*
``P`` from the checkpoint's keys: ``P`` is chosen among the checkpoint keys' dotted
heads (``module.``, ``model.``, ``model.module.`` ...) to maximise the number of model
keys ``k`` with ``P + k`` present, so a prefix is stripped only when doing so makes
keys match (ties: wrapper names such as ``model``/``module`` first, then the shortest).
Keys of the candidate that start with ``P`` but are not the model's are *unexpected*;
keys outside ``P`` belong to something else (a Lightning module's loss, an EMA copy)
and are ignored. The first candidate with no missing, unexpected or mis-shaped key is
loaded; otherwise the error reports the candidate that matched most keys.
``LoadedCheckpoint.source`` says which was loaded, the prefix stripped and what was
ignored beside it, by dotted head (``'ema_model.' 4 keys, the model's keys again``),
and any other candidate that matched as well. Where the
choice is a guess (two prefixes made of other names match equally well, or the model
matches under two keys that are not container keys: ``student``/``teacher``), the
error says so rather than loading either. A missing
key is excused only when it is tied to (shares its tensor with) a key that is present,
as Hugging Face checkpoints omit tied weights. Where the model is a transformers
``PreTrainedModel`` (built from config.json or returned by the factory) and no
candidate matches, each is tried again with its keys renamed by the model's
conversion mapping, as ``from_pretrained`` renames them (transformers 5's ViT).

Step, meta and trainer log
--------------------------
``step``: the checkpoint's own top-level ``step``, ``global_step`` or ``iteration`` (a
non-negative integer or an integral 0-dim tensor), in that order; for a Hugging Face
folder ``trainer_state.json``'s ``global_step``; else ``None`` (the caller falls back
to the number in the name). ``meta``: the checkpoint's own scalars, at its step: every
top-level real scalar (``val_acc``, ``epoch``, ``loss`` ...; booleans excluded) as a
float, and the numeric strings of a safetensors file's ``__metadata__``; for Hugging
Face, ``trainer_state.json``'s ``epoch`` and ``best_metric`` and the ``log_history``
entries logged at the checkpoint's own step; for a Lightning ``.ckpt``, the score each
``ModelCheckpoint`` monitors (its saved ``current_score``) and the ``name=value`` pairs
of the file's name (``epoch=2-step=24-val_loss=0.61.ckpt``; all that
``save_weights_only`` leaves). A tensor of the state dict is never a
scalar: where the state dict is the top level (``torch.save(model.state_dict())``),
only its dotless 0-dim tensors that are not the model's (``step``, ``val_acc``) may be,
so a one-output layer's ``4.bias`` or an EMA copy's ``ema_model.4.bias`` is not; and no
key naming one of the model's keys is, anywhere. ``trainer_log``: every
``log_history`` entry with an integral ``step``, at that step (``logging_steps``
need not divide ``save_steps``), numbers only, one entry per step, in step order.
"""

from ddsmon.loading.checkpoint import builds_its_model, checkpoint_step, load_checkpoint
from ddsmon.loading.factories import resolve_callable, resolve_factory
from ddsmon.loading.loaded import (
    CHECKPOINT_KINDS,
    VANISHED,
    CheckpointLike,
    LoadedCheckpoint,
    TrainerLogEntry,
)
from ddsmon.loading.probes import load_probe

__all__ = (
    "CHECKPOINT_KINDS",
    "VANISHED",
    "CheckpointLike",
    "LoadedCheckpoint",
    "TrainerLogEntry",
    "builds_its_model",
    "checkpoint_step",
    "load_checkpoint",
    "load_probe",
    "resolve_callable",
    "resolve_factory",
)
