"""The parameter-side Fisher-Gram K_l = J_l J_l^T / n of a module's own parameters.

``J_l`` (n x p_l) holds, per sample i, the gradient of ``loss_i`` with respect to the
module's own parameters (``recurse=False``), flattened. ``K_l`` (n x n) has the positive
spectrum of the layer's empirical-Fisher block ``J_l^T J_l / n`` (p_l x p_l).

Structured layers never materialise J:

* ``nn.Linear`` (``h = a W^T + b``): sample i's weight gradient is
  ``sum_t delta_{it} a_{it}^T``, so ``<dW_i, dW_j> = sum_{t,s} (a_it . a_js)(delta_it . delta_js)``:
  ``K = blocksum((A A^T) * (Delta Delta^T)) / n`` with ``*`` elementwise on the N x N
  row Grams and ``blocksum`` adding the T x T position block of each pair of samples;
  the bias adds ``blocksum(Delta Delta^T) / n``.
* ``nn.Embedding``: the same with A the one-hot rows of the token ids, so
  ``A A^T = [id_it == id_js]``.

Every other module with parameters goes through ``torch.func``: ``vmap(grad(loss_i))``
over samples, chunked, with one pass serving all such modules at once.
Scaling (BackPACK's convention made explicit): the per-sample loss is not divided by n,
the Gram is, once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ddsmon.probe import LayerCapture, model_output

__all__ = ("is_structured", "param_gram_structured", "param_grams_functional")

log = logging.getLogger(__name__)


def is_structured(module: nn.Module) -> bool:
    """Whether K of ``module`` is built from its captured inputs and output gradients."""
    return isinstance(module, (nn.Linear, nn.Embedding))


def _blocksum(m: Tensor, n: int) -> Tensor:
    """Sum the T x T block of every sample pair of an N x N matrix (N = n*T) -> n x n."""
    rows = m.shape[0]
    if rows == n:
        return m
    t = rows // n
    return m.reshape(n, t, n, t).sum(dim=(1, 3))


def param_gram_structured(cap: LayerCapture, n: int) -> Tensor:
    """K (n x n) of a Linear or Embedding layer from its captured A and Delta."""
    delta = cap.grad
    dd = delta @ delta.T
    module = cap.module
    if isinstance(module, nn.Embedding):
        ids = cap.inputs
        aa = (ids[:, None] == ids[None, :]).to(dd.dtype)
        return _blocksum(aa * dd, n) / n
    a = cap.inputs.to(dd.dtype)
    gram = _blocksum((a @ a.T) * dd, n)
    if module.bias is not None:
        gram = gram + _blocksum(dd, n)
    return gram / n


def param_grams_functional(
    model: nn.Module,
    modules: dict[str, nn.Module],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    n: int,
    *,
    chunk_bytes: int = 1 << 28,
) -> dict[str, Tensor]:
    """K (n x n) for each module in ``modules`` via ``torch.func.vmap(grad(...))``.

    One vmapped pass over the probe (in chunks of samples so the per-sample gradients
    stay under ``chunk_bytes``) yields every module's J at once; each J is reduced to
    its Gram immediately.
    """
    names = {id(m): prefix for prefix, m in modules.items()}
    own: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for full_name, p in model.named_parameters():
        prefix, _, _ = full_name.rpartition(".")
        if prefix in modules and id(modules[prefix]) in names:
            own[full_name] = p.detach()
            owner[full_name] = prefix
    if not own:
        return {}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in own}
    frozen.update({k: v for k, v in model.named_buffers()})

    def one_loss(params: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        x1 = _unsqueeze(x)
        y1 = _unsqueeze(y)
        out = model_output(_functional(model, {**params, **frozen}, x1))
        return loss_fn(out, y1)[0]

    per_sample_grad = vmap(grad(one_loss), in_dims=(None, 0, 0))
    p_total = sum(v.numel() for v in own.values())
    itemsize = next(iter(own.values())).element_size()
    chunk = max(1, min(n, chunk_bytes // max(1, p_total * itemsize)))
    blocks: dict[str, list[Tensor]] = {m: [] for m in modules}
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        grads = per_sample_grad(own, _slice(inputs, sl), _slice(targets, sl))
        for prefix in modules:
            parts = [g.reshape(g.shape[0], -1) for k, g in grads.items() if owner[k] == prefix]
            if parts:
                blocks[prefix].append(torch.cat(parts, dim=1))
        del grads
    grams = {}
    for prefix, js in blocks.items():
        if js:
            j = torch.cat(js, dim=0)
            grams[prefix] = j @ j.T / n
    return grams


def _functional(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return functional_call(model, params, args=(), kwargs=inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs))
    return functional_call(model, params, (inputs,))


def _unsqueeze(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.unsqueeze(0)
    if isinstance(obj, dict):
        return {k: _unsqueeze(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unsqueeze(v) for v in obj)
    return obj


def _slice(obj: Any, sl: slice) -> Any:
    if isinstance(obj, Tensor):
        return obj[sl]
    if isinstance(obj, dict):
        return {k: _slice(v, sl) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, sl) for v in obj)
    return obj
