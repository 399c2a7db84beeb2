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

For sequences (T > 1 positions per sample) the N x N row Grams can cost far more than
the per-sample gradients themselves: GPT-2's MLP (768 -> 3072) on 32 x 128 tokens needs
``2 N^2 (d_in + d_out) ~ 129`` GFLOP for them, against ``2 d_in d_out (N + n^2) ~ 24``
GFLOP to form ``J_i = Delta_i^T A_i`` (d_out x d_in, one batched matmul over positions)
and take ``J J^T``. ``param_gram_structured`` counts both and takes the cheaper; the
per-sample path is built a block of output columns at a time, ``K = sum_b J_b J_b^T``,
so no more than ``chunk_bytes`` of J exist at once and nothing is recomputed.
Embedding's per-sample path sums Delta over the positions of each (sample, token) pair,
``S_p = sum_{t: id_it = u} delta_it`` for p = (i, u), and visits only the pairs of such
rows that share a token: ``K_ij = sum_{p in i, q in j, u_p = u_q} S_p . S_q``. With
``c_u`` rows holding token u that is ``P = sum_u c_u^2`` dot products of length d_out,
against the ``N^2`` of the row Grams (for 4096 random GPT-2 tokens, P ~ N).

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

__all__ = (
    "GRAM_METHODS",
    "cheaper_gram_method",
    "is_structured",
    "param_gram_structured",
    "param_grams_functional",
)

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


GRAM_METHODS = ("auto", "row_gram", "per_sample")


def param_gram_structured(
    cap: LayerCapture, n: int, *, method: str = "auto", chunk_bytes: int = 1 << 28
) -> Tensor:
    """K (n x n) of a Linear or Embedding layer from its captured A and Delta.

    ``method``: ``"row_gram"`` (blocksums of the N x N row Grams), ``"per_sample"``
    (materialise ``J`` a block of columns at a time) or ``"auto"``, the one with fewer
    floating-point operations (see the module docstring). Both give the same K to
    rounding; tests hold each to the per-sample loop.
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"method must be one of {GRAM_METHODS}, got {method!r}")
    delta = cap.grad
    module = cap.module
    rows, d_out = delta.shape
    if isinstance(module, nn.Embedding):
        ids = cap.inputs.reshape(-1)
        if method != "row_gram" and rows > n:
            index, owner, pairs = _embedding_token_pairs(ids, n, module.num_embeddings)
            if method == "auto":
                method = cheaper_gram_method(rows, n, 0, d_out, pairs=pairs.shape[1])
            if method == "per_sample":
                return _embedding_gram_per_sample(delta, index, owner, pairs, n, chunk_bytes)
        dd = delta @ delta.T
        aa = (ids[:, None] == ids[None, :]).to(dd.dtype)
        return _blocksum(aa * dd, n) / n
    a = cap.inputs.to(delta.dtype)
    d_in = a.shape[1]
    if method == "auto":
        method = cheaper_gram_method(rows, n, d_in, d_out)
    if method == "per_sample":
        gram = _linear_gram_per_sample(a, delta, n, chunk_bytes)
        if module.bias is not None:
            summed = delta.reshape(n, rows // n, d_out).sum(dim=1)
            gram = gram + summed @ summed.T
        return gram / n
    dd = delta @ delta.T
    gram = _blocksum((a @ a.T) * dd, n)
    if module.bias is not None:
        gram = gram + _blocksum(dd, n)
    return gram / n


#: How many times slower, per multiply-add, the per-sample paths ran than the row Grams'
#: GEMMs on the benchmark machine (2-core EPYC, float64): the batched products with a
#: T-long inner dimension and the writes of J are memory-bound (measured 27 against 69
#: GFLOP/s), and the embedding's gathered dot products more so.
LINEAR_PER_SAMPLE_PENALTY = 2.5
EMBEDDING_PAIR_PENALTY = 8.0


def cheaper_gram_method(
    rows: int, n: int, d_in: int, d_out: int, *, pairs: int | None = None
) -> str:
    """The K method expected to be faster for N = ``rows`` rows of n samples.

    Linear (``pairs`` None): ``row_gram`` costs ``N^2 (d_in + d_out + 1)`` multiply-adds,
    ``per_sample`` ``d_in d_out (N + n^2)``, weighted by ``LINEAR_PER_SAMPLE_PENALTY``.
    Embedding (``pairs`` = P rows of S sharing a token, ``d_in`` unused):
    ``N^2 (d_out + 1)`` against ``P d_out`` weighted by ``EMBEDDING_PAIR_PENALTY``.
    One sample per row (N = n) always takes ``row_gram``.
    """
    if pairs is None:
        row_gram = rows * rows * (d_in + d_out + 1)
        per_sample = LINEAR_PER_SAMPLE_PENALTY * d_in * d_out * (rows + n * n)
    else:
        row_gram = rows * rows * (d_out + 1)
        per_sample = EMBEDDING_PAIR_PENALTY * pairs * d_out
    return "per_sample" if rows > n and per_sample < row_gram else "row_gram"


def _linear_gram_per_sample(a: Tensor, delta: Tensor, n: int, chunk_bytes: int) -> Tensor:
    """``sum_b J_b J_b^T`` with ``J_i = Delta_i^T A_i`` built ``cols`` output rows at a time.

    a: A (N x d_in), delta: Delta (N x d_out), N = n*T. Returns the unscaled n x n Gram
    of the weight gradients.
    """
    rows, d_in = a.shape
    d_out = delta.shape[1]
    t = rows // n
    a3 = a.reshape(n, t, d_in)
    d3 = delta.reshape(n, t, d_out).transpose(1, 2)  # n x d_out x T
    cols = max(1, min(d_out, chunk_bytes // max(1, n * d_in * a.element_size())))
    gram = a.new_zeros(n, n)
    for start in range(0, d_out, cols):
        j = torch.bmm(d3[:, start : start + cols], a3).reshape(n, -1)
        gram.addmm_(j, j.T)
    return gram


def _embedding_token_pairs(ids: Tensor, n: int, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of S and the pairs of them that share a token (see the module docstring).

    ids: token ids (N,), N = n*T. Returns ``index`` (N,), the row of S each position adds
    into; ``owner`` (M,), the sample of each row of S; ``pairs`` (2 x P), every ordered
    pair of rows of S holding the same token.
    """
    rows = ids.numel()
    sample = torch.arange(rows, device=ids.device) // (rows // n)
    keys, index = torch.unique(sample * vocab + ids, return_inverse=True)
    owner, token = keys // vocab, keys % vocab
    order = torch.argsort(token, stable=True)
    _, counts = torch.unique_consecutive(token[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    sizes = counts * counts
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device), sizes)
    offset = torch.arange(int(sizes.sum()), device=ids.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes
    )
    width = counts[group]
    first = order[starts[group] + torch.div(offset, width, rounding_mode="floor")]
    second = order[starts[group] + offset % width]
    return index, owner, torch.stack([first, second])


def _embedding_gram_per_sample(
    delta: Tensor, index: Tensor, owner: Tensor, pairs: Tensor, n: int, chunk_bytes: int
) -> Tensor:
    """K (n x n) of an Embedding from the token-sharing pairs of :func:`_embedding_token_pairs`."""
    summed = delta.new_zeros(owner.numel(), delta.shape[1]).index_add_(0, index, delta)
    gram = delta.new_zeros(n, n)
    step = max(1, chunk_bytes // max(1, 2 * delta.shape[1] * delta.element_size()))
    for start in range(0, pairs.shape[1], step):
        first, second = pairs[:, start : start + step]
        dots = (summed[first] * summed[second]).sum(dim=1)
        gram.index_put_((owner[first], owner[second]), dots, accumulate=True)
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
