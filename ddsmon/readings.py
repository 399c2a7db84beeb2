"""The table of readings: what each per-layer number *is*, in one place.

Every scalar reading a :class:`~ddsmon.signature.LayerSignature` carries has one row in
:data:`READINGS`: its name, the matrix it is read from (``side``), its unit, the trust
floor it is read against, a short label for tables and plots, and whether it is a
*headline* reading (what a reviewer should see first) or a detail; and where it is shown
(a column of the terminal table, a panel of the trajectories figure). The signature, the
event detectors, the terminal, the plots and the MLflow sink iterate over this table;
adding a reading is one row here (and the field or property that computes it).
:data:`SPECTRA` is the same for the three spectra, one row per side.

Sides (Shirodkar & Narayanan 2026, arXiv 2606.21158, notation of
:mod:`ddsmon.signature`):

* ``"X"``: singular values of the layer's activation matrix X (N x d);
* ``"G"``: eigenvalues of the per-sample-gradient Fisher-Gram ``G = Delta^T Delta / n``;
* ``"K"``: eigenvalues of the parameter-side Gram ``K = J J^T / n``.

Units, and how a change is measured in decades (:meth:`Reading.decades`):

* ``"value"``: a positive quantity (a singular value, an eigenvalue): ``log10 v``;
* ``"ratio"``: a scale-free positive ratio (``lambda_min / lambda_max``): ``log10 r``;
* ``"nats"``: a natural logarithm (``log det+ G``, ``log_volume``): ``v / ln 10``;
* ``"count"``: an integer (ranks, dead counts), or an estimated number of directions
  (``dying_directions``): not measured in decades;
* ``"floor"``: a trust floor (``dim * eps * max``), the level below which a value is
  unresolved (paper Figure 7); a positive value, so ``log10 v``;
* ``"fraction"``: a number in [0, 1] (a normalised entropy, a share): compared as it
  is, a change being a difference (:meth:`Reading.level`), never in decades.

A *model-level* reading (``loss_spread``, the spread of the per-sample losses, and
``samples_resolved``, how many samples G can still see) is not a property of one layer: the table has no model-level rows, so it is carried by the
*output layer*, the last layer read to run in the forward pass (the module nearest the
loss, whose Delta rows are the loss's own gradients) and is ``None`` on every other
layer: the sinks log it under that layer (``dds_detail/loss_spread/<output layer>``).
Its side is ``"G"``: it is what the Fisher side's resolved rank follows near zero loss
(:func:`ddsmon.signature.loss_spread`, :func:`ddsmon.signature.resolved_samples`).

A *derived* reading (``derived=True``) is not a property of one checkpoint's spectra but
of two consecutive checkpoints of a layer: :class:`ddsmon.events.EventDetector` computes
it as it is fed (``EventDetector.last_derived``) and
:meth:`ddsmon.signature.Signatures.with_derived` puts it into the signatures the sinks
see; a :class:`~ddsmon.signature.LayerSignature` fresh from the engine holds ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = (
    "DERIVED_READINGS",
    "HEADLINE_READINGS",
    "READINGS",
    "SCALAR_READINGS",
    "SIDES",
    "SPECTRA",
    "UNITS",
    "Reading",
    "Spectrum",
    "reading",
)

#: The matrices a reading comes from: activations X, Fisher-Gram G, parameter-side Gram K.
SIDES: tuple[str, ...] = ("X", "G", "K")
#: The units a reading can have (see the module docstring).
UNITS: tuple[str, ...] = ("value", "ratio", "nats", "count", "floor", "fraction")
_LOG10_UNITS = ("value", "ratio", "floor")


@dataclass(frozen=True)
class Reading:
    """One row of the table: what the per-layer number ``name`` is.

    name: the ``LayerSignature`` field or property, and the MLflow metric's last part
        (``dds/<layer>/<name>``).
    side: ``"X"``, ``"G"`` or ``"K"``, the matrix it is read from.
    unit: one of :data:`UNITS`.
    floor: the floor reading an unresolved value is shown against (``<floor``), in the
        reading's own units; ``None`` for readings with no such floor: counts, the floors
        themselves, logarithms, and the ratios (a ratio is unresolved when its numerator
        is, but the floor of ``lambda_min`` is no floor of ``lambda_min / lambda_max``).
    label: short text under the side, as in a table header (``X`` over ``σ_min``);
        :attr:`title` prefixes the side for a legend.
    headline: True for what a reviewer should see first (scale-free readings and dead
        counts); False for details kept at hand.
    description: one line, for docs, MLflow's run description and plot titles.
    terminal: a column of the terminal's readings table (in table order).
    pair: a count shown after this one in the same terminal cell (``x_rank/x_dead``);
        the paired reading then has no column of its own.
    heading: the first line of the terminal column's header when it is not the side.
    panel: the panel (0 = top) of the trajectories figure the reading is drawn in;
        readings sharing a panel share its axes. ``None``: not drawn.
    derived: computed between two consecutive checkpoints of the layer by the event
        detector, not from one checkpoint's spectra (see the module docstring).
    """

    name: str
    side: str
    unit: str
    floor: str | None
    label: str
    headline: bool
    description: str
    terminal: bool = False
    pair: str | None = None
    heading: str | None = None
    panel: int | None = None
    derived: bool = False

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"reading {self.name!r}: side {self.side!r} not in {SIDES}")
        if self.unit not in UNITS:
            raise ValueError(f"reading {self.name!r}: unit {self.unit!r} not in {UNITS}")

    @property
    def scale_free(self) -> bool:
        """True when the reading does not move if every eigenvalue scales together."""
        return self.unit in ("ratio", "fraction") or self.name.endswith("log_volume")

    @property
    def is_count(self) -> bool:
        return self.unit == "count"

    @property
    def in_decades(self) -> bool:
        """True when :meth:`decades` applies (every unit but ``"count"`` and ``"fraction"``)."""
        return self.unit not in ("count", "fraction")

    @property
    def has_level(self) -> bool:
        """True when :meth:`level` applies: the reading can be watched for collapses
        (every unit but ``"count"``)."""
        return self.unit != "count"

    @property
    def title(self) -> str:
        """The label with its side, for a legend or a message (``"G λ_min"``)."""
        return f"{self.heading or self.side} {self.label}"

    def decades(self, value: float) -> float:
        """``value`` on a log10 scale: ``value / ln 10`` for nats, ``log10 value`` for a
        positive value, ratio or floor (``-inf`` at or below 0). Counts have no decades."""
        if self.unit == "nats":
            return value / math.log(10.0)
        if self.unit in _LOG10_UNITS:
            return math.log10(value) if value > 0 else -math.inf
        raise ValueError(f"reading {self.name!r} ({self.unit}) is not measured in decades")

    def from_decades(self, decades: float) -> float:
        """The inverse of :meth:`decades`: a value in the reading's own units."""
        if self.unit == "nats":
            return decades * math.log(10.0)
        if self.unit in _LOG10_UNITS:
            return 10.0**decades
        raise ValueError(f"reading {self.name!r} ({self.unit}) is not measured in decades")

    def level(self, value: float) -> float:
        """Where a change of the reading is measured: :meth:`decades` for every unit
        measured in decades, the value itself for a ``"fraction"`` (so a change is a
        difference). Counts have no level."""
        if self.unit == "fraction":
            return value
        return self.decades(value)

    def from_level(self, level: float) -> float:
        """The inverse of :meth:`level`."""
        if self.unit == "fraction":
            return level
        return self.from_decades(level)


#: Every scalar reading, in the order tables and metric batches show them.
READINGS: tuple[Reading, ...] = (
    # activation side: singular values of X
    Reading("sigma_min", "X", "value", "floor_x", "σ_min", False,
            "smallest singular value of X above floor_x", terminal=True),
    Reading("sigma_max", "X", "value", "floor_x", "σ_max", False,
            "largest singular value of X"),
    Reading("x_rank", "X", "count", None, "rank", False,
            "singular values of X above floor_x", terminal=True, pair="x_dead", panel=3),
    Reading("x_dead", "X", "count", None, "dead", True,
            "d - x_rank: dead directions of the activations"),
    Reading("floor_x", "X", "floor", None, "floor", False,
            "max(N, d) * eps * sigma_max: the activation side's trust floor"),
    # Fisher side: eigenvalues of G
    Reading("lambda_min", "G", "value", "floor_g", "λ_min", False,
            "smallest eigenvalue of G above floor_g (the paper's lambda+_min)", terminal=True),
    Reading("lambda_max", "G", "value", "floor_g", "λ_max", False,
            "largest eigenvalue of G", terminal=True),
    Reading("g_rank", "G", "count", None, "rank", False,
            "eigenvalues of G above floor_g", terminal=True, pair="g_dead", panel=3),
    Reading("g_dead", "G", "count", None, "dead", True,
            "d - g_rank: dead directions of the Fisher-Gram"),
    Reading("floor_g", "G", "floor", None, "floor", False,
            "dim * eps * lambda_max: the Fisher side's trust floor"),
    Reading("logdet", "G", "nats", None, "log det", False,
            "active volume log det+(G): sum of the logs of the resolved eigenvalues",
            terminal=True),
    Reading("log_volume", "G", "nats", None, "log vol", True,
            "log_volume = log det+(G) - g_rank * log lambda_max: scale-free active volume",
            terminal=True, panel=2),
    Reading("u_dead_gain", "G", "value", None, "dead gain", False,
            "u^T G u at the right singular vector u of X at sigma_min",
            terminal=True, heading="G at u"),
    Reading("lambda_ratio", "G", "ratio", None, "λ_min/λ_max", True,
            "lambda_min / lambda_max (Fisher side, scale-free)", panel=0),
    Reading("sigma_ratio", "X", "ratio", None, "σ_min/σ_max", True,
            "sigma_min / sigma_max (activation side, scale-free)", panel=1),
    Reading("x_entropy", "X", "fraction", None, "entropy", True,
            "normalised spectral entropy of X: -sum p log p / log x_rank, "
            "p = sigma^2 / sum sigma^2 over the resolved singular values",
            terminal=True, panel=4),
    Reading("g_dominance", "G", "fraction", None, "top share", False,
            "lambda_max / sum of the resolved eigenvalues of G: the share of the per-sample "
            "gradient energy in its top direction"),
    Reading("loss_spread", "G", "ratio", None, "spread", False,
            "model-level, on the output layer only: 90th / 10th percentile of the probe's "
            "per-sample losses (log10: the decades they span), which G's resolved rank "
            "follows near zero loss", heading="loss"),
    Reading("samples_resolved", "G", "count", None, "resolved", False,
            "model-level, on the output layer only: probe samples whose loss is within "
            "sqrt(d eps) of the largest, those G can resolve above its floor near zero loss",
            heading="samples"),
    Reading("dying_directions", "G", "count", None, "dying", True,
            "d log det+(G) / d log lambda_min between this checkpoint and the previous one, "
            "where lambda_min fell: directions dying at the rate of the smallest (paper "
            "Figure 4)", terminal=True, panel=5, derived=True),
    # parameter side: eigenvalues of K
    Reading("param_lambda_min", "K", "value", "param_floor", "λ_min", False,
            "smallest eigenvalue of K above param_floor", terminal=True),
    Reading("param_lambda_max", "K", "value", "param_floor", "λ_max", False,
            "largest eigenvalue of K"),
    Reading("param_rank", "K", "count", None, "rank", False,
            "eigenvalues of K above param_floor", terminal=True),
    Reading("param_floor", "K", "floor", None, "floor", False,
            "n * eps * param_lambda_max: the parameter side's trust floor"),
    Reading("param_logdet", "K", "nats", None, "log det", False,
            "log det+(K)"),
    Reading("param_log_volume", "K", "nats", None, "log vol", False,
            "param_logdet - param_rank * log(param_lambda_max) (scale-free)"),
)  # fmt: skip

_BY_NAME: dict[str, Reading] = {r.name: r for r in READINGS}

#: Names of every scalar reading (what the daemon logs as metrics per layer).
SCALAR_READINGS: tuple[str, ...] = tuple(r.name for r in READINGS)
#: Names of the headline readings, in table order.
HEADLINE_READINGS: tuple[str, ...] = tuple(r.name for r in READINGS if r.headline)
#: Names of the derived readings (computed between checkpoints by the event detector).
DERIVED_READINGS: tuple[str, ...] = tuple(r.name for r in READINGS if r.derived)


def reading(name: str) -> Reading:
    """The row of ``name``; a ``KeyError`` naming the reading and the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown reading {name!r}; known: {', '.join(SCALAR_READINGS)}") from None


@dataclass(frozen=True)
class Spectrum:
    """One side's spectrum: the ``LayerSignature`` array and the readings made of it.

    field: the array (descending, every value, resolved or not).
    floor / rank: the side's floor and rank readings (rows of :data:`READINGS`).
    label: legend text. bound: the ``LayerSignature`` field the rank is out of
        (``"d"``), or None when it has no fixed bound to show.
    """

    side: str
    field: str
    floor: str
    rank: str
    label: str
    bound: str | None

    def __post_init__(self) -> None:
        for name, unit in ((self.floor, "floor"), (self.rank, "count")):
            row = reading(name)
            if row.side != self.side or row.unit != unit:
                raise ValueError(f"spectrum {self.field!r}: {name!r} is no {unit} of {self.side}")


#: The three spectra, in drawing order.
SPECTRA: tuple[Spectrum, ...] = (
    Spectrum("X", "x_spectrum", "floor_x", "x_rank", "sigma(X)", "d"),
    Spectrum("G", "g_spectrum", "floor_g", "g_rank", "lambda(G)", "d"),
    Spectrum("K", "param_spectrum", "param_floor", "param_rank", "lambda(K), params", None),
)
