"""Slow, plainly correct reference implementations of the DDS readings (for tests only).

Everything here is written the long way on purpose, so that it shares no code and no
shortcut with the engine (:mod:`ddsmon.engine`):

* per-sample quantities come from a loop over samples, one forward and one backward
  (``torch.autograd.grad``) per sample on a float64 deep copy of the model;
* ``G = Delta^T Delta / n`` is always built as the full d x d matrix and ``K = J J^T / n``
  from the explicit n x p per-sample parameter-gradient matrix ``J``; spectra come from
  ``numpy.linalg.eigvalsh`` / ``numpy.linalg.svd`` (LAPACK, float64).

Conventions (the engine's, restated; issue 2):

* per-sample loss: cross-entropy on ``(n, C)`` logits is the sample's loss; on
  ``(n, T, C)`` logits it is the mean over the sample's T positions; MSE is the mean of
  the squared error over every non-batch element of the sample;
* ``Delta`` has one row per (sample, position): ``d loss_i / d h_{i,t}``;
  ``G = Delta^T Delta / n`` divides by the number of samples ``n``, not rows ``N``;
* ``J`` has one row per sample: ``d loss_i / d theta`` over the module's own parameters
  (summed over positions by the chain rule); ``K = J J^T / n``;
* trust floors: ``floor_x = max(N, d) * eps * sigma_max``,
  ``floor_g = min(N, d) * eps * lambda_max``, ``param_floor = n * eps * param_lambda_max``
  (the engine decomposes the n x n side of K), ``eps`` that of the forward dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = (
    "Capture",
    "assert_close_report",
    "per_sample_capture",
    "per_sample_loss",
    "readings",
    "spectrum_readings",
)

LossSpec = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: LossSpec) -> torch.Tensor:
    """Per-sample losses, shape ``(n,)``, written out element by element.

    ``"ce"``: ``-log softmax(z)[y]``, averaged over positions for ``(n, T, C)`` logits.
    ``"lm"``: next-token: ``-log softmax(z_t)[y_{t+1}]`` averaged over the positions
    whose next target is not -100.
    ``"mse"``: ``mean over non-batch elements of (out - target)^2``.
    A callable is used as given.
    """
    if callable(loss):
        return loss(outputs, targets)
    n = outputs.shape[0]
    if loss == "ce":
        logp = outputs - torch.logsumexp(outputs, dim=-1, keepdim=True)
        picked = torch.gather(logp, -1, targets.long().unsqueeze(-1)).squeeze(-1)
        return (-picked).reshape(n, -1).mean(dim=1)
    if loss == "lm":  # position t scored against the token at t + 1, -100 skipped
        logp = outputs - torch.logsumexp(outputs, dim=-1, keepdim=True)
        rows = []
        for i in range(n):
            scored = [
                -logp[i, t, int(targets[i, t + 1])]
                for t in range(outputs.shape[1] - 1)
                if int(targets[i, t + 1]) != -100
            ]
            rows.append(torch.stack(scored).mean() if scored else logp.new_zeros(()))
        return torch.stack(rows)
    if loss == "mse":
        diff = outputs - targets.to(outputs.dtype)
        return (diff * diff).reshape(n, -1).mean(dim=1)
    raise ValueError(f"unknown loss {loss!r}")


@dataclass
class Capture:
    """One layer's explicit matrices from the per-sample loop (all float64 numpy).

    ``X`` (N x d) outputs, ``Delta`` (N x d) per-sample output gradients, ``J`` (n x p)
    per-sample parameter gradients (``None`` when the module owns no parameters).
    """

    X: np.ndarray
    Delta: np.ndarray
    J: np.ndarray | None
    n: int


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"no tensor in module output of type {type(out).__name__}")


def _slice(x: object, i: int) -> object:
    if isinstance(x, torch.Tensor):
        return x[i : i + 1]
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(v, i) for v in x)
    if isinstance(x, dict):
        return {k: _slice(v, i) for k, v in x.items()}
    return x


def _to_double(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def _call(model: nn.Module, inputs: object) -> torch.Tensor:
    if isinstance(inputs, dict):
        return _first_tensor(model(**inputs))
    if isinstance(inputs, (tuple, list)):
        return _first_tensor(model(*inputs))
    return _first_tensor(model(inputs))


def per_sample_capture(
    model: nn.Module,
    inputs: object,
    targets: torch.Tensor,
    loss: LossSpec,
    layers: Sequence[str],
    n: int | None = None,
) -> dict[str, Capture]:
    """X, Delta and J of each named layer by a loop: one forward and backward per sample.

    Runs on a float64 deep copy of ``model`` in eval mode (the model itself is untouched).
    Sample ``i`` is ``inputs[i:i+1]`` (applied through tuples/dicts); its loss is
    ``per_sample_loss(model(x_i), y_i)[0]``; ``Delta`` rows for sample ``i`` are
    ``autograd.grad(loss_i, h_l(x_i))`` flattened over every leading axis, and ``J[i]``
    the concatenated ``autograd.grad(loss_i, params of l)``.
    """
    ref = copy.deepcopy(model).double().eval()
    inputs = _to_double(inputs)
    targets = targets.double() if targets.is_floating_point() else targets
    modules = dict(ref.named_modules())
    if n is None:
        n = targets.shape[0]
    store: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_mod: nn.Module, _args: object, out: object) -> None:
            store[name] = _first_tensor(out)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    xs: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    ds: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    js: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    try:
        for i in range(n):
            store.clear()
            out = _call(ref, _slice(inputs, i))
            li = per_sample_loss(out, targets[i : i + 1], loss)
            assert li.shape == (1,), li.shape
            for name in layers:
                h = store[name]
                params = [p for p in modules[name].parameters() if p.requires_grad]
                grads = torch.autograd.grad(
                    li[0], [h, *params], retain_graph=True, allow_unused=True
                )
                gh = torch.zeros_like(h) if grads[0] is None else grads[0]
                d = h.shape[-1]
                xs[name].append(h.detach().reshape(-1, d).numpy().copy())
                ds[name].append(gh.detach().reshape(-1, d).numpy().copy())
                if params:
                    flat = [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(params, grads[1:])
                    ]
                    js[name].append(torch.cat(flat).detach().numpy().copy())
    finally:
        for hnd in handles:
            hnd.remove()
    return {
        name: Capture(
            X=np.concatenate(xs[name], axis=0),
            Delta=np.concatenate(ds[name], axis=0),
            J=np.stack(js[name]) if js[name] else None,
            n=n,
        )
        for name in layers
    }


def spectrum_readings(values: np.ndarray, floor: float) -> dict[str, float | int | None]:
    """Readings of a PSD spectrum: the positive part is the values strictly above ``floor``.

    ``lambda_min`` = smallest value above the floor, ``rank`` = their count,
    ``logdet`` = sum of their natural logs, ``log_volume = logdet - rank * log(lambda_max)``.
    """
    vals = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    lam_max = float(vals[0]) if vals.size else 0.0
    pos = vals[vals > floor]
    if pos.size == 0 or lam_max <= 0.0:
        return {
            "lambda_min": None,
            "lambda_max": lam_max,
            "rank": 0,
            "logdet": None,
            "log_volume": None,
        }
    logdet = float(sum(math.log(float(v)) for v in pos))
    return {
        "lambda_min": float(pos[-1]),
        "lambda_max": lam_max,
        "rank": int(pos.size),
        "logdet": logdet,
        "log_volume": logdet - pos.size * math.log(lam_max),
    }


def readings(cap: Capture, eps: float = float(np.finfo(np.float64).eps)) -> dict[str, object]:
    """Every DDS reading of one layer from its explicit matrices (the definitions, literally).

    ``G`` is the full d x d ``Delta^T Delta / n`` whatever N is; ``u`` is the right singular
    vector of X at its smallest singular value above ``floor_x``; ``K = J J^T / n``.
    """
    X, Delta, n = cap.X, cap.Delta, cap.n
    N, d = X.shape
    sv_x = np.linalg.svd(X, compute_uv=False)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    sigma_max = float(sv_x[0])
    floor_x = max(N, d) * eps * sigma_max
    x_pos = sv_x > floor_x
    x_rank = int(x_pos.sum())

    G = Delta.T @ Delta / n
    g_spec = np.sort(np.linalg.eigvalsh(G))[::-1]
    lam_max = float(g_spec[0])
    floor_g = min(N, d) * eps * lam_max
    g = spectrum_readings(g_spec, floor_g)

    u_gain = None
    if x_rank > 0:
        u = vt[x_rank - 1]
        u_gain = float(u @ G @ u)

    out: dict[str, object] = {
        "N": N,
        "d": d,
        "n": n,
        "x_spectrum": sv_x,
        "sigma_max": sigma_max,
        "sigma_min": float(sv_x[x_rank - 1]) if x_rank else None,
        "x_rank": x_rank,
        "x_dead": d - x_rank,
        "floor_x": floor_x,
        "g_spectrum": g_spec,
        "G": G,
        "lambda_min": g["lambda_min"],
        "lambda_max": lam_max,
        "g_rank": g["rank"],
        "g_dead": d - int(g["rank"]),
        "floor_g": floor_g,
        "logdet": g["logdet"],
        "log_volume": g["log_volume"],
        "u_dead_gain": u_gain,
    }
    if cap.J is not None:
        K = cap.J @ cap.J.T / n
        k_spec = np.sort(np.linalg.eigvalsh(K))[::-1]
        k_max = float(k_spec[0])
        floor_k = n * eps * k_max
        k = spectrum_readings(k_spec, floor_k)
        out.update(
            param_count=cap.J.shape[1],
            param_spectrum=k_spec,
            param_lambda_max=k_max,
            param_lambda_min=k["lambda_min"],
            param_rank=k["rank"],
            param_floor=floor_k,
            param_logdet=k["logdet"],
            param_log_volume=k["log_volume"],
        )
    return out


def assert_close_report(
    actual: object, expected: object, *, rtol: float = 0.0, atol: float = 0.0, what: str = ""
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, else list every miss.

    On failure the message names ``what`` and prints each mismatched entry with its
    actual value, expected value, absolute and relative difference.
    """
    a = np.atleast_1d(np.asarray(actual, dtype=np.float64))
    e = np.atleast_1d(np.asarray(expected, dtype=np.float64))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    diff = np.abs(a - e)
    bad = ~(diff <= atol + rtol * np.abs(e))
    if bad.any():
        lines = [f"{what}: {int(bad.sum())} of {a.size} entries differ (rtol={rtol}, atol={atol})"]
        for idx in np.argwhere(bad)[:20]:
            i = tuple(int(j) for j in idx)
            rel = diff[i] / abs(e[i]) if e[i] != 0 else float("inf")
            lines.append(
                f"  {list(i)} actual={a[i]:.17g} expected={e[i]:.17g} abs={diff[i]:.3g} rel={rel:.3g}"
            )
        raise AssertionError("\n".join(lines))
