"""The parameter-side Fisher-Gram K_l = J_l J_l^T / n of a module's own parameters.

``J_l`` (n x p_l) holds, per sample i, the gradient of ``loss_i`` with respect to the
module's own parameters (``recurse=False``), flattened. ``K_l`` (n x n) has the positive
spectrum of the layer's empirical-Fisher block ``J_l^T J_l / n`` (p_l x p_l).

How K of a module is built is looked up in a registry, module type -> strategy, in the
manner of BackPACK's module extensions (see :func:`register_param_gram`):

* a *structured* strategy (:class:`StructuredGram`) builds K from what the probe pass
  captured, the module's input A and output gradient Delta, without materialising J;
* the *functional* strategy (:data:`FUNCTIONAL`) runs ``torch.func``;
* a module that owns no parameters has no K.

Built in, structured:

* ``nn.Linear`` (``h = a W^T + b``): sample i's weight gradient is
  ``sum_t delta_{it} a_{it}^T``, so ``<dW_i, dW_j> = sum_{t,s} (a_it . a_js)(delta_it . delta_js)``:
  ``K = blocksum((A A^T) * (Delta Delta^T)) / n`` with ``*`` elementwise on the N x N
  row Grams and ``blocksum`` adding the T x T position block of each pair of samples;
  the bias adds ``blocksum(Delta Delta^T) / n``.
* ``nn.Embedding``: the same with A the one-hot rows of the token ids, so
  ``A A^T = [id_it == id_js]``; positions holding ``padding_idx`` send the weight no
  gradient and are left out. Embeddings with ``max_norm`` (weights renormalised in the
  forward pass) or ``scale_grad_by_freq`` go through ``torch.func`` instead.
* transformers' ``Conv1D`` (GPT-2's attention and MLP projections, ``h = a W + b`` with
  W stored d_in x d_out) is a Linear layer with its weight transposed: the same K. It is
  registered by class name, so transformers is never imported.
* ``nn.LayerNorm`` and ``nn.RMSNorm`` normalised over the last axis: sample i's gradient
  is ``[sum_t xhat_it * delta_it, sum_t delta_it]`` (weight, bias), J formed outright
  from the recomputed ``xhat`` (:func:`_norm_gram`). Through ``torch.func`` they held the
  whole model's per-sample graph in memory: on a 2-block GPT-2 (32 x 128 tokens) one
  LayerNorm's K alone peaked at 8.8 GiB, the vocabulary embedding's at 2.1 GiB.

For sequences (T > 1 positions per sample) the N x N row Grams can cost far more than
the per-sample gradients themselves: GPT-2's MLP (768 -> 3072) on 32 x 128 tokens needs
``2 N^2 (d_in + d_out) ~ 129`` GFLOP for them, against ``2 d_in d_out (N + n^2) ~ 24``
GFLOP to form ``J_i = Delta_i^T A_i`` (d_out x d_in, one batched matmul over positions)
and take ``J J^T``. ``param_gram_structured`` counts both and takes the cheaper; the
per-sample path is built a block of output columns at a time, ``K = sum_b J_b J_b^T``,
so no more than ``chunk_bytes`` of J exist at once and nothing is recomputed.
Embedding's per-sample path sums Delta over the positions of each (sample, token) pair,
``S_p = sum_{t: id_it = u} delta_it`` for p = (i, u) (M <= N rows), and visits only the
pairs of such rows that share a token: ``K_ij = sum_{p in i, q in j, u_p = u_q} S_p . S_q``.
With ``c_u <= n`` rows holding token u that is ``P = sum_u c_u^2`` dot products of length
d_out against the ``N^2`` of the row Grams: P ~ N for 4096 uniformly random GPT-2 ids,
more for natural text, whose frequent tokens occur in most samples. A token held by
many rows is one dense ``S_u S_u^T`` product; the rest are grouped by their block size
rounded up to a power of two, each group one batched product and one ``index_add_``
into K (at most 4x the P products; a slice of tokens at a time within ``chunk_bytes``).

Every other module with parameters goes through ``torch.func``: ``vmap(grad(loss_i))``
over samples, chunked, with one pass serving all such modules at once.
Scaling (BackPACK's convention made explicit): the per-sample loss is not divided by n,
the Gram is, once.

What K does not see. Each module's K is of its *own use* of its parameters: when two
modules share a tensor (GPT-2's ``wte`` and ``lm_head``), the shared parameter's
gradient is the sum over both uses, and each module's K holds one term. Frozen
parameters (``requires_grad=False``) are included: K reads the loss geometry of a
module's parameters whether or not training moves them. On CUDA the per-sample
Embedding path accumulates with atomics (``index_add_``/``index_put_``), so K may
differ between runs at the rounding level.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.parametrize import is_parametrized

from ddsmon.errors import ProbeError
from ddsmon.probe import READ_WHOLE, LayerCapture, model_output

__all__ = (
    "EMBEDDING_GRAM",
    "FUNCTIONAL",
    "GRAM_METHODS",
    "LINEAR_GRAM",
    "NORM_GRAM",
    "TRANSPOSED_LINEAR_GRAM",
    "FunctionalGram",
    "GramFunction",
    "ParamGramStrategy",
    "StructuredGram",
    "cheaper_gram_method",
    "is_structured",
    "is_transposed_linear",
    "lookup_param_gram",
    "own_parameters",
    "param_gram_strategy",
    "param_gram_structured",
    "param_grams_functional",
    "register_param_gram",
    "unregister_param_gram",
)

log = logging.getLogger(__name__)

GRAM_METHODS = ("auto", "row_gram", "per_sample")

#: ``gram(module, inputs, grad, n) -> K``: the function a :class:`StructuredGram` wraps.
GramFunction: TypeAlias = Callable[[nn.Module, Tensor, Tensor, int], Tensor]


# ---- strategies -----------------------------------------------------------------------


class StructuredGram:
    """A structured strategy: K (n x n) of one module from its captured A and Delta.

    ``StructuredGram(gram, applies=None, name=None)``. The probe pass captures, for
    the module's one call per forward pass with output ``h`` of shape (n, ..., d_out)
    and first positional input ``a`` of shape (n, ..., d_in):

    * ``inputs``: A, the input with its leading axes flattened into rows, (N x d_in),
      or (N,) when the input is an integer tensor (token ids);
    * ``grad``: Delta (N x d_out), ``d (sum_i loss_i) / d h`` in the same rows, whose
      row block i (rows ``i*T .. i*T + T - 1``, N = n*T, sample-major) is sample i's
      per-sample output gradient ``delta_it = d loss_i / d h_it``;

    both in the probe pass's dtype, on the reading device, detached. ``gram(module,
    inputs, grad, n)`` must return ``K = J J^T / n`` (n x n, same dtype and device)
    where row i of J is ``d loss_i / d theta``, theta *every* parameter the module owns
    (``module.parameters(recurse=False)``), flattened. By the chain rule
    ``J_i = sum_t (d h_it / d theta)^T delta_it``, so a module whose output row
    ``h_it`` depends on theta and its own input row ``a_it`` only (no mixing of
    positions) has ``K`` computable from A and Delta: for ``h = a W^T``,
    ``K_ij = sum_{t,s} (a_it . a_js)(delta_it . delta_js) / n``.

    ``applies(module) -> bool`` (default: always) says whether this *instance* can be
    read from structure; where it is False the module goes through :data:`FUNCTIONAL`
    (the built-in Embedding strategy declines ``max_norm`` and ``scale_grad_by_freq``).
    A strategy that raises, or returns anything but an n x n tensor, is a ProbeError
    naming the layer. On CPU it may be called from a worker thread, beside other
    layers' readings (:func:`ddsmon.engine._read_layers`): it must not change state that
    other calls share.

    Example, a module ``MyLinear`` computing ``x @ self.weight.T``::

        def my_linear_gram(module, a, delta, n):
            t = a.shape[0] // n  # positions per sample
            both = (a @ a.T) * (delta @ delta.T)  # N x N
            return both.reshape(n, t, n, t).sum(dim=(1, 3)) / n

        register_param_gram(MyLinear, StructuredGram(my_linear_gram))
    """

    def __init__(
        self,
        gram: GramFunction,
        *,
        applies: Callable[[nn.Module], bool] | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(gram) or isinstance(gram, type):
            raise TypeError(
                f"StructuredGram needs a function gram(module, inputs, grad, n) -> K, got {gram!r}"
            )
        if applies is not None and not callable(applies):
            raise TypeError(f"applies must be a function of the module, got {applies!r}")
        self._gram = gram
        self._applies = applies
        self.name = name or getattr(gram, "__qualname__", repr(gram))

    def applies(self, module: nn.Module) -> bool:
        """Whether K of this module instance is built by this strategy."""
        return True if self._applies is None else bool(self._applies(module))

    def __call__(self, module: nn.Module, inputs: Tensor, grad: Tensor, n: int) -> Tensor:
        """K (n x n) of ``module`` from A = ``inputs`` and Delta = ``grad`` (see the class)."""
        return self._gram(module, inputs, grad, n)

    def __repr__(self) -> str:
        return f"StructuredGram({self.name})"


class FunctionalGram:
    """The ``torch.func`` strategy: J by ``vmap(grad(loss_i))`` over samples (any module).

    Use the one instance, :data:`FUNCTIONAL`, to force it on a type that would otherwise
    be read from structure: ``register_param_gram(nn.Linear, FUNCTIONAL)``.
    """

    _instance: FunctionalGram | None = None

    def __new__(cls) -> FunctionalGram:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FUNCTIONAL"


#: The ``torch.func`` strategy (see :class:`FunctionalGram`); the default of every type.
FUNCTIONAL: Final = FunctionalGram()

#: What the registry maps a module type to.
ParamGramStrategy: TypeAlias = StructuredGram | FunctionalGram


class _BuiltinGram(StructuredGram):
    """A built-in structured strategy: also takes ``method`` and ``chunk_bytes``."""

    def __init__(
        self,
        gram: Callable[..., Tensor],
        *,
        applies: Callable[[nn.Module], bool] | None = None,
        name: str,
    ) -> None:
        super().__init__(gram, applies=applies, name=name)
        self._tuned = gram

    def __call__(
        self,
        module: nn.Module,
        inputs: Tensor,
        grad: Tensor,
        n: int,
        *,
        method: str = "auto",
        chunk_bytes: int = 1 << 28,
    ) -> Tensor:
        return self._tuned(module, inputs, grad, n, method=method, chunk_bytes=chunk_bytes)


# ---- the registry ---------------------------------------------------------------------

_BY_TYPE: dict[type, ParamGramStrategy] = {}
_BY_NAME: dict[str, ParamGramStrategy] = {}


def register_param_gram(
    module_type: type[nn.Module] | str, strategy: ParamGramStrategy
) -> ParamGramStrategy | None:
    """Read K of every module of ``module_type`` (and its subclasses) with ``strategy``.

    ``module_type``: an ``nn.Module`` subclass, or a bare class name (``"Conv1D"``)
    matched against ``__name__`` of each class in a module's MRO, for classes of
    packages that should not be imported to register them. ``strategy``: a
    :class:`StructuredGram` (see it for the protocol and the math) or :data:`FUNCTIONAL`.

    Registering again replaces the entry. Returns the strategy registered before under
    exactly this key (None if there was none), so that it can be put back. Raises
    TypeError for anything else than a module type or name, or than a strategy.
    """
    if not isinstance(strategy, (StructuredGram, FunctionalGram)):
        hint = (
            "; wrap a function as StructuredGram(fn)"
            if callable(strategy) and not isinstance(strategy, type)
            else "; pass an instance"
            if isinstance(strategy, type)
            else ""
        )
        raise TypeError(
            f"strategy for {module_type!r} must be a StructuredGram or FUNCTIONAL, "
            f"got {strategy!r}{hint}"
        )
    table, key = _registry_key(module_type)
    previous = table.get(key)
    table[key] = strategy
    return previous


def unregister_param_gram(module_type: type[nn.Module] | str) -> ParamGramStrategy | None:
    """Remove the entry of ``module_type`` (type or class name); returns it, or None."""
    table, key = _registry_key(module_type)
    return table.pop(key, None)


def _registry_key(module_type: object) -> tuple[dict[Any, ParamGramStrategy], Any]:
    if isinstance(module_type, str):
        if not module_type.isidentifier():
            raise TypeError(
                f"a module type given by name must be a bare class name, got {module_type!r}"
            )
        return _BY_NAME, module_type
    if isinstance(module_type, type) and issubclass(module_type, nn.Module):
        return _BY_TYPE, module_type
    raise TypeError(
        f"module_type must be an nn.Module subclass or a class name, got {module_type!r}"
    )


def lookup_param_gram(module_type: type[nn.Module]) -> ParamGramStrategy:
    """The registered strategy of ``module_type``: the first class in its MRO with an
    entry (by type, then by class name, at each class), else :data:`FUNCTIONAL`."""
    for cls in module_type.__mro__:
        found = _BY_TYPE.get(cls)
        if found is None:
            found = _BY_NAME.get(cls.__name__)
        if found is not None:
            return found
    return FUNCTIONAL


def _registered(module: nn.Module) -> ParamGramStrategy:
    """The strategy of this instance, ignoring whether it owns parameters. A module
    reparametrised by ``torch.nn.utils.parametrize`` goes through :data:`FUNCTIONAL`:
    a structured strategy would give the gradient of the computed weight, not of the
    parameters that are trained (``original0``, ``original1``, ...)."""
    strategy = lookup_param_gram(type(module))
    if isinstance(strategy, StructuredGram) and (
        is_parametrized(module) or not strategy.applies(module)
    ):
        return FUNCTIONAL
    return strategy


def own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters K of ``module`` is of, named relative to it: its own
    (``recurse=False``); for a module reparametrised by ``torch.nn.utils.parametrize``
    (``weight_norm``, ``spectral_norm``) also those of its parametrizations
    (``parametrizations.weight.original0``, ...), which stand for the weight it
    computes; for a module read whole (:data:`ddsmon.probe.READ_WHOLE`,
    ``nn.MultiheadAttention``, whose ``out_proj`` never runs as a module of its own)
    all of its parameters, its children's included."""
    if isinstance(module, READ_WHOLE):
        return list(module.named_parameters())
    found = list(module.named_parameters(recurse=False))
    extra = getattr(module, "parametrizations", None)
    if is_parametrized(module) and isinstance(extra, nn.Module):
        found += list(extra.named_parameters(prefix="parametrizations"))
    return found


def param_gram_strategy(module: nn.Module) -> ParamGramStrategy | None:
    """How K of ``module`` is built: None when it owns no parameters (no K, see
    :func:`own_parameters`), else the registered strategy, or :data:`FUNCTIONAL` where
    a structured one does not apply."""
    if not own_parameters(module):
        return None
    return _registered(module)


def is_structured(module: nn.Module) -> bool:
    """Whether K of ``module`` is built from its captured inputs and output gradients."""
    return isinstance(_registered(module), StructuredGram)


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (``h = a W + b``, W of shape d_in x d_out, ``nf`` = d_out),
    recognised by name and shape so that transformers need not be imported."""
    return type(module).__name__ == "Conv1D" and _transposed_linear_shape(module)


def _transposed_linear_shape(module: nn.Module) -> bool:
    """A 2-D ``weight`` of shape d_in x ``nf``: the layout of transformers' ``Conv1D``."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.ndim == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


# ---- the structured K -----------------------------------------------------------------


def _blocksum(m: Tensor, n: int) -> Tensor:
    """Sum the T x T block of every sample pair of an N x N matrix (N = n*T) -> n x n."""
    rows = m.shape[0]
    if rows == n:
        return m
    t = rows // n
    return m.reshape(n, t, n, t).sum(dim=(1, 3))


def param_gram_structured(
    cap: LayerCapture,
    n: int,
    *,
    method: str = "auto",
    chunk_bytes: int = 1 << 28,
    strategy: StructuredGram | None = None,
) -> Tensor:
    """K (n x n) of a structured layer (see :func:`is_structured`) from its A and Delta.

    ``strategy``: the one to use; None looks it up in the registry (a ValueError if the
    module is not structured). ``method`` and ``chunk_bytes`` tune the built-in ones:
    ``"row_gram"`` (blocksums of the N x N row Grams), ``"per_sample"`` (J built a block
    of columns at a time for Linear; the token-sharing rows of S for Embedding; see the
    module docstring) or ``"auto"``, the one :func:`cheaper_gram_method` expects to be
    faster. All give the same K to rounding; tests hold each to the per-sample loop.
    A user strategy that fails, or returns anything but an n x n tensor, raises a
    ProbeError naming the layer.
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"method must be one of {GRAM_METHODS}, got {method!r}")
    if strategy is None:
        found = _registered(cap.module)
        if not isinstance(found, StructuredGram):
            raise ValueError(
                f"layer {cap.name!r} ({type(cap.module).__name__}) has no structured strategy"
            )
        strategy = found
    if cap.inputs is None or cap.grad is None:
        raise ValueError(f"layer {cap.name!r}: K from structure needs the captured A and Delta")
    if isinstance(strategy, _BuiltinGram):
        return strategy(cap.module, cap.inputs, cap.grad, n, method=method, chunk_bytes=chunk_bytes)
    if method != "auto":
        raise ValueError(f"method {method!r} applies to the built-in strategies only")
    try:
        gram = strategy(cap.module, cap.inputs, cap.grad, n)
    except Exception as exc:
        raise ProbeError(
            f"layer {cap.name!r}: parameter-side strategy {strategy.name} failed: {exc}"
        ) from exc
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (n, n):
        got = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ProbeError(
            f"layer {cap.name!r}: parameter-side strategy {strategy.name} returned {got}, "
            f"not an n x n = {n} x {n} tensor"
        )
    return gram


def _embedding_gram(
    module: nn.Embedding, ids: Tensor, delta: Tensor, n: int, *, method: str, chunk_bytes: int
) -> Tensor:
    """K of ``nn.Embedding`` from the token ids (N,) and Delta (N x d_out)."""
    rows, d_out = delta.shape
    ids = ids.reshape(-1)
    if module.padding_idx is not None:
        delta = delta.masked_fill((ids == module.padding_idx)[:, None], 0.0)
    if method == "per_sample" or (method == "auto" and rows > n):
        tokens = _token_rows(ids, n, module.num_embeddings)
        if method == "auto":
            method = cheaper_gram_method(rows, n, 0, d_out, pairs=tokens.block_pairs)
        if method == "per_sample":
            return _embedding_gram_per_sample(delta, tokens, n, chunk_bytes) / n
    dd = delta @ delta.T
    aa = (ids[:, None] == ids[None, :]).to(dd.dtype)
    return _blocksum(aa * dd, n) / n


def _linear_gram(
    module: nn.Module, a: Tensor, delta: Tensor, n: int, *, method: str, chunk_bytes: int
) -> Tensor:
    """K of ``nn.Linear`` / ``Conv1D`` (weight and optional ``bias``) from A and Delta."""
    rows, d_out = delta.shape
    a = a.to(delta.dtype)
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


def _norm_gram(
    module: nn.Module, a: Tensor, delta: Tensor, n: int, *, method: str, chunk_bytes: int
) -> Tensor:
    """K of ``nn.LayerNorm`` / ``nn.RMSNorm`` over the last axis (d) from A and Delta.

    ``h_t = xhat_t * w + b`` with ``xhat_t = (a_t - mean a_t) / sqrt(var a_t + eps)``
    (LayerNorm; the biased variance, as torch computes it) or ``a_t / sqrt(mean a_t^2 +
    eps)`` (RMSNorm, ``eps`` None: the dtype's machine epsilon). ``d h_t / d w`` is
    ``diag(xhat_t)`` and ``d h_t / d b`` the identity, so sample i's gradient is
    ``J_i = [sum_t xhat_it * delta_it, sum_t delta_it]`` (weight, then bias where the
    module has them): J is n x (d or 2d), formed outright (no rows of its parameters'
    size per position), and ``K = J J^T / n``. ``method`` and ``chunk_bytes`` do not
    apply (J is never larger than the rows it is summed from)."""
    rows, d = delta.shape
    a = a.to(delta.dtype)
    eps = getattr(module, "eps", None)
    eps = torch.finfo(a.dtype).eps if eps is None else float(eps)
    if isinstance(module, nn.LayerNorm):
        centred = a - a.mean(dim=1, keepdim=True)
        xhat = centred * torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)
    else:
        xhat = a * torch.rsqrt(a.pow(2).mean(dim=1, keepdim=True) + eps)
    parts = []
    if getattr(module, "weight", None) is not None:
        parts.append((xhat * delta).reshape(n, rows // n, d).sum(dim=1))
    if getattr(module, "bias", None) is not None:
        parts.append(delta.reshape(n, rows // n, d).sum(dim=1))
    jac = torch.cat(parts, dim=1)
    return jac @ jac.T / n


def _norm_applies(module: nn.Module) -> bool:
    """Normalised over the last axis alone, as :func:`_norm_gram` assumes."""
    shape = getattr(module, "normalized_shape", ())
    return len(tuple(shape)) == 1


def _embedding_applies(module: nn.Module) -> bool:
    return getattr(module, "max_norm", None) is None and not getattr(
        module, "scale_grad_by_freq", False
    )


#: Built-in structured strategies, registered below.
LINEAR_GRAM: Final = _BuiltinGram(_linear_gram, name="linear")
EMBEDDING_GRAM: Final = _BuiltinGram(_embedding_gram, applies=_embedding_applies, name="embedding")
TRANSPOSED_LINEAR_GRAM: Final = _BuiltinGram(
    _linear_gram, applies=_transposed_linear_shape, name="transposed_linear"
)

NORM_GRAM: Final = _BuiltinGram(_norm_gram, applies=_norm_applies, name="norm")

register_param_gram(nn.Linear, LINEAR_GRAM)
register_param_gram(nn.Embedding, EMBEDDING_GRAM)
register_param_gram(nn.LayerNorm, NORM_GRAM)
register_param_gram(nn.RMSNorm, NORM_GRAM)
register_param_gram("Conv1D", TRANSPOSED_LINEAR_GRAM)  # transformers.pytorch_utils.Conv1D


#: How many times slower, per multiply-add, the per-sample paths ran than the row Grams'
#: GEMMs on the benchmark machine (2-core EPYC CPU, float64). Linear: the batched
#: products with a T-long inner dimension and the writes of J are memory-bound (measured
#: 27 against 69 GFLOP/s). Embedding, per product of its blocks (``block_pairs``) against
#: the row Grams' ``N^2 (d_out + 1)`` (which also pay for the N x N mask and blocksum):
#: 1.9x to 4.4x where the small tokens' blocks dominate, 0.5x where dense tokens do
#: (thread CPU time on one thread; vocabularies of 3 to 50257 ids, T of 2 to 16, d_out
#: of 32 to 256; 2.6x for a modular-addition embedding, T = 2, 53 ids, d_out 128); the
#: per-sample path was the faster in every case measured with T > 1. Measured on CPU
#: only; CUDA uses the same weights, unmeasured (no GPU was available to us).
LINEAR_PER_SAMPLE_PENALTY = 2.5
EMBEDDING_PAIR_PENALTY = 4.0


def cheaper_gram_method(
    rows: int, n: int, d_in: int, d_out: int, *, pairs: int | None = None
) -> str:
    """The K method expected to be faster for N = ``rows`` rows of n samples.

    Linear (``pairs`` None): ``row_gram`` costs ``N^2 (d_in + d_out + 1)`` multiply-adds,
    ``per_sample`` ``d_in d_out (N + n^2)``, weighted by ``LINEAR_PER_SAMPLE_PENALTY``.
    Embedding (``pairs``: the products of rows of S the per-sample path computes,
    ``_TokenRows.block_pairs``; ``d_in`` unused): ``N^2 (d_out + 1)`` against
    ``pairs d_out`` weighted by ``EMBEDDING_PAIR_PENALTY``.
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


#: Tokens held by at least this many rows of S are one dense ``S_u S_u^T`` product each.
DENSE_TOKEN_ROWS = 32
#: How many times cheaper, per product, such a token's block ran than the batched
#: blocks of the others (16 against 79 ns per product at d_out 128, one thread).
DENSE_PAIR_DISCOUNT = 5


def _padded_token_rows(counts: Tensor) -> Tensor:
    """The block size of each token's rows of S: the next power of two >= its count."""
    return torch.where(
        counts > 1, torch.pow(2, torch.ceil(torch.log2(counts.to(torch.float64)))), 1
    ).to(counts.dtype)


@dataclass(frozen=True)
class _TokenRows:
    """The rows of S (one per distinct (sample, token) pair of the probe), grouped by token.

    index (N,): the row of S each position adds into. owner (M,): the sample of each
    row. order (M,): the rows sorted by token; counts: rows per token, in that order.
    pairs: ``P = sum_u counts_u^2``, the ordered pairs of rows sharing a token.
    block_pairs: the products :func:`_embedding_gram_per_sample` computes for the
    tokens of fewer than ``DENSE_TOKEN_ROWS`` rows, ``w_u^2`` each (``w_u`` the count
    rounded up to a power of two, :func:`_padded_token_rows`; at most 4x their pairs),
    plus ``counts_u^2 / DENSE_PAIR_DISCOUNT`` for each denser token (one GEMM and one
    scatter of its block, cheaper per product): the per-sample path's cost in
    :func:`cheaper_gram_method`'s units.
    """

    index: Tensor
    owner: Tensor
    order: Tensor
    counts: Tensor
    pairs: int
    block_pairs: int


def _token_rows(ids: Tensor, n: int, vocab: int) -> _TokenRows:
    """Group the probe's token ids (N,), N = n*T sample-major, into the rows of S."""
    rows = ids.numel()
    sample = torch.arange(rows, device=ids.device) // (rows // n)
    keys, index = torch.unique(sample * vocab + ids, return_inverse=True)
    owner, token = keys // vocab, keys % vocab
    order = torch.argsort(token, stable=True)
    _, counts = torch.unique_consecutive(token[order], return_counts=True)
    dense = counts >= DENSE_TOKEN_ROWS
    small = _padded_token_rows(counts[~dense])
    block_pairs = (
        int((small * small).sum()) + int((counts[dense] ** 2).sum()) // DENSE_PAIR_DISCOUNT
    )
    return _TokenRows(index, owner, order, counts, int((counts * counts).sum()), block_pairs)


def _embedding_gram_per_sample(
    delta: Tensor, tokens: _TokenRows, n: int, chunk_bytes: int
) -> Tensor:
    """Unscaled n x n Gram of an Embedding's weight gradients from the rows of S.

    ``K_ij = sum_u sum_{p in i, q in j, u_p = u_q = u} S_p . S_q``: token u's rows of S
    (c_u of them, each of a distinct sample) give the c_u x c_u block ``S_u S_u^T``,
    added at (owner_p, owner_q). A token held by ``DENSE_TOKEN_ROWS`` rows or more is
    one product of its own; the others are grouped by block size (c_u rounded up to a
    power of two, :func:`_padded_token_rows`, padding rows pointing at a zero row of S,
    so a padded entry adds an exact 0.0 to K) and each group is one batched product
    ``bmm(S_g, S_g^T)`` and one ``index_add_`` into K, a slice of tokens at a time
    within ``chunk_bytes``. Rounding up costs at most 4x the ``sum_u c_u^2`` products
    of the tokens' exact blocks. On CPU ``index_add_`` adds in index order, so K is
    the same from run to run.
    """
    d_out = delta.shape[1]
    m = tokens.owner.numel()
    # S with a zero row appended (row m): what a padding slot of a token's block reads
    summed = delta.new_zeros(m + 1, d_out).index_add_(0, tokens.index, delta)
    owner = torch.cat([tokens.owner, tokens.owner.new_zeros(1)])
    order = torch.cat([tokens.order, tokens.order.new_full((1,), m)])  # order[m] = zero row
    counts = tokens.counts
    starts = torch.cumsum(counts, 0) - counts
    gram = delta.new_zeros(n, n)
    dense = counts >= DENSE_TOKEN_ROWS
    for start, count in zip(starts[dense].tolist(), counts[dense].tolist(), strict=True):
        rows = order[start : start + count]
        who = owner[rows]  # distinct samples: one row of S per (sample, token)
        block = summed[rows] @ summed[rows].T
        where = (who[:, None].expand_as(block), who[None, :].expand_as(block))
        gram.index_put_(where, block, accumulate=True)
    flat = gram.view(-1)
    small = (~dense).nonzero().flatten()
    width = _padded_token_rows(counts[small])
    itemsize = delta.element_size()
    for w in torch.unique(width).tolist():
        group = small[width == w]
        slot = torch.arange(w, device=delta.device)
        per_token = w * d_out * itemsize + w * w * (itemsize + 8)  # block, products, indices
        step = max(1, chunk_bytes // per_token)
        for lo in range(0, group.numel(), step):
            g = group[lo : lo + step]
            at = torch.where(slot < counts[g, None], starts[g, None] + slot, m)  # k x w
            rows = order[at]
            block = summed[rows]  # k x w x d_out
            who = owner[rows]
            target = who[:, :, None] * n + who[:, None, :]
            flat.index_add_(
                0, target.reshape(-1), torch.bmm(block, block.transpose(1, 2)).reshape(-1)
            )
    return gram


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

    Where ``vmap`` cannot batch the model's forward pass (``nn.LSTM`` / ``nn.GRU``
    write their batched state into an unbatched buffer in place: "output with shape
    [1, 128] doesn't match the broadcast shape [64, 1, 128]"; any other operator
    without a batching rule that raises), J is built one sample at a time instead
    (:func:`_per_sample_rows`): ``J_i = d loss_i / d theta`` by ``torch.autograd.grad``
    of sample i's loss alone, the same rows exactly, n forward and backward passes
    instead of ``n / chunk`` vmapped ones. Said once per model type at INFO level (then
    at DEBUG); an
    error of the per-sample loop too is raised (the model cannot run on one sample).

    vmap's "There is a performance drop because we have not yet implemented the
    batching rule for ..." UserWarnings (``nn.TransformerEncoderLayer``'s and
    ``nn.MultiheadAttention``'s fused kernels in eval mode) are turned off inside this
    call only, by functorch's switch (:func:`_vmap_fallback_warnings_off`; not by the
    process-wide warnings filters, which other threads change meanwhile): they are about torch's speed, not the reading, and under a caller's
    ``warnings.simplefilter("error")`` (pytest's ``filterwarnings = error``) they would
    otherwise be raised inside the vmapped pass.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}  # tied: one name
    own: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for prefix, module in modules.items():
        for _, p in own_parameters(module):
            key = canonical.get(id(p))
            if key is not None and key not in own:  # a shared tensor: its first module
                own[key] = p.detach()
                owner[key] = prefix
    if not own:
        return {}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in own}
    frozen.update({k: v for k, v in model.named_buffers()})

    def one_loss(params: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        x1 = _unsqueeze(x)
        y1 = _unsqueeze(y)
        out = model_output(_functional(model, {**params, **frozen}, x1))
        return loss_fn(out, y1)[0]

    p_total = sum(v.numel() for v in own.values())
    itemsize = next(iter(own.values())).element_size()
    chunk = max(1, min(n, chunk_bytes // max(1, p_total * itemsize)))
    try:
        with _vmap_fallback_warnings_off():
            rows = _vmapped_rows(one_loss, own, owner, modules, inputs, targets, n, chunk)
    except Exception as exc:  # vmap cannot batch every operator: one sample at a time
        key = type(model).__qualname__
        level = logging.DEBUG if key in _SAID_PER_SAMPLE else logging.INFO
        _SAID_PER_SAMPLE.add(key)
        log.log(
            level,
            "parameter-side Gram of %s: torch.func.vmap cannot batch %s (%s); "
            "computed one sample at a time instead (exact, slower)",
            sorted(modules),
            key,
            _one_line(exc),
        )
        rows = _per_sample_rows(one_loss, own, owner, modules, inputs, targets, n)
    grams = {}
    for prefix, js in rows.items():
        if js:
            j = torch.cat(js, dim=0)
            grams[prefix] = j @ j.T / n
    return grams


#: The message of vmap's fallback warnings (a batching rule torch has not written yet).
_NO_BATCHING_RULE = (
    r"There is a performance drop because we have not yet implemented the batching rule"
)

_FALLBACK_WARNING_LOCK = threading.Lock()
_fallback_quiet_depth = 0


@contextlib.contextmanager
def _vmap_fallback_warnings_off() -> Iterator[None]:
    """vmap's batching-rule fallback warnings off for the duration, by functorch's own
    switch (``torch._C._functorch._set_vmap_fallback_warning_enabled``), not by
    ``warnings.catch_warnings``: that one saves and restores the process-wide filter
    list, and the reading runs in a worker thread ("ddsmon-read") while another
    ("ddsmon-load") or the main thread may enter and leave catch_warnings blocks of
    their own; interleaved, one block's exit puts back a list the other changed (a
    filter of one leaks for good, or another's is dropped while it is still inside).
    The switch is torch's and only ever set here (counted, so nested or concurrent
    calls turn it back on once, at the last exit; on again is torch's default). On a
    torch without it, the filter is used."""
    switch = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    if switch is None:  # pragma: no cover - every torch this project supports has it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE, category=UserWarning)
            yield
        return
    global _fallback_quiet_depth
    with _FALLBACK_WARNING_LOCK:
        _fallback_quiet_depth += 1
        switch(False)
    try:
        yield
    finally:
        with _FALLBACK_WARNING_LOCK:
            _fallback_quiet_depth -= 1
            if _fallback_quiet_depth == 0:
                switch(True)


#: Model types whose per-sample fallback was already said (once per process).
_SAID_PER_SAMPLE: set[str] = set()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _vmapped_rows(
    one_loss: Callable[[dict[str, Tensor], Any, Any], Tensor],
    own: dict[str, Tensor],
    owner: dict[str, str],
    modules: dict[str, nn.Module],
    inputs: Any,
    targets: Any,
    n: int,
    chunk: int,
) -> dict[str, list[Tensor]]:
    """Blocks of rows of each module's J, ``chunk`` samples per vmapped pass."""
    per_sample_grad = vmap(grad(one_loss), in_dims=(None, 0, 0))
    blocks: dict[str, list[Tensor]] = {m: [] for m in modules}
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        grads = per_sample_grad(own, _slice(inputs, sl), _slice(targets, sl))
        _add_rows(blocks, grads, owner)
        del grads
    return blocks


def _add_rows(
    blocks: dict[str, list[Tensor]], grads: dict[str, Tensor], owner: dict[str, str]
) -> None:
    """Append to each module's blocks its rows of J: the gradients ``grads`` (parameter
    key -> (rows, *shape)) of the parameters it owns, flattened and side by side."""
    for prefix, rows in blocks.items():
        parts = [g.reshape(g.shape[0], -1) for k, g in grads.items() if owner[k] == prefix]
        if parts:
            rows.append(torch.cat(parts, dim=1))


def _per_sample_rows(
    one_loss: Callable[[dict[str, Tensor], Any, Any], Tensor],
    own: dict[str, Tensor],
    owner: dict[str, str],
    modules: dict[str, nn.Module],
    inputs: Any,
    targets: Any,
    n: int,
) -> dict[str, list[Tensor]]:
    """Each module's J a row at a time: ``J_i = d loss_i / d theta`` by
    ``torch.autograd.grad`` of sample i's loss (sample i alone through the model,
    ``one_loss`` as vmap calls it); a parameter the loss does not reach has a zero
    gradient, as in vmap's ``grad``."""
    blocks: dict[str, list[Tensor]] = {m: [] for m in modules}
    keys = list(own)
    for i in range(n):
        params = {k: own[k].detach().requires_grad_(True) for k in keys}
        with torch.enable_grad():
            loss = one_loss(params, _index(inputs, i), _index(targets, i))
            found = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
        row = {
            k: (torch.zeros_like(own[k]) if g is None else g.detach()).unsqueeze(0)
            for k, g in zip(keys, found, strict=True)
        }
        _add_rows(blocks, row, owner)
    return blocks


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


def _index(obj: Any, i: int) -> Any:
    """Sample i of a probe, without its batch axis (what vmap hands ``one_loss``); a 0-d
    tensor or another object is the same for every sample and passes through."""
    if isinstance(obj, Tensor):
        return obj[i] if obj.ndim > 0 else obj
    if isinstance(obj, dict):
        return {k: _index(v, i) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_index(v, i) for v in obj)
    return obj
