"""Per-sample losses: the scalar whose per-sample gradients the Fisher-Gram is built from.

Every reading uses the *per-sample* loss ``loss_i`` (one number per probe sample), and
the probe pass differentiates ``sum_i loss_i``; in eval mode samples do not interact, so
the gradient of that sum with respect to sample i's activations is exactly
``d loss_i / d h_i``. Conventions:

* ``"ce"``: cross-entropy. Logits (n, C) with class targets (n,) or probability targets
  (n, C); logits (n, T, C) with targets (n, T): the mean over the positions of a sample
  (positions whose target is -100 are ignored, as in ``F.cross_entropy``).
* ``"lm"``: next-token cross-entropy, as Hugging Face's causal language models compute
  it from ``labels`` = the input ids: logits (n, T, C) at position t scored against
  the target at t + 1, the mean over a sample's T - 1 scored positions (targets -100
  ignored). With ``"ce"`` and targets equal to the input ids, every position is scored
  against its own token: a copying loss, not the one the model was trained on.
* ``"mse"``: mean over a sample's non-batch elements of ``(output - target)^2``.
* a callable ``(outputs, targets) -> (n,)`` tensor of per-sample losses: floating
  point, a differentiable function of the outputs, and finite where the outputs are
  (else a :class:`~ddsmon.errors.ProbeError` naming the loss: an integer, detached or
  NaN result would be read as zero or missing gradients, readings of nothing).

Scaling conventions matter only up to a constant factor for the scale-free readings
(``log_volume``, ratios); the absolute eigenvalues scale with the square of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ddsmon.errors import ProbeError

__all__ = (
    "IGNORE_INDEX",
    "LossSpec",
    "check_scored",
    "kept_torch_modes",
    "per_sample_loss_fn",
    "warn_if_copying",
)

log = logging.getLogger(__name__)

LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]
#: The class target that scores nothing (``F.cross_entropy``'s ``ignore_index``): its
#: position is left out of a sample's loss, by ``"ce"`` and ``"lm"`` alike.
IGNORE_INDEX = -100


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    if outputs.ndim == 2:
        if targets.shape == outputs.shape and targets.is_floating_point():
            return -(targets * F.log_softmax(outputs, dim=-1)).sum(-1)
        if targets.shape != outputs.shape[:1]:
            raise ProbeError(
                f"loss 'ce': logits have shape {tuple(outputs.shape)}, so targets must be "
                f"({outputs.shape[0]},) class ids, got {tuple(targets.shape)}"
            )
        return F.cross_entropy(outputs, _class_ids("ce", targets, outputs), reduction="none")
    if outputs.ndim == 3:
        n, t, c = outputs.shape
        if targets.shape != (n, t):
            raise ProbeError(
                f"loss 'ce': logits have shape {(n, t, c)}, so targets must be {(n, t)}, "
                f"got {tuple(targets.shape)}"
            )
        return _token_mean(outputs, _class_ids("ce", targets, outputs))
    raise ProbeError(
        f"loss 'ce' needs logits of shape (n, C) or (n, T, C), got {tuple(outputs.shape)}"
    )


def _next_token(outputs: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy: ``outputs[:, t]`` against ``targets[:, t + 1]``, the
    mean over each sample's scored positions (HF's ``labels`` convention)."""
    if outputs.ndim != 3:
        raise ProbeError(f"loss 'lm' needs logits of shape (n, T, C), got {tuple(outputs.shape)}")
    n, t, c = outputs.shape
    if targets.shape != (n, t):
        raise ProbeError(
            f"loss 'lm': logits have shape {(n, t, c)}, so targets must be the {(n, t)} "
            f"token ids (the input ids, as Hugging Face's labels), got {tuple(targets.shape)}"
        )
    if t < 2:
        raise ProbeError(f"loss 'lm' needs at least 2 positions per sample, got {t}")
    return _token_mean(outputs[:, :-1], _class_ids("lm", targets, outputs)[:, 1:])


def _token_mean(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample mean of the token cross-entropies of ``outputs`` (n, T, C) against
    ``targets`` (n, T), positions whose target is -100 left out."""
    n, t, c = outputs.shape
    token = F.cross_entropy(
        outputs.reshape(n * t, c), targets.reshape(n * t), reduction="none"
    ).view(n, t)
    valid = (targets != IGNORE_INDEX).to(token.dtype)
    return (token * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def _class_ids(label: str, targets: Tensor, outputs: Tensor) -> Tensor:
    """``targets`` as class ids (long); a ProbeError names a target outside the logits'
    classes (-100 is ignored, as in ``F.cross_entropy``). Not checked under vmap."""
    ids = targets.long()
    if ids.numel() == 0 or torch._C._are_functorch_transforms_active():
        return ids
    classes = outputs.shape[-1]
    bad = ((ids < 0) & (ids != IGNORE_INDEX)) | (ids >= classes)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        value = int(ids[tuple(where)])
        raise ProbeError(
            f"loss {label!r}: the targets hold {value} at {tuple(where)}, but the logits "
            f"have {classes} classes (ids 0 to {classes - 1}; {IGNORE_INDEX} is ignored)"
        )
    return ids


def check_scored(loss: LossSpec, targets: object) -> None:
    """A ProbeError when the class targets of ``"ce"`` or ``"lm"`` score no position
    at all (every one :data:`IGNORE_INDEX`, ignored; with ``"lm"`` a sample's first
    target is never scored): every sample's loss is then 0 and its gradients zeros, and
    G and K would be readings of nothing, recorded as if measured. The engine calls it
    once, on the whole probe's targets."""
    if loss not in ("ce", "lm") or not isinstance(targets, Tensor) or targets.numel() == 0:
        return
    if targets.is_floating_point():
        return
    scored = targets[:, 1:] if loss == "lm" and targets.ndim == 2 else targets
    if scored.numel() == 0 or not bool((scored == IGNORE_INDEX).all()):
        return
    which = "every target after each sample's first" if scored is not targets else "every target"
    raise ProbeError(
        f"loss {loss!r}: {which} of the probe's {tuple(targets.shape)} targets is "
        f"{IGNORE_INDEX} (ignored), so no position is scored: every sample's loss is 0 and its "
        "gradients are zeros; give targets that hold the token or class ids, or "
        "--fisher none for activation readings only"
    )


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    if targets.shape != outputs.shape:
        if targets.numel() == outputs.numel():
            targets = targets.reshape(outputs.shape)
        else:
            raise ProbeError(
                f"loss 'mse': outputs have shape {tuple(outputs.shape)} but targets "
                f"{tuple(targets.shape)}"
            )
    return (outputs - targets.to(outputs.dtype)).pow(2).reshape(outputs.shape[0], -1).mean(1)


#: Whether :func:`warn_if_copying` has said its warning (once per process).
_SAID_COPYING = False


def _decoder_side(name: str) -> bool:
    """Whether a probe input of this name holds the targets a model scores position by
    position: a seq2seq model's ``labels`` / ``decoder_input_ids`` (any ``decoder_*`` or
    label-like input, Hugging Face's names). Targets equal to them are right for
    ``"ce"``: T5's logits at position t predict ``labels[t]``."""
    lowered = name.lower()
    return lowered.startswith("decoder") or "label" in lowered or "target" in lowered


def warn_if_copying(loss: LossSpec, inputs: object, targets: object) -> None:
    """Warn, once, when ``loss`` is ``"ce"`` and the targets (n, T) are the probe's input
    ids: every position is then scored against its own token (a copying loss), where a
    causal language model's is the next token's (``"lm"``).

    Only the encoder-side / causal inputs are compared: a dict's values but those of
    decoder-side or label inputs (:func:`_decoder_side`: ``labels``,
    ``decoder_input_ids``, which a seq2seq model scores position by position, so that
    ``"ce"`` is right for them), or the first of positional inputs (the model's input
    ids)."""
    global _SAID_COPYING
    if _SAID_COPYING or loss != "ce" or not isinstance(targets, Tensor) or targets.ndim != 2:
        return
    if targets.is_floating_point():
        return
    if isinstance(inputs, dict):
        parts = [v for k, v in inputs.items() if not _decoder_side(str(k))]
    elif isinstance(inputs, (list, tuple)):
        parts = list(inputs[:1])
    else:
        parts = [inputs]
    for part in parts:
        if (
            isinstance(part, Tensor)
            and part.shape == targets.shape
            and not part.is_floating_point()
            and torch.equal(part.cpu(), targets.cpu())
        ):
            _SAID_COPYING = True
            log.warning(
                "loss 'ce' with targets equal to the probe's input ids scores every "
                "position against its own token; for a causal language model's "
                "next-token loss (Hugging Face's labels = input_ids), use --loss lm"
            )
            return


def per_sample_loss_fn(loss: LossSpec) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample loss function for ``loss``, checking the shape it returns."""
    if callable(loss):
        fn = loss
        label = getattr(loss, "__name__", repr(loss))
    elif loss == "ce":
        fn, label = _cross_entropy, "ce"
    elif loss == "lm":
        fn, label = _next_token, "lm"
    elif loss == "mse":
        fn, label = _mse, "mse"
    else:
        raise ProbeError(f"unknown loss {loss!r}: use 'ce', 'lm', 'mse' or a callable")

    def checked(outputs: Tensor, targets: Tensor) -> Tensor:
        with kept_torch_modes(f"loss {label!r}"):
            values = fn(outputs, targets)
        n = outputs.shape[0]
        if not isinstance(values, Tensor) or values.shape != (n,):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ProbeError(
                f"loss {label!r} must return per-sample losses of shape ({n},), got {shape}"
            )
        if not torch._C._are_functorch_transforms_active():  # vmap: no data-dependent checks
            _check_values(label, outputs, values)  # (the probe pass checked the same loss)
        return values

    return checked


_said_changed: set[tuple[str, str]] = set()


@contextmanager
def kept_torch_modes(label: str) -> Iterator[None]:
    """Run user code (a loss, a model factory) and put back what it changed of torch's
    global modes: gradient mode (``torch.set_grad_enabled(False)`` left behind turns the
    backward pass of every later reading into no gradients at all: readings of nothing)
    and the default dtype. Each change is said once per ``label``."""
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    try:
        yield
    finally:
        changed = []
        if torch.is_grad_enabled() != grad:
            torch.set_grad_enabled(grad)
            changed.append(f"torch.set_grad_enabled({not grad})")
        if torch.get_default_dtype() != dtype:
            changed.append(f"torch.set_default_dtype({torch.get_default_dtype()})")
            torch.set_default_dtype(dtype)
        for what in changed:
            if (label, what) not in _said_changed:
                _said_changed.add((label, what))
                log.warning(
                    "%s called %s, which would change every later reading; ddsmon put it back",
                    label,
                    what,
                )


def _check_values(label: str, outputs: Tensor, values: Tensor) -> None:
    """A loss's per-sample values are ones the readings can be built from: floating
    point, differentiable where the outputs are (else the gradients would be zeros, or
    missing, and G empty: readings of nothing, recorded as if measured), and finite
    where the outputs are (a NaN from the loss itself, not from the model: a model's
    non-finite outputs are the checkpoint's state, recorded as not finite)."""
    if not values.is_floating_point():
        raise ProbeError(
            f"loss {label!r} must return floating-point per-sample losses, got {values.dtype}"
        )
    if outputs.requires_grad and not values.requires_grad:
        raise ProbeError(
            f"loss {label!r} returned losses that do not depend on the model's outputs "
            "(no gradient: detached, rebuilt from .item() or numpy, or computed under "
            "torch.no_grad()); the readings are their gradients, so it must return a "
            "differentiable function of the outputs"
        )
    finite = torch.isfinite(values.detach())
    if bool(finite.all()) or not bool(torch.isfinite(outputs.detach()).all()):
        return
    bad = (~finite).nonzero().flatten()
    first = int(bad[0])
    raise ProbeError(
        f"loss {label!r} returned non-finite losses for {bad.numel()} of {values.numel()} "
        f"samples (sample {first}: {float(values.detach()[first])}) where the model's "
        "outputs are finite"
    )
