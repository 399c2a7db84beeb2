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

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ddsmon.readings import DERIVED_READINGS, SCALAR_READINGS

__all__ = (
    "DERIVED_READINGS",
    "LOSS_QUANTILES",
    "SCALAR_READINGS",
    "LayerSignature",
    "Signatures",
    "dying_directions",
    "loss_spread",
    "resolved_samples",
    "spectral_entropy",
)

#: The quantiles of the per-sample losses whose ratio is :func:`loss_spread`: the
#: 90th over the 10th percentile (the middle 80% of the probe's samples).
LOSS_QUANTILES: tuple[float, float] = (0.1, 0.9)


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

    Regime readings (properties, from the spectra):
        x_entropy: the normalised spectral entropy of X (arXiv 2604.13123),
            ``-sum p_i log p_i / log x_rank`` with ``p_i = sigma_i^2 / sum sigma_j^2``
            over the resolved singular values: 1 when the activation energy is spread
            evenly over every resolved direction, toward 0 as a few directions carry it.
        g_dominance: ``lambda_max / sum of the resolved eigenvalues of G``, the share of
            the per-sample gradient energy ``trace G = mean_i |delta_i|^2`` along its
            top direction (1/g_rank when spread evenly, 1 when every sample's gradient
            points one way).

    Model-level reading (on the output layer only, ``None`` on every other layer):
        loss_spread: :func:`loss_spread` of the probe's per-sample losses ``loss_i``, the
            ratio of their 90th to their 10th percentile (``log10`` of it: the decades
            the middle 80% of the samples span). It belongs to the model, not to one
            layer; it is carried by the *output layer*, the last layer read to run in the
            forward pass (the logits' module of a plain model), because that layer's
            Delta rows are ``d loss_i / d logits_i``, whose sizes follow ``loss_i``
            (for cross-entropy near zero loss ``|delta_i| ~ sqrt(2) loss_i``). ``None``
            without a backward pass (``fisher="none"``).
        samples_resolved: :func:`resolved_samples`, on the output layer likewise: how
            many probe samples have a loss within ``sqrt(d eps)`` of the largest, the
            samples whose gradients G can still resolve above its trust floor.

    Derived reading (between two checkpoints; ``None`` from the engine):
        dying_directions: :func:`dying_directions` between the layer's previous
            checkpoint and this one, filled in by :meth:`Signatures.with_derived` from
            :attr:`ddsmon.events.EventDetector.last_derived`.

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
    # model-level, on the output layer only
    loss_spread: float | None = None
    samples_resolved: int | None = None
    # derived between checkpoints (the event detector's; None from the engine)
    dying_directions: float | None = None
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

    @property
    def x_entropy(self) -> float | None:
        """Normalised spectral entropy of X over its resolved singular values (None when
        none is resolved; 0.0 when one is)."""
        if not self.finite or self.floor_x is None:
            return None
        return spectral_entropy(self.x_spectrum, self.floor_x)

    @property
    def g_dominance(self) -> float | None:
        """``lambda_max`` over the sum of the resolved eigenvalues of G (None when none is
        resolved)."""
        if not self.finite or self.floor_g is None or self.g_spectrum.size == 0:
            return None
        resolved = self.g_spectrum[self.g_spectrum > self.floor_g]
        total = float(np.sum(resolved))
        if resolved.size == 0 or not total > 0.0 or not math.isfinite(total):
            return None
        return float(np.max(resolved)) / total

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
    ``sample_losses``: the per-sample losses ``loss_i`` (n,) the probe pass
    differentiated, float64, in probe order (None without a backward pass);
    ``output_layer``: the layer that carries the model-level readings made of them
    (``loss_spread``), the last layer read to run in the forward pass.
    """

    layers: dict[str, LayerSignature]
    n: int
    device: str
    forward_dtype: str
    fisher: str
    loss: str
    seconds: float = 0.0
    sample_losses: np.ndarray | None = field(default=None, repr=False)
    output_layer: str | None = None

    @property
    def fitted_loss(self) -> float | None:
        """The loss of the probe's best-fit tenth: the 10th percentile of
        :attr:`sample_losses` (the lower of :data:`LOSS_QUANTILES`); None without a
        backward pass, for an empty probe, or where it is not finite. It falls with the
        training loss whether the probe is training data or holds held-out samples too:
        on the modular-addition probe, half held out, the mean loss rises from 4.0 to 12
        during memorisation while the 10th percentile falls from 3.7 to 0.03 with the
        training loss. The event detector's warm-up follows it where the checkpoints
        carry no training loss (:attr:`ddsmon.events.EventWindows.loss_falling`)."""
        if self.sample_losses is None or self.sample_losses.size == 0:
            return None
        value = float(np.quantile(self.sample_losses, LOSS_QUANTILES[0]))
        return value if math.isfinite(value) else None

    def with_derived(self, derived: Mapping[str, Mapping[str, Any]]) -> Signatures:
        """These signatures with the derived readings filled in: ``derived`` maps a layer
        to ``{reading: value}`` for readings of :data:`DERIVED_READINGS` (what
        :attr:`ddsmon.events.EventDetector.last_derived` holds after an update); layers
        and readings it does not name are left as they are. Unknown reading names raise
        ``KeyError``."""
        layers = dict(self.layers)
        for name, values in derived.items():
            if name not in layers:
                continue
            unknown = [k for k in values if k not in DERIVED_READINGS]
            if unknown:
                raise KeyError(
                    f"layer {name!r}: {unknown} are no derived readings "
                    f"({', '.join(DERIVED_READINGS)})"
                )
            changes: dict[str, Any] = {
                k: None if v is None else float(v) for k, v in values.items()
            }
            layers[name] = dataclasses.replace(layers[name], **changes)
        return dataclasses.replace(self, layers=layers)

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


def spectral_entropy(values: np.ndarray, floor: float) -> float | None:
    """Normalised entropy of a spectrum of singular values: ``-sum p_i log p_i / log k``,
    ``p_i = s_i^2 / sum s_j^2`` over the ``k`` values above ``floor`` (arXiv 2604.13123).

    1.0 for a flat spectrum, toward 0 as a few values carry the energy; 0.0 when one
    value is resolved, None when none is (or the values are not finite).
    """
    s = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return None
    s = s[s > floor]
    if s.size == 0:
        return None
    if s.size == 1:
        return 0.0
    energy = s * s
    p = energy / np.sum(energy)
    p = p[p > 0.0]
    h = float(-np.sum(p * np.log(p)) / math.log(s.size))
    return min(max(h, 0.0), 1.0)


def loss_spread(losses: np.ndarray, eps: float = float(np.finfo(np.float64).eps)) -> float | None:
    """The spread of the per-sample losses: ``q_hi / max(q_lo, eps * q_hi)``.

    ``losses`` (n,): the probe's per-sample losses ``loss_i`` (non-negative);
    ``q_lo, q_hi``: their :data:`LOSS_QUANTILES` (10th and 90th percentiles, linear
    interpolation between order statistics, ``numpy.quantile``'s default). ``log10`` of
    the result is the number of decades the middle 80% of the samples span; it is at
    most ``1 / eps`` (``eps`` of the forward dtype), losses below ``eps * q_hi`` being
    read as that (a loss of exactly 0, or one rounded to it, has no resolved size).

    Why it matters: at the output layer ``Delta`` has rows ``d loss_i / d logits_i``,
    whose norms follow ``loss_i`` near zero loss, and ``G = Delta^T Delta / n`` weighs
    sample i by ``|delta_i|^2``: a spread of s decades in the losses puts the samples'
    gradient energies ~2s decades apart, so past ``s ~ -log10(d eps) / 2`` (about 7
    decades in float64) the well-fitted samples' directions fall under the trust floor
    ``floor_g = d eps lambda_max`` and ``g_rank`` follows the loss's dynamic range, not
    the structure. Returns None when a loss is negative or not finite, or ``q_hi`` is 0.
    """
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0.0):
        return None
    q_lo, q_hi = (float(q) for q in np.quantile(values, LOSS_QUANTILES))
    if not q_hi > 0.0:
        return None
    return q_hi / max(q_lo, eps * q_hi)


def resolved_samples(
    losses: np.ndarray, d: int, eps: float = float(np.finfo(np.float64).eps)
) -> int | None:
    """How many per-sample losses are at least ``sqrt(d eps) * max_i loss_i``.

    ``losses`` (n,) non-negative; ``d`` the width of the output layer; ``eps`` that of
    the forward dtype. Near zero loss sample i's output gradient has norm ~ ``loss_i``
    and enters ``G = Delta^T Delta / n`` with weight ``|delta_i|^2``, against a trust
    floor of ``d eps lambda_max``: a sample more than ``-log10(d eps) / 2`` decades
    (about 7 in float64) below the largest loss is under the floor, and ``g_rank`` of a
    layer fed by the output gradient can count no more directions than this many
    samples span. An estimate: ``lambda_max`` also depends on how the large gradients
    align. None when a loss is negative or not finite, or there are none.
    """
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0.0):
        return None
    top = float(np.max(values))
    if not top > 0.0:
        return 0
    return int(np.sum(values >= top * math.sqrt(d * eps)))


def _get(reading: LayerSignature | Mapping[str, Any], key: str) -> Any:
    return reading.get(key) if isinstance(reading, Mapping) else getattr(reading, key)


def dying_directions(
    prev: LayerSignature | Mapping[str, Any], cur: LayerSignature | Mapping[str, Any]
) -> float | None:
    """Number of directions dying at the rate of the smallest one, between two readings.

    The rank-multiplicative volume identity (paper Figure 4): near a singular set with
    ``r`` dead directions whose eigenvalues fall together, ``log det+(G)`` falls ``r``
    times as fast as ``log lambda_min``, so

        r_hat = (logdet(cur) - logdet(prev)) / (log lambda_min(cur) - log lambda_min(prev)).

    ``prev`` and ``cur`` are two readings of one layer, each a :class:`LayerSignature` or
    its :meth:`~LayerSignature.to_dict`. Returns None where lambda_min did not fall (or
    either reading is unresolved or non-finite), or where the active rank changed between
    the two (the volumes then sum different sets), or where ``log det+(G)`` rose while
    lambda_min fell (the other directions grew: the estimate would be negative and counts
    nothing). An estimate above the rank (the spectrum falling faster than its smallest)
    is the rank: every direction is dying. Note that a loss that merely shrinks lowers
    every eigenvalue together, and the count is then the whole active rank.
    """
    readings = [(_get(r, "lambda_min"), _get(r, "logdet"), _get(r, "g_rank")) for r in (prev, cur)]
    if any(_get(r, "finite") is False for r in (prev, cur)):
        return None
    (lam0, vol0, rank0), (lam1, vol1, rank1) = readings
    if lam0 is None or lam1 is None or vol0 is None or vol1 is None or rank0 != rank1:
        return None
    lam0, lam1, vol0, vol1 = float(lam0), float(lam1), float(vol0), float(vol1)
    if not (lam0 > 0.0 and lam1 > 0.0) or not all(map(math.isfinite, (lam0, lam1, vol0, vol1))):
        return None
    d_log_min = math.log(lam1) - math.log(lam0)
    if not d_log_min < 0.0:
        return None
    count = (vol1 - vol0) / d_log_min
    if not count >= 0.0:
        return None
    # numbers.Real: a numpy integer (np.int64) is no int, and was left unclamped
    return min(count, float(rank1)) if isinstance(rank1, numbers.Real) else count
