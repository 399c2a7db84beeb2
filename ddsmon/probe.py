"""One probe pass: capture every selected layer's outputs X and per-sample gradients Delta.

For each selected module ``l`` with output ``h_l`` of shape (n, ..., d):

* ``X_l`` (N x d): the output with all leading axes flattened into rows
  (N = n, or n*T with a position axis);
* ``Delta_l`` (N x d): ``d (sum_i loss_i) / d h_l``. Samples do not interact in eval
  mode, so row block i is exactly ``d loss_i / d h_{l,i}`` (the per-sample gradient);
* ``A_l`` (N x d_in): the module's input, kept only where the parameter-side Gram is
  built from structure (Linear, Embedding; see :mod:`ddsmon.param_gram`).

All layers come from ONE forward and ONE ``torch.autograd.grad`` call over the summed
per-sample loss; parameters get no ``.grad``. A module that is an output of the
selection but whose output does not require grad (frozen earlier layers, integer
inputs) is re-rooted as a fresh leaf so its gradient exists.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ddsmon.errors import ProbeError

__all__ = ("LayerCapture", "model_output", "probe_batch_size", "run_probe", "select_layers")

log = logging.getLogger(__name__)

#: Leaf modules the default selection skips: in eval mode they repeat their input.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


@dataclass
class LayerCapture:
    """What the probe pass kept for one layer (tensors on the reading device).

    output: X (N x d). grad: Delta (N x d), zeros where the loss does not reach the
    layer. inputs: A (N x d_in) for Linear/Embedding modules, else None. n: samples.
    """

    name: str
    module: nn.Module
    output: Tensor
    grad: Tensor | None = None
    inputs: Tensor | None = None

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
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _batch_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _batch_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _batch_tensors(v)]
    return []


def probe_batch_size(inputs: Any, targets: Any) -> int:
    """The probe's n; a ProbeError names the tensors whose first axes disagree."""
    sizes = [("inputs", t.shape[0]) for t in _batch_tensors(inputs) if t.ndim > 0]
    sizes += [("targets", t.shape[0]) for t in _batch_tensors(targets) if t.ndim > 0]
    if not sizes or not any(k == "inputs" for k, _ in sizes):
        raise ProbeError("the probe has no input tensor with a batch axis")
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
    or a regex string matched with ``re.search`` against those names.
    """
    names = [name for name, _ in model.named_modules() if name]
    if layers is None:
        return None
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise ProbeError(f"layers regex {layers!r} is not valid: {exc}") from exc
        chosen = [name for name in names if pattern.search(name)]
        if not chosen:
            raise ProbeError(
                f"layers regex {layers!r} matches no module; modules are: {_listing(names)}"
            )
        return chosen
    chosen = list(layers)
    unknown = [name for name in chosen if name not in set(names)]
    if unknown:
        raise ProbeError(f"unknown layer(s) {unknown}; modules are: {_listing(names)}")
    return chosen


def _listing(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def run_probe(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: list[str] | None,
    *,
    n: int,
    keep_inputs: Callable[[nn.Module], bool],
    max_rows: int | None = None,
) -> dict[str, LayerCapture]:
    """Run the one forward/backward pass and return a capture per selected layer.

    ``model`` must already be on the reading device and dtype, in eval mode. ``names``
    None selects by the default rule. ``keep_inputs(module)`` says whether to keep the
    module's input A. Raises ProbeError for explicit layers that cannot be read.

    If a later in-place op (``ReLU(inplace=True)``) overwrote a captured output, the pass
    is run once more handing a copy downstream, so X and Delta are those of the layer.
    """
    try:
        return _probe_pass(model, inputs, targets, loss_fn, names, n, keep_inputs, max_rows, False)
    except _InPlaceModified as exc:
        log.debug("re-running the probe pass with copies: %s", exc)
        return _probe_pass(model, inputs, targets, loss_fn, names, n, keep_inputs, max_rows, True)


class _InPlaceModified(Exception):
    pass


def _probe_pass(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: list[str] | None,
    n: int,
    keep_inputs: Callable[[nn.Module], bool],
    max_rows: int | None,
    copy_downstream: bool,
) -> dict[str, LayerCapture]:
    explicit = names is not None
    wanted = set(names) if explicit else None
    captures: dict[str, LayerCapture] = {}
    live: dict[str, Tensor] = {}
    versions: dict[str, tuple[int, int | None]] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                captures.pop(name, None)
                live.pop(name, None)
                if explicit:
                    raise ProbeError(
                        f"layer {name!r} runs more than once in one forward pass; "
                        "DDS needs one output per sample"
                    )
                return None
            tensor = _first_tensor(out)
            ok = (
                tensor is not None
                and tensor.is_floating_point()
                and tensor.ndim >= 2
                and tensor.shape[0] == n
                and tensor.shape[-1] >= 2
            )
            if not ok:
                if explicit:
                    shape = None if tensor is None else tuple(tensor.shape)
                    raise ProbeError(
                        f"layer {name!r} output cannot be read: need a floating tensor of "
                        f"shape (n={n}, ..., d>=2), got {type(out).__name__} {shape}"
                    )
                return None
            rows = tensor.numel() // tensor.shape[-1]
            if max_rows is not None and rows > max_rows:
                positions = rows // n
                raise ProbeError(
                    f"layer {name!r} has N={rows} rows ({n} samples x {positions} "
                    f"position{'' if positions == 1 else 's'}), above "
                    f"max_probe_rows={max_rows}; use a smaller probe or raise the cap"
                )
            replaced = None
            if not tensor.requires_grad:
                tensor = tensor.detach().requires_grad_(True)
                replaced = tensor
            live[name] = tensor
            a = None
            if keep_inputs(module) and args and isinstance(args[0], Tensor):
                a = args[0].detach()
                a = a.reshape(rows, -1) if a.is_floating_point() else a.reshape(rows)
            captures[name] = LayerCapture(
                name, module, tensor.detach().reshape(rows, tensor.shape[-1]), inputs=a
            )
            versions[name] = (tensor._version, None if a is None else args[0]._version)
            if copy_downstream:
                replaced = tensor.clone()
            if replaced is None:
                return None
            if isinstance(out, Tensor):
                return replaced
            return (replaced, *out[1:]) if isinstance(out, tuple) else [replaced, *out[1:]]

        return hook

    for name, module in model.named_modules():
        if not name:
            continue
        if explicit:
            if name not in wanted:
                continue
        elif next(module.children(), None) is not None or isinstance(module, _PASS_THROUGH):
            continue
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            out = model_output(_call(model, inputs))
            per_sample = loss_fn(out, targets)
            total = per_sample.sum()
            _check_in_place(captures, live, versions)
            order = [name for name in captures if name in live]
            if total.requires_grad and order:
                grads = torch.autograd.grad(
                    total, [live[name] for name in order], allow_unused=True
                )
            else:
                grads = [None] * len(order)
    finally:
        for handle in handles:
            handle.remove()
    if explicit:
        missing = [name for name in names if name not in captures]
        if missing:
            raise ProbeError(f"layer(s) {missing} did not run in the model's forward pass")
    for name, grad in zip(order, grads):
        cap = captures[name]
        if grad is None:
            cap.grad = torch.zeros_like(cap.output)
        else:
            cap.grad = grad.detach().reshape(cap.output.shape)
    ordered = {name: captures[name] for name in (names if explicit else order)}
    return ordered


def _check_in_place(
    captures: dict[str, LayerCapture],
    live: dict[str, Tensor],
    versions: dict[str, tuple[int, int | None]],
) -> None:
    """Detect captured tensors that an in-place op changed after they were captured."""
    for name, tensor in live.items():
        if tensor._version != versions[name][0]:
            raise _InPlaceModified(f"layer {name!r} output was modified in place")
