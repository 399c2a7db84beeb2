"""One probe pass: capture every selected layer's outputs X and per-sample gradients Delta.

For each selected module ``l`` with output ``h_l`` of shape (n, ..., d):

* ``X_l`` (N x d): the output with all leading axes flattened into rows
  (N = n, or n*T with a position axis);
* ``Delta_l`` (N x d): ``d (sum_i loss_i) / d h_l``. Samples do not interact in eval
  mode, so row block i is exactly ``d loss_i / d h_{l,i}`` (the per-sample gradient);
* ``A_l`` (N x d_in): the module's input, kept only where the parameter-side Gram is
  built from structure (a structured strategy of :mod:`ddsmon.param_gram`: Linear,
  Embedding, Conv1D, or one a user registered); (N,) for integer inputs (token ids).

A pass (:class:`ProbePass`) is ONE forward and ONE ``torch.autograd.grad`` call over
the summed per-sample loss of the samples it is given, with respect to the captured
outputs only: parameters get no ``.grad``, and the forward pass builds no graph for
weight gradients (their ``requires_grad`` is off during the pass). Because row block i
of Delta depends on sample i alone, the probe may be cut into micro-batches of samples
and each read by its own pass (:mod:`ddsmon.streaming`): the rows are the same. A
module that is an output of the selection but whose output does not require grad (the
first layer read, frozen earlier layers, integer inputs) is re-rooted as a fresh leaf
so its gradient exists (downstream gets a copy, which an in-place op may change).
``backward=False`` runs a forward pass only, with no graph.

The pass keeps the per-sample losses it differentiates, ``loss_i`` (n,) detached
(:attr:`ProbePass.losses`; :class:`ProbeRun` of :func:`run_probe_pass`), and the
*output layer*: the last selected module to run in the forward pass, the one nearest
the loss (the logits' Linear of a plain model), which carries the model-level
readings made of the losses (``loss_spread``, :func:`ddsmon.signature.loss_spread`).
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized

from ddsmon.errors import ProbeError

__all__ = (
    "CHANNEL_FIRST",
    "READ_WHOLE",
    "LayerCapture",
    "PassMode",
    "ProbePass",
    "ProbeRun",
    "RetryPass",
    "default_leaves",
    "feature_rows",
    "model_output",
    "probe_batch_size",
    "run_probe_pass",
    "select_layers",
    "slice_batch",
)

log = logging.getLogger(__name__)

#: Leaf modules the default selection skips: in eval mode they repeat their input.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)

#: Modules read whole, as leaves: their children never run as modules of their own
#: (``nn.MultiheadAttention`` reads ``out_proj.weight`` inside its functional forward,
#: so a hook on ``out_proj`` never fires). Their parameter-side Gram is of all their
#: parameters, the children's included (:func:`ddsmon.param_gram.own_parameters`).
READ_WHOLE: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


#: Modules whose outputs (n, C, *spatial) hold their features on axis 1, the channels:
#: their X and Delta rows are (sample, spatial position) pairs, sample-major, and d = C
#: (for a 2-D output (n, C) that is the last axis anyway). Subclasses (the lazy
#: variants, ``SyncBatchNorm``) included.
CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
    nn.LocalResponseNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
)  # fmt: skip

#: Modules that pad the trailing (spatial) axes and so keep their input's layout,
#: though not its shape: channel-first when handed a channel-first tensor (the
#: ``ReflectionPad2d`` between a ReLU and a Conv of a pix2pix / CycleGAN residual block).
_KEEPS_LAYOUT: tuple[type[nn.Module], ...] = (
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd,
)  # fmt: skip

#: Modules that act on the last axis whatever their input's layout.
_LAST_AXIS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag,
    nn.MultiheadAttention, nn.RNNBase, nn.Flatten, nn.Unflatten,
)  # fmt: skip


def _parametrizations(module: nn.Module) -> nn.Module | None:
    """The ``parametrizations`` ModuleDict of a module reparametrised by
    ``torch.nn.utils.parametrize`` (``weight_norm``, ``spectral_norm``, ``orthogonal``),
    else None. Its modules compute the weight, not the layer's output."""
    found = getattr(module, "parametrizations", None)
    return found if isinstance(found, nn.ModuleDict) and is_parametrized(module) else None


def _never_run_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of the modules that never run as layers of their own: a
    reparametrised module's ``parametrizations`` (``"fc.parametrizations."``: their
    outputs are the weight) and the children of a :data:`READ_WHOLE` module
    (``"attn.out_proj."``: ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside its
    functional forward). A module named ``name`` is inside when ``name + "."`` starts
    with one of them."""
    prefixes: list[str] = []
    for name, m in model.named_modules():
        dotted = f"{name}." if name else ""
        if _parametrizations(m) is not None:
            prefixes.append(f"{dotted}parametrizations.")
        if isinstance(m, READ_WHOLE):
            prefixes.extend(f"{dotted}{child}." for child, _ in m.named_children())
    return prefixes


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(f"{name}.".startswith(p) for p in prefixes)


def default_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules the default selection hooks, in model order: leaf modules (pass-
    throughs excepted), where a module whose only children are its parametrizations
    (``weight_norm(nn.Linear(...))``, state-dict keys ``parametrizations.weight.original0``)
    and a module of :data:`READ_WHOLE` count as leaves, and nothing inside either is
    hooked (:func:`_never_run_prefixes`)."""
    hidden = _never_run_prefixes(model)
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name or _inside(name, hidden):
            continue
        if isinstance(m, READ_WHOLE):
            chosen.append((name, m))
            continue
        extra = _parametrizations(m)
        children = [c for c in m.children() if c is not extra]
        if not children and not isinstance(m, _PASS_THROUGH):
            chosen.append((name, m))
    return chosen


@dataclass
class LayerCapture:
    """What the probe pass kept for one layer (tensors on the reading device).

    output: X (N x d). grad: Delta (N x d), zeros where the loss does not reach the
    layer (None only until the backward pass has run). inputs: A (N x d_in), or (N,)
    token ids, where ``keep_inputs`` asked for it (modules whose K is built from
    structure), else None.
    """

    name: str
    module: nn.Module
    output: Tensor
    grad: Tensor | None = None
    inputs: Tensor | None = None
    #: The axis of the module's output that holds the features: -1, or 1 for a
    #: channel-first output (see :data:`CHANNEL_FIRST`); X and Delta rows are the
    #: other axes flattened, sample-major, either way.
    feature_axis: int = -1
    #: The axis of the module's output that holds the samples: 0, or 1 for a
    #: sequence-first module (``batch_first=False``: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``,
    #: ``nn.MultiheadAttention``), whose output is (T, n, d).
    batch_axis: int = 0

    @property
    def rows(self) -> int:
        return self.output.shape[0]

    @property
    def width(self) -> int:
        return self.output.shape[1]


def model_output(out: Any) -> Tensor:
    """The tensor a loss reads from a model's output (tensor, tuple, dict or ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ProbeError(f"cannot find a tensor in the model's output of type {type(out).__name__}")


def _first_tensor(out: Any) -> Tensor | None:
    """The output tensor of a module: itself, or the first of a tuple or list; None for
    a PackedSequence (a tuple whose first tensor is time-major across samples)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def feature_rows(tensor: Tensor, axis: int, batch_axis: int = 0) -> Tensor:
    """``tensor`` (n, ..., d) as its N x d matrix of rows, the features on ``axis``
    (-1, or 1 for channel-first (n, C, *spatial)), the samples on ``batch_axis`` (0, or
    1 for a sequence-first (T, n, d)); rows sample-major."""
    if batch_axis != 0:
        tensor = tensor.movedim(batch_axis, 0)
    if axis not in (-1, tensor.ndim - 1):
        tensor = tensor.movedim(axis, -1)
    return tensor.reshape(-1, tensor.shape[-1])


def _sequence_first(module: nn.Module, out: Tensor) -> bool:
    """A module that says its output is (T, n, d): ``batch_first`` False, 3-D output."""
    return getattr(module, "batch_first", None) is False and out.ndim == 3


def _batch_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _batch_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _batch_tensors(v)]
    return []


def _kinds(obj: Any) -> str:
    """What a probe part holds, for an error: ``Tensor (32, 4)``, ``ndarray``, a dict's
    or tuple's parts."""
    if isinstance(obj, Tensor):
        return f"Tensor {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {_kinds(v)}" for k, v in list(obj.items())[:6]) + "}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of [" + ", ".join(_kinds(v) for v in obj[:6]) + "]"
    return type(obj).__name__


def probe_batch_size(inputs: Any, targets: Any) -> int:
    """The probe's n; a ProbeError names the tensors whose first axes disagree."""
    sizes = [("inputs", t.shape[0]) for t in _batch_tensors(inputs) if t.ndim > 0]
    sizes += [("targets", t.shape[0]) for t in _batch_tensors(targets) if t.ndim > 0]
    if not sizes or not any(k == "inputs" for k, _ in sizes):
        raise ProbeError(
            f"the probe has no input tensor with a batch axis (inputs: {_kinds(inputs)}); "
            "give torch tensors, a tuple or a dict of them (torch.as_tensor converts arrays)"
        )
    n = sizes[0][1]
    bad = [(k, s) for k, s in sizes if s != n]
    if bad:
        listing = ", ".join(f"{k} has {s}" for k, s in sizes)
        raise ProbeError(f"probe batch sizes disagree: {listing} rows")
    if n == 0:
        raise ProbeError("the probe is empty (0 samples)")
    return n


def select_layers(model: nn.Module, layers: str | Sequence[str] | None) -> list[str] | None:
    """Module names to read, in model order; None means the default selection.

    ``layers`` is None (every leaf module whose output is a floating tensor with last
    dimension >= 2, decided during the probe pass), a list of ``named_modules()`` names,
    or a regex string matched with ``re.search`` against those names. A regex does not
    match the modules inside a :data:`READ_WHOLE` module (``attn.out_proj`` never runs),
    inside a module's ``parametrizations`` (their outputs are weights), or a module
    without a forward (``ModuleDict``, ``ModuleList``), which would otherwise fail the
    pass ("did not run"); named in a list, they still do.
    """
    names = [name for name, _ in model.named_modules() if name]
    if layers is None:
        return None
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise ProbeError(f"layers regex {layers!r} is not valid: {exc}") from exc
        hidden = _never_layers(model)
        matched = [name for name in names if pattern.search(name)]
        chosen = [name for name in matched if name not in hidden]
        if matched and not chosen:
            raise ProbeError(
                f"layers regex {layers!r} matches only modules that never run as layers of "
                f"their own (containers without a forward, such as a ModuleDict, or modules "
                f"inside a module read whole or inside parametrizations): "
                f"{_listing(matched, 5)}; match the modules inside them instead "
                f"(modules are: {_listing(names)})"
            )
        if not chosen:
            raise ProbeError(
                f"layers regex {layers!r} matches no module; modules are: {_listing(names)}"
            )
        return chosen
    chosen = list(layers)
    if not chosen:
        raise ProbeError(f"the layer selection names no module; modules are: {_listing(names)}")
    unknown = [name for name in chosen if name not in set(names)]
    if unknown:
        raise ProbeError(f"unknown layer(s) {unknown}; modules are: {_listing(names)}")
    return chosen


def _never_layers(model: nn.Module) -> set[str]:
    """The modules that never run as layers of their own (:func:`_never_run_prefixes`),
    and the modules without a forward of their own (containers: ``nn.ModuleDict``,
    ``nn.ModuleList``; peft's ``lora_A`` holds ``lora_A.default``, and a regex ``lora_``
    matches both)."""
    hidden = _never_run_prefixes(model)
    return {
        name
        for name, m in model.named_modules()
        if name and (_inside(name, hidden) or type(m).forward is nn.Module.forward)
    }


def _listing(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _call(model: nn.Module, inputs: Any) -> Any:
    """The model's output on the probe's inputs (a dict as keywords, a tuple or list as
    positional arguments, else the one argument). An encoder-decoder (a config with
    ``is_encoder_decoder``, T5, BART) given no decoder inputs fails in its decoder with
    "You must specify exactly one of input_ids or inputs_embeds": that is a ProbeError
    saying what the probe lacks."""
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
    except Exception as exc:
        hint = _decoder_inputs_missing(model, inputs)
        if hint is None:
            raise
        raise ProbeError(f"{hint} ({type(exc).__name__}: {exc})") from exc


_DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def _decoder_inputs_missing(model: nn.Module, inputs: Any) -> str | None:
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    if isinstance(inputs, dict) and any(k in inputs for k in _DECODER_KEYS):
        return None
    return (
        f"{type(model).__name__} is an encoder-decoder: the probe's inputs must be a dict "
        "with the decoder's inputs beside the encoder's, e.g. {'input_ids': ..., "
        "'decoder_input_ids': ...} or {'input_ids': ..., 'labels': ...} (the targets then "
        "the same labels)"
    )


def slice_batch(obj: Any, sl: slice) -> Any:
    """The samples ``sl`` of a probe (tensor, tuple/list or dict of them): every tensor
    with a batch axis is sliced along it; 0-d tensors and other objects pass through."""
    if isinstance(obj, Tensor):
        return obj[sl] if obj.ndim > 0 else obj
    if isinstance(obj, dict):
        return {k: slice_batch(v, sl) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(v, sl) for v in obj)
    return obj


@dataclass
class ProbeRun:
    """What one whole-probe pass read: the captures per layer, the per-sample losses
    ``loss_i`` (n,) it differentiated (detached, in the forward dtype; None for a
    forward-only pass) and the output layer (the last selected module to run in the
    forward pass; None when none was read)."""

    captures: dict[str, LayerCapture]
    losses: Tensor | None
    output_layer: str | None


def run_probe_pass(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: list[str] | None,
    *,
    n: int,
    keep_inputs: Callable[[nn.Module], bool],
    max_rows: int | None = None,
    max_width: int | None = None,
) -> ProbeRun:
    """Run the one forward/backward pass over the whole probe: a capture per layer, the
    per-sample losses and the output layer (:class:`ProbeRun`).

    ``model`` must already be on the reading device and dtype, in eval mode. ``names``
    None selects by the default rule. ``keep_inputs(module)`` says whether to keep the
    module's input A. Raises ProbeError for explicit layers that cannot be read.

    If a later in-place op (``ReLU(inplace=True)``) overwrote a captured output, the pass
    is run once more handing a copy downstream, so X and Delta are those of the layer.
    The streamed pass of the engine (:mod:`ddsmon.streaming`) runs the same pass on
    micro-batches of samples.
    """
    mode = PassMode()
    while True:
        probe = ProbePass(names, n, keep_inputs, max_rows, mode, max_width=max_width)
        try:
            captures = probe.run(model, inputs, targets, loss_fn)
        except RetryPass as retry:
            mode = retry.apply(mode)
            continue
        return ProbeRun(captures, probe.losses, probe.output_layer)


@dataclass(frozen=True)
class PassMode:
    """How a pass runs, learnt from earlier tries (see :class:`RetryPass`).

    copy_downstream: hand each captured output's copy downstream (an in-place op
    overwrote a captured output). unfrozen: modules whose parameters keep
    ``requires_grad`` (a tuple output that had to be re-rooted; see ProbePass).
    """

    copy_downstream: bool = False
    unfrozen: frozenset[str] = frozenset()


class RetryPass(Exception):
    """The pass must run again, in the mode :meth:`apply` gives; raised before any
    capture of the failed try is used."""

    def __init__(self, reason: str, *, copy_downstream: bool = False, unfreeze: str = "") -> None:
        super().__init__(reason)
        self.copy_downstream = copy_downstream
        self.unfreeze = unfreeze

    def apply(self, mode: PassMode) -> PassMode:
        """The mode of the next try; a ProbeError if it would be the same again."""
        unfrozen = mode.unfrozen | ({self.unfreeze} if self.unfreeze else set())
        after = PassMode(mode.copy_downstream or self.copy_downstream, frozenset(unfrozen))
        if after == mode:
            raise ProbeError(f"the probe pass cannot be run: {self}")
        log.debug("re-running the probe pass: %s", self)
        return after


#: (model type, layers) whose leaving out was already said (once per process).
_SAID_UNREAD: set[tuple[str, tuple[str, ...]]] = set()


def _say_unread(
    model: nn.Module, unread: dict[str, str], n: int, max_width: int | None = None
) -> None:
    """Say, once per model type and layers, the layers with parameters the default
    selection left out for want of per-sample rows: an output whose first axis is not
    the probe's samples (a sequence-first (T, n, d) layout of a module without
    ``batch_first``, such as the Linears of ``nn.TransformerEncoderLayer(batch_first=
    False)``), or a ``PackedSequence`` (an RNN fed a packed batch), whose rows are
    time-major across samples, or a module run more than once in the pass (an
    ``nn.LSTMCell`` stepped over time); and, for their cost, outputs wider than
    ``max_width`` (any layer). ``unread``: layer -> its output's shape, or
    :data:`_PACKED`, :data:`_TWICE`, or :data:`_WIDE` and the width."""
    key = (type(model).__qualname__, tuple(unread))
    if key in _SAID_UNREAD:
        return
    _SAID_UNREAD.add(key)
    shown = ", ".join(f"{name} {what}" for name, what in list(unread.items())[:8])
    more = f" and {len(unread) - 8} more" if len(unread) > 8 else ""
    why = []
    if any(what.startswith(_WIDE) for what in unread.values()):
        why.append(
            f"outputs wider than max_width = {max_width} features (a vocabulary head?): "
            "decomposing one costs about 2 N^2 d, and its readings are bounded by the "
            "probe's rows and the layer's input width; name it in --layers, or raise "
            "--max-width, to read it"
        )
    shapes = [w for w in unread.values() if w not in (_PACKED, _TWICE) and not w.startswith(_WIDE)]
    if shapes:
        why.append(
            f"outputs whose first axis is not the probe's {n} samples: a sequence-first "
            "layout? ddsmon reads the samples on axis 0, or axis 1 of a module with "
            "batch_first=False"
        )
    if _TWICE in unread.values():
        why.append(
            "a module run more than once in one forward pass (an RNN cell stepped over "
            "time, an embedding shared by encoder and decoder) has no one output per "
            "sample: name the module around the loop in --layers"
        )
    if _PACKED in unread.values():
        why.append(
            "a PackedSequence has no per-sample rows: read the layer after "
            "nn.utils.rnn.pad_packed_sequence, or feed the probe unpacked"
        )
    log.warning("not read: %s%s (%s)", shown, more, "; ".join(why))


#: What :attr:`ProbePass.unread` says of a layer whose output is a PackedSequence.
_PACKED = "(a PackedSequence)"
#: ... and of a module with parameters that ran more than once in the pass.
_TWICE = "(runs more than once)"
#: ... and, followed by the width and ")", of one the default selection left out for
#: its width (``max_width``).
_WIDE = "(width"


class _StopForward(BaseException):
    """Raised by the last wanted hook of a forward-only pass: nothing after it is read.
    A BaseException, so that a model's own ``except Exception`` does not swallow it."""


class ProbePass:
    """The state of one probe pass (all samples, or one micro-batch of them).

    A forward hook per selected module (:meth:`_on_output`) keeps, per layer, the
    capture (X, and A where ``keep_inputs`` asks), the live output tensor whose
    gradient is Delta, and that tensor's version counter, to tell when a later in-place
    op overwrote it. ``names`` None selects by the default rule: leaf modules,
    pass-throughs excepted, whose output is a floating tensor (n, ..., 2 <= d <= max_width); a
    module that runs twice in one forward pass is dropped from that selection.

    * ``n``: the samples of this pass; ``total``: those of the whole probe (the rows
      that ``max_rows`` caps are ``total`` samples' worth), n by default.
    * ``strict``: named layers that cannot be read, run twice or do not run are a
      ProbeError (default: when ``names`` is given); else they are left out.
    * ``max_width``: the default selection leaves out outputs of more than this many
      features (a vocabulary head), noted in :attr:`unread`; named layers are read
      whatever their width.
    * ``backward`` False: a forward pass only, under ``torch.no_grad`` (no loss, no
      graph; captures have ``grad`` None). ``stop_early``: end the forward pass (by an
      exception from the hook) once every named layer is captured; forward-only only.
      ``graph_only``: the forward pass and the loss with their graph, no backward pass
      and no captures (what :mod:`ddsmon.streaming` measures a sample's graph by).

    Parameters get no ``.grad`` and no graph: during a backward pass every parameter
    of the model has ``requires_grad`` off (restored after), so the forward pass saves
    nothing for weight gradients, and ``torch.autograd.grad`` runs only down to the
    captured outputs. A captured output that then does not require grad (the first
    layer read, a frozen or integer-fed one) is re-rooted: handed downstream as a fresh
    leaf, whose gradient is Delta, exactly: nothing upstream of it is differentiated.
    A module with parameters whose output is a tuple of several tensors cannot be
    re-rooted faithfully (another element may be computed from the first); the pass
    then runs again with that module's parameters left as they were (``unfrozen``).

    After :meth:`run`: ``losses`` holds the per-sample losses ``loss_i`` (n,) of this
    pass's samples, detached, in the forward dtype (None for a forward-only pass),
    ``forward_order`` the returned layers in the order they ran (the hooks fire in
    forward order), and ``output_layer`` the last of them (None when none was read).
    """

    def __init__(
        self,
        names: list[str] | None,
        n: int,
        keep_inputs: Callable[[nn.Module], bool],
        max_rows: int | None,
        mode: PassMode | None = None,
        *,
        total: int | None = None,
        strict: bool | None = None,
        backward: bool = True,
        stop_early: bool = False,
        graph_only: bool = False,
        max_width: int | None = None,
    ) -> None:
        self.names = names
        self.max_width = max_width
        self.n = n
        self.total = n if total is None else total
        self.keep_inputs = keep_inputs
        self.max_rows = max_rows
        self.mode = mode or PassMode()
        self.strict = names is not None if strict is None else strict
        self.backward = backward
        self.stop_early = stop_early and not backward and names is not None
        self.graph_only = graph_only
        self.captures: dict[str, LayerCapture] = {}
        self.live: dict[str, Tensor] = {}
        self.versions: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._frozen: set[int] = set()  # ids of the parameters this pass froze
        # channel-first tensors of this pass by id (weak: an id freed is not reused here)
        self._layout: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        # ... and the sequence-first (T, n, ...) ones, samples on axis 1
        self._sequence: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self.losses: Tensor | None = None
        self.forward_order: list[str] = []
        #: layers with parameters left out for want of a batch axis: name -> shape
        self.unread: dict[str, str] = {}

    @property
    def output_layer(self) -> str | None:
        """The last layer read to run in the forward pass (None when none was read)."""
        return self.forward_order[-1] if self.forward_order else None

    @property
    def explicit(self) -> bool:
        return self.names is not None

    def run(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> dict[str, LayerCapture]:
        """Forward with the hooks on, ``autograd.grad`` of the summed loss, hooks off.

        Returns the captures in model order (default selection) or in ``names`` order,
        less the named layers a non-strict pass left out. Raises RetryPass when the
        pass must run again in another mode.
        """
        hooked = self._hooked(model)
        handles = [
            module.register_forward_hook(functools.partial(self._on_output, name))
            for name, module in hooked
        ]
        seen = {id(m) for _, m in hooked}
        handles += [  # the layout of the tensors the hooked modules are fed
            module.register_forward_hook(self._on_layout)
            for _, module in default_leaves(model)
            if id(module) not in seen
        ]
        order: list[str] = []
        grads: Sequence[Tensor | None] = []
        frozen: list[nn.Parameter] = []
        try:
            if self.backward:
                frozen = self._freeze(model)
                with torch.enable_grad():
                    out = model_output(_call(model, inputs))
                    total = self._loss(loss_fn, out, targets)
                    if self.graph_only:  # a forward pass with a graph: what it saves
                        return {}
                    self._check_in_place()
                    order = [name for name in self.captures if name in self.live]
                    grads = [None] * len(order)
                    if total.requires_grad and order:
                        grads = torch.autograd.grad(
                            total, [self.live[name] for name in order], allow_unused=True
                        )
            else:
                with torch.no_grad():
                    try:
                        _call(model, inputs)
                    except _StopForward:
                        pass
                    self._check_in_place()
                order = list(self.captures)
        finally:
            for handle in handles:
                handle.remove()
            for p in frozen:
                p.requires_grad_(True)
        if self.unread and not self.strict:
            _say_unread(model, self.unread, self.n, self.max_width)
        if self.names is not None and self.strict:
            missing = [name for name in self.names if name not in self.captures]
            if missing:
                raise ProbeError(f"layer(s) {missing} did not run in the model's forward pass")
        for name, delta in zip(order, grads):
            cap = self.captures[name]
            if delta is None:
                cap.grad = torch.zeros_like(cap.output)
            else:
                cap.grad = feature_rows(delta.detach(), cap.feature_axis, cap.batch_axis)
        chosen = order if self.names is None else [x for x in self.names if x in self.captures]
        returned = set(chosen)
        self.forward_order = [name for name in self.captures if name in returned]
        return {name: self.captures[name] for name in chosen}

    def _loss(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, targets: Any
    ) -> Tensor:
        """The summed per-sample loss (the per-sample losses kept in :attr:`losses`); a
        ProbeError from a micro-batch says it was one."""
        try:
            values = loss_fn(out, targets)
            self.losses = values.detach()
            return values.sum()
        except ProbeError as exc:
            if self.n == self.total:
                raise
            raise ProbeError(
                f"{exc} (in a micro-batch of {self.n} of the probe's {self.total} samples)"
            ) from exc

    def _freeze(self, model: nn.Module) -> list[nn.Parameter]:
        """Turn ``requires_grad`` off on every parameter outside ``mode.unfrozen``."""
        kept = {
            id(p) for name in self.mode.unfrozen for p in model.get_submodule(name).parameters()
        }
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in kept]
        for p in frozen:
            p.requires_grad_(False)
        self._frozen = {id(p) for p in frozen}
        return frozen

    def _hooked(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules that get a hook: the named ones, else the default selection's."""
        if self.names is not None:
            wanted = set(self.names)
            return [(name, m) for name, m in model.named_modules() if name and name in wanted]
        return default_leaves(model)

    def _on_output(self, name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        """The forward hook: capture X (and A), hand downstream a tensor Delta can reach."""
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1:
            self.captures.pop(name, None)
            self.live.pop(name, None)
            if next(module.parameters(), None) is not None:
                self.unread[name] = _TWICE
            if self.strict:
                raise ProbeError(
                    f"layer {name!r} runs more than once in one forward pass; "
                    "DDS needs one output per sample"
                )
            return None
        first = _first_tensor(out)
        axis = 1 if first is not None and self._is_channel_first(module, args, first) else -1
        if axis == 1 and first is not None:
            self._layout[id(first)] = first
        batch = (
            1
            if first is not None and axis == -1 and self._is_sequence_first(module, args, first)
            else 0
        )
        if batch == 1 and first is not None:
            self._sequence[id(first)] = first
        tensor = self._readable(name, module, out, axis, batch)
        if tensor is None:
            return None
        rows = tensor.numel() // tensor.shape[axis]
        self._check_rows(name, rows)
        replaced = None
        if self.backward and not tensor.requires_grad:
            if (
                isinstance(out, (tuple, list))
                and sum(isinstance(o, Tensor) for o in out) > 1
                and any(id(p) in self._frozen for p in module.parameters())
            ):
                raise RetryPass(f"layer {name!r}: a tuple output to re-root", unfreeze=name)
            tensor = tensor.detach().requires_grad_(True)
            replaced = tensor.clone()  # not the leaf: an in-place op downstream may follow
        self.live[name] = tensor
        a = None
        if self.keep_inputs(module) and args and isinstance(args[0], Tensor):
            a = args[0].detach()
            if batch != 0:  # a sequence-first (T, n, d_in): rows sample-major, as X's
                a = a.movedim(batch, 0)
            a = a.reshape(rows, -1) if a.is_floating_point() else a.reshape(rows)
        self.captures[name] = LayerCapture(
            name,
            module,
            feature_rows(tensor.detach(), axis, batch),
            inputs=a,
            feature_axis=axis,
            batch_axis=batch,
        )
        self.versions[name] = tensor._version
        if self.mode.copy_downstream and replaced is None:
            replaced = tensor.clone()
        if replaced is not None and axis == 1:
            self._layout[id(replaced)] = replaced
        if replaced is not None and batch == 1:
            self._sequence[id(replaced)] = replaced
        if self.stop_early and self.names is not None and len(self.captures) == len(self.names):
            raise _StopForward
        if replaced is None:
            return None
        if isinstance(out, Tensor):
            return replaced
        return (replaced, *out[1:]) if isinstance(out, tuple) else [replaced, *out[1:]]

    def _on_layout(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        """The hook of a module not read: note a channel-first output it hands on."""
        first = _first_tensor(out)
        if first is None:
            return
        if self._is_channel_first(module, args, first):
            self._layout[id(first)] = first
        elif self._is_sequence_first(module, args, first):
            self._sequence[id(first)] = first

    def _is_sequence_first(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> bool:
        """Whether ``out`` (T, n, ...) holds the probe's samples on axis 1: the 3-D
        output of a module with ``batch_first=False`` (:func:`_sequence_first`), or a
        tensor such a module made, handed on by a module around it (a named block
        holding a sequence-first ``nn.LSTM``: its children's hooks ran first), or the
        output of a module fed a sequence-first tensor that keeps its two leading axes
        (the ``nn.Linear`` decoder or ``nn.LayerNorm`` applied to an LSTM's (T, n, d)).
        A tensor made by a function between modules (``x + attn(x)``, ``h.transpose(0,
        1)``) is not known to be sequence-first: a module fed it is read, or named as
        not read, by its own output's first axis."""
        if out.ndim < 3:
            return False
        if _sequence_first(module, out):
            return True
        if out.shape[1] != self.n:
            return False
        if id(out) in self._sequence:
            return True
        a = args[0] if args else None
        return isinstance(a, Tensor) and id(a) in self._sequence and a.shape[:2] == out.shape[:2]

    def _is_channel_first(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> bool:
        """Whether ``out`` (ndim >= 3) holds its features on axis 1: the output of a
        :data:`CHANNEL_FIRST` module, or of a module keeping the shape of a channel-
        first input it was handed (``nn.ReLU`` after ``nn.BatchNorm2d``), or padding
        one (:data:`_KEEPS_LAYOUT`), or of a
        module handing on a channel-first tensor a module inside it made (a named block
        ``conv -> bn -> relu``, whatever its input's shape: its children's hooks ran
        first), unless the module acts on the last axis (``nn.Linear``). A tensor made
        by a function between modules (``torch.relu(h) + x``) is not known to be
        channel-first: a module fed it reads its last axis."""
        if out.ndim < 3 or isinstance(module, _LAST_AXIS):
            return False
        if isinstance(module, CHANNEL_FIRST) or id(out) in self._layout:
            return True
        a = args[0] if args else None
        if not isinstance(a, Tensor) or id(a) not in self._layout:
            return False
        return a.shape == out.shape or (isinstance(module, _KEEPS_LAYOUT) and a.ndim == out.ndim)

    def _readable(
        self, name: str, module: nn.Module, out: Any, axis: int = -1, batch: int = 0
    ) -> Tensor | None:
        """The output tensor (n, ..., d >= 2; d on ``axis``, n on ``batch``) to read,
        else None (a ProbeError if strict). Left out of the default selection: a
        module with parameters whose floating output has n samples on another axis
        than ``batch``, or a ``PackedSequence``, is noted in :attr:`unread` (said by
        :meth:`run`); an output with no axis of n (a position embedding's (1, T, d),
        shared by every sample) is not."""
        n = self.n
        tensor = _first_tensor(out)
        if (
            tensor is not None
            and tensor.is_floating_point()
            and tensor.ndim >= 2
            and tensor.shape[batch] == n
            and tensor.shape[axis] >= 2
        ):
            width = tensor.shape[axis]
            if self.names is None and self.max_width is not None and width > self.max_width:
                self.unread[name] = f"{_WIDE} {width})"
                return None
            return tensor
        if (
            tensor is not None
            and tensor.is_floating_point()
            and tensor.ndim >= 2
            and tensor.shape[batch] != n
            and n in tensor.shape[1:]  # the samples are there, on another axis
            and next(module.parameters(), None) is not None
        ):
            self.unread[name] = str(list(tensor.shape))
        packed = out
        if not isinstance(out, nn.utils.rnn.PackedSequence) and isinstance(out, tuple) and out:
            packed = out[0]
        if isinstance(packed, nn.utils.rnn.PackedSequence):
            self.unread[name] = _PACKED
        if self.strict:
            shape = None if tensor is None else tuple(tensor.shape)
            part = "" if n == self.total else f" (a micro-batch of the probe's {self.total})"
            raise ProbeError(
                f"layer {name!r} output cannot be read: need a floating tensor of "
                f"shape (n={n}{part}, ..., d>=2), got {type(out).__name__} {shape}"
            )
        return None

    def _check_rows(self, name: str, rows: int) -> None:
        total_rows = rows // self.n * self.total
        if self.max_rows is not None and total_rows > self.max_rows:
            positions = rows // self.n
            raise ProbeError(
                f"layer {name!r} has N={total_rows} rows ({self.total} samples x {positions} "
                f"position{'' if positions == 1 else 's'}), above "
                f"max_probe_rows={self.max_rows}; use a smaller probe or raise the cap"
            )

    def _check_in_place(self) -> None:
        """Detect captured outputs that an in-place op changed after they were captured."""
        for name, tensor in self.live.items():
            if tensor._version != self.versions[name]:
                raise RetryPass(
                    f"layer {name!r} output was modified in place", copy_downstream=True
                )
