"""The MLflow sink: readings, events, spectra and plots of one watched directory, one run.

Everything goes through :class:`mlflow.tracking.MlflowClient` with an explicit run id;
``mlflow.start_run`` is never called (resuming a training run with it would flip that
run's status). :class:`MlflowSink` is the :class:`~ddsmon.sinks.Sink` the daemon
composes; it holds no logic of its own beyond putting these parts together:

=========================================  ===================================================
:mod:`ddsmon.sinks.mlflow_run`             which run: ``--run-id``, else one per watched
                                           directory (stored id, directory tag, or new)
:mod:`ddsmon.sinks.mlflow_lease`           the run's lease: one daemon writes a run
:mod:`ddsmon.sinks.mlflow_record`          the typed record of one message (start, checkpoint,
                                           tags) and its JSON line in the spool
:mod:`ddsmon.sinks.mlflow_outbox`          spool when down, replay in order (also from a
                                           retry timer), acknowledgement, exactly once
                                           per step, the spool's ledger
:mod:`ddsmon.sinks.mlflow_writer`          the MlflowClient calls (batches within MLflow's
                                           limits, artifacts, params, tags, the note)
:mod:`ddsmon.sinks.mlflow_keys`            metric/param/tag names within MLflow's limits
:mod:`ddsmon.sinks.mlflow_http`            fail-fast HTTP; unreachable vs bad request
:mod:`ddsmon.sinks.history`                the local history the plots read
:mod:`ddsmon.sinks.plot_schedule`          when the plots are drawn and uploaded
:mod:`ddsmon.redaction`                    credentials out of anything shown or logged
=========================================  ===================================================

What a run holds (also written into the run's note, ``mlflow.note.content``)
    * params: the daemon's settings (:class:`~ddsmon.sinks.RunInfo` ``params``), values
      cut to MLflow's length limit; params are immutable, so on a restart equal ones are
      skipped and a changed one is reported (warning), not logged; one that ddsmon chose
      itself (``torch_threads`` without ``--threads``) is kept without a warning.
    * metrics at each checkpoint's ``step`` (named by :mod:`ddsmon.sinks.mlflow_keys`):
      every finite number among :data:`~ddsmon.readings.SCALAR_READINGS`, as
      ``dds/<reading>/<layer>`` for a headline reading and ``dds_detail/<reading>/<layer>``
      for the others (plus ``dds_detail/finite/<layer>`` = 0/1), ``ddsmon/checkpoint`` = 1
      (the marker of a checkpoint fully logged, sent last; ``dds/checkpoint`` in runs of
      earlier versions),
      ``train/<key>`` for the trainer's scalars from the checkpoint (and those of an
      alias of the step, a ``best-*.ckpt`` holding its weights, that the step lacks:
      :meth:`MlflowSink.on_alias`), and
      ``ddsmon/load_seconds`` / ``ddsmon/read_seconds``. Sent with ``log_batch`` in
      chunks within MLflow's batch limits: a constant number of calls per checkpoint
      (plus one per 1000 rows of the trainer's log new to the run).
    * the trainer's log (:attr:`CheckpointReading.trainer_log
      <ddsmon.records.CheckpointReading.trainer_log>`, a Hugging Face
      ``log_history``): ``train/<name>`` at the step each entry was logged at, each
      (name, step) once (see "The trainer's log" below).
    * events: tag ``dds.event.<step>.<layer>.<kind>`` = its kind, reading, step, layer,
      magnitude and message (:func:`~ddsmon.sinks.mlflow_keys.event_tag_value`), metric
      ``dds/events/<kind>`` = the largest magnitude of that kind at that step, and one
      JSON line each in the artifact ``events.jsonl``.
    * artifacts: ``spectra/step_<step>.npz`` (``<layer>/x_spectrum``, ``g_spectrum``,
      ``param_spectrum`` and the floors ``floor_x``, ``floor_g``, ``param_floor``),
      ``events.jsonl``, and ``plots/trajectories.png`` / ``plots/spectra.png``
      (:mod:`ddsmon.plots`), refreshed at most every ``plot_interval`` seconds and on close.
    * a checkpoint that could not be read: tag ``ddsmon.failure.<file>`` = the reason,
      deleted once that file is read (a checkpoint incomplete or corrupt at first, then
      saved again): the sink keeps the paths whose failure it told the run in the state
      directory (``state.json``, key :data:`FAILURE_TAGS_KEY`), and a reading of one of
      them sends the tag's deletion ahead of its readings, through the spool like any
      record. A tag that another file of the same name still failing holds is kept.

Exactly once
    :meth:`MlflowSink.recorded_steps` reads the run's history of the checkpoint marker
    (``ddsmon/checkpoint``, and ``dds/checkpoint`` of older runs) plus the steps waiting
    in the spool, so the daemon does not log a step twice after a
    ``kill -9`` between logging and its state write; the sink also skips a step its run
    already holds. Spool, replay and acknowledgement: :mod:`ddsmon.sinks.mlflow_outbox`.
    Per run, not only per state directory: the run is leased
    (:mod:`ddsmon.sinks.mlflow_lease`) when it is resolved; a run another live daemon
    writes refuses this one (:class:`~ddsmon.sinks.mlflow_lease.RunClaimed`, a
    ConfigError naming its host, pid and state directory), and before every write (one
    ``get_run`` per record) the lease is checked: a lease taken over raises
    :class:`~ddsmon.sinks.mlflow_lease.LeaseLost` and nothing more is written.
The trainer's log
    Every checkpoint repeats the trainer's whole log, so a record holds only the rows the
    run does not (:func:`~ddsmon.sinks.mlflow_record.trainer_rows`): per ``train/<name>``
    key the sink knows the highest step sent or spooled, and an entry of the log at or
    below it is left out (the checkpoint's own scalars at its step: see there). That
    knowledge is rebuilt at each start (once the spool is replayed) from the run (the
    highest step of each ``train/*`` history) and the spool's records, so a ``kill -9``
    anywhere neither doubles nor loses a row. It is kept in the state directory too
    (``state.json``, key :data:`TRAINER_LOG_KEY`, written after each record is sent or
    spooled) for a start while the server cannot be reached, then synced with the run
    (never lowered) once it answers; only a ``kill -9`` between a record's delivery and
    that write, followed by such a start, can send rows again. A replayed record holds
    the same rows as when it was built (fixed timestamps: re-sent rows are identical),
    and no later record holds them again. A checkpoint read after a later one (out of
    order) adds only its own scalars at its step: its log is in the later one's.
A verifiable spool
    At the first :meth:`MlflowSink.recorded_steps` (or :meth:`MlflowSink.start`), the
    spool's ledger is checked: a step spooled and recorded as read that is neither in
    the spool (a garbled line fails its checksum; a spool truncated, emptied or deleted)
    nor in the run is warned about by step and taken out of the read-set
    (:meth:`StateDir.forget <ddsmon.state.StateDir.forget>`), so the daemon reads its
    checkpoint again. After :meth:`MlflowSink.close`, :meth:`MlflowSink.undelivered_steps`
    lists the readings still spooled.

Tracking server down
    A call failing for a connection-type reason (refused, timeout, 5xx after retries,
    TEMPORARILY_UNAVAILABLE and the like) spools the whole record; records are replayed
    in order before the next send (at most every ``retry_interval`` seconds, and on start
    and close), and by a background retry timer while records wait (``retry_first``
    seconds after the failure, doubling up to ``retry_max``), so they arrive once the
    server answers even when no checkpoint comes. Nothing lost, nothing doubled. A store
    that answers but not as a usable MLflow server (a TLS certificate that fails
    verification, a sign-in page or proxy answering HTML, credentials refused:
    :class:`~ddsmon.sinks.mlflow_http.Misconfigured`) is a settings error when it is met
    at :meth:`MlflowSink.recorded_steps` or :meth:`MlflowSink.start`
    (:class:`~ddsmon.sinks.mlflow_http.StoreNotUsable`, naming the URI and the cause),
    and spooled with its cause said once the daemon is reading. Any other error (a bad
    request) is raised to the daemon, which reports it. So that a down server fails in seconds rather than
    minutes, the sink sets :data:`~ddsmon.sinks.mlflow_http.HTTP_ENV_DEFAULTS` unless
    already set in the environment (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=15`` seconds).

Credentials
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``_TOKEN``) are read
    by MLflow itself. ddsmon never prints them: tracking URIs are shown with any
    ``user:password@`` replaced by ``***@`` and error messages are scrubbed the same way
    (and of the password/token values) before they are logged (:mod:`ddsmon.redaction`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsmon.errors import ConfigError
from ddsmon.sinks.history import HistoryEntry, LocalHistory, event_dict
from ddsmon.sinks.mlflow_http import (
    Misconfigured,
    StoreNotUsable,
    Unreachable,
    call,
    configure_http_env,
)
from ddsmon.sinks.mlflow_keys import failure_tag_key
from ddsmon.sinks.mlflow_lease import RunLease, RunLeaseError
from ddsmon.sinks.mlflow_outbox import Outbox, Retrier
from ddsmon.sinks.mlflow_record import (
    ArtifactFile,
    DeleteTagsRecord,
    MetricRow,
    ReadingRecord,
    Record,
    ScalarsRecord,
    StartRecord,
    alias_record,
    failure_cleared_record,
    failure_record,
    reading_record,
    start_record,
    write_spectra,
)
from ddsmon.sinks.mlflow_run import RunLocator
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.sinks.plot_schedule import PlotScheduler
from ddsmon.state import StateDir

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ddsmon.events import Event
    from ddsmon.records import CheckpointFailure, CheckpointReading
    from ddsmon.sinks import RunInfo

__all__ = ("FAILURE_TAGS_KEY", "TRAINER_LOG_KEY", "MlflowSink")

log = logging.getLogger(__name__)

#: The state directory's key of ``{"run_id": ..., "steps": {train/<name>: highest step
#: sent or spooled}}``: what the trainer's log left to send, across a restart while the
#: server cannot be reached.
TRAINER_LOG_KEY = "mlflow_trainer_log"
#: The state directory's key of the paths whose failure was sent or spooled
#: (``ddsmon.failure.<file>``) and whose file has not been read since.
FAILURE_TAGS_KEY = "mlflow_failure_tags"


class MlflowSink:
    """Log every checkpoint's readings of one directory into one MLflow run.

    Args:
        tracking_uri: MLflow tracking URI; None for MLflow's own default
            (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). Credentials come
            from ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (read by MLflow).
        experiment: experiment name (created if missing; a deleted one is an error).
        run_id: log into this existing run and never change its status; None for one
            ddsmon-owned run per watched directory.
        state: the directory's :class:`~ddsmon.state.StateDir` (run id, spool, local
            copies of events and history for the plots). The sink never claims it.
        run_name: name of a run ddsmon creates (default ``ddsmon <dir name>``).
        plots: render and upload ``plots/*.png``.
        artifacts: upload ``spectra/step_<step>.npz`` and ``events.jsonl``.
        plot_interval: seconds between plot refreshes (plots are also drawn on close).
        retry_interval: after a failed call, seconds during which records go straight
            to the spool without trying the server.
        retry_first, retry_max: the retry timer's first pause and its cap (seconds): while
            records wait in the spool, a background thread replays them, the pause
            doubling after each failure.
        lease_timeout: seconds without a heartbeat after which the run's lease is taken
            over (None: ``DDSMON_LEASE_TIMEOUT``, else 60).

    No connection is made before the first call that needs one; the constructor only
    sets :data:`~ddsmon.sinks.mlflow_http.HTTP_ENV_DEFAULTS`. Every method may be called
    from any thread (one lock). Background threads (the retry timer, the lease's
    heartbeat) run between :meth:`start` (or the first resolution of the run) and
    :meth:`close`.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None,
        experiment: str,
        run_id: str | None,
        state: StateDir,
        run_name: str | None = None,
        plots: bool = True,
        artifacts: bool = True,
        plot_interval: float = 10.0,
        retry_interval: float = 10.0,
        retry_first: float = 1.0,
        retry_max: float = 30.0,
        lease_timeout: float | None = None,
    ) -> None:
        configure_http_env()
        self.state = state
        self.artifacts = artifacts
        self._lock = threading.RLock()
        self._writer = MlflowWriter(tracking_uri)
        self._run = RunLocator(
            self._writer,
            experiment=experiment,
            run_id=run_id,
            state=state,
            run_name=run_name,
            lease_timeout=lease_timeout,
        )
        self._history = LocalHistory(state)
        self._plots = PlotScheduler(self._history, enabled=plots, interval=plot_interval)
        self._retrier = Retrier(
            self._retry,
            lambda: self._outbox.count() > 0,
            first=retry_first,
            cap=retry_max,
            on_give_up=self._gave_up,
        )
        #: called (from the retry thread) when the spool cannot be replayed any more: the
        #: run is another daemon's now, or gone (deleted, a server restarted on an empty
        #: store); the daemon sets it to stop (exit 2) instead of idling until the next
        #: checkpoint meets the same error
        self.on_give_up: Callable[[ConfigError], None] | None = None
        self._outbox = Outbox(
            state,
            open_run=self._open_run,
            deliver=self._deliver,
            display_uri=self._writer.display_uri,
            retry_interval=retry_interval,
            on_spooled=self._retrier.poke,
        )
        self._spool_checked = False
        #: the steps the run holds, as of the last :meth:`recorded_steps` (None: not
        #: known, the server unreachable or the run not resolved yet)
        self.run_steps: set[int] | None = None
        self._closed = False
        self._trainer_marks: dict[str, int] | None = None  # train/<name> -> highest step
        self._trainer_synced = False  # the marks include the run's histories

    # ------------------------------------------------------------------ settings, display
    @property
    def tracking_uri(self) -> str | None:
        return self._writer.tracking_uri

    @property
    def experiment(self) -> str:
        return self._run.experiment

    @property
    def given_run_id(self) -> str | None:
        """The ``run_id`` given to the constructor."""
        return self._run.given_run_id

    @property
    def run_name(self) -> str | None:
        return self._run.run_name

    @property
    def plots(self) -> bool:
        return self._plots.enabled

    @property
    def plot_interval(self) -> float:
        return self._plots.interval

    @property
    def retry_interval(self) -> float:
        return self._outbox.retry_interval

    @property
    def run_id(self) -> str | None:
        """The run logged into, once resolved (None before)."""
        return self._run.run_id

    @property
    def owned(self) -> bool:
        """Whether ddsmon created the run (and so sets its status)."""
        return self._run.owned

    @property
    def client(self) -> MlflowClient:
        return self._writer.client

    @property
    def lease(self) -> RunLease | None:
        """The run's lease, once resolved (None before)."""
        return self._run.lease

    @property
    def retry_max(self) -> float:
        return self._retrier.cap

    @property
    def display_uri(self) -> str:
        """The tracking URI with any credentials redacted (what ddsmon ever prints)."""
        return self._writer.display_uri

    def __repr__(self) -> str:
        return (
            f"MlflowSink(tracking_uri={self.display_uri!r}, experiment={self.experiment!r}, "
            f"run_id={self.run_id or self.given_run_id!r})"
        )

    # ------------------------------------------------------------------ Sink protocol
    def start(self, info: RunInfo) -> None:
        """Resolve (and lease) the run, check the spool against its ledger, replay it,
        log params and tags (or spool them), learn which steps of the trainer's log the
        run holds; start the retry timer."""
        with self._lock:
            directory = Path(info.directory).resolve()
            self._run.directory = self._plots.directory = directory
            self.state.set("directory", str(directory))
            self._history.load()
            self._outbox.clean()
            if not self._spool_checked:
                held: set[int] | None = None
                try:
                    self._run.ensure(directory)
                    held = set(self._run.steps or ())
                except Misconfigured as exc:
                    raise self._not_usable(exc) from exc
                except Unreachable as exc:
                    self._outbox.mark_down(exc)
                self._check_spool(held)
            self._outbox.send(
                start_record(directory, info.params, automatic=info.automatic), force=True
            )
            self._trainer_log_marks()  # the spool replayed: the run and what is left
        self._closed = False
        self._retrier.start()
        self._retrier.poke()

    def on_queue(self, pending: int) -> None:
        """Nothing to log."""

    def on_reading(self, reading: CheckpointReading, events: list[Event]) -> None:
        """Log one checkpoint (metrics, event tags, artifacts), or spool it."""
        with self._lock:
            self._clear_failure(reading.path)
            step = int(reading.step)
            if self._run.holds(step):
                log.info("step %d is already in MLflow run %s; not logged again", step, self.run_id)
                return
            self._history.load()
            timestamp = int(time.time() * 1000)
            entry = HistoryEntry.of(reading)
            files: list[ArtifactFile] = []
            if self.artifacts:
                npz = self._outbox.new_folder(step) / f"step_{step}.npz"
                write_spectra(reading.signatures, npz)
                files.append(ArtifactFile(str(npz), "spectra"))
            marks = self._trainer_log_marks()
            record = reading_record(
                reading, events, entry=entry, timestamp=timestamp, files=files, logged=marks
            )
            self._history.append(entry, [event_dict(e) for e in events])
            self._plots.note(step, reading.signatures)
            self._outbox.send(record)
            self._note_trainer_rows(record)
            self._refresh_plots()

    def on_alias(self, step: int, path: Path, scalars: Mapping[str, float]) -> dict[str, float]:
        """``path`` holds the weights of ``step``, read already (an alias: Lightning's
        ``best-*.ckpt`` beside the periodic ``epoch=1-step=8.ckpt``): its trainer
        scalars that the step has no value of (``val_loss``, which only the best file's
        callback state and name hold) are added to the step, in the local history
        (:meth:`LocalHistory.add_train`) and as ``train/<name>`` at ``step``
        (:class:`~ddsmon.sinks.mlflow_record.ScalarsRecord`, sent or spooled; the run's
        own values at that step are kept). Whichever of the two files is read first,
        the step ends up with the scalars of both, the first one's where both have one.
        Returns the scalars added."""
        with self._lock:
            added = self._history.add_train(int(step), scalars)
            if not added:
                return {}
            record = alias_record(step, path, added, timestamp=int(time.time() * 1000))
            self._trainer_log_marks()
            self._outbox.send(record)
            self._note_trainer_rows(record)
            return added

    def on_failure(self, failure: CheckpointFailure) -> None:
        """A tag ``ddsmon.failure.<file>`` = reason, so failed checkpoints show in the UI;
        the path is noted first (:data:`FAILURE_TAGS_KEY`), so that a crash never leaves
        a tag that a later reading of the file does not delete."""
        with self._lock:
            failed = self._failed_paths()
            if str(failure.path) not in failed:
                self.state.set(FAILURE_TAGS_KEY, [*failed, str(failure.path)])
            self._outbox.send(failure_record(failure))

    def on_file_read(self, path: Path) -> None:
        """``path`` was read without fault but logs nothing (an alias of a step read, a
        step the run holds already, a file with no step): a failure told of it before
        is cleared as a reading's is (:meth:`_clear_failure`)."""
        with self._lock:
            self._clear_failure(path)

    def _failed_paths(self) -> list[str]:
        """The paths noted by :meth:`on_failure` and not read since."""
        stored = self.state.get(FAILURE_TAGS_KEY)
        return [p for p in stored if isinstance(p, str)] if isinstance(stored, list) else []

    def _clear_failure(self, path: Path) -> None:
        """``path`` was read: when its failure was told, delete its tag (sent or spooled
        ahead of the reading), unless another failed path of the same file name holds
        it; then forget the path."""
        failed = self._failed_paths()
        if str(path) not in failed:
            return
        rest = [p for p in failed if p != str(path)]
        key = failure_tag_key(Path(path).name)
        if all(failure_tag_key(Path(p).name) != key for p in rest):
            self._outbox.send(failure_cleared_record(path))
        self.state.set(FAILURE_TAGS_KEY, rest)

    def close(self, status: str = "FINISHED") -> None:
        """Stop the retry timer, replay the spool, draw the final plots and, for a run
        ddsmon owns, set its status (``FINISHED``, or e.g. ``KILLED`` on interruption);
        release the run's lease. A run given by id keeps its status. What cannot be
        delivered stays spooled for the next start (:meth:`undelivered_steps`)."""
        self._retrier.stop()  # outside the lock: an attempt under way takes it
        with self._lock:
            self._closed = True
            try:
                if not self._outbox.flush(force=True):
                    log.warning(
                        "MLflow at %s %s on close; %d records stay spooled in %s "
                        "and are sent at the next start",
                        self.display_uri,
                        self._outbox.down_reason,
                        self._outbox.count(),
                        self.state.root,
                    )
                    return
                self._refresh_plots(force=True)
                if self.owned and self.run_id is not None:
                    self._run.verify()
                    self._writer.set_terminated(self.run_id, status=status)
            except Unreachable as exc:
                log.warning("MLflow at %s unreachable on close: %s", self.display_uri, exc)
            except RunLeaseError as exc:
                log.error(
                    "%s; %d records stay spooled in %s", exc, self._outbox.count(), self.state.root
                )
            finally:
                self._run.release(tell_store=not self._outbox.waiting())

    def undelivered_steps(self) -> list[int]:
        """Steps whose readings wait in the spool, not delivered (after :meth:`close`:
        what the server did not get this time; sent at the next start)."""
        with self._lock:
            return sorted(self._outbox.pending_steps())

    # ------------------------------------------------------------------ exactly-once
    def recorded_steps(self) -> set[int]:
        """Steps whose checkpoint the run already holds (its checkpoint marker's history)
        or that wait in the spool to be sent. When the server cannot be reached, only
        the spooled steps (replay skips steps the run holds, so nothing doubles).

        The first call (before the daemon reads checkpoints) also checks the spool
        against its ledger: a step lost from the spool is taken out of the read-set, so
        its checkpoint is read again. Raises
        :class:`~ddsmon.sinks.mlflow_lease.RunClaimed` when another daemon writes the
        run."""
        with self._lock:
            held: set[int] | None = None
            try:
                if self.run_id is None:
                    if self.given_run_id is not None or self._run.guess_directory() is not None:
                        self._run.ensure()
                        held = set(self._run.steps or ())
                else:
                    held = set(self._run.refresh_steps())
            except Misconfigured as exc:
                raise self._not_usable(exc) from exc
            except Unreachable as exc:
                self._outbox.mark_down(exc)
                log.warning(
                    "MLflow at %s unreachable; recorded steps known from the spool only",
                    self.display_uri,
                )
            self.run_steps = None if held is None else set(held)
            if not self._spool_checked:
                self._check_spool(held)
            return self._outbox.pending_steps() | (held or set())

    def _not_usable(self, exc: Misconfigured) -> StoreNotUsable:
        """A store not usable as configured, met before anything was read: a settings
        error naming the URI and the cause (the state and the spool are kept)."""
        waiting = self._outbox.count()
        kept = f"; {waiting} records stay spooled in {self.state.root}" if waiting else ""
        return StoreNotUsable(f"MLflow at {self.display_uri}: {exc}{kept}")

    def _check_spool(self, held: set[int] | None) -> None:
        """The spool against its ledger (see the module docstring): lost steps are
        warned about and forgotten by the read-set."""
        self._spool_checked = True
        lost, settled = self._outbox.lost_steps(held)
        if settled:
            self.state.note_delivered(settled)
        if not lost:
            return
        self.state.forget(lost)
        self.state.note_delivered(lost)
        where = (
            f"nor in MLflow run {self.run_id}"
            if held is not None
            else "(MLflow unreachable: whether the run holds them is asked when they are sent)"
        )
        log.warning(
            "spool %s lost the records of step%s %s (a garbled line, or a truncated, "
            "emptied or deleted spool): they are neither in the spool %s; their "
            "checkpoints are read again",
            self.state.root / "spool.jsonl",
            "" if len(lost) == 1 else "s",
            ", ".join(str(s) for s in sorted(lost)),
            where,
        )

    # ------------------------------------------------------------------ the trainer's log
    def _trainer_log_marks(self) -> dict[str, int]:
        """``train/<name>`` -> the highest step sent or spooled (see the module docstring,
        "The trainer's log"). Built on first use from the spool's records and the run's
        histories, or, while the server cannot be reached, from the spool and the state
        directory; synced with the run (never lowered) once it answers."""
        if self._trainer_marks is None:
            spooled: dict[str, int] = {}
            for rec in self._outbox.pending():
                if isinstance(rec, ReadingRecord):
                    _raise_marks(spooled, rec.metrics)
            held = self._run_trainer_steps()
            if held is not None:
                self._trainer_synced = True
                base = held
            else:
                base = self._stored_trainer_marks()
            _merge_marks(base, spooled)
            self._trainer_marks = base
        elif not self._trainer_synced:
            held = self._run_trainer_steps()
            if held is not None:
                self._trainer_synced = True
                _merge_marks(self._trainer_marks, held)
        return self._trainer_marks

    def _run_trainer_steps(self) -> dict[str, int] | None:
        """The highest step of each ``train/*`` history of the run; None while the run is
        not resolved or the server does not answer."""
        if self.run_id is None or self._outbox.waiting():
            return None
        run_id = self.run_id
        client = self._writer.client
        try:
            keys = [k for k in call(client.get_run, run_id).data.metrics if k.startswith("train/")]
            out: dict[str, int] = {}
            for key in keys:
                steps = [int(m.step) for m in call(client.get_metric_history, run_id, key)]
                if steps:
                    out[key] = max(steps)
        except Unreachable as exc:
            self._outbox.mark_down(exc)
            return None
        return out

    def _stored_trainer_marks(self) -> dict[str, int]:
        """The marks kept in the state directory, when they are this run's (or the run is
        not known yet)."""
        stored = self.state.get(TRAINER_LOG_KEY)
        if not isinstance(stored, dict) or not isinstance(stored.get("steps"), dict):
            return {}
        run_id = stored.get("run_id")
        if run_id is not None and self.run_id is not None and run_id != self.run_id:
            return {}
        out: dict[str, int] = {}
        for key, step in stored["steps"].items():
            if isinstance(key, str) and isinstance(step, int) and not isinstance(step, bool):
                out[key] = step
        return out

    def _note_trainer_rows(self, record: ReadingRecord | ScalarsRecord) -> None:
        """``record`` was sent or spooled: its ``train/*`` rows are the run's now."""
        assert self._trainer_marks is not None
        before = dict(self._trainer_marks)
        _raise_marks(self._trainer_marks, record.metrics)
        if self._trainer_marks != before:
            self.state.set(
                TRAINER_LOG_KEY, {"run_id": self.run_id, "steps": dict(self._trainer_marks)}
            )

    # ------------------------------------------------------------------ local history
    def history(self) -> dict[str, list[tuple[int, dict[str, Any]]]]:
        """Every layer's readings over steps, from the local copy (for plots)."""
        return self._history.layers()

    # ------------------------------------------------------------------ the parts, joined
    def _open_run(self, directory: Path | None) -> tuple[str, set[int]]:
        """For the outbox: the run (resolved with the directory the spool knows, when the
        sink does not know it yet) and the steps it holds, asked now."""
        run_id = self._run.ensure(self._run.directory or directory)
        return run_id, self._run.fetch_steps()

    def _deliver(self, record: Record) -> None:
        """For the outbox: check the lease, then write one record into the run."""
        if isinstance(record, StartRecord):
            run_id = self._run.ensure(Path(record.directory))
            self._run.verify()
            self._writer.write_start(run_id, record, owned=self.owned)
        elif isinstance(record, ReadingRecord):
            run_id = self._run.ensure()
            self._run.verify()
            events_file = self._history.events_path if self.artifacts else None
            self._writer.write_reading(run_id, record, events_file=events_file)
            self._run.add_step(record.step)
        elif isinstance(record, ScalarsRecord):
            run_id = self._run.ensure()
            self._run.verify()
            self._writer.write_scalars(run_id, record)
        elif isinstance(record, DeleteTagsRecord):
            run_id = self._run.ensure()
            self._run.verify()
            self._writer.delete_tags(run_id, record.keys)
        else:
            run_id = self._run.ensure()
            self._run.verify()
            self._writer.log_batch(run_id, tags=record.tags)

    def _gave_up(self, exc: ConfigError) -> None:
        if self.on_give_up is not None:
            self.on_give_up(exc)

    def _retry(self) -> bool:
        """For the retry timer: replay the spool now; True when it is empty."""
        with self._lock:
            if self._closed:
                return True
            return self._outbox.flush(force=True)

    def _refresh_plots(self, force: bool = False) -> None:
        if self.run_id is None:
            return
        self._plots.refresh(self._upload_plots, force=force, down=self._outbox.waiting())

    def _upload_plots(self, folder: Path) -> bool:
        assert self.run_id is not None
        try:
            self._run.verify()
            self._writer.log_artifacts(self.run_id, str(folder), "plots")
        except Unreachable as exc:
            self._outbox.mark_down(exc)
            return False
        except RunLeaseError:
            return False  # raised again at the next record
        return True


def _raise_marks(marks: dict[str, int], rows: Iterable[MetricRow]) -> None:
    """Raise each ``train/*`` key's mark to the highest step among ``rows``."""
    for row in rows:
        if row.key.startswith("train/") and row.step > marks.get(row.key, row.step - 1):
            marks[row.key] = row.step


def _merge_marks(marks: dict[str, int], other: dict[str, int]) -> None:
    for key, step in other.items():
        if step > marks.get(key, step - 1):
            marks[key] = step
