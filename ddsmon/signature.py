"""The readings: what one probe pass says about each layer.

A :class:`LayerSignature` holds the Dead-Direction Signature (DDS) readings of one
layer, a :class:`Signatures` those of every selected layer of one model on one probe.
Both are plain frozen data: the engine (:mod:`ddsmon.engine`) fills them, the daemon
and its sinks only read them.

Notation (Shirodkar & Narayanan 2026, arXiv 2606.21158, "Dead-Direction Signatures"):
for layer ``l`` with output ``h_l`` in R^d and a probe of ``n`` samples,

* ``X_l`` (N x d) stacks the layer outputs, one row per sample and position
  (N = n, or n*T when the output has a position axis);
* ``Delta_l`` (N x d) stacks ``d loss_i / d h_l`` for the per-sample loss ``loss_i``;
* ``G_l = Delta_l^T Delta_l / n`` is the per-sample-gradient Fisher-Gram
  (the empirical Fisher of an additive shift of ``h_l``);
* ``K_l = J_l J_l^T / n`` is the parameter-side Gram, ``J_l`` (n x p_l) the per-sample
  gradients with respect to the module's own parameters: its positive spectrum is that
  of the layer's empirical-Fisher block.

A value is *resolved* only above its trust floor (see :mod:`ddsmon.spectra`); a
reading whose matrix has no resolved value is ``None``. What each scalar reading is
(side, unit, floor, label) is one row of :data:`ddsmon.readings.READINGS`;
:data:`SCALAR_READINGS` (their names) is re-exported from there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ddsmon.readings import SCALAR_READINGS

__all__ = ("SCALAR_READINGS", "LayerSignature", "Signatures", "dying_directions")


@dataclass(frozen=True)
class LayerSignature:
    """DDS readings of one layer on one probe.

    Activation side (singular values of X, descending in ``x_spectrum``):
        sigma_min: smallest singular value of X above ``floor_x``.
        sigma_max: largest singular value of X.
        x_rank: number of singular values above ``floor_x``; ``x_dead = d - x_rank``.
        floor_x: ``max(N, d) * eps * sigma_max``, eps of the forward dtype.

    Fisher side (eigenvalues of G, descending in ``g_spectrum``):
        lambda_min: smallest eigenvalue of G above ``floor_g`` (the paper's
            lambda+_min, Figure 2 and 7).
        lambda_max: largest eigenvalue of G.
        g_rank: eigenvalues above ``floor_g``; ``g_dead = d - g_rank``.
        floor_g: ``dim * eps * lambda_max``, ``dim`` the side decomposed (min(N, d)).
        logdet: active-volume ``log det+(G) = sum_{lambda > floor_g} log lambda``
            (natural log); its slope toward a singular set counts dead directions
            (paper Figure 4A).
        log_volume: ``logdet - g_rank * log(lambda_max)``: scale-free, unchanged when
            every eigenvalue scales together (a loss that merely shrinks).
        u_dead_gain: ``u^T G u = ||Delta u||^2 / n`` for ``u`` the right singular vector
            of X at ``sigma_min``: the Fisher-side reading at the activation-side dead
            direction (paper Figure 6, Figure 10).

    Parameter side (``param_*``, eigenvalues of K; ``None`` when the module owns no
    parameters or the family was not asked for): the same readings for K, with
    ``param_count = p_l`` and ``param_floor = n * eps * param_lambda_max``.

    ``finite`` is False when the layer's activations or gradients held NaN/inf; then
    ``nonfinite`` says which and every reading is ``None``.
    """

    name: str
    n: int
    N: int
    d: int
    # activation side
    sigma_min: float | None = None
    sigma_max: float | None = None
    x_rank: int | None = None
    x_dead: int | None = None
    floor_x: float | None = None
    # Fisher side
    lambda_min: float | None = None
    lambda_max: float | None = None
    g_rank: int | None = None
    g_dead: int | None = None
    floor_g: float | None = None
    logdet: float | None = None
    log_volume: float | None = None
    u_dead_gain: float | None = None
    # parameter side
    param_count: int | None = None
    param_lambda_min: float | None = None
    param_lambda_max: float | None = None
    param_rank: int | None = None
    param_floor: float | None = None
    param_logdet: float | None = None
    param_log_volume: float | None = None
    # health
    finite: bool = True
    nonfinite: str | None = None
    # spectra (descending, float64, every value including unresolved ones)
    x_spectrum: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    g_spectrum: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    param_spectrum: np.ndarray | None = field(default=None, repr=False)

    @property
    def lambda_ratio(self) -> float | None:
        """Scale-free ``lambda_min / lambda_max`` (None when unresolved)."""
        if self.lambda_min is None or not self.lambda_max:
            return None
        return self.lambda_min / self.lambda_max

    @property
    def sigma_ratio(self) -> float | None:
        """Scale-free ``sigma_min / sigma_max`` (None when unresolved)."""
        if self.sigma_min is None or not self.sigma_max:
            return None
        return self.sigma_min / self.sigma_max

    def to_dict(self, spectra: bool = False) -> dict[str, Any]:
        """Scalar readings as a plain dict (JSON-ready); spectra as lists if asked."""
        out = {k: v for k, v in asdict(self).items() if not k.endswith("spectrum")}
        for name in SCALAR_READINGS:  # the properties (lambda_ratio, sigma_ratio)
            if name not in out:
                out[name] = getattr(self, name)
        if spectra:
            out["x_spectrum"] = self.x_spectrum.tolist()
            out["g_spectrum"] = self.g_spectrum.tolist()
            out["param_spectrum"] = (
                None if self.param_spectrum is None else self.param_spectrum.tolist()
            )
        return out


@dataclass(frozen=True)
class Signatures:
    """Every selected layer's :class:`LayerSignature` from one probe pass.

    ``layers`` keeps the model's module order. ``n`` is the probe size, ``device``
    where the reading ran, ``forward_dtype`` the probe pass's dtype (``"float64"`` by
    default), ``fisher`` the families read, ``seconds`` the wall time of the call.
    """

    layers: dict[str, LayerSignature]
    n: int
    device: str
    forward_dtype: str
    fisher: str
    loss: str
    seconds: float = 0.0

    def to_dict(self, spectra: bool = False) -> dict[str, Any]:
        return {
            "n": self.n,
            "device": self.device,
            "forward_dtype": self.forward_dtype,
            "fisher": self.fisher,
            "loss": self.loss,
            "seconds": self.seconds,
            "layers": {k: v.to_dict(spectra=spectra) for k, v in self.layers.items()},
        }


def dying_directions(prev: LayerSignature, cur: LayerSignature) -> float | None:
    """Number of directions dying at the rate of the smallest one, between two readings.

    The rank-multiplicative volume identity (paper Figure 4): near a singular set with
    ``r`` dead directions whose eigenvalues fall together, ``log det+(G)`` falls ``r``
    times as fast as ``log lambda_min``, so

        r_hat = (logdet(cur) - logdet(prev)) / (log lambda_min(cur) - log lambda_min(prev)).

    Returns None where lambda_min did not fall (or either reading is unresolved), or where
    the active rank changed between the two (the volumes then sum different sets).
    """
    if prev.lambda_min is None or cur.lambda_min is None:
        return None
    if prev.logdet is None or cur.logdet is None or prev.g_rank != cur.g_rank:
        return None
    d_log_min = math.log(cur.lambda_min) - math.log(prev.lambda_min)
    if not d_log_min < 0.0:
        return None
    return (cur.logdet - prev.logdet) / d_log_min
