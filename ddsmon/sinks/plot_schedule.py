"""When to draw the plots of a run, and drawing them (:mod:`ddsmon.plots`,
:mod:`ddsmon.heatmaps`, :mod:`ddsmon.dashboard`).

Contract of :class:`PlotScheduler`:

* a checkpoint logged (:meth:`~PlotScheduler.note`) makes the plots *dirty*, and its
  spectra are kept in the local history for the dashboard
  (:meth:`~ddsmon.sinks.history.LocalHistory.keep_spectra`);
* :meth:`~PlotScheduler.refresh` draws them, when dirty, at most every ``interval``
  seconds (counted from the end of the last drawing) and not while the tracking store is known to be down (both unless forced, as
  on close), into a temporary folder handed to ``upload`` (the folder's files ->
  ``plots/`` of the run):

  - ``trajectories.png`` (:func:`~ddsmon.plots.plot_trajectories`) from the local
    history (:class:`~ddsmon.sinks.history.LocalHistory`), and ``spectra.png``
    (:func:`~ddsmon.plots.plot_spectra`) of the latest checkpoint noted;
  - the heavier ones, at most every ``heavy_interval`` seconds (default
    ``max(interval, 60)``; always when forced), also from the local history:
    ``heatmaps/<reading>.png``, a layer x step heatmap of each headline reading with
    the events marked (:func:`~ddsmon.heatmaps.plot_heatmaps`), and ``dashboard.html``
    (:func:`~ddsmon.dashboard.write_dashboard`), the interactive page with plotly.js
    inlined;

* what was drawn stays dirty until ``upload`` says it went (so a refused upload is
  retried at the next refresh); a figure that cannot be drawn is logged and given up
  until the next checkpoint, the others going out as usual.

It knows nothing of MLflow: the caller supplies ``upload`` and whether the store is down.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddsmon.signature import Signatures
    from ddsmon.sinks.history import LocalHistory

__all__ = ("DASHBOARD_FILE", "HEATMAP_FOLDER", "HEAVY_INTERVAL", "PlotScheduler")

log = logging.getLogger(__name__)

#: The least seconds between two drawings of the heatmaps and the dashboard (by default).
HEAVY_INTERVAL = 60.0
#: Where the heatmaps go in the upload folder (``plots/heatmaps/<reading>.png``).
HEATMAP_FOLDER = "heatmaps"
#: The dashboard's file name (``plots/dashboard.html``).
DASHBOARD_FILE = "dashboard.html"


class PlotScheduler:
    """Draw the plots now and then (see the module docstring).

    enabled: False draws nothing, ever (and keeps no spectra).
    interval: seconds between two drawings (forced ones excepted).
    heavy_interval: seconds between two drawings of the heatmaps and the dashboard
        (forced ones excepted); None: ``max(interval, HEAVY_INTERVAL)``.
    directory: shown in the figures' titles (set when the run's directory is known).
    """

    def __init__(
        self,
        history: LocalHistory,
        *,
        enabled: bool = True,
        interval: float = 10.0,
        heavy_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history = history
        self.enabled = enabled
        self.interval = float(interval)
        self.heavy_interval = (
            max(self.interval, HEAVY_INTERVAL) if heavy_interval is None else float(heavy_interval)
        )
        self.directory: Path | None = None
        self._clock = clock
        self._dirty = False
        self._heavy_dirty = False
        self._last = 0.0
        self._heavy_last = -math.inf
        self._signatures: Signatures | None = None
        self._step: int | None = None
        self._missing: set[str] = set()

    @property
    def dirty(self) -> bool:
        """Whether a checkpoint came since the plots (any of them) last went out."""
        return self._dirty or self._heavy_dirty

    def note(self, step: int, signatures: Signatures) -> None:
        """A checkpoint was logged: its spectra are the latest (and kept for the
        dashboard); the plots need redrawing."""
        self._signatures = signatures
        self._step = step
        self._dirty = self._heavy_dirty = True
        if self.enabled:
            try:
                self.history.keep_spectra(step, signatures)
            except OSError as exc:
                log.warning(
                    "could not keep the spectra of step %d for the dashboard: %s", step, exc
                )

    def refresh(
        self, upload: Callable[[Path], bool], *, force: bool = False, down: bool = False
    ) -> None:
        """Draw and ``upload`` the plots if enabled, dirty and due (always due when
        ``force``); ``down``: the store is known to be down, so wait (unless ``force``).
        ``upload(folder)`` returns False when the store did not take them."""
        if not (self.enabled and self.dirty):
            return
        now = self._clock()
        if not force and (now - self._last < self.interval or down):
            return
        heavy = self._heavy_dirty and (force or now - self._heavy_last >= self.heavy_interval)
        light = self._dirty
        self._last = now
        if heavy:
            self._heavy_last = now
        with tempfile.TemporaryDirectory(prefix="ddsmon-plots-") as tmp:
            folder = Path(tmp)
            drawn = 0
            if light:
                drawn += self._draw("trajectories.png", lambda: self._trajectories(folder))
                if self._signatures is not None:
                    drawn += self._draw("spectra.png", lambda: self._spectra(folder))
            if heavy:
                drawn += self._draw(f"{HEATMAP_FOLDER}/", lambda: self._heatmaps(folder))
                drawn += self._draw(DASHBOARD_FILE, lambda: self._dashboard(folder))
            # The intervals count from the end of a drawing, so that at least ``interval``
            # seconds of reading pass between two drawings even when a drawing takes longer
            # than that (a busy machine: one drawing per checkpoint otherwise).
            end = self._clock()
            self._last = end
            if heavy:
                self._heavy_last = end
            if not drawn:  # every figure failed: given up until the next checkpoint
                self._dirty = self._dirty and not light
                self._heavy_dirty = self._heavy_dirty and not heavy
                return
            if upload(folder):
                if light:
                    self._dirty = False
                if heavy:
                    self._heavy_dirty = False
            elif heavy:
                self._heavy_last = -math.inf  # not taken: the heavy ones are due again

    # ------------------------------------------------------------------ the figures
    def _draw(self, name: str, draw: Callable[[], object]) -> int:
        """1 when ``draw`` drew ``name``; 0, logged, when it raised."""
        try:
            draw()
        except ImportError as exc:  # plotly not installed: said once, not a traceback each time
            if name not in self._missing:
                self._missing.add(name)
                log.warning("could not draw the plots: %s skipped (%s)", name, exc)
            return 0
        except Exception:
            log.exception("could not draw the plots: %s skipped", name)
            return 0
        return 1

    def _title(self, what: str) -> str:
        return f"{what}: {self.directory or ''}"

    def _trajectories(self, folder: Path) -> None:
        from ddsmon.plots import plot_trajectories

        plot_trajectories(
            self.history.layers(),
            folder / "trajectories.png",
            self.history.events(),
            train=self.history.train(),
            title=self._title("Dead-direction readings over training"),
        )

    def _spectra(self, folder: Path) -> None:
        from ddsmon.plots import plot_spectra

        assert self._signatures is not None
        plot_spectra(
            self._signatures,
            folder / "spectra.png",
            title=f"Spectra at step {self._step} (dashed: trust floors)",
        )

    def _heatmaps(self, folder: Path) -> None:
        from ddsmon.heatmaps import plot_heatmaps

        plot_heatmaps(
            self.history.layers(),
            folder / HEATMAP_FOLDER,
            self.history.events(),
            title=str(self.directory or ""),
        )

    def _dashboard(self, folder: Path) -> None:
        from ddsmon.dashboard import write_dashboard

        write_dashboard(
            folder / DASHBOARD_FILE,
            self.history.layers(),
            self.history.events(),
            train=self.history.train(),
            spectra=self.history.spectra(),
            title=f"ddsmon: {self.directory.name if self.directory else 'dashboard'}",
            source=str(self.directory or ""),
        )
