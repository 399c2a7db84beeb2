"""The table of readings: what each per-layer number *is*, in one place.

Every scalar reading a :class:`~ddsmon.signature.LayerSignature` carries has one row in
:data:`READINGS`: its name, the matrix it is read from (``side``), its unit, the trust
floor it is read against, a short label for tables and plots, and whether it is a
*headline* reading (what a reviewer should see first) or a detail. The signature, the
event detectors, the terminal, the plots and the MLflow sink iterate over this table;
adding a reading is one row here (and the field or property that computes it).

Sides (Shirodkar & Narayanan 2026, arXiv 2606.21158, notation of
:mod:`ddsmon.signature`):

* ``"X"``: singular values of the layer's activation matrix X (N x d);
* ``"G"``: eigenvalues of the per-sample-gradient Fisher-Gram ``G = Delta^T Delta / n``;
* ``"K"``: eigenvalues of the parameter-side Gram ``K = J J^T / n``.

Units, and how a change is measured in decades (:meth:`Reading.decades`):

* ``"value"``: a positive quantity (a singular value, an eigenvalue): ``log10 v``;
* ``"ratio"``: a scale-free positive ratio (``lambda_min / lambda_max``): ``log10 r``;
* ``"nats"``: a natural logarithm (``log det+ G``, ``log_volume``): ``v / ln 10``;
* ``"count"``: an integer (ranks, dead counts): not measured in decades;
* ``"floor"``: a trust floor (``dim * eps * max``), the level below which a value is
  unresolved (paper Figure 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = (
    "HEADLINE_READINGS",
    "READINGS",
    "SCALAR_READINGS",
    "SIDES",
    "UNITS",
    "Reading",
    "reading",
)

#: The matrices a reading comes from: activations X, Fisher-Gram G, parameter-side Gram K.
SIDES: tuple[str, ...] = ("X", "G", "K")
#: The units a reading can have (see the module docstring).
UNITS: tuple[str, ...] = ("value", "ratio", "nats", "count", "floor")


@dataclass(frozen=True)
class Reading:
    """One row of the table: what the per-layer number ``name`` is.

    name: the ``LayerSignature`` field or property, and the MLflow metric's last part
        (``dds/<layer>/<name>``).
    side: ``"X"``, ``"G"`` or ``"K"``, the matrix it is read from.
    unit: one of :data:`UNITS`.
    floor: the name of the floor reading it is read against (``None`` for readings that
        are never unresolved against a floor, such as ranks and the floors themselves).
    label: short text for table headers and plot legends.
    headline: True for what a reviewer should see first (scale-free readings and dead
        counts); False for details kept at hand.
    description: one line, for docs, MLflow's run description and plot titles.
    """

    name: str
    side: str
    unit: str
    floor: str | None
    label: str
    headline: bool
    description: str

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"reading {self.name!r}: side {self.side!r} not in {SIDES}")
        if self.unit not in UNITS:
            raise ValueError(f"reading {self.name!r}: unit {self.unit!r} not in {UNITS}")

    @property
    def scale_free(self) -> bool:
        """True when the reading does not move if every eigenvalue scales together."""
        return self.unit == "ratio" or self.name.endswith("log_volume")

    @property
    def is_count(self) -> bool:
        return self.unit == "count"

    def decades(self, value: float) -> float:
        """``value`` on a log10 scale: ``value / ln 10`` for nats, ``log10 value`` for a
        positive value or ratio (``-inf`` at 0). Counts and floors have no decades."""
        if self.unit == "nats":
            return value / math.log(10.0)
        if self.unit in ("value", "ratio"):
            return math.log10(value) if value > 0 else -math.inf
        raise ValueError(f"reading {self.name!r} ({self.unit}) is not measured in decades")


#: Every scalar reading, in the order tables and metric batches show them.
READINGS: tuple[Reading, ...] = (
    # activation side: singular values of X
    Reading("sigma_min", "X", "value", "floor_x", "σ_min", False,
            "smallest singular value of X above floor_x"),
    Reading("sigma_max", "X", "value", None, "σ_max", False,
            "largest singular value of X"),
    Reading("x_rank", "X", "count", None, "x_rank", False,
            "singular values of X above floor_x"),
    Reading("x_dead", "X", "count", None, "x_dead", True,
            "d - x_rank: dead directions of the activations"),
    Reading("floor_x", "X", "floor", None, "floor_x", False,
            "max(N, d) * eps * sigma_max: the activation side's trust floor"),
    # Fisher side: eigenvalues of G
    Reading("lambda_min", "G", "value", "floor_g", "λ_min", False,
            "smallest eigenvalue of G above floor_g (the paper's lambda+_min)"),
    Reading("lambda_max", "G", "value", "floor_g", "λ_max", False,
            "largest eigenvalue of G"),
    Reading("g_rank", "G", "count", None, "g_rank", False,
            "eigenvalues of G above floor_g"),
    Reading("g_dead", "G", "count", None, "g_dead", True,
            "d - g_rank: dead directions of the Fisher-Gram"),
    Reading("floor_g", "G", "floor", None, "floor_g", False,
            "dim * eps * lambda_max: the Fisher side's trust floor"),
    Reading("logdet", "G", "nats", None, "log det+ G", False,
            "active volume log det+(G): sum of the logs of the resolved eigenvalues"),
    Reading("log_volume", "G", "nats", None, "log vol", True,
            "logdet - g_rank * log(lambda_max): scale-free active volume"),
    Reading("u_dead_gain", "G", "value", None, "uᵀGu", False,
            "u^T G u at the right singular vector u of X at sigma_min"),
    Reading("lambda_ratio", "G", "ratio", "floor_g", "λ_min/λ_max", True,
            "lambda_min / lambda_max (scale-free)"),
    Reading("sigma_ratio", "X", "ratio", "floor_x", "σ_min/σ_max", True,
            "sigma_min / sigma_max (scale-free)"),
    # parameter side: eigenvalues of K
    Reading("param_lambda_min", "K", "value", "param_floor", "K λ_min", False,
            "smallest eigenvalue of K above param_floor"),
    Reading("param_lambda_max", "K", "value", None, "K λ_max", False,
            "largest eigenvalue of K"),
    Reading("param_rank", "K", "count", None, "K rank", False,
            "eigenvalues of K above param_floor"),
    Reading("param_floor", "K", "floor", None, "K floor", False,
            "n * eps * param_lambda_max: the parameter side's trust floor"),
    Reading("param_logdet", "K", "nats", None, "log det+ K", False,
            "log det+(K)"),
    Reading("param_log_volume", "K", "nats", None, "K log vol", False,
            "param_logdet - param_rank * log(param_lambda_max) (scale-free)"),
)  # fmt: skip

_BY_NAME: dict[str, Reading] = {r.name: r for r in READINGS}

#: Names of every scalar reading (what the daemon logs as metrics per layer).
SCALAR_READINGS: tuple[str, ...] = tuple(r.name for r in READINGS)
#: Names of the headline readings, in table order.
HEADLINE_READINGS: tuple[str, ...] = tuple(r.name for r in READINGS if r.headline)


def reading(name: str) -> Reading:
    """The row of ``name``; a ``KeyError`` naming the reading and the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown reading {name!r}; known: {', '.join(SCALAR_READINGS)}"
        ) from None
