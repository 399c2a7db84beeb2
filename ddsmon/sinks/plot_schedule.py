"""When to draw the plots of a run, and drawing them (:mod:`ddsmon.plots`).

Contract of :class:`PlotScheduler`:

* a checkpoint logged (:meth:`~PlotScheduler.note`) makes the plots *dirty*;
* :meth:`~PlotScheduler.refresh` draws them, when dirty, at most every ``interval``
  seconds and not while the tracking store is known to be down (both unless forced, as
  on close), into a temporary folder handed to ``upload``;
* ``trajectories.png`` (:func:`~ddsmon.plots.plot_trajectories`) from the local history
  (:class:`~ddsmon.sinks.history.LocalHistory`), and ``spectra.png``
  (:func:`~ddsmon.plots.plot_spectra`) of the latest checkpoint noted;
* the plots stay dirty until ``upload`` says they went (so a refused upload is retried
  at the next refresh); a figure that cannot be drawn is logged and given up until the
  next checkpoint.

It knows nothing of MLflow: the caller supplies ``upload`` (the folder's files ->
``plots/*.png`` of the run) and whether the store is down.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddsmon.signature import Signatures
    from ddsmon.sinks.history import LocalHistory

__all__ = ("PlotScheduler",)

log = logging.getLogger(__name__)


class PlotScheduler:
    """Draw ``trajectories.png`` / ``spectra.png`` now and then (see the module docstring).

    enabled: False draws nothing, ever.
    interval: seconds between two drawings (forced ones excepted).
    directory: shown in the trajectories' title (set when the run's directory is known).
    """

    def __init__(
        self,
        history: LocalHistory,
        *,
        enabled: bool = True,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history = history
        self.enabled = enabled
        self.interval = float(interval)
        self.directory: Path | None = None
        self._clock = clock
        self._dirty = False
        self._last = 0.0
        self._signatures: Signatures | None = None
        self._step: int | None = None

    @property
    def dirty(self) -> bool:
        """Whether a checkpoint came since the plots last went out."""
        return self._dirty

    def note(self, step: int, signatures: Signatures) -> None:
        """A checkpoint was logged: its spectra are the latest; the plots need redrawing."""
        self._signatures = signatures
        self._step = step
        self._dirty = True

    def refresh(
        self, upload: Callable[[Path], bool], *, force: bool = False, down: bool = False
    ) -> None:
        """Draw and ``upload`` the plots if enabled, dirty and due (always due when
        ``force``); ``down``: the store is known to be down, so wait (unless ``force``).
        ``upload(folder)`` returns False when the store did not take them."""
        if not (self.enabled and self._dirty):
            return
        if not force and self._clock() - self._last < self.interval:
            return
        if not force and down:
            return
        from ddsmon.plots import plot_spectra, plot_trajectories

        self._last = self._clock()
        with tempfile.TemporaryDirectory(prefix="ddsmon-plots-") as tmp:
            try:
                plot_trajectories(
                    self.history.layers(),
                    Path(tmp) / "trajectories.png",
                    self.history.events(),
                    train=self.history.train(),
                    title=f"Dead-direction readings over training: {self.directory or ''}",
                )
                if self._signatures is not None:
                    plot_spectra(
                        self._signatures,
                        Path(tmp) / "spectra.png",
                        title=f"Spectra at step {self._step} (dashed: trust floors)",
                    )
            except Exception:
                log.exception("could not draw the plots; skipped")
                self._dirty = False
                return
            if upload(Path(tmp)):
                self._dirty = False
