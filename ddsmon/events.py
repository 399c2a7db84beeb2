"""Events: what changed in a layer's readings, decided from its history of checkpoints.

Each detector reads one layer's history, a list of ``(step, reading)`` pairs in step
order where ``reading`` is :meth:`ddsmon.signature.LayerSignature.to_dict` (unresolved
readings are ``None``; ``finite`` is False for a non-finite layer), and says what
happened at the *newest* point, so replaying a history point by point reports each event
exactly once. :class:`EventDetector` is the stateful wrapper the daemon feeds one
checkpoint at a time; it runs the same scanners incrementally and can be saved to JSON
(:meth:`EventDetector.to_state`) and restored after a restart.

Time is counted in training steps. Every window (reference, lag, confirmation,
transition, dying) is a number of steps, set in one of three ways (per window):

* ``X_steps``: that many steps;
* ``X``: that many checkpoints at the run's *cadence*, the median step gap of its newest
  ``cadence_checkpoints`` checkpoints (the old checkpoint counts keep this meaning; the
  cadence follows a run whose checkpoints thin out, as a log-spaced start does);
* neither (the default): a fixed fraction of the run's *age*, the steps since the first
  checkpoint read (:data:`AGE_FRACTIONS`: the reference is the half of the run before
  the last fifth, a transition's collapses fall within half of it and are held for 2%
  of it, but at least one checkpoint).

Windows that do not depend on the cadence give the same events whether a run is
checkpointed every 100 or every 500 steps: a change is seen up to one (coarser) cadence
late, and confirmed after the same number of steps (rounded up to a checkpoint). With a
confirmation of one checkpoint at either cadence, the coarse run reported a transition
up to two coarse cadences after the fine one; held for a fraction of the age, the fine
run waits about as long as the coarse one (``bench_events.py``'s tuning seeds 0-2: the
entropy signature's cadence pairs agreed in 3 of 3 instead of 1 of 3, DDS's in 3 of 3
either way, grokking runs caught unchanged; 3% lost a DDS catch of the parity run).
:class:`EventWindows` is what is in force (:attr:`EventDetector.windows`).

Kinds (every :class:`Event` has step, layer, kind, reading, before, after, magnitude,
message; some carry more, see :meth:`Event.to_dict`):

``rank_change``
    ``x_rank`` or ``g_rank`` moved from its previous *stable* value by at least
    ``rank_min_change``, where a value is stable once it held for ``rank_hysteresis``
    consecutive checkpoints (default 2), so a rank flipping at the trust floor for a
    single checkpoint does not flap. ``before``/``after``: the two stable ranks;
    ``magnitude``: ``|after - before|``.

``collapse`` / ``revival``
    A watched scale-free reading left its trailing reference. Values are compared at
    their *level* (:meth:`ddsmon.readings.Reading.level`): in decades for a ratio ``r``
    (``lambda_ratio``, ``sigma_ratio``: ``log10 r``) and a natural-log reading
    (``log_volume = log det+(G) - rank * log lambda_max``: ``value / ln 10``); as they
    are for a fraction in [0, 1] (``x_entropy``, not watched by default).

    The reference ``ref`` is the median over time (below) of the values in the ``reference_window`` steps
    that end ``reference_lag`` steps before the newest checkpoint (where that window holds
    fewer values than a decision needs, the ``min_reference`` newest values before the
    lag, below; where it holds many, an even sample of about 128 of them). The lag matters: a phase change spread over a few checkpoints is compared with
    where the reading stood before it began, not with its own first steps. The
    threshold ``thr`` is, for ratios and values, ``min(ratio_decades, max(ratio_min_decades,
    ratio_mad_k * 1.4826 * MAD))`` of the reference window: ``ratio_decades`` (default
    2), or less where the reading is quiet: 40 of its own robust sigmas (``ratio_mad_k``),
    but at least ``ratio_min_decades`` (0.05); never more than ``ratio_decades``. For
    natural-log readings (whose scale grows with the rank they sum over) it is
    ``max(volume_min_decades, volume_mad_k * 1.4826 * MAD)`` of the same window
    (``fraction_change`` in place of ``volume_min_decades`` for fractions). The quiet
    rule is what sees ``bench_events.py``'s sparse parity: its first layer's sigma_ratio
    scatters by 0.001-0.003 decades on the plateau and falls 0.1-0.2 decades by the 95%
    validation crossing, about 100 of its own sigmas but a tenth of 2 decades, while its
    lambda_ratio, scattering by about a decade near G's trust floor, keeps the 2-decade
    threshold. With a fixed 2 decades DDS caught none of the parity runs inside their
    window on seeds 3-11 (BENCHMARKS.md, section 6; ``ratio_mad_k = 0`` restores it).
    Per reading:

    * ``collapse``: ``value <= ref - thr`` from the normal state. The reading then stays
      *collapsed* until it recovers to ``anchor - thr / 2`` (``anchor`` being the
      reference at the collapse), which is a ``revival``; or until the reference has
      caught up (``value > ref - thr / 2``), after which the new level is the norm and
      nothing is reported.
    * ``revival``: that recovery, or ``value >= ref + thr`` from the normal state (a
      reading rising to a new level). A rise is reported once, its return not at all.

    The reference is a median over time: each value weighs the span of training it
    stands for (half the gaps to its neighbours), so a run read every 5 steps and then
    every 50 has the reference a run read regularly has.

    After a reading's first decision, the window's own values are its reference as soon
    as they number ``min(min_reference, 4)`` (:meth:`_LevelScanner.least_reference`): a
    coarse run's window of half the age holds fewer than ``min_reference`` checkpoints
    for a long time (at every 500 steps, until step 6000), and the ``min_reference``
    newest values reached back into early training, which moved both the median and the
    MAD. On ``bench_events.py``'s slow run every 500
    steps (seed 6, unembed log_volume at step 5500) that fallback took in step 1500, the
    median moved by 0.6 decades and the threshold rose from 4 to 11 decades, so the
    collapse the run read every 100 steps saw at 5400 waited for 6000; the cadence pairs
    within one cadence went from 0/3 to 2/3 on the report seeds (BENCHMARKS.md section 6).

    Nothing is decided before ``min_reference`` values are in the reference (fewer when
    a reference window given in steps or checkpoints cannot hold that many at the run's
    cadence), and nothing before the run's age passed the lag and ``min_reference - 1``
    cadences (:attr:`EventWindows.warm_up`, at the cadence now), so the first
    checkpoints (``min_reference`` before the lag: about 7 by default, at a regular
    cadence) are a warm-up: early training (memorisation) moves every reading by
    decades. A log-spaced start (steps 0, 1, 2, 4, ... 64, then every 25) stays in the
    warm-up until its age is that of a run checkpointed at the later cadence; counted in
    checkpoints alone, its warm-up ended at step 64, within memorisation, which made a
    "not generalising" transition of the example's control. Once over, the warm-up stays
    over, even if the cadence grows later. Where the checkpoints carry the trainer's
    training loss, the warm-up also lasts while that loss is in its first fall
    (``warm_up_loss_fall``, :attr:`EventWindows.loss_falling`), so early training ends in
    steps whatever the cadence.
    A departure that already held at the previous checkpoint when a reading is first
    decided (its previous value past the same threshold of the same reference) happened
    in the warm-up: the state leaves normal silently, reporting neither it nor its
    return. A coarse run's warm-up is longer in steps (``min_reference`` checkpoints) and
    its first reference reaches back into early training, so without this it reported
    at its first decision a collapse the fine run had seen, and let expire, long before
    (``bench_events.py``'s slow run every 500 steps: a hidden-layer lambda_ratio collapse
    at step 3500 that the run every 100 steps saw at 900; it joined a transition
    thousands of steps later as its onset). ``before`` is the reference
    and ``after`` the value, both in the reading's own units; ``magnitude`` is the
    departure (in decades, or as a difference for a fraction). A collapse's message and
    its ``dying_directions`` say how many directions are dying at the layer.

``transition``
    Collapses of at least ``min_collapses`` (default 2) distinct (layer, reading) pairs
    within the last ``transition_window`` steps, each of which has held (no revival of
    the same pair) for at least ``confirm`` steps: a grokking-like phase change, the
    headline alert. A transient dip that recovers within ``confirm`` steps is a collapse
    and a revival, never part of a transition; so are collapses whose layer turns
    non-finite before they are confirmed and stays so (a run diverging: its loss blew up
    at the checkpoint before its weights went NaN, and no reading held the collapses
    since); a layer finite again (one bad checkpoint) has its collapses held or revived
    as before. A collapse counts toward one transition only, and collapses in the
    ``transition_window`` steps after a transition belong to it (one alert per phase
    change). After a ``"generalising"`` transition, each collapse that belongs to it
    and held for ``confirm`` (unrevived; once per layer and reading) extends that
    stretch to ``transition_window`` steps past itself: a generalisation
    reaches the layers one after another (``bench_events.py``'s slow run: hidden, then
    act and unembed, then embed, over 3000-5000 steps), and a stretch measured from the
    report alone cut it where the cadence put the report, so the run read every 100
    steps reported a second "generalising" transition for the last layer that the run
    read every 500 steps did not (seeds 9-14: 4 of 6 cadence pairs). After any other
    label the stretch is not extended, so a generalisation that follows a collapse
    without one, past its stretch, is its own transition (the one-layer transformer's,
    seeds 6 and 12). The stretch is bounded: each (layer, reading) pair extends it once,
    so a reading that dips and recovers, or one that keeps collapsing, cannot hold it
    open; it ends at most a ``transition_window`` past the last pair's collapse.
    ``layer`` and ``reading`` list the layers and
    readings involved (comma-separated, in order of collapse), the message each pair
    with its depth and step and each layer's dying directions, ``before``/``after`` are
    None, and ``magnitude`` is the number of collapsed pairs. ``step`` is where the
    transition is reported (confirmed); ``completed_step`` where its collapses were in
    place (its ``min_collapses``-th collapse in step order), which the message says as
    ``complete at step N``. The two differ by the confirmation, at least one checkpoint,
    so ``completed_step`` is what to compare across cadences.

    It carries the trainer's own validation scalars (``val_acc``, ``eval_loss``, ...:
    :func:`validation_scalars`) at the start of its window (the last checkpoint at or
    before ``step - transition_window``) and at its step, as ``trainer_before`` and
    ``trainer_after``, and a ``label``: ``"generalising"`` when a validation metric
    improved across the window (an accuracy by at least ``label_acc_gain``; a loss,
    looked at only where no accuracy is carried, by at least ``label_loss_drop`` of
    itself), ``"not generalising"`` when one is carried at both ends and none did,
    ``"unknown"`` when none is. The message says it too.

    Near zero training loss G resolves only the samples whose losses are within about 7
    decades of the largest (``samples_resolved``, carried by the output layer); when a
    transition's collapses are all G-side and that count moved by at least
    :data:`SAMPLES_MOVED` of itself across the window, the message says the collapses may
    be the loss's dynamic range rather than structure (``bench_events.py``'s long
    controls: Adam's loss spikes bring 30-40 training samples back into G's view).

``dying``
    A layer's ``dying_directions`` (the count of directions dying at the rate of the
    smallest, :func:`ddsmon.signature.dying_directions`, between each checkpoint and the
    previous one; None where that estimate is negative, and at most ``g_rank``) held at
    or above ``dying_min`` (default 1) at every checkpoint over the last
    ``dying_window`` steps, while ``lambda_ratio`` fell by at least
    ``dying_decades`` over them. The second condition keeps a loss that merely shrinks
    quiet: every eigenvalue then falls together, the count is the whole rank, the ratio
    stays. Reported once per stretch (a stretch ends when no checkpoint qualified for a
    whole ``dying_window``), and not in the warm-up (``EventWindows.warm_up``). ``after`` is the newest count, ``magnitude`` and
    ``dying_directions`` the median count over the window.

``nonfinite``
    The layer's activations or gradients held NaN/inf (``finite`` False), reported
    when the layer turns non-finite (not again while it stays so).

A loss that merely shrinks scales every eigenvalue of G together: ratios, log_volume and
ranks do not move, so it is no event at all. Absolute readings (``lambda_min``,
``logdet``) can be watched too by naming them in ``EventConfig.readings``, but they then
move with the loss scale.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import numbers
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ddsmon.errors import ConfigError, DDSError
from ddsmon.readings import READINGS, SCALAR_READINGS, Reading
from ddsmon.readings import reading as _row
from ddsmon.signature import dying_directions

__all__ = (
    "AGE_FRACTIONS",
    "EVENT_KINDS",
    "LABELS",
    "PROBE_LOSS_KEY",
    "Event",
    "EventConfig",
    "EventDetector",
    "EventWindows",
    "detect_dying",
    "detect_level_shifts",
    "detect_nonfinite",
    "detect_rank_change",
    "detect_transitions",
    "training_loss",
    "transition_label",
    "validation_scalars",
)

log = logging.getLogger(__name__)

#: Every kind an :class:`Event` can have.
EVENT_KINDS: tuple[str, ...] = (
    "rank_change",
    "collapse",
    "revival",
    "transition",
    "nonfinite",
    "dying",
)
#: The labels of a transition: did validation improve across its window?
LABELS: tuple[str, ...] = ("generalising", "not generalising", "unknown")

_MAD_TO_SIGMA = 1.4826  # MAD of a normal sample times this estimates its sigma
_STATE_VERSION = 2
_MAX_BUFFER = 4096  # a hard bound on any buffer
#: How many of the reference window's own values make a reference once a reading has
#: decided, where ``min_reference`` is more (:meth:`_LevelScanner.least_reference`): a
#: median and MAD of 4. On bench_events.py's tuning seeds 0-2, 2, 3 and 4 gave the same
#: scorecard (4: the most values of those), 5 split one more cadence pair by completed
#: step, and 6 (``min_reference``) is the rule before.
_LEAST_WINDOW_REFERENCE = 4
_MAX_KEPT = 128  # past this, a buffer is thinned evenly in time (see _thin)
_KEEP_NEWEST = 16  # ... its newest entries always kept as they are
_CADENCE_DRIFT = 4.0  # a gap this many times off the cadence is warned about, once
#: The longest a falling training loss holds the warm-up, as a multiple of the age at
#: which the age rule alone would have ended it: a loss that keeps falling by its
#: first value's ``warm_up_loss_fall`` each lag (``a - b log t``, common in language
#: models) would otherwise hold it for the whole run.
_LOSS_HOLD_MAX = 4.0

History = Sequence[tuple[int, Mapping[str, Any]]]


# --------------------------------------------------------------------------- Event


@dataclass(frozen=True)
class Event:
    """One thing that happened to a layer at a checkpoint (see the module docstring).

    dying_directions: for a ``collapse`` or ``dying`` event, the layer's count of
        dying directions (None where it has none).
    trainer_before / trainer_after / label: a ``transition``'s validation scalars at the
        start and the end of its window, and whether they say the model generalised
        (one of :data:`LABELS`); None for the other kinds.
    completed_step: for a ``transition``, the step of its ``min_collapses``-th collapse
        in step order, where its collapses were all in place; ``step`` is where it was
        reported, once they had held for the confirmation. The confirmation waits at
        least one checkpoint, so ``step`` trails ``completed_step`` by a cadence or more
        and differs between cadences by more than the collapses do (``bench_events.py``:
        the same run read every 100 and every 500 steps). None for the other kinds.
    """

    step: int
    layer: str
    kind: str
    reading: str
    before: float | None
    after: float | None
    magnitude: float
    message: str
    dying_directions: float | None = None
    trainer_before: dict[str, float] | None = field(default=None, hash=False)
    trainer_after: dict[str, float] | None = field(default=None, hash=False)
    label: str | None = None
    completed_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as a plain JSON-ready dict (one line of ``--events-json``): the eight
        fields every event has, then ``dying_directions`` where set, ``trainer_before``,
        ``trainer_after`` and ``label`` where set (every transition the detector reports
        has them), and ``completed_step`` where set (likewise)."""
        out: dict[str, Any] = {
            "step": self.step,
            "layer": self.layer,
            "kind": self.kind,
            "reading": self.reading,
            "before": self.before,
            "after": self.after,
            "magnitude": self.magnitude,
            "message": self.message,
        }
        if self.dying_directions is not None:
            out["dying_directions"] = self.dying_directions
        if (self.label, self.trainer_before, self.trainer_after) != (None, None, None):
            out["trainer_before"] = dict(self.trainer_before or {})
            out["trainer_after"] = dict(self.trainer_after or {})
            out["label"] = self.label or "unknown"
        if self.completed_step is not None:
            out["completed_step"] = self.completed_step
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Inverse of :meth:`to_dict` (the optional fields may be missing)."""

        def scalars(value: Any) -> dict[str, float] | None:
            return None if value is None else {str(k): float(v) for k, v in value.items()}

        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        return cls(
            step=int(data["step"]),
            layer=str(data["layer"]),
            kind=str(data["kind"]),
            reading=str(data["reading"]),
            before=number("before"),
            after=number("after"),
            magnitude=float(data["magnitude"]),
            message=str(data["message"]),
            dying_directions=number("dying_directions"),
            trainer_before=scalars(data.get("trainer_before")),
            trainer_after=scalars(data.get("trainer_after")),
            label=None if data.get("label") is None else str(data["label"]),
            completed_step=None
            if data.get("completed_step") is None
            else int(data["completed_step"]),
        )


# --------------------------------------------------------------------------- config

#: The windows: (count key, steps key). The count is in checkpoints at the run's cadence.
_WINDOWS: tuple[tuple[str, str], ...] = (
    ("reference_window", "reference_window_steps"),
    ("reference_lag", "reference_lag_steps"),
    ("transition_window", "transition_window_steps"),
    ("confirm", "confirm_steps"),
    ("dying_window", "dying_window_steps"),
)


@dataclass(frozen=True)
class EventConfig:
    """Thresholds and windows of the event detectors.

    The thresholds were tuned on ``examples/modular_addition`` (seeds 0-2; checkpoints
    every 10, 25 and 50 steps; two probes; a weight-decay-free control), the default
    windows on ``benchmarks/bench_events.py``'s seeds 0-2 (the grokking run, a 10x slower
    one read every 100 and every 500 steps, a long control and a converged run) and
    checked on its seeds 3-5; the quiet-ratio rule (``ratio_mad_k``,
    ``ratio_min_decades``) on its seeds 0-5, checked on 6-11. Around them:
    ``volume_mad_k`` 6 or ``volume_min_decades`` 2-3 flag the slow drift of log_volume
    that precedes grokking (the "hidden progress" before validation accuracy moves);
    ``min_reference`` below 6 lets the memorisation of the first checkpoints through.

    Windows (each in steps: ``X_steps`` when set, else ``X`` checkpoints at the run's
    cadence, else the default fraction of the run's age, :data:`AGE_FRACTIONS`; set at
    most one of ``X`` and ``X_steps``; see :class:`EventWindows`):

    reference_window / reference_window_steps: the trailing reference (median) window
        (default: half the run's age).
    reference_lag / reference_lag_steps: the newest stretch left out of the reference,
        so a collapse spread over a few checkpoints is measured from where it began
        (default: a fifth of the age).
    transition_window / transition_window_steps: the span within which the collapses of
        one transition fall, and after it the span whose collapses belong to it (after a
        generalising one, past each of them; default: half the age).
    confirm / confirm_steps: how long a collapse must hold, unrevived, to count toward a
        transition (default: 2% of the age, at least one checkpoint).
    dying_window / dying_window_steps: how long ``dying_directions`` must hold at or
        above ``dying_min`` for a ``dying`` event (default: a tenth of the age, at least
        two checkpoints).
    cadence_steps: the run's cadence in steps; None (default): the median step gap of
        its newest ``cadence_checkpoints`` checkpoints, as the run goes.
    cadence_checkpoints: how many newest checkpoints the cadence is measured on.
    warm_up_loss_fall: the warm-up also lasts while the trainer's training loss, where
        the checkpoints carry one (:func:`training_loss`), fell by more than this
        fraction of its first value over the last ``reference_lag`` steps: early
        training is over when the loss's first fall is, in steps, whatever the cadence
        (:attr:`EventWindows.loss_falling`), for at most four times the age at which
        the age rule alone would have ended the warm-up; 0 turns the rule off.

    Thresholds:

    readings: readings watched for collapse/revival, any reading of
        :data:`ddsmon.readings.READINGS` but a count. Each is compared at its level
        (:meth:`ddsmon.readings.Reading.level`): a natural log (``"nats"``) as
        ``value / ln 10``, a positive value or ratio as ``log10``, a fraction as it is.
    ratio_decades: collapse/revival threshold of values and ratios, in decades: the
        most it is (a quiet reading's is lower, see ``ratio_mad_k``).
    ratio_mad_k: the threshold of values and ratios is ``min(ratio_decades,
        max(ratio_min_decades, ratio_mad_k * 1.4826 * MAD))`` of the reference window,
        lower where the reading is quiet, never higher; 0 keeps it at
        ``ratio_decades``. Chosen on ``bench_events.py``'s seeds 0-5 (30-50 and 0.05-0.12
        decades gave the same catches; 20 split a cadence pair).
    ratio_min_decades: the least threshold of values and ratios, in decades (at or
        above ``ratio_decades``, the threshold is ``ratio_decades``).
    volume_mad_k: robust threshold of natural-log and fraction readings, in units of
        the reference window's MAD-based sigma (``1.4826 * MAD``).
    volume_min_decades: the least threshold of natural-log readings, in decades (so a
        very quiet window does not turn noise into events).
    fraction_change: the least threshold of fraction readings (``x_entropy``), as a
        difference.
    min_reference: values needed in the reference before anything is decided (a warm-up
        of ``min_reference + reference_lag`` checkpoints); at most what the reference
        window holds at the run's cadence. After a reading's first decision, a window
        holding fewer is read on its own values once they number at least
        ``min(min_reference, 4)`` (the module docstring).
    rank_readings: count readings (unit ``"count"``) watched for rank changes.
    rank_hysteresis: consecutive checkpoints a rank must hold to be stable.
    rank_min_change: least difference between stable ranks that is reported.
    min_collapses: distinct (layer, reading) collapses that make a transition.
    dying_min: the least ``dying_directions`` of a dying stretch.
    dying_decades: how far ``lambda_ratio`` must fall over the dying window, in decades.
    label_acc_gain: the gain of a validation accuracy that labels a transition
        "generalising" (a fraction; times 100 for an accuracy given in percent).
    label_loss_drop: the relative drop of a validation loss that does, where the
        checkpoints carry no accuracy.

    Building one checks every value (:meth:`from_dict` is the parser of the ``[events]``
    table): a wrong type or an out-of-range value is a :class:`~ddsmon.errors.ConfigError`
    naming the key. Built directly, an ``X_steps`` that is set wins over its ``X``.
    """

    readings: tuple[str, ...] = ("lambda_ratio", "sigma_ratio", "log_volume")
    ratio_decades: float = 2.0
    ratio_mad_k: float = 40.0
    ratio_min_decades: float = 0.05
    volume_mad_k: float = 10.0
    volume_min_decades: float = 4.0
    fraction_change: float = 0.01
    reference_window: int | None = None
    reference_window_steps: int | None = None
    reference_lag: int | None = None
    reference_lag_steps: int | None = None
    min_reference: int = 6
    rank_readings: tuple[str, ...] = ("x_rank", "g_rank")
    rank_hysteresis: int = 2
    rank_min_change: int = 1
    transition_window: int | None = None
    transition_window_steps: int | None = None
    min_collapses: int = 2
    confirm: int | None = None
    confirm_steps: int | None = None
    dying_min: float = 1.0
    dying_decades: float = 0.5
    dying_window: int | None = None
    dying_window_steps: int | None = None
    cadence_steps: int | None = None
    cadence_checkpoints: int = 5
    warm_up_loss_fall: float = 0.02
    label_acc_gain: float = 0.01
    label_loss_drop: float = 0.05

    def __post_init__(self) -> None:
        checked = _checked_values({f.name: getattr(self, f.name) for f in fields(self)}, None)
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value; unset ``*_steps`` (None) are left out, and so is the
        count of a window given in steps (which :meth:`from_dict` would refuse)."""
        shadowed = {count for count, steps in _WINDOWS if getattr(self, steps) is not None}
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in shadowed:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> EventConfig:
        """The config of an ``[events]`` table (or :meth:`to_dict`'s output); missing keys
        keep their defaults.

        Unknown keys, values of the wrong type (a string or a bool for a number, a float
        for a whole number, anything but a list of names for ``readings`` and
        ``rank_readings``), out-of-range values, and a window given both as a count and
        in steps raise :class:`~ddsmon.errors.ConfigError` naming the key; ``source``
        (e.g. ``"config file ddsmon.toml"``) starts the message when given.
        """
        where = _Where(source)
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where.prefix}{where.table} must be a table, got {type(data).__name__}"
            )
        known = sorted(f.name for f in fields(cls))
        unknown = [k for k in data if k not in known]
        if unknown and source is None:
            raise ConfigError(
                f"event config: unknown key(s) {sorted(unknown, key=str)}; known: {known}"
            )
        if unknown:
            keys = ", ".join(repr(k) for k in unknown)
            raise ConfigError(
                f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {keys} in [events] "
                f"(known: {', '.join(known)})"
            )
        for count, steps in _WINDOWS:
            if count in data and data.get(steps) is not None:
                raise ConfigError(
                    f"{where.prefix}{where.key(count)} and {where.key(steps)} are both set: "
                    f"give one ({count} counts checkpoints at the run's cadence, {steps} "
                    "counts training steps)"
                )
        return cls(**_checked_values(data, source))

    def windows(
        self, cadence: float, age: float = 0.0, warm: bool = False, loss_falling: bool = False
    ) -> EventWindows:
        """The windows in steps at a run's ``cadence`` (steps between checkpoints) and
        ``age`` (steps since the first checkpoint read): ``X_steps`` where set, else
        ``X`` checkpoints at the cadence, else the default fraction of the age
        (:data:`AGE_FRACTIONS`). ``warm``: the warm-up ended at an earlier checkpoint
        (:attr:`EventWindows.warm`); ``loss_falling``: the training loss is still in its
        first fall (:attr:`EventWindows.loss_falling`)."""
        if not (cadence > 0 and math.isfinite(cadence)):
            raise DDSError(f"cadence must be a positive number of steps, got {cadence!r}")
        age = max(0.0, float(age))
        spans = {}
        by_age = False
        for count, steps in _WINDOWS:
            given, counted = getattr(self, steps), getattr(self, count)
            if given is not None:
                spans[count] = float(given)
            elif counted is not None:
                spans[count] = counted * cadence
            else:
                by_age = by_age or count == "reference_window"
                spans[count] = AGE_FRACTIONS[count] * age
        if self.dying_window is None and self.dying_window_steps is None:
            spans["dying_window"] = max(spans["dying_window"], 2.0 * cadence)
        if self.confirm is None and self.confirm_steps is None:
            spans["confirm"] = max(spans["confirm"], cadence)
        if by_age:
            least = self.min_reference  # the window grows with the run; the lag holds it back
        else:
            fits = math.floor(spans["reference_window"] / cadence + 1e-9)
            least = max(1, min(self.min_reference, fits))
        return EventWindows(
            cadence=float(cadence),
            age=age,
            reference_window=spans["reference_window"],
            reference_lag=spans["reference_lag"],
            transition_window=spans["transition_window"],
            confirm=spans["confirm"],
            dying_window=spans["dying_window"],
            min_reference=least,
            warm=warm,
            loss_falling=loss_falling,
        )


#: The windows' defaults where neither ``X`` nor ``X_steps`` is set: a fraction of the
#: run's age (steps since the first checkpoint read), so that the same run checkpointed
#: at any cadence has the same windows. The confirmation is at least one checkpoint, and
#: the dying window at least two.
AGE_FRACTIONS: dict[str, float] = {
    "reference_window": 0.5,
    "reference_lag": 0.2,
    "transition_window": 0.5,
    "confirm": 0.02,
    "dying_window": 0.1,
}


@dataclass(frozen=True)
class EventWindows:
    """The windows in force, in training steps, at the run's ``cadence`` and ``age``
    (steps since the first checkpoint read).

    ``min_reference`` is the config's; where the reference window is given (in steps or
    checkpoints) it is cut to what the window holds at this cadence (at least 1).
    ``warm_up``: the age before which nothing is decided, the lag plus
    ``min_reference - 1`` cadences (in steps, at the cadence now, so a log-spaced start
    is a warm-up until its checkpoints are as far apart as the later ones). ``warm``: the
    age passed ``warm_up`` at an earlier checkpoint; the warm-up, once over, stays over
    when the cadence grows later (every 50 steps, then every 500). ``loss_falling``: the
    trainer's training loss fell by more than ``warm_up_loss_fall`` of its first value
    over the last ``reference_lag`` steps (:class:`_Cadence`), which holds the warm-up
    past ``warm_up``: a run read every 5 steps passes ``warm_up`` at step 35, in the
    middle of the modular-addition runs' memorisation (the control's loss falls from
    4.0 to about 0.01 over steps 15-60), and reported that memorisation as a "not generalising"
    transition (``bench_events.py --cadences``, the fine-then-coarse schedule); read
    every 25, the warm-up ends at step 175, after it.
    """

    cadence: float
    age: float
    reference_window: float
    reference_lag: float
    transition_window: float
    confirm: float
    dying_window: float
    min_reference: int
    warm: bool = False
    loss_falling: bool = False

    @property
    def warm_up(self) -> float:
        return self.reference_lag + (self.min_reference - 1) * self.cadence

    @property
    def in_warm_up(self) -> bool:
        """Nothing is decided yet: the age is below :attr:`warm_up`, or the training loss
        is still in its first fall (``loss_falling``), and was so at every earlier
        checkpoint."""
        return not self.warm and (self.age < self.warm_up or self.loss_falling)

    def describe(self) -> str:
        """One line for a log: the windows and the cadence they were derived at."""
        return (
            f"cadence {self.cadence:g} steps, age {self.age:g}: reference "
            f"{self.reference_window:g} steps behind a lag of {self.reference_lag:g}, "
            f"transitions within {self.transition_window:g} held {self.confirm:g}, dying "
            f"over {self.dying_window:g}"
        )


class _Where:
    """How a config message says where a value came from: ``source: [events] key`` when
    the source (e.g. ``"config file ddsmon.toml"``) is known, else ``event config: key``."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.prefix = f"{source}: " if source else "event config: "
        self.table = "[events]" if source else "the event config"

    def key(self, key: str) -> str:
        return f"[events] {key}" if self.source else key


#: Each field's kind: "float", "int", "count" / "steps" (a whole number or None) or "names".
_KINDS: dict[str, str] = {
    "readings": "names",
    "rank_readings": "names",
    **{count: "count" for count, _ in _WINDOWS},
    **{steps: "steps" for _, steps in _WINDOWS},
    "cadence_steps": "steps",
}


def _field_kinds() -> dict[str, str]:
    out = {}
    for f in fields(EventConfig):
        out[f.name] = _KINDS.get(f.name) or ("int" if type(f.default) is int else "float")
    return out


def _checked_values(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """``data``'s values, type-checked, normalised (floats, ints, tuples of names) and
    range-checked against each other (missing keys taking their defaults)."""
    where = _Where(source)
    kinds = _field_kinds()
    out: dict[str, Any] = {}
    for key, value in data.items():
        kind = kinds[key]
        name = where.key(key)
        if kind == "names":
            out[key] = _names(where, key, value)
        elif kind in ("count", "steps") and value is None:
            out[key] = None
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            what = {"int": "a whole number", "count": "a whole number"}.get(kind, "a number")
            what = "a whole number of steps" if kind == "steps" else what
            raise ConfigError(
                f"{where.prefix}{name} must be {what}, got {type(value).__name__} {value!r}"
            )
        elif kind in ("int", "count", "steps"):
            if not isinstance(value, numbers.Integral):
                what = "a whole number of steps" if kind == "steps" else "a whole number"
                raise ConfigError(
                    f"{where.prefix}{name} must be {what}, got {type(value).__name__} {value!r}"
                )
            out[key] = int(value)
        else:
            if not math.isfinite(value):
                raise ConfigError(f"{where.prefix}{name} must be a finite number, got {value!r}")
            out[key] = float(value)
    values: dict[str, Any] = {f.name: f.default for f in fields(EventConfig)}
    values.update(out)
    positive = (
        "ratio_decades",
        "ratio_min_decades",
        "volume_min_decades",
        "fraction_change",
        "reference_window",
        "min_reference",
        "rank_hysteresis",
        "rank_min_change",
        "transition_window",
        "min_collapses",
        "dying_min",
        "dying_window",
        "reference_window_steps",
        "transition_window_steps",
        "dying_window_steps",
        "cadence_steps",
    )
    for key in positive:
        if values[key] is not None and not values[key] > 0:
            raise ConfigError(
                f"{where.prefix}{where.key(key)} must be positive, got {values[key]!r}"
            )
    non_negative = (
        "ratio_mad_k",
        "volume_mad_k",
        "confirm",
        "reference_lag",
        "confirm_steps",
        "reference_lag_steps",
        "dying_decades",
        "label_acc_gain",
        "label_loss_drop",
        "warm_up_loss_fall",
    )
    for key in non_negative:
        if values[key] is not None and values[key] < 0:
            raise ConfigError(f"{where.prefix}{where.key(key)} must be >= 0, got {values[key]!r}")
    if values["cadence_checkpoints"] < 2:
        raise ConfigError(
            f"{where.prefix}{where.key('cadence_checkpoints')} must be at least 2 (one gap), "
            f"got {values['cadence_checkpoints']!r}"
        )
    if values["reference_window"] is not None and (
        values["min_reference"] > values["reference_window"]
    ):
        raise ConfigError(
            f"{where.prefix}{where.key('min_reference')} ({values['min_reference']}) cannot "
            f"exceed reference_window ({values['reference_window']})"
        )
    confirm, window = values["confirm_steps"], values["transition_window_steps"]
    if confirm is None and window is None:
        confirm, window = values["confirm"], values["transition_window"]
        keys = ("confirm", "transition_window")
    else:
        keys = ("confirm_steps", "transition_window_steps")
    if confirm is not None and window is not None and confirm >= window:  # same units
        raise ConfigError(
            f"{where.prefix}{where.key(keys[0])} ({confirm}) must be below {keys[1]} ({window})"
        )
    return values


def _names(where: _Where, key: str, value: Any) -> tuple[str, ...]:
    """``readings`` / ``rank_readings`` as a tuple of known names of the right unit."""
    name = where.key(key)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{where.prefix}{name} must be a list of reading names, "
            f"got {type(value).__name__} {value!r}"
        )
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise ConfigError(
            f"{where.prefix}{name} must be a list of reading names, got {bad[0]!r} in {list(names)}"
        )
    unknown = [r for r in names if r not in SCALAR_READINGS]
    if unknown:
        raise ConfigError(
            f"{where.prefix}{name}: unknown reading(s) {unknown}; "
            f"known: {', '.join(SCALAR_READINGS)}"
        )
    counts = [r.name for r in READINGS if r.is_count and not r.derived]
    for r in names:
        row = _row(r)
        if row.derived:
            raise ConfigError(
                f"{where.prefix}{name}: {r!r} is derived between checkpoints; the 'dying' "
                "event watches it (dying_min, dying_window)"
            )
        if key == "rank_readings" and row.unit != "count":
            raise ConfigError(
                f"{where.prefix}{name}: {r!r} is not a count ({row.unit}); "
                f"counts: {', '.join(counts)}"
            )
        if key != "rank_readings" and row.unit == "count":
            raise ConfigError(
                f"{where.prefix}{name}: {r!r} is a count, not measured in decades "
                "(watch it in rank_readings)"
            )
    return names


# --------------------------------------------------------------------------- trainer scalars

_VAL_PREFIXES = ("val", "valid", "validation", "eval", "evaluation", "dev")
_ACC_METRICS = ("acc", "accuracy", "top1", "acc1", "top1_acc", "top1_accuracy", "acc_top1")
_LOSS_METRICS = ("loss", "nll", "ce", "cross_entropy", "perplexity", "ppl")
_NAME = re.compile(
    rf"^(?:{'|'.join(_VAL_PREFIXES)})_(?P<metric>.+?)(?:_epoch|_step)?$",
)


def _normalised(name: str) -> str:
    """A trainer scalar's name lower-cased, with ``/ . - space`` read as ``_``."""
    return re.sub(r"[/.\- ]+", "_", name.strip().lower())


def _metric_kind(name: str) -> str | None:
    """``"acc"`` / ``"loss"`` for a validation metric's name, else None.

    Names are compared lower-cased with ``/ . - space`` read as ``_``: a prefix ``val``,
    ``valid``, ``validation``, ``eval`` (Hugging Face's ``eval_loss``), ``evaluation`` or
    ``dev``; an accuracy (``acc``, ``accuracy``, ``top1``...) or a loss (``loss``,
    ``nll``, ``perplexity``...); Lightning's ``_epoch`` / ``_step`` suffixes allowed:
    ``val_acc``, ``val/accuracy``, ``eval_accuracy``, ``val_loss_epoch``.
    """
    match = _NAME.match(_normalised(name))
    if match is None:
        return None
    metric = match.group("metric")
    if metric in _ACC_METRICS:
        return "acc"
    if metric in _LOSS_METRICS:
        return "loss"
    return None


def validation_scalars(meta: Mapping[str, Any] | None) -> dict[str, float]:
    """The validation accuracies and losses among a checkpoint's scalar meta (finite
    numbers under the usual names, see :func:`_metric_kind`), in their order."""
    out: dict[str, float] = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or _metric_kind(key) is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        v = float(value)
        if math.isfinite(v):
            out[key] = v
    return out


#: The training loss's names, most specific first (compared as :func:`_metric_kind`
#: compares, with Lightning's ``_step`` / ``_epoch`` suffixes): Lightning's usual
#: ``train_loss``, Hugging Face's ``log_history`` ``loss``, a script's ``loss``.
_TRAIN_LOSS_NAMES = ("train_loss", "training_loss", "loss")
#: The key the warm-up's loss is kept under when it is the probe's
#: (:attr:`ddsmon.signature.Signatures.fitted_loss`, the checkpoints carrying no training
#: loss: a Lightning checkpoint's, by default).
PROBE_LOSS_KEY = "probe loss (10th percentile)"
_TRAIN_LOSS = re.compile(rf"^(?P<name>{'|'.join(_TRAIN_LOSS_NAMES)})(?:_step|_epoch)?$")


def _loss_name(key: str) -> str:
    """The name a training loss's key stands for (``train/loss_epoch`` ->
    ``train_loss``), so that a run's checkpoints carrying it under two suffixes are one
    source."""
    match = _TRAIN_LOSS.match(_normalised(key))
    return key if match is None else match.group("name")


def training_loss(meta: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """The trainer's training loss among a checkpoint's scalar meta, as ``(key, value)``:
    the first finite number under the most specific of :data:`_TRAIN_LOSS_NAMES`
    (``train_loss``, ``train/loss``, ``train_loss_epoch``, ``training_loss``, ``loss``);
    None when the checkpoint carries none. A validation loss (``val_loss``) is not one."""
    found: dict[str, tuple[str, float]] = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or isinstance(value, bool):
            continue
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            continue
        name = _loss_name(key)
        if name in _TRAIN_LOSS_NAMES:
            found.setdefault(name, (key, float(value)))
    for name in _TRAIN_LOSS_NAMES:
        if name in found:
            return found[name]
    return None


def transition_label(
    before: Mapping[str, float], after: Mapping[str, float], cfg: EventConfig = EventConfig()
) -> str:
    """``"generalising"``, ``"not generalising"`` or ``"unknown"`` for the validation
    scalars at the start and end of a transition's window (see the module docstring)."""
    common = [k for k in after if k in before and _metric_kind(k) is not None]
    accs = [k for k in common if _metric_kind(k) == "acc"]
    losses = [k for k in common if _metric_kind(k) == "loss"]
    if accs:
        for k in accs:
            scale = 100.0 if max(abs(before[k]), abs(after[k])) > 1.0 else 1.0
            if after[k] - before[k] >= cfg.label_acc_gain * scale:
                return "generalising"
        return "not generalising"
    if losses:
        for k in losses:
            if after[k] <= before[k] - cfg.label_loss_drop * abs(before[k]):
                return "generalising"
        return "not generalising"
    return "unknown"


# --------------------------------------------------------------------------- helpers


def _number(layer: str, reading: str, value: Any) -> float | None:
    """A reading as a float (None when unresolved); a clear error for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DDSError(
            f"layer {layer!r}: reading {reading!r} must be a number or None, "
            f"got {type(value).__name__} {value!r}"
        )
    return float(value)


def _level(layer: str, row: Reading, value: Any) -> float | None:
    """The value at its level (decades, or as it is for a fraction): None when
    unresolved, non-finite, or a positive quantity at or below 0."""
    x = _number(layer, row.name, value)
    if x is None or not math.isfinite(x):
        return None
    out = row.level(x)
    return out if math.isfinite(out) else None


def _median(values: Iterable[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The median of ``values`` where each counts by its weight (``> 0``): the smallest
    value whose cumulative weight, in value order, passes half the total; where a prefix
    holds exactly half, the mean of its last value and the next, so equal weights give
    :func:`_median`'s answer."""
    pairs = sorted(zip(values, weights))
    half = 0.5 * sum(w for _, w in pairs)
    tol = 1e-12 * half
    cum = 0.0
    for i, (v, w) in enumerate(pairs):
        cum += w
        if abs(cum - half) <= tol and i + 1 < len(pairs):
            return 0.5 * (v + pairs[i + 1][0])
        if cum > half:
            return v
    return pairs[-1][0]


def _time_weights(steps: Sequence[int]) -> list[float]:
    """The span of training each of a time-ordered sample of ``steps`` stands for: half
    the gap to each neighbour (the one gap at either end), so a stretch checkpointed every
    5 steps weighs no more, per step, than one checkpointed every 50. At a regular cadence
    every weight is the cadence."""
    n = len(steps)
    if n < 2:
        return [1.0] * n
    out = []
    for i in range(n):
        lo = steps[i] - steps[i - 1] if i > 0 else steps[1] - steps[0]
        hi = steps[i + 1] - steps[i] if i + 1 < n else steps[i] - steps[i - 1]
        out.append(max(0.5 * (lo + hi), 1e-9))
    return out


def _fmt(row: Reading, value: float) -> str:
    return f"{value:.4g}" if row.unit == "nats" else f"{value:.3g}"


def _is_finite_point(reading: Mapping[str, Any]) -> bool:
    return reading.get("finite", True) is not False


def _dying_text(layer: str, count: float | None) -> str:
    """``about 3 directions dying at 'fc1'`` (empty when there is no count to say)."""
    if count is None or not math.isfinite(count) or count < 0.5:
        return ""
    n = round(count)
    return f"about {n} direction{'s' if n != 1 else ''} dying at {layer!r}"


def _scalars_text(scalars: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())


def _thin(buffer: deque[Any]) -> None:
    """Keep a time-ordered buffer of ``(step, ...)`` entries to about :data:`_MAX_KEPT`:
    once longer, keep the first entry in each of ``_MAX_KEPT / 2`` equal spans of its
    steps (the newest :data:`_KEEP_NEWEST` always), so a dense run's windows are read
    from an even sample of them and the saved state stays small."""
    if len(buffer) <= _MAX_KEPT:
        return
    entries = list(buffer)
    old, newest = entries[:-_KEEP_NEWEST], entries[-_KEEP_NEWEST:]
    first, last = old[0][0], old[-1][0]
    cell = max((last - first) / (_MAX_KEPT // 2), 1e-12)
    kept, seen = [], set()
    for entry in old:
        k = int((entry[0] - first) // cell)
        if k not in seen:
            seen.add(k)
            kept.append(entry)
    buffer.clear()
    buffer.extend(kept + newest)


# --------------------------------------------------------------------------- cadence


class _Cadence:
    """The run's cadence: pinned by the config, or the median of its newest step gaps
    (the last ``cadence_checkpoints`` checkpoints'), so it follows a run whose cadence
    changes: a log-spaced start (steps 0, 1, 2, 4, ... 512, then every 1000) or a
    trainer checkpointing every 50 steps, then every 500. A gap left by a few
    checkpoints rotated away before they were read, or steps jittered around the
    cadence, do not move the median.

    ``warm``: the warm-up is over (:attr:`EventWindows.warm`); once over it stays over,
    so a cadence growing later in the run does not start it again. Until then it keeps
    the trainer's training loss of the recent checkpoints (:func:`training_loss`, under
    the key first found; where the checkpoints carry none, the probe's fitted loss the
    daemon passes, :data:`PROBE_LOSS_KEY`) and its first value, for ``loss_falling``
    (:attr:`EventWindows.loss_falling`): the newest loss at least
    ``warm_up_loss_fall * |first|`` below the last one at or before ``reference_lag``
    steps earlier; and for at most :data:`_LOSS_HOLD_MAX` times the age at which the age
    rule alone would have ended the warm-up (``held_since``). A run with neither loss, or with one for less than the lag, is not
    held.
    """

    def __init__(self, cfg: EventConfig) -> None:
        self.cfg = cfg
        self.gaps: deque[int] = deque(maxlen=cfg.cadence_checkpoints - 1)
        self.value: float | None = (
            float(cfg.cadence_steps) if cfg.cadence_steps is not None else None
        )
        self.pinned = cfg.cadence_steps is not None
        self.seen = 0  # checkpoints seen
        self.first: int | None = None
        self.last: int | None = None
        self.warned = False
        self.warm = False
        self.loss_key: str | None = None
        self.loss_first: float | None = None
        self.losses: deque[tuple[int, float]] = deque(maxlen=_MAX_BUFFER)
        self.loss_falling = False
        self.held_since: float | None = None  # the age the loss first held the warm-up at

    @property
    def settled(self) -> bool:
        """Pinned, or measured on a full ``cadence_checkpoints`` (the windows are said)."""
        return self.pinned or self.seen >= self.cfg.cadence_checkpoints

    def push(
        self, step: int, meta: Mapping[str, Any] | None = None, probe_loss: float | None = None
    ) -> None:
        if self.last is not None:
            gap = step - self.last
            self._drift(gap)
            if not self.pinned:
                self.gaps.append(gap)
                self.value = float(_median(self.gaps))
        self.last = step
        if self.first is None:
            self.first = step
        self.seen += 1
        if self.warm:
            return
        self._note_loss(step, meta, probe_loss)
        win = self.windows()
        self.loss_falling = win is not None and self._loss_falling(step, win.reference_lag)
        if win is None or win.age < win.warm_up:
            return
        if self.loss_falling:
            if self.held_since is None:
                self.held_since = win.age
                log.info(
                    "event detector: the training loss (%s) is still falling at step %d: "
                    "the warm-up goes on while it falls by more than %g of its first "
                    "value over %g steps, until step %d at the latest",
                    self.loss_key,
                    step,
                    self.cfg.warm_up_loss_fall,
                    win.reference_lag,
                    round((self.first or 0) + _LOSS_HOLD_MAX * win.age),
                )
            if win.age < _LOSS_HOLD_MAX * self.held_since:
                return
        self.warm = True
        self.loss_falling = False
        self.losses.clear()

    def _note_loss(
        self, step: int, meta: Mapping[str, Any] | None, probe_loss: float | None
    ) -> None:
        """Keep this checkpoint's training loss: the trainer's (:func:`training_loss`),
        else the probe's fitted loss; the source first found is the run's for good."""
        found = training_loss(meta)
        if found is not None:
            found = (_loss_name(found[0]), found[1])
        elif probe_loss is not None and math.isfinite(probe_loss):
            found = (PROBE_LOSS_KEY, float(probe_loss))
        if found is None or (self.loss_key is not None and found[0] != self.loss_key):
            return
        key, value = found
        if self.loss_key is None:
            self.loss_key, self.loss_first = key, value
        self.losses.append((step, value))
        _thin(self.losses)

    def _loss_falling(self, step: int, lag: float) -> bool:
        """The training loss fell by more than ``warm_up_loss_fall`` of its first value
        over the last ``lag`` steps (the newest loss against the last at or before
        ``step - lag``); False without a loss reaching back that far."""
        q = self.cfg.warm_up_loss_fall
        if q <= 0 or self.loss_first is None or not self.losses:
            return False
        before = [v for s, v in self.losses if s <= step - lag]
        if not before:
            return False
        return before[-1] - self.losses[-1][1] > q * abs(self.loss_first)

    def _drift(self, gap: int) -> None:
        """Warn, once, of a gap far off the cadence: the pinned one (either way), or
        longer than every recent gap (a gap doubling at each checkpoint, as in a
        log-spaced start, is no drift; a short one, a checkpoint saved beside the periodic
        ones, as a trainer's final save is, moves neither the median nor the windows)."""
        if self.warned:
            return
        if self.pinned and self.value is not None:
            low = high = self.value
            said = f"while cadence_steps pins the cadence at {self.value:g} steps"
            fix = "check cadence_steps, or set the [events] *_steps keys"
        elif self.gaps:
            low, high = 0.0, float(max(self.gaps))
            said = (
                f"after a cadence of {self.value:g} steps (checkpoints missing, or the "
                f"cadence changed); the windows follow the median of the newest "
                f"{self.gaps.maxlen} gaps"
            )
            fix = "to pin them, set the [events] *_steps keys (or cadence_steps)"
        else:
            return
        if gap > _CADENCE_DRIFT * high or gap * _CADENCE_DRIFT < low:
            self.warned = True
            log.warning("event detector: checkpoints %d steps apart %s; %s", gap, said, fix)

    def windows(self) -> EventWindows | None:
        """The windows at the newest step (None while the cadence is unknown)."""
        if self.value is None:
            return None
        age = 0.0 if self.first is None or self.last is None else float(self.last - self.first)
        return self.cfg.windows(self.value, age, warm=self.warm, loss_falling=self.loss_falling)

    def to_state(self) -> dict[str, Any]:
        return {
            "gaps": list(self.gaps),
            "value": self.value,
            "seen": self.seen,
            "first": self.first,
            "last": self.last,
            "warned": self.warned,
            "warm": self.warm,
            "loss_key": self.loss_key,
            "loss_first": self.loss_first,
            "losses": [[s, v] for s, v in self.losses],
            "loss_falling": self.loss_falling,
            "held_since": self.held_since,
        }

    def load(self, state: Mapping[str, Any], recent: Sequence[int] = ()) -> None:
        """Restore :meth:`to_state`'s dict.

        One saved by the previous release, whose cadence was the median gap of the
        *first* checkpoints (``steps``, ``frozen``), takes the newest gaps from
        ``recent``, the newest checkpoint steps its saved history holds (those first
        steps' gaps where it holds fewer than two): a run whose cadence changed before the
        restart (every 50 steps, then every 500) carries on at its cadence now, not at
        the first checkpoints' for the next few."""
        if "gaps" in state:
            gaps = [int(g) for g in state["gaps"]]
            seen = int(state["seen"])
            value = None if state["value"] is None else float(state["value"])
        else:
            first = [int(s) for s in state["steps"]]
            newest = sorted({int(s) for s in recent})
            known = newest if len(newest) >= 2 else first
            gaps = [b - a for a, b in itertools.pairwise(known)]
            seen = max(len(first), len(newest))
            if state.get("frozen"):
                seen = max(seen, self.cfg.cadence_checkpoints)
            keep = gaps[len(gaps) - min(len(gaps), self.cfg.cadence_checkpoints - 1) :]
            value = float(_median(keep)) if keep else None
            if value is None and state["value"] is not None:
                value = float(state["value"])
        self.first = None if state["first"] is None else int(state["first"])
        self.last = None if state["last"] is None else int(state["last"])
        self.warned = bool(state["warned"])
        self.seen = seen
        if not self.pinned:
            self.gaps.clear()
            self.gaps.extend(gaps)
            self.value = value
        self.loss_key = None if state.get("loss_key") is None else str(state["loss_key"])
        loss_first = state.get("loss_first")
        self.loss_first = None if loss_first is None else float(loss_first)
        self.losses.clear()
        self.losses.extend((int(s), float(v)) for s, v in state.get("losses", []))
        self.loss_falling = bool(state.get("loss_falling", False))
        held = state.get("held_since")
        self.held_since = None if held is None else float(held)
        if "warm" in state:
            self.warm = bool(state["warm"])
        else:
            win = self.windows()
            self.warm = win is not None and win.age >= win.warm_up


# --------------------------------------------------------------------------- scanners
# Each scanner holds the incremental state of one detector for one (layer, reading); a
# pure detect_* function replays a whole history through a fresh scanner and keeps the
# newest point's events, so the daemon's incremental path and the pure path agree.


class _LevelScanner:
    """Collapse/revival state machine of one (layer, reading); see the module docstring."""

    def __init__(self, layer: str, reading: str, cfg: EventConfig) -> None:
        self.layer = layer
        self.reading = reading
        self.row = _row(reading)
        self.cfg = cfg
        # (step, level) of the values the reference may still need, oldest first
        self.buffer: deque[tuple[int, float]] = deque(maxlen=_MAX_BUFFER)
        self.state = "normal"  # normal | low | high
        self.anchor = 0.0  # reference (level) when the state left normal
        self.thr = 0.0  # the threshold it left by
        self.decided = False  # a decision was made: the warm-up is over for this reading
        self.silent = False  # the state left normal before the first decision: no news

    def least_reference(self, win: EventWindows) -> int:
        """Values a decision needs in the reference: ``min_reference`` up to the reading's
        first decision (the warm-up's guard against early training); after it,
        ``min(min_reference, _LEAST_WINDOW_REFERENCE)``, so a window that holds fewer
        checkpoints (a coarse cadence, rotated-away or jittered checkpoints) is read on
        its own values rather than on older ones (module docstring). A count of the
        window's own values, not one derived from the cadence: with jittered steps the
        median gap overstates what a window holds, and a rule of ``max(4, window /
        cadence)`` values fell back to early training again (a review's replay)."""
        if not self.decided:
            return win.min_reference
        return min(win.min_reference, _LEAST_WINDOW_REFERENCE)

    def _reference(self, step: int, win: EventWindows) -> tuple[list[float], list[float]]:
        """The values in the reference window ``[step - lag - window, step - lag)`` (where
        it holds fewer than :meth:`least_reference`, the newest ``min_reference`` before
        the lag) and each value's weight, the span of training it stands for
        (:func:`_time_weights` over the buffer, this step included), so that the
        reference is a median over time, not over checkpoints: read every 5 steps and then
        every 50, a window straddling the switch was otherwise the level of its dense
        first stretch (``bench_events.py --cadences``: the steady run's fine-then-coarse
        schedule flagged a transition at step 1800 that its regular schedule did not)."""
        end = step - win.reference_lag
        start = end - win.reference_window
        steps = [s for s, _ in self.buffer] + [step]
        weights = _time_weights(steps)
        before_lag = [(s, v, w) for (s, v), w in zip(self.buffer, weights) if s < end]
        kept = [(v, w) for s, v, w in before_lag if s >= start]
        if len(kept) < self.least_reference(win):
            kept = [(v, w) for _, v, w in before_lag[-win.min_reference :]]
        return [v for v, _ in kept], [w for _, w in kept]

    def _prune(self, step: int, win: EventWindows) -> None:
        """Drop what no later reference needs: values older than the window, beyond the
        ``min_reference`` newest before the lag."""
        start = step - win.reference_lag - win.reference_window
        end = step - win.reference_lag
        before_lag = sum(1 for s, _ in self.buffer if s < end)
        while self.buffer and self.buffer[0][0] < start and before_lag > win.min_reference:
            self.buffer.popleft()
            before_lag -= 1

    def _threshold(self, values: list[float], centre: float) -> float:
        """The collapse threshold (module docstring) from the reference values' MAD
        about ``centre``. The MAD counts every checkpoint alike (each is a sample of the
        reading's scatter), where the centre is weighted by time (:meth:`_reference`):
        weighted too, a window of 20 values read every 50 steps and 2 read every 500
        took its scatter mostly from the 2, and a steady reading's wobble passed the
        threshold (``tests/test_review_session_events_oldstate.py``'s run)."""
        if self.row.unit not in ("nats", "fraction"):
            if self.cfg.ratio_mad_k <= 0:
                return self.cfg.ratio_decades
            mad = _median(abs(v - centre) for v in values)
            spread = max(self.cfg.ratio_min_decades, self.cfg.ratio_mad_k * _MAD_TO_SIGMA * mad)
            return min(self.cfg.ratio_decades, spread)
        least = self.cfg.volume_min_decades if self.row.unit == "nats" else self.cfg.fraction_change
        mad = _median(abs(v - centre) for v in values)
        return max(least, self.cfg.volume_mad_k * _MAD_TO_SIGMA * mad)

    def push(
        self, step: int, raw: Any, win: EventWindows | None, dying: float | None = None
    ) -> Event | None:
        value = _level(self.layer, self.row, raw)
        if value is None:
            return None
        event = None
        if win is not None and (self.decided or not win.in_warm_up):
            values, weights = self._reference(step, win)
            if values and len(values) >= self.least_reference(win):
                prior = self.buffer[-1][1] if self.buffer and not self.decided else None
                event = self._decide(step, value, float(raw), values, weights, dying, prior)
                self.decided = True
        self.buffer.append((step, value))
        if win is not None:
            self._prune(step, win)
        _thin(self.buffer)
        return event

    def _decide(
        self,
        step: int,
        value: float,
        raw: float,
        values: list[float],
        weights: list[float],
        dying: float | None,
        prior: float | None = None,
    ) -> Event | None:
        """The state machine at one checkpoint (module docstring). ``prior``: at the
        reading's first decision, its previous value (None at every later one). Where
        ``prior`` was already past the threshold of this reference (``prior <= ref - thr``,
        or ``>= ref + thr`` for a rise), the departure happened before anything could be
        decided, in the warm-up: the state leaves normal *silently* (no collapse, and no
        revival when it returns), so it counts toward no transition."""
        ref = _weighted_median(values, weights)
        if self.state == "low":
            if value >= self.anchor - self.thr / 2:
                self.state = "normal"
                if self.silent:
                    self.silent = False
                    return None
                return self._event(
                    step, "revival", self.anchor, raw, value - self.anchor, None, True
                )
            if value > ref - self.thr / 2:
                self.state = "normal"  # the reference caught up: the new level is the norm
                self.silent = False
            return None
        if self.state == "high":
            if value < ref + self.thr / 2:
                self.state, self.silent = "normal", False
            return None
        thr = self._threshold(values, ref)
        if value <= ref - thr:
            self.state, self.anchor, self.thr = "low", ref, thr
            if prior is not None and prior <= ref - thr:
                self.silent = True
                return None
            return self._event(step, "collapse", ref, raw, ref - value, dying)
        if value >= ref + thr:
            self.state, self.anchor, self.thr = "high", ref, thr
            if prior is not None and prior >= ref + thr:
                self.silent = True
                return None
            return self._event(step, "revival", ref, raw, value - ref, None)
        return None

    def _event(
        self,
        step: int,
        kind: str,
        ref: float,
        raw: float,
        delta: float,
        dying: float | None,
        recovered: bool = False,
    ) -> Event:
        before = self.row.from_level(ref)
        mag = abs(delta)
        r, row = self.reading, self.row
        units = "decades" if row.in_decades else ""
        own = " (nats)" if row.unit == "nats" else ""  # the values' unit, not the depth's
        if recovered:
            what = (
                f"recovered to {_fmt(row, raw)} (reference before the collapse {_fmt(row, before)})"
            )
        else:
            verb = "fell below" if kind == "collapse" else "rose above"
            what = (
                f"{verb} its trailing reference by {mag:.2f}{' ' + units if units else ''} "
                f"({_fmt(row, before)} -> {_fmt(row, raw)})"
            )
        message = f"{kind}: {self.layer} {r}{own} {what}"
        count = dying if kind == "collapse" else None
        said = _dying_text(self.layer, count)
        if said:
            message += f"; {said}"
        return Event(step, self.layer, kind, r, before, raw, mag, message, dying_directions=count)

    def to_state(self) -> dict[str, Any]:
        return {
            "buffer": [[s, v] for s, v in self.buffer],
            "state": self.state,
            "anchor": self.anchor,
            "thr": self.thr,
            "decided": self.decided,
            "silent": self.silent,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`to_state`'s dict; one saved before ``decided`` / ``silent``
        existed is taken as past its first decision, with nothing silent (as it ran)."""
        self.buffer.clear()
        self.buffer.extend((int(s), float(v)) for s, v in state["buffer"])
        self.state = str(state["state"])
        self.anchor = float(state["anchor"])
        self.thr = float(state["thr"])
        self.decided = bool(state.get("decided", True))
        self.silent = bool(state.get("silent", False))


class _RankScanner:
    """Stable-value tracker of one integer reading with hysteresis (in checkpoints)."""

    def __init__(self, layer: str, reading: str, cfg: EventConfig) -> None:
        self.layer = layer
        self.reading = reading
        self.cfg = cfg
        self.stable: int | None = None
        self.run_value: int | None = None
        self.run_length = 0

    def push(self, step: int, raw: Any) -> Event | None:
        x = _number(self.layer, self.reading, raw)
        if x is None or not math.isfinite(x):
            return None
        value = round(x)
        if value == self.run_value:
            self.run_length += 1
        else:
            self.run_value, self.run_length = value, 1
        if self.run_length != self.cfg.rank_hysteresis:
            return None
        before, self.stable = self.stable, value
        if before is None or abs(value - before) < self.cfg.rank_min_change:
            return None
        change = value - before
        return Event(
            step,
            self.layer,
            "rank_change",
            self.reading,
            float(before),
            float(value),
            float(abs(change)),
            f"rank_change: {self.layer} {self.reading} {before} -> {value} "
            f"({change:+d}, held {self.cfg.rank_hysteresis} checkpoints)",
        )

    def to_state(self) -> dict[str, Any]:
        return {"stable": self.stable, "run_value": self.run_value, "run_length": self.run_length}

    def load(self, state: Mapping[str, Any]) -> None:
        self.stable = state["stable"]
        self.run_value = state["run_value"]
        self.run_length = int(state["run_length"])


class _NonfiniteScanner:
    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.was_finite = True

    def push(self, step: int, reading: Mapping[str, Any]) -> Event | None:
        finite = _is_finite_point(reading)
        entered = self.was_finite and not finite
        self.was_finite = finite
        if not entered:
            return None
        what = reading.get("nonfinite") or "activations or gradients not finite"
        return Event(
            step,
            self.layer,
            "nonfinite",
            "finite",
            None,
            None,
            1.0,
            f"nonfinite: {self.layer} {what} (NaN/inf); its readings are left out of the "
            "event history until it is finite again",
        )


_DYING_KEYS = ("lambda_min", "logdet", "g_rank", "lambda_ratio")


class _DyingScanner:
    """One layer's ``dying_directions`` between consecutive finite checkpoints, and the
    ``dying`` event: the count held at or above ``dying_min`` over ``dying_window`` steps
    while ``lambda_ratio`` fell ``dying_decades``.

    ``prev`` is the previous finite point (the keys the count needs); ``run`` the
    current stretch of qualifying checkpoints as ``(step, count, log10 lambda_ratio)``,
    its first entry the checkpoint it starts from (count None); ``start`` that step.
    """

    def __init__(self, layer: str, cfg: EventConfig) -> None:
        self.layer = layer
        self.cfg = cfg
        self.prev: dict[str, Any] | None = None
        self.prev_step: int | None = None
        self.run: deque[tuple[int, float | None, float | None]] = deque(maxlen=_MAX_BUFFER)
        self.start: int | None = None
        self.armed = True
        self.last_ok: int | None = None

    @staticmethod
    def _ratio(point: Mapping[str, Any]) -> float | None:
        r = point.get("lambda_ratio")
        if r is None or isinstance(r, bool) or not isinstance(r, numbers.Real):
            return None
        r = float(r)
        return math.log10(r) if r > 0 and math.isfinite(r) else None

    def count(self, point: Mapping[str, Any]) -> float | None:
        """The count between the previous finite point and ``point`` (no state change).

        The estimate is a count only within ``[0, g_rank]``: below 0 (``log det+`` rose
        while lambda_min fell: the others grew, nothing dies with the smallest) it is
        None; above the rank (the spectrum falling faster than its smallest) it is the
        rank, every direction. Unclamped, the example's control logged counts down to
        -269 (32 of its 33) and the terminal showed them; the grokking run's hidden layer
        (g_rank 128) was said to have "about 183 directions dying"."""
        if self.prev is None or not _is_finite_point(point):
            return None
        value = dying_directions(self.prev, point)  # within [0, g_rank], or None
        return value if value is None or math.isfinite(value) else None

    def push(
        self, step: int, point: Mapping[str, Any], win: EventWindows | None
    ) -> tuple[float | None, Event | None]:
        """This checkpoint's count, and a ``dying`` event when one starts here."""
        if not _is_finite_point(point):
            self._broken(step, win)
            return None, None
        value = self.count(point)
        prev_step, prev = self.prev_step, self.prev
        self.prev = {k: point.get(k) for k in _DYING_KEYS}
        self.prev["finite"] = True
        self.prev_step = step
        if value is None or value < self.cfg.dying_min or prev is None or prev_step is None:
            self._broken(step, win)
            return value, None
        self.last_ok = step
        if self.start is None:
            self.start = prev_step
            self.run.append((prev_step, None, self._ratio(prev)))
        self.run.append((step, value, self._ratio(point)))
        if win is None:
            return value, None
        window = win.dying_window
        # keep the points within the window, and the newest one at or before its start
        while len(self.run) >= 2 and self.run[1][0] <= step - window:
            self.run.popleft()
        _thin(self.run)
        if not self.armed or step - self.start < window or win.in_warm_up:
            return value, None
        first = self.run[0]
        now = self._ratio(point)
        fall = None if first[2] is None or now is None else first[2] - now
        if self.cfg.dying_decades > 0 and (fall is None or fall < self.cfg.dying_decades):
            return value, None
        self.armed = False
        counts = [c for s, c, _ in self.run if c is not None and s > step - window]
        counts = counts or [value]
        typical = _median(counts)
        fell = "" if fall is None else f", lambda_ratio fell {fall:.2f} decades"
        message = (
            f"dying: {_dying_text(self.layer, typical) or 'directions dying at ' + repr(self.layer)}"
            f" (dying_directions >= {self.cfg.dying_min:g} at every checkpoint for "
            f"{step - self.start} steps, {self.start}-{step}{fell})"
        )
        event = Event(
            step,
            self.layer,
            "dying",
            "dying_directions",
            None,
            value,
            typical,
            message,
            dying_directions=typical,
        )
        return value, event

    def _broken(self, step: int, win: EventWindows | None) -> None:
        """The count does not qualify at ``step``: the stretch is broken, and the next
        one may be reported once none qualified for a whole ``dying_window``."""
        self.run.clear()
        self.start = None
        if self.last_ok is None or (win is not None and step - self.last_ok >= win.dying_window):
            self.armed = True

    def to_state(self) -> dict[str, Any]:
        return {
            "prev": self.prev,
            "prev_step": self.prev_step,
            "run": [list(r) for r in self.run],
            "start": self.start,
            "armed": self.armed,
            "last_ok": self.last_ok,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.prev = None if state["prev"] is None else dict(state["prev"])
        self.prev_step = None if state["prev_step"] is None else int(state["prev_step"])
        self.run.clear()
        for s, c, r in state["run"]:
            self.run.append((int(s), None if c is None else float(c), None if r is None else r))
        self.start = None if state["start"] is None else int(state["start"])
        self.armed = bool(state["armed"])
        self.last_ok = None if state["last_ok"] is None else int(state["last_ok"])


class _Trainer:
    """The validation scalars of the recent checkpoints, for a transition's context."""

    def __init__(self) -> None:
        self.points: deque[tuple[int, dict[str, float]]] = deque(maxlen=_MAX_BUFFER)

    def push(self, step: int, meta: Mapping[str, Any] | None, win: EventWindows | None) -> None:
        scalars = validation_scalars(meta)
        if scalars:
            self.points.append((step, scalars))
        if win is not None:
            start = step - win.transition_window
            while len(self.points) >= 2 and self.points[1][0] <= start:
                self.points.popleft()
        _thin(self.points)

    def window(self, step: int, span: float) -> tuple[dict[str, float], dict[str, float]]:
        """The scalars at the start of ``[step - span, step]`` (the last checkpoint at or
        before it, else the first one in it) and at its end (the newest up to ``step``)."""
        kept = [(s, p) for s, p in self.points if s <= step]
        if not kept:
            return {}, {}
        start = step - span
        before = [p for s, p in kept if s <= start]
        first = before[-1] if before else kept[0][1]
        last = kept[-1][1]
        if kept[-1][0] <= start:  # nothing new inside the window
            return dict(first), {}
        return dict(first), dict(last)

    def to_state(self) -> list[list[Any]]:
        return [[s, dict(p)] for s, p in self.points]

    def load(self, state: Sequence[Any]) -> None:
        self.points.clear()
        for s, p in state:
            self.points.append((int(s), {str(k): float(v) for k, v in p.items()}))


class _ResolvedSamples:
    """``samples_resolved`` of the recent checkpoints (the output layer's, the first layer
    that carries one), for a transition's note on the loss's dynamic range."""

    def __init__(self) -> None:
        self.points: deque[tuple[int, int]] = deque(maxlen=_MAX_BUFFER)

    def push(
        self, step: int, readings: Mapping[str, Mapping[str, Any]], win: EventWindows | None
    ) -> None:
        for reading in readings.values():
            value = reading.get("samples_resolved")
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.points.append((step, round(float(value))))
                break
        if win is not None:
            start = step - win.transition_window
            while len(self.points) >= 2 and self.points[1][0] <= start:
                self.points.popleft()
        _thin(self.points)

    def window(self, step: int, span: float) -> tuple[int, int] | None:
        """The count at the start of ``[step - span, step]`` (the last at or before it,
        else the first in it) and at its end; None without two of them."""
        kept = [(s, v) for s, v in self.points if s <= step]
        if len(kept) < 2:
            return None
        before = [v for s, v in kept if s <= step - span]
        return (before[-1] if before else kept[0][1]), kept[-1][1]

    def to_state(self) -> list[list[int]]:
        return [[s, v] for s, v in self.points]

    def load(self, state: Sequence[Any]) -> None:
        self.points.clear()
        self.points.extend((int(s), int(v)) for s, v in state)


#: A transition whose collapses are all on the Fisher side, across a window in which the
#: output layer's ``samples_resolved`` moved by at least this fraction (and 2 samples),
#: says that its collapses may be the loss's dynamic range (see the module docstring).
SAMPLES_MOVED = 0.1


def _samples_note(picked: Sequence[Mapping[str, Any]], counts: tuple[int, int] | None) -> str:
    """The note of a transition made of G-side collapses while G's samples moved."""
    if counts is None or not all(_row(e["reading"]).side == "G" for e in picked):
        return ""
    a, b = counts
    if abs(b - a) < max(2.0, SAMPLES_MOVED * max(a, 1)):
        return ""
    return (
        f"; G-side collapses only, while the samples G resolves moved {a} -> {b}: "
        "the loss's dynamic range, not necessarily structure"
    )


class _TransitionScanner:
    """Groups collapses across readings and layers into transitions.

    ``ledger`` holds the collapses of the last ``transition_window`` steps (dicts with
    step, layer, reading, magnitude, dying, revived, claimed, and broken while their
    layer is non-finite: a broken collapse counts toward none, and is held or revived as
    any other once its layer reads finite again, so only a layer that stays non-finite
    (a run diverging) takes its collapses out of a transition); collapses before
    ``quiet_until`` (a step) belong to the transition just reported. ``last_label``:
    that transition's label; when it is ``"generalising"``, each collapse that belongs
    to it, once held, moves ``quiet_until`` to its own step plus the
    ``transition_window``, so a generalisation that reaches the layers one after
    another stays one transition. ``stretch_pairs``: the (layer, reading) pairs of the
    stretch so far, each of which extends it once (:meth:`_extend`).
    """

    def __init__(self, cfg: EventConfig) -> None:
        self.cfg = cfg
        self.quiet_until: float | None = None
        self.last_label: str | None = None
        self.stretch_pairs: set[tuple[str, str]] = set()
        self.ledger: list[dict[str, Any]] = []

    def push(
        self,
        step: int,
        events: Sequence[Event],
        win: EventWindows | None,
        trainer: _Trainer | None = None,
        samples: _ResolvedSamples | None = None,
        finite: Mapping[str, bool] | None = None,
    ) -> list[Event]:
        """``finite``: whether each layer read at this checkpoint is finite (None: not
        known; a layer broken stays broken)."""
        for entry in self.ledger:
            if entry.get("broken") and finite is not None and finite.get(entry["layer"]):
                # finite again (a bad batch at one save, a probe overflowing once): no
                # divergence; its readings are read again, and a revival marks it
                entry["broken"] = False
        for ev in events:
            if ev.kind == "collapse":
                self.ledger.append(
                    {
                        "step": ev.step,
                        "layer": ev.layer,
                        "reading": ev.reading,
                        "magnitude": ev.magnitude,
                        "dying": ev.dying_directions,
                        "revived": False,
                        "claimed": self.quiet_until is not None and ev.step < self.quiet_until,
                    }
                )
            elif ev.kind == "revival":
                for entry in self.ledger:
                    if entry["layer"] == ev.layer and entry["reading"] == ev.reading:
                        entry["revived"] = True
            elif ev.kind == "nonfinite":
                # the layer broke before its collapses were confirmed: they were the run
                # diverging (its loss blowing up a checkpoint before the weights went
                # NaN), held by no reading since, not a phase change
                for entry in self.ledger:
                    if entry["layer"] == ev.layer:
                        entry["broken"] = True
        if win is None:
            return []
        span = win.transition_window
        if self.quiet_until is not None and self.last_label == "generalising":
            self._extend(step, span, win.confirm)
        self.ledger = [e for e in self.ledger if e["step"] > step - span]
        ready = [
            e
            for e in self.ledger
            if not (e["revived"] or e["claimed"] or e.get("broken"))
            and e["step"] <= step - win.confirm
        ]
        chosen: dict[tuple[str, str], dict[str, Any]] = {}
        for e in ready:
            chosen.setdefault((e["layer"], e["reading"]), e)
        if len(chosen) < self.cfg.min_collapses:
            return []
        for e in self.ledger:
            e["claimed"] = True
        self.quiet_until = step + span
        self.stretch_pairs = {(e["layer"], e["reading"]) for e in self.ledger}
        picked = list(chosen.values())
        layers = list(dict.fromkeys(e["layer"] for e in picked))
        readings = ",".join(dict.fromkeys(e["reading"] for e in picked))
        parts = ", ".join(
            f"{e['layer']} {e['reading']} -{e['magnitude']:.1f}"
            f"{' dec' if _row(e['reading']).in_decades else ''} @ {e['step']}"
            for e in picked
        )
        dying: dict[str, float] = {}
        for e in picked:
            if e["dying"] is not None:
                dying[e["layer"]] = float(e["dying"])
        said = [_dying_text(layer, dying.get(layer)) for layer in layers]
        said = [s for s in said if s]
        before, after = trainer.window(step, span) if trainer is not None else ({}, {})
        label = transition_label(before, after, self.cfg)
        self.last_label = label
        completed = sorted(e["step"] for e in picked)[self.cfg.min_collapses - 1]
        msg = (
            f"transition: {len(picked)} collapses within {span:.0f} steps, complete at step "
            f"{completed}, each held {win.confirm:.0f}+ steps: {parts}"
        )
        if said:
            msg += "; " + ", ".join(said)
        msg += _samples_note(picked, None if samples is None else samples.window(step, span))
        if label == "unknown":
            msg += "; validation: unknown (the checkpoints carry no validation metric)"
        else:
            msg += f"; {label}: {_scalars_text(before)} -> {_scalars_text(after)}"
        return [
            Event(
                step,
                ",".join(layers),
                "transition",
                readings,
                None,
                None,
                float(len(picked)),
                msg,
                trainer_before=before,
                trainer_after=after,
                label=label,
                completed_step=int(completed),
            )
        ]

    def _extend(self, step: int, span: float, confirm: float) -> None:
        """The stretch of a generalising transition, extended by each collapse that
        belongs to it once it has held for ``confirm`` steps (unrevived, its layer
        finite): to ``span`` steps past that collapse. One extension per (layer,
        reading) pair a stretch, so a reading that dips and recovers, or collapses again
        and again, does not hold the stretch open."""
        if self.quiet_until is None:
            return
        for e in self.ledger:
            pair = (e["layer"], e["reading"])
            if (
                e["claimed"]
                and not (e["revived"] or e.get("broken"))
                and e["step"] <= step - confirm
                and pair not in self.stretch_pairs
            ):
                self.stretch_pairs.add(pair)
                self.quiet_until = max(self.quiet_until, e["step"] + span)

    def to_state(self) -> dict[str, Any]:
        return {
            "quiet_until": self.quiet_until,
            "last_label": self.last_label,
            "stretch_pairs": sorted([layer, reading] for layer, reading in self.stretch_pairs),
            "ledger": [dict(e) for e in self.ledger],
        }

    def load(self, state: Mapping[str, Any]) -> None:
        q = state["quiet_until"]
        self.quiet_until = None if q is None else float(q)
        # absent in a state saved before they were kept: the stretch then ends where it
        # was saved to end, not extended (a generalisation across a restart may split)
        label = state.get("last_label")
        self.last_label = label if label in LABELS else None
        self.stretch_pairs = {(str(a), str(b)) for a, b in state.get("stretch_pairs", [])}
        self.ledger = [dict(e) for e in state["ledger"]]
        for e in self.ledger:
            e["step"] = int(e["step"])
            e.setdefault("dying", None)


# --------------------------------------------------------------------------- pure API


def _check_history(layer: str, history: History) -> None:
    last = None
    for i, point in enumerate(history):
        if not (isinstance(point, (tuple, list)) and len(point) == 2):
            raise DDSError(f"layer {layer!r}: history[{i}] is not a (step, reading) pair")
        step, reading = point
        if not isinstance(reading, Mapping):
            raise DDSError(
                f"layer {layer!r}: reading at step {step} must be a dict, "
                f"got {type(reading).__name__}"
            )
        if last is not None and step <= last:
            raise DDSError(f"layer {layer!r}: history steps must increase ({last} then {step})")
        last = step


def _layer_name(history: History, layer: str | None) -> str:
    if layer is not None:
        return layer
    return str(history[-1][1].get("name", "?")) if history else "?"


def _replay_windows(steps: Sequence[int], cfg: EventConfig) -> list[EventWindows | None]:
    """The windows in force at each of ``steps`` (the cadence as the detector sees it)."""
    cadence = _Cadence(cfg)
    cadence.warned = True  # a replay is no place for the warning
    out = []
    for step in steps:
        cadence.push(step)
        out.append(cadence.windows())
    return out


def detect_rank_change(
    history: History, cfg: EventConfig = EventConfig(), layer: str | None = None
) -> list[Event]:
    """``rank_change`` events at the newest point of one layer's history.

    For each of ``cfg.rank_readings``: the stable value is the latest one held for
    ``cfg.rank_hysteresis`` consecutive checkpoints; an event is reported at the point
    where a new value becomes stable and differs from the previous stable one by at
    least ``cfg.rank_min_change``.
    """
    name = _layer_name(history, layer)
    _check_history(name, history)
    out: list[Event] = []
    for reading in cfg.rank_readings:
        scanner = _RankScanner(name, reading, cfg)
        event = None
        for step, point in history:
            event = scanner.push(step, point.get(reading)) if _is_finite_point(point) else None
        if event is not None:
            out.append(event)
    return out


def detect_level_shifts(
    history: History,
    cfg: EventConfig = EventConfig(),
    layer: str | None = None,
    steps: Sequence[int] | None = None,
) -> list[Event]:
    """``collapse`` / ``revival`` events at the newest point of one layer's history.

    Replays the state machine of the module docstring over the whole history for each of
    ``cfg.readings`` (unresolved values and non-finite points are skipped). ``steps``:
    every checkpoint step of the run so far, which the cadence is measured on (default:
    the history's own steps).
    """
    name = _layer_name(history, layer)
    _check_history(name, history)
    run_steps = list(steps) if steps is not None else [s for s, _ in history]
    at = dict(zip(run_steps, _replay_windows(run_steps, cfg)))
    dying = _DyingScanner(name, cfg)
    counts = []
    for step, point in history:
        counts.append(dying.push(step, point, at.get(step))[0])
    out: list[Event] = []
    for reading in cfg.readings:
        scanner = _LevelScanner(name, reading, cfg)
        event = None
        for (step, point), count in zip(history, counts):
            win = at.get(step)
            event = (
                scanner.push(step, point.get(reading), win, count)
                if _is_finite_point(point)
                else None
            )
        if event is not None:
            out.append(event)
    return out


def detect_dying(
    history: History,
    cfg: EventConfig = EventConfig(),
    layer: str | None = None,
    steps: Sequence[int] | None = None,
) -> list[Event]:
    """A ``dying`` event at the newest point of one layer's history (see the module
    docstring); ``steps`` as for :func:`detect_level_shifts`."""
    name = _layer_name(history, layer)
    _check_history(name, history)
    run_steps = list(steps) if steps is not None else [s for s, _ in history]
    at = dict(zip(run_steps, _replay_windows(run_steps, cfg)))
    scanner = _DyingScanner(name, cfg)
    event = None
    for step, point in history:
        event = scanner.push(step, point, at.get(step))[1]
    return [] if event is None else [event]


def detect_nonfinite(history: History, layer: str | None = None) -> list[Event]:
    """A ``nonfinite`` event when the newest point is non-finite and the one before was not."""
    name = _layer_name(history, layer)
    _check_history(name, history)
    if not history:
        return []
    scanner = _NonfiniteScanner(name)
    event = None
    for step, point in history:
        event = scanner.push(step, point)
    return [] if event is None else [event]


def detect_transitions(
    events: Iterable[Event],
    steps: Sequence[int],
    cfg: EventConfig = EventConfig(),
    meta: Sequence[Mapping[str, Any] | None] | None = None,
    finite: Sequence[Mapping[str, bool]] | None = None,
) -> list[Event]:
    """``transition`` events at the newest checkpoint ``steps[-1]``.

    ``events`` are the collapse/revival/nonfinite events so far (any others are
    ignored), across every layer; ``steps`` the checkpoint steps so far in order (the
    cadence is measured on them); ``meta`` the trainer's scalars of each checkpoint
    (aligned with ``steps``), for the transition's ``trainer_before`` /
    ``trainer_after`` / ``label``. A collapse counts when it lies within the last ``transition_window`` steps, has not been
    followed by a revival of the same (layer, reading), its layer is not non-finite
    since (``finite``: whether each layer read at each checkpoint is finite, aligned with
    ``steps``, as the detector knows; without it a layer turned non-finite is taken to
    stay so), has held at least ``confirm`` steps, and neither counted toward an earlier
    transition nor fell in the stretch after one that belongs to it (the module
    docstring, ``transition``).
    """
    if not steps:
        return []
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise DDSError("detect_transitions: checkpoint steps must increase")
    if meta is not None and len(meta) != len(steps):
        raise DDSError(f"detect_transitions: {len(meta)} meta for {len(steps)} checkpoint steps")
    if finite is not None and len(finite) != len(steps):
        raise DDSError(
            f"detect_transitions: {len(finite)} finite maps for {len(steps)} checkpoint steps"
        )
    by_index: list[list[Event]] = [[] for _ in steps]
    for ev in events:
        if ev.kind not in ("collapse", "revival", "nonfinite"):
            continue
        i = bisect.bisect_left(steps, ev.step)
        if i == len(steps) or steps[i] != ev.step:
            raise DDSError(
                f"detect_transitions: event at step {ev.step} ({ev.layer} {ev.reading}) "
                "is not one of the checkpoint steps"
            )
        by_index[i].append(ev)
    scanner = _TransitionScanner(cfg)
    trainer = _Trainer()
    found: list[Event] = []
    for i, (step, win) in enumerate(zip(steps, _replay_windows(steps, cfg))):
        trainer.push(step, None if meta is None else meta[i], win)
        found = scanner.push(
            step, by_index[i], win, trainer, None, None if finite is None else finite[i]
        )
    return found


# --------------------------------------------------------------------------- detector


class _LayerState:
    """Every scanner of one layer."""

    def __init__(self, name: str, cfg: EventConfig) -> None:
        self.levels = {r: _LevelScanner(name, r, cfg) for r in cfg.readings}
        self.ranks = {r: _RankScanner(name, r, cfg) for r in cfg.rank_readings}
        self.nonfinite = _NonfiniteScanner(name)
        self.dying = _DyingScanner(name, cfg)


class EventDetector:
    """Feeds checkpoints' readings through the detectors, one checkpoint at a time.

    ``update(step, {layer: LayerSignature.to_dict()}, meta)`` appends to each layer's
    history and returns the events at this step (per layer: non-finite, rank changes,
    collapses/revivals, dying; then any transition). They equal the pure ``detect_*``
    functions' answers on the same histories. ``meta`` is the checkpoint's scalar meta
    (the trainer's ``val_acc``, ``eval_loss`` ...), which a transition reports and is
    labelled by. After each update :attr:`last_derived` holds the derived readings of
    this checkpoint per layer (``{"dying_directions": value or None}``), for
    :meth:`ddsmon.signature.Signatures.with_derived`.

    Steps must increase: a step at or before the last one seen is ignored with a warning
    (a re-read checkpoint must not repeat its events). ``keep_history`` bounds the
    points kept per layer for :meth:`history` (None keeps all): the detectors themselves
    need only their scanners' state, which is bounded by the windows, so a long run does
    not grow the daemon's memory.
    """

    def __init__(self, config: EventConfig = EventConfig(), keep_history: int | None = 256) -> None:
        if keep_history is not None and keep_history < 0:
            raise DDSError(f"keep_history must be >= 0 or None, got {keep_history}")
        self.config = config
        self.keep_history = keep_history
        self._layers: dict[str, _LayerState] = {}
        self._history: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._transitions = _TransitionScanner(config)
        self._cadence = _Cadence(config)
        self._trainer = _Trainer()
        self._samples = _ResolvedSamples()
        self._last_step: int | None = None
        self._derived: dict[str, dict[str, float | None]] = {}
        self._said_windows = False

    @property
    def last_step(self) -> int | None:
        """The newest checkpoint step seen (None before the first)."""
        return self._last_step

    @property
    def last_derived(self) -> dict[str, dict[str, float | None]]:
        """The derived readings of the last update, ``{layer: {"dying_directions": value}}``
        (value None where lambda_min did not fall, the rank changed, the layer is
        non-finite or it is the layer's first checkpoint); empty before any update."""
        return {name: dict(values) for name, values in self._derived.items()}

    @property
    def cadence(self) -> float | None:
        """The run's cadence in steps (None before two checkpoints, unless pinned)."""
        return self._cadence.value

    @property
    def windows(self) -> EventWindows | None:
        """The windows in force (None while the cadence is unknown)."""
        return self._cadence.windows()

    def layers(self) -> list[str]:
        """Layers seen so far, in order of first appearance."""
        return list(self._history)

    def history(self, layer: str) -> list[tuple[int, dict[str, Any]]]:
        """The layer's ``(step, reading)`` pairs seen so far (the kept tail after a restore)."""
        if layer not in self._history:
            raise KeyError(f"no history for layer {layer!r}; layers: {list(self._history)}")
        return list(self._history[layer])

    def _layer(self, name: str) -> _LayerState:
        st = self._layers.get(name)
        if st is None:
            st = self._layers[name] = _LayerState(name, self.config)
            self._history[name] = []
        return st

    def update(
        self,
        step: int,
        readings: Mapping[str, Mapping[str, Any]],
        meta: Mapping[str, Any] | None = None,
        probe_loss: float | None = None,
    ) -> list[Event]:
        """Add one checkpoint's readings (layer -> reading dict) and its scalar ``meta``;
        return its new events (and set :attr:`last_derived`). ``probe_loss``: the loss of
        the probe's best-fit samples (:attr:`ddsmon.signature.Signatures.fitted_loss`),
        which stands in for the training loss of the warm-up (``warm_up_loss_fall``)
        where ``meta`` carries none."""
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            log.warning(
                "event detector: step %d is not after the last step %d; ignored",
                step,
                self._last_step,
            )
            return []
        for name, reading in readings.items():
            if not isinstance(reading, Mapping):
                raise DDSError(
                    f"layer {name!r}: reading at step {step} must be a dict, "
                    f"got {type(reading).__name__}"
                )
        if meta is not None and not isinstance(meta, Mapping):
            raise DDSError(f"meta at step {step} must be a dict, got {type(meta).__name__}")
        self._cadence.push(step, meta, probe_loss)
        win = self._cadence.windows()
        if win is not None and self._cadence.settled and not self._said_windows:
            self._said_windows = True
            log.info("event detector: %s", win.describe())
        self._trainer.push(step, meta, win)
        self._samples.push(step, readings, win)
        events: list[Event] = []
        derived: dict[str, dict[str, float | None]] = {}
        for name, reading in readings.items():
            st = self._layer(name)
            point = dict(reading)
            hist = self._history[name]
            hist.append((step, point))
            if self.keep_history is not None and len(hist) > self.keep_history:
                del hist[: len(hist) - self.keep_history]
            count, dying = st.dying.push(step, point, win)
            derived[name] = {"dying_directions": count}
            found = [st.nonfinite.push(step, point)]
            if _is_finite_point(point):
                found += [sc.push(step, point.get(r)) for r, sc in st.ranks.items()]
                found += [sc.push(step, point.get(r), win, count) for r, sc in st.levels.items()]
                found.append(dying)
            events.extend(ev for ev in found if ev is not None)
        finite = {name: _is_finite_point(reading) for name, reading in readings.items()}
        events.extend(
            self._transitions.push(step, events, win, self._trainer, self._samples, finite)
        )
        self._last_step = step
        self._derived = derived
        for ev in events:
            log.info("%s", ev.message)
        return events

    def to_state(self, keep_history: int | None = 8) -> dict[str, Any]:
        """JSON-able state: the config, the cadence, every scanner's state and the last
        ``keep_history`` points of each layer's history (None: all of it). The scanners
        alone decide future events, so a restored detector continues exactly."""
        layers = {}
        for name, st in self._layers.items():
            hist = self._history[name]
            kept = (
                hist if keep_history is None else hist[len(hist) - min(keep_history, len(hist)) :]
            )
            layers[name] = {
                "levels": {r: sc.to_state() for r, sc in st.levels.items()},
                "ranks": {r: sc.to_state() for r, sc in st.ranks.items()},
                "dying": st.dying.to_state(),
                "was_finite": st.nonfinite.was_finite,
                "history": [[s, p] for s, p in kept],
            }
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "last_step": self._last_step,
            "cadence": self._cadence.to_state(),
            "trainer": self._trainer.to_state(),
            "samples_resolved": self._samples.to_state(),
            "transitions": self._transitions.to_state(),
            "derived": self._derived,
            "layers": layers,
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], config: EventConfig | None = None
    ) -> EventDetector:
        """Restore a detector saved by :meth:`to_state` (``config`` defaults to the saved
        one; with a different one, saved scanner state is kept for the readings both
        watch, and the windows follow the new config).

        A state saved by the previous version (1, whose windows counted checkpoints) is
        carried over: its steps are placed at the cadence of its saved history, with a
        warning. Any other version, or a malformed state, is a
        :class:`~ddsmon.errors.DDSError` (the daemon then warns and starts fresh).
        """
        version = state.get("version") if isinstance(state, Mapping) else None
        if version == 1:
            return cls._from_v1(state, config)
        if version != _STATE_VERSION:
            raise DDSError(
                f"event detector state has version {version!r}, expected {_STATE_VERSION}"
            )
        try:
            det = cls(config or EventConfig.from_dict(state["config"]))
            det._last_step = None if state["last_step"] is None else int(state["last_step"])
            recent = [int(s) for saved in state["layers"].values() for s, _ in saved["history"]]
            det._cadence.load(state["cadence"], recent)
            det._said_windows = det._cadence.settled
            det._trainer.load(state["trainer"])
            det._samples.load(state.get("samples_resolved", []))
            det._transitions.load(state["transitions"])
            det._derived = {
                str(k): {str(r): None if v is None else float(v) for r, v in d.items()}
                for k, d in state["derived"].items()
            }
            for name, saved in state["layers"].items():
                st = det._layer(name)
                for r, sc_state in saved["levels"].items():
                    if r in st.levels:
                        st.levels[r].load(sc_state)
                for r, sc_state in saved["ranks"].items():
                    if r in st.ranks:
                        st.ranks[r].load(sc_state)
                st.dying.load(saved["dying"])
                st.nonfinite.was_finite = bool(saved["was_finite"])
                det._history[name] = [(int(s), dict(p)) for s, p in saved["history"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DDSError(f"event detector state is malformed: {exc!r}") from exc
        return det

    @classmethod
    def _from_v1(cls, state: Mapping[str, Any], config: EventConfig | None) -> EventDetector:
        """A version-1 state (windows in checkpoints, buffers without steps) carried over:
        the cadence is the median step gap of the saved history, and the k-th newest
        buffered value is placed k cadences before the last step."""
        try:
            saved_cfg = {k: v for k, v in state["config"].items() if k != "version"}
            det = cls(config or EventConfig.from_dict(saved_cfg))
            last = None if state["last_step"] is None else int(state["last_step"])
            det._last_step = last
            steps = sorted(
                {int(s) for saved in state["layers"].values() for s, _ in saved["history"]}
            )
            gaps = [b - a for a, b in itertools.pairwise(steps)]
            if last is None or not gaps:
                raise DDSError("event detector state (version 1) has too little history to place")
            cadence = float(_median(gaps))
            if det.config.cadence_steps is None:
                det._cadence.value = cadence
                det._cadence.gaps.extend(gaps[-(det.config.cadence_checkpoints - 1) :])
            det._cadence.seen = max(len(steps), det.config.cadence_checkpoints)
            old = state["transitions"]
            index = int(old["index"])  # checkpoints seen, less one
            det._cadence.last = last
            det._cadence.first = last - round(index * cadence)
            now = det._cadence.windows()
            det._cadence.warm = now is not None and now.age >= now.warm_up
            det._said_windows = True
            det._transitions.quiet_until = (
                None
                if int(old["quiet_until"]) < 0
                else last + (int(old["quiet_until"]) - index + 1) * cadence
            )
            det._transitions.ledger = [
                {
                    "step": int(e["step"]),
                    "layer": str(e["layer"]),
                    "reading": str(e["reading"]),
                    "magnitude": float(e["magnitude"]),
                    "dying": None,
                    "revived": bool(e["revived"]),
                    "claimed": bool(e["claimed"]),
                }
                for e in old["ledger"]
            ]
            for name, saved in state["layers"].items():
                st = det._layer(name)
                for r, sc_state in saved["levels"].items():
                    if r not in st.levels:
                        continue
                    values = [float(v) for v in sc_state["buffer"]]
                    n = len(values)
                    placed = [
                        [last - round((n - 1 - k) * cadence), v] for k, v in enumerate(values)
                    ]
                    st.levels[r].load({**sc_state, "buffer": placed})
                for r, sc_state in saved["ranks"].items():
                    if r in st.ranks:
                        st.ranks[r].load(sc_state)
                st.nonfinite.was_finite = bool(saved["was_finite"])
                history = [(int(s), dict(p)) for s, p in saved["history"]]
                det._history[name] = history
                finite = [(s, p) for s, p in history if _is_finite_point(p)]
                if finite:
                    s, p = finite[-1]
                    st.dying.prev = {k: p.get(k) for k in _DYING_KEYS}
                    st.dying.prev["finite"] = True
                    st.dying.prev_step = s
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DDSError(f"event detector state (version 1) is malformed: {exc!r}") from exc
        log.warning(
            "event detector: carried over a state saved by the previous version (windows in "
            "checkpoints); its values are placed at a cadence of %g steps",
            cadence,
        )
        return det
