"""The MLflow sink: readings, events, spectra and plots of one watched directory, one run.

Everything goes through :class:`mlflow.tracking.MlflowClient` with an explicit run id;
``mlflow.start_run`` is never called (resuming a training run with it would flip that
run's status).

Run
    ``run_id`` given: log into that run (e.g. the training run itself) and never change
    its status. Otherwise one run per watched directory: the run id stored in the state
    directory for this (tracking URI, experiment), else the active run of the experiment
    tagged ``ddsmon.directory_id`` = sha1 of the directory's absolute path and
    ``ddsmon.owned`` = ``true``, else a new run (the experiment is created if missing).
    Runs ddsmon created are set RUNNING while it works and FINISHED (or the status given
    to :meth:`MlflowSink.close`, e.g. KILLED) when it closes.

What a run holds (also written into the run's note, ``mlflow.note.content``)
    * params: the daemon's settings (:class:`~ddsmon.sinks.RunInfo` ``params``), values
      cut to MLflow's length limit; params are immutable, so on a restart equal ones are
      skipped and a changed one is reported (warning), not logged.
    * metrics at each checkpoint's ``step``: ``dds/<layer>/<reading>`` for every finite
      number among :data:`~ddsmon.signature.SCALAR_READINGS` (plus ``dds/<layer>/finite``
      = 0/1), ``dds/checkpoint`` = 1 (the marker of a checkpoint fully logged, sent last),
      ``train/<key>`` for the trainer's scalars from the checkpoint, and
      ``ddsmon/load_seconds`` / ``ddsmon/read_seconds``. Sent with ``log_batch`` in
      chunks within MLflow's batch limits: a constant number of calls per checkpoint.
    * events: tag ``dds.event.<step>.<layer>.<kind>`` = the event's message, metric
      ``dds/events/<kind>`` = the largest magnitude of that kind at that step, and one
      JSON line each in the artifact ``events.jsonl``.
    * artifacts: ``spectra/step_<step>.npz`` (``<layer>/x_spectrum``, ``g_spectrum``,
      ``param_spectrum`` and the floors ``floor_x``, ``floor_g``, ``param_floor``),
      ``events.jsonl``, and ``plots/trajectories.png`` / ``plots/spectra.png``
      (:mod:`ddsmon.plots`), refreshed at most every ``plot_interval`` seconds and on close.

Exactly once
    :meth:`MlflowSink.recorded_steps` reads the run's history of ``dds/checkpoint`` (plus
    the steps waiting in the spool), so the daemon does not log a step twice after a
    ``kill -9`` between logging and its state write; the sink also skips a step its run
    already holds. Each record carries fixed timestamps, so re-sending a half-delivered
    record stores identical metric rows, which MLflow's stores de-duplicate.

Tracking server down
    A call failing for a connection-type reason (refused, timeout, 5xx after retries,
    TEMPORARILY_UNAVAILABLE and the like) puts the whole record (metrics, tags, artifact
    files kept under the state directory) into the spool (:meth:`StateDir.spool_append`);
    while records wait, new ones queue behind them, and before the next send (at most
    every ``retry_interval`` seconds, and on start and close) they are replayed in order,
    skipping steps the run already holds. Nothing lost, nothing doubled. Any other error
    (a bad request) is raised to the daemon, which reports it.

    So that a down server fails in seconds rather than minutes, the sink sets, unless
    already set in the environment: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1`` (MLflow's
    default 7 retries with exponential backoff take ~4 minutes), and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=15`` seconds (default 120) per request. See
    :data:`HTTP_ENV_DEFAULTS`.

Credentials
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``_TOKEN``) are read
    by MLflow itself. ddsmon never prints them: tracking URIs are shown with any
    ``user:password@`` replaced by ``***@`` and error messages are scrubbed the same way
    (and of the password/token values) before they are logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ddsmon.config import redact_uri
from ddsmon.errors import ConfigError
from ddsmon.signature import SCALAR_READINGS, Signatures
from ddsmon.sinks.mlflow_http import (
    HTTP_ENV_DEFAULTS,
    _Unreachable,
    configure_http_env,
    is_unreachable,
    scrub,
)
from ddsmon.sinks.mlflow_keys import (
    _BAD_CHARS,
    LIMITS,
    _component,
    _cut,
    _fit,
    event_tag_key,
    metric_key,
)
from ddsmon.state import StateDir, append_jsonl_lines, read_jsonl

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ddsmon.events import Event
    from ddsmon.records import CheckpointFailure, CheckpointReading
    from ddsmon.sinks import RunInfo

__all__ = (
    "HTTP_ENV_DEFAULTS",
    "MlflowSink",
    "configure_http_env",
    "is_unreachable",
    "metric_key",
    "scrub",
)

log = logging.getLogger(__name__)

#: Tag marking runs ddsmon created (and so may set RUNNING / FINISHED).
OWNED_TAG = "ddsmon.owned"
DIRECTORY_TAG = "ddsmon.directory"
DIRECTORY_ID_TAG = "ddsmon.directory_id"
NOTE_TAG = "mlflow.note.content"
CHECKPOINT_METRIC = "dds/checkpoint"
_NOTE_HEADER = "### ddsmon: dead-direction readings"


# ---------------------------------------------------------------------- the sink
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

    No connection is made before the first call that needs one; the constructor only
    sets :data:`HTTP_ENV_DEFAULTS`.
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
    ) -> None:
        configure_http_env()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.given_run_id = run_id
        self.state = state
        self.run_name = run_name
        self.plots = plots
        self.artifacts = artifacts
        self.plot_interval = float(plot_interval)
        self.retry_interval = float(retry_interval)
        self.run_id: str | None = None
        self.owned = False
        self._client: MlflowClient | None = None
        self._directory: Path | None = None
        self._remote_steps: set[int] | None = None
        self._down_until = 0.0
        self._down_logged = False
        self._lock = threading.RLock()
        self._history: dict[int, dict[str, Any]] | None = None
        self._event_keys: set[tuple[Any, ...]] | None = None
        self._events_all: list[dict[str, Any]] = []
        self._last_signatures: Signatures | None = None
        self._last_step: int | None = None
        self._plots_dirty = False
        self._last_plot = 0.0
        self._warned_params: set[str] = set()

    # ------------------------------------------------------------------ display
    @property
    def display_uri(self) -> str:
        """The tracking URI with any credentials redacted (what ddsmon ever prints)."""
        if self.tracking_uri is None:
            return "(MLflow default)"
        return redact_uri(self.tracking_uri)

    def __repr__(self) -> str:
        return (
            f"MlflowSink(tracking_uri={self.display_uri!r}, experiment={self.experiment!r}, "
            f"run_id={self.run_id or self.given_run_id!r})"
        )

    # ------------------------------------------------------------------ client/run
    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            try:
                self._client = MlflowClient(self.tracking_uri)
            except Exception as exc:
                if is_unreachable(exc):
                    raise _Unreachable(scrub(str(exc))) from exc
                raise ConfigError(
                    f"MLflow tracking URI {self.display_uri}: {scrub(str(exc))}"
                ) from exc
        return self._client

    @property
    def _state_key(self) -> str:
        uri = self.tracking_uri
        if uri is None:
            import mlflow

            uri = mlflow.get_tracking_uri()
        return f"mlflow_run:{redact_uri(str(uri))}|{self.experiment}"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One MLflow call; a connection-type failure becomes :class:`_Unreachable`."""
        try:
            return fn(*args, **kwargs)
        except _Unreachable:
            raise
        except Exception as exc:
            if is_unreachable(exc):
                raise _Unreachable(scrub(str(exc))) from exc
            raise

    def _guess_directory(self) -> Path | None:
        if self._directory is not None:
            return self._directory
        stored = self.state.get("directory")
        if stored:
            return Path(stored)
        if self.state.root.name == ".ddsmon":
            return self.state.root.parent.resolve()
        return None

    def _ensure_run(self, directory: Path | None = None) -> str:
        """Resolve (or create) the run; raises _Unreachable, ConfigError."""
        if self.run_id is not None:
            return self.run_id
        from mlflow.entities import RunStatus, ViewType

        client = self.client
        if self.given_run_id:
            try:
                run = self._call(client.get_run, self.given_run_id)
            except _Unreachable:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"--run-id {self.given_run_id}: no such run at {self.display_uri} "
                    f"({scrub(str(exc))})"
                ) from exc
            if run.info.lifecycle_stage == "deleted":
                raise ConfigError(f"--run-id {self.given_run_id} is a deleted run")
            self.run_id, self.owned = run.info.run_id, False
        else:
            directory = directory or self._guess_directory()
            run = None
            stored = self.state.get(self._state_key)
            if isinstance(stored, dict) and stored.get("run_id"):
                try:
                    run = self._call(client.get_run, stored["run_id"])
                except _Unreachable:
                    raise
                except Exception:
                    log.warning(
                        "stored MLflow run %s is gone; looking for another", stored["run_id"]
                    )
                    run = None
                if run is not None and run.info.lifecycle_stage == "deleted":
                    log.warning(
                        "stored MLflow run %s was deleted; starting a new one", run.info.run_id
                    )
                    run = None
            if run is None:
                if directory is None:
                    raise ConfigError("MLflow sink: the watched directory is not known yet")
                exp_id = self._experiment_id()
                found = self._call(
                    client.search_runs,
                    [exp_id],
                    filter_string=(
                        f"tags.`{DIRECTORY_ID_TAG}` = '{_directory_id(directory)}' "
                        f"and tags.`{OWNED_TAG}` = 'true'"
                    ),
                    run_view_type=ViewType.ACTIVE_ONLY,
                    max_results=1,
                    order_by=["attributes.start_time DESC"],
                )
                if found:
                    run = found[0]
                    log.info("resuming MLflow run %s for %s", run.info.run_id, directory)
                else:
                    run = self._call(
                        client.create_run,
                        exp_id,
                        run_name=self.run_name or f"ddsmon {directory.name}",
                        tags={
                            OWNED_TAG: "true",
                            DIRECTORY_TAG: str(directory),
                            DIRECTORY_ID_TAG: _directory_id(directory),
                            "mlflow.source.name": "ddsmon",
                            "mlflow.source.type": "JOB",
                        },
                    )
                    log.info(
                        "created MLflow run %s in experiment %r at %s",
                        run.info.run_id,
                        self.experiment,
                        self.display_uri,
                    )
            self.run_id, self.owned = run.info.run_id, True
            self.state.set(
                self._state_key,
                {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id},
            )
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                self._call(client.update_run, run.info.run_id, status="RUNNING")
        self._remote_steps = self._fetch_remote_steps()
        return self.run_id

    def _experiment_id(self) -> str:
        client = self.client
        exp = self._call(client.get_experiment_by_name, self.experiment)
        if exp is None:
            try:
                return self._call(client.create_experiment, self.experiment)
            except _Unreachable:
                raise
            except Exception:  # created meanwhile by another watcher
                exp = self._call(client.get_experiment_by_name, self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} is deleted at {self.display_uri}; "
                "restore it (mlflow experiments restore) or choose another --experiment"
            )
        return exp.experiment_id

    def _fetch_remote_steps(self) -> set[int]:
        assert self.run_id is not None
        history = self._call(self.client.get_metric_history, self.run_id, CHECKPOINT_METRIC)
        return {int(m.step) for m in history}

    # ------------------------------------------------------------------ Sink protocol
    def start(self, info: RunInfo) -> None:
        """Resolve the run, replay any spool, log params and tags (or spool them)."""
        with self._lock:
            self._directory = Path(info.directory).resolve()
            self.state.set("directory", str(self._directory))
            self._load_local()
            self._clean_outbox()
            record = {
                "kind": "start",
                "directory": str(self._directory),
                "params": {str(k): str(v) for k, v in info.params.items()},
            }
            self._send_or_spool(record, force=True)

    def on_queue(self, pending: int) -> None:
        """Nothing to log."""

    def on_reading(self, reading: CheckpointReading, events: list[Event]) -> None:
        """Log one checkpoint (metrics, event tags, artifacts), or spool it."""
        with self._lock:
            step = int(reading.step)
            if self._remote_steps is not None and step in self._remote_steps:
                log.info("step %d is already in MLflow run %s; not logged again", step, self.run_id)
                return
            self._load_local()
            record = self._build(reading, events)
            self._last_signatures = reading.signatures
            self._last_step = step
            self._plots_dirty = True
            self._send_or_spool(record)
            self._maybe_plot()

    def on_failure(self, failure: CheckpointFailure) -> None:
        """A tag ``ddsmon.failure.<file>`` = reason, so failed checkpoints show in the UI."""
        with self._lock:
            key = _fit(f"ddsmon.failure.{_component(Path(failure.path).name)}")
            record = {"kind": "tags", "tags": {key: _cut(failure.reason, LIMITS["tag_value"])}}
            self._send_or_spool(record)

    def close(self, status: str = "FINISHED") -> None:
        """Replay the spool, draw the final plots and, for a run ddsmon owns, set its
        status (``FINISHED``, or e.g. ``KILLED`` on interruption). A run given by id keeps
        its status. What cannot be delivered stays spooled for the next start."""
        with self._lock:
            try:
                if not self._flush_spool(force=True):
                    log.warning(
                        "MLflow at %s unreachable on close; %d records stay spooled in %s "
                        "and are sent at the next start",
                        self.display_uri,
                        self.state.spool_count(),
                        self.state.root,
                    )
                    return
                self._maybe_plot(force=True)
                if self.owned and self.run_id is not None:
                    self._call(self.client.set_terminated, self.run_id, status=status)
            except _Unreachable as exc:
                log.warning("MLflow at %s unreachable on close: %s", self.display_uri, exc)

    # ------------------------------------------------------------------ exactly-once
    def recorded_steps(self) -> set[int]:
        """Steps whose checkpoint the run already holds (history of ``dds/checkpoint``)
        or that wait in the spool to be sent. When the server cannot be reached, only
        the spooled steps (replay skips steps the run holds, so nothing doubles)."""
        with self._lock:
            steps = {
                int(r["step"]) for r in self.state.spool_pending() if r.get("kind") == "reading"
            }
            try:
                if self.run_id is None:
                    if self.given_run_id is None and self._guess_directory() is None:
                        return steps
                    self._ensure_run()
                else:
                    self._remote_steps = self._fetch_remote_steps()
            except _Unreachable as exc:
                self._mark_down(exc)
                log.warning(
                    "MLflow at %s unreachable; recorded steps known from the spool only",
                    self.display_uri,
                )
                return steps
            return steps | set(self._remote_steps or ())

    # ------------------------------------------------------------------ records
    def _build(self, reading: CheckpointReading, events: list[Event]) -> dict[str, Any]:
        """The record of one checkpoint: what is sent, or spooled when it cannot be."""
        step = int(reading.step)
        ts = int(time.time() * 1000)
        sig = reading.signatures
        metrics: list[list[Any]] = []
        layers_local: dict[str, dict[str, Any]] = {}
        for name, layer in sig.layers.items():
            values = layer.to_dict()
            layers_local[name] = {k: _finite(values.get(k)) for k in SCALAR_READINGS}
            layers_local[name]["finite"] = bool(layer.finite)
            metrics.append([metric_key("dds", name, "finite"), float(bool(layer.finite)), step, ts])
            for reading_name in SCALAR_READINGS:
                value = _finite(values.get(reading_name))
                if value is not None:
                    metrics.append([metric_key("dds", name, reading_name), value, step, ts])
        train: dict[str, float] = {}
        for key, value in reading.meta.items():
            v = _finite(value)
            if v is not None:
                train[str(key)] = v
                metrics.append([metric_key("train", str(key)), v, step, ts])
        for key, value in (
            ("load_seconds", reading.load_seconds),
            ("read_seconds", reading.read_seconds),
        ):
            v = _finite(value)
            if v is not None:
                metrics.append([metric_key("ddsmon", key), v, step, ts])
        tags: dict[str, str] = {}
        by_kind: dict[str, float] = {}
        new_events: list[dict[str, Any]] = []
        for event in events:
            tags[event_tag_key(event.step, event.layer, event.kind)] = _cut(
                event.message, LIMITS["tag_value"]
            )
            mag = _finite(event.magnitude)
            mag = 1.0 if mag is None else mag
            by_kind[event.kind] = max(by_kind.get(event.kind, -math.inf), mag)
            new_events.append(_event_dict(event))
        for kind, mag in by_kind.items():
            metrics.append([metric_key("dds", "events", kind), mag, step, ts])
        metrics.append([CHECKPOINT_METRIC, 1.0, step, ts])  # last: the record is complete

        files: list[list[str]] = []
        if self.artifacts:
            outbox = self.state.path("outbox") / f"{step}-{uuid.uuid4().hex[:8]}"
            outbox.mkdir(parents=True, exist_ok=True)
            npz = outbox / f"step_{step}.npz"
            _write_spectra(sig, npz)
            files.append([str(npz), "spectra"])
        self._append_local(step, layers_local, train, new_events)
        return {
            "kind": "reading",
            "step": step,
            "path": str(reading.path),
            "metrics": metrics,
            "tags": tags,
            "files": files,
            "events": len(new_events),
        }

    def _send_or_spool(self, record: dict[str, Any], force: bool = False) -> None:
        """Send ``record`` after whatever waits in the spool, or queue it behind them."""
        if self._flush_spool(force=force):
            try:
                self._deliver(record)
                self._back_up()
                return
            except _Unreachable as exc:
                self._mark_down(exc)
            except Exception:
                _remove_files(record)
                raise
        self._spool(record)

    def _spool(self, record: dict[str, Any]) -> None:
        self.state.spool_append(record)
        what = f"step {record['step']}" if record["kind"] == "reading" else record["kind"]
        if not self._down_logged:
            log.warning(
                "MLflow at %s unreachable: %s spooled to %s; records are replayed in order "
                "once it answers",
                self.display_uri,
                what,
                self.state.root,
            )
            self._down_logged = True
        else:
            log.info("MLflow still unreachable: %s spooled", what)

    def _mark_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_interval
        log.debug("MLflow at %s unreachable: %s", self.display_uri, exc)

    def _back_up(self) -> None:
        if self._down_logged:
            log.warning("MLflow at %s answers again", self.display_uri)
        self._down_logged = False
        self._down_until = 0.0

    def _flush_spool(self, force: bool = False) -> bool:
        """Replay spooled records in order; True when the spool is empty afterwards."""
        pending = self.state.spool_pending()
        if not pending:
            return True
        if not force and time.monotonic() < self._down_until:
            return False
        directory = self._directory
        for rec in pending:
            if rec.get("kind") == "start" and rec.get("directory"):
                directory = directory or Path(rec["directory"])
        done = 0
        replayed = 0
        try:
            self._ensure_run(directory)
            remote = self._fetch_remote_steps()
            for rec in pending:
                if rec.get("kind") == "reading" and int(rec["step"]) in remote:
                    log.info("spooled step %s is already in the run; dropped", rec["step"])
                else:
                    try:
                        self._deliver(rec)
                        replayed += 1
                        if rec.get("kind") == "reading":
                            remote.add(int(rec["step"]))
                    except _Unreachable:
                        raise
                    except Exception as exc:
                        log.error(
                            "MLflow rejected a spooled %s record (%s); dropped",
                            rec.get("kind"),
                            scrub(str(exc)),
                        )
                done += 1
        except _Unreachable as exc:
            self._mark_down(exc)
            return False
        finally:
            self.state.spool_ack(done)
            for rec in pending[:done]:
                _remove_files(rec)
        if replayed:
            log.warning("replayed %d spooled records into MLflow run %s", replayed, self.run_id)
        self._back_up()
        return True

    def _deliver(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "start":
            self._deliver_start(record)
        elif kind == "reading":
            self._deliver_reading(record)
        elif kind == "tags":
            self._ensure_run()
            self._log_batch(tags=record["tags"])
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _deliver_start(self, record: dict[str, Any]) -> None:
        directory = Path(record["directory"])
        run_id = self._ensure_run(directory)
        run = self._call(self.client.get_run, run_id)
        existing = run.data.params
        params: dict[str, str] = {}
        for key, value in record["params"].items():
            k = _fit(_component_key(key))
            v = _cut(value, LIMITS["param_value"])
            if k in existing:
                if existing[k] != v and k not in self._warned_params:
                    self._warned_params.add(k)
                    log.warning(
                        "MLflow param %r of run %s is %r, now %r; params cannot change, "
                        "the run keeps the first value",
                        k,
                        run_id,
                        _cut(existing[k], 80),
                        _cut(v, 80),
                    )
                continue
            params[k] = v
        from ddsmon import __version__

        tags = {
            "ddsmon.version": __version__,
            DIRECTORY_TAG: str(directory),
            DIRECTORY_ID_TAG: _directory_id(directory),
        }
        note = _note(directory)
        current = run.data.tags.get(NOTE_TAG)
        if self.owned or not current or current.startswith(_NOTE_HEADER):
            tags[NOTE_TAG] = note
        else:
            tags["ddsmon.note"] = note  # keep the training run's own note
        self._log_batch(params=params, tags=tags)

    def _deliver_reading(self, record: dict[str, Any]) -> None:
        run_id = self._ensure_run()
        step = int(record["step"])
        for local, artifact_dir in record.get("files", []):
            if Path(local).exists():
                self._call(self.client.log_artifact, run_id, local, artifact_dir)
            else:
                log.warning("spooled artifact %s is gone; not uploaded", local)
        if self.artifacts and record.get("events"):
            events_path = self.state.root / "events.jsonl"
            if events_path.exists():
                self._call(self.client.log_artifact, run_id, str(events_path))
        self._log_batch(metrics=record["metrics"], tags=record.get("tags", {}))
        if self._remote_steps is not None:
            self._remote_steps.add(step)
        _remove_files(record)

    def _log_batch(
        self,
        metrics: Iterable[list[Any]] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """log_batch in chunks within MLflow's limits; metrics keep their order, so the
        last metric (the checkpoint marker) goes in the last call."""
        from mlflow.entities import Metric, Param, RunTag

        assert self.run_id is not None
        ents: list[tuple[str, Any]] = [("p", Param(k, v)) for k, v in (params or {}).items()]
        ents += [("t", RunTag(k, v)) for k, v in (tags or {}).items()]
        ents += [("m", Metric(k, float(v), int(ts), int(s))) for k, v, s, ts in metrics]
        chunk: dict[str, list[Any]] = {"m": [], "p": [], "t": []}

        def send() -> None:
            if any(chunk.values()):
                self._call(
                    self.client.log_batch,
                    self.run_id,
                    metrics=chunk["m"],
                    params=chunk["p"],
                    tags=chunk["t"],
                    synchronous=True,
                )
            for v in chunk.values():
                v.clear()

        for kind, ent in ents:
            full = (
                len(chunk["m"]) + len(chunk["p"]) + len(chunk["t"]) >= LIMITS["entities"]
                or (kind == "m" and len(chunk["m"]) >= LIMITS["metrics"])
                or (kind != "m" and len(chunk["p"]) + len(chunk["t"]) >= LIMITS["params_tags"])
            )
            if full:
                send()
            chunk[kind].append(ent)
        send()

    def _clean_outbox(self) -> None:
        """Remove artifact files of records that are neither spooled nor being sent
        (left by a crash between delivery and clean-up)."""
        outbox = self.state.root / "outbox"
        if not outbox.is_dir():
            return
        keep = {
            str(Path(local).parent)
            for rec in self.state.spool_pending()
            for local, _ in rec.get("files", [])
        }
        for folder in outbox.iterdir():
            if str(folder) not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ local copies
    def _load_local(self) -> None:
        """History and events kept in the state directory (for plots, across restarts)."""
        if self._history is not None:
            return
        self._history = {}
        for rec in read_jsonl(self.state.root / "history.jsonl"):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self._history[int(rec["step"])] = rec
        self._event_keys = set()
        self._events_all = []
        for rec in read_jsonl(self.state.root / "events.jsonl"):
            self._event_keys.add(_event_key(rec))
            self._events_all.append(rec)

    def _append_local(
        self,
        step: int,
        layers: dict[str, dict[str, Any]],
        train: dict[str, float],
        events: list[dict[str, Any]],
    ) -> None:
        assert self._history is not None and self._event_keys is not None
        entry = {"step": step, "layers": layers, "train": train}
        self._history[step] = entry
        append_jsonl_lines(self.state.path("history.jsonl"), [json.dumps(entry)])
        fresh = [e for e in events if _event_key(e) not in self._event_keys]
        if fresh:
            append_jsonl_lines(self.state.path("events.jsonl"), [json.dumps(e) for e in fresh])
            for e in fresh:
                self._event_keys.add(_event_key(e))
                self._events_all.append(e)

    def history(self) -> dict[str, list[tuple[int, dict[str, Any]]]]:
        """Every layer's readings over steps, from the local copy (for plots)."""
        self._load_local()
        assert self._history is not None
        out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for step in sorted(self._history):
            for layer, values in self._history[step].get("layers", {}).items():
                out.setdefault(layer, []).append((step, values))
        return out

    def _train_history(self) -> dict[str, list[tuple[int, float]]]:
        assert self._history is not None
        out: dict[str, list[tuple[int, float]]] = {}
        for step in sorted(self._history):
            for key, value in self._history[step].get("train", {}).items():
                out.setdefault(key, []).append((step, value))
        return out

    # ------------------------------------------------------------------ plots
    def _maybe_plot(self, force: bool = False) -> None:
        if not (self.plots and self._plots_dirty) or self.run_id is None:
            return
        if not force and time.monotonic() - self._last_plot < self.plot_interval:
            return
        if not force and time.monotonic() < self._down_until:
            return
        from ddsmon.plots import plot_spectra, plot_trajectories

        self._last_plot = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="ddsmon-plots-") as tmp:
            try:
                plot_trajectories(
                    self.history(),
                    Path(tmp) / "trajectories.png",
                    self._events_all,
                    train=self._train_history(),
                    title=f"Dead-direction readings over training: {self._directory or ''}",
                )
                if self._last_signatures is not None:
                    plot_spectra(
                        self._last_signatures,
                        Path(tmp) / "spectra.png",
                        title=f"Spectra at step {self._last_step} (dashed: trust floors)",
                    )
            except Exception:
                log.exception("could not draw the plots; skipped")
                self._plots_dirty = False
                return
            try:
                self._call(self.client.log_artifacts, self.run_id, tmp, "plots")
                self._plots_dirty = False
            except _Unreachable as exc:
                self._mark_down(exc)


# ---------------------------------------------------------------------- helpers
def _component_key(key: str) -> str:
    return _BAD_CHARS.sub("_", key) or "_"


def _directory_id(directory: Path) -> str:
    return hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _event_dict(event: Any) -> dict[str, Any]:
    if hasattr(event, "to_dict"):
        return dict(event.to_dict())
    return dict(event)


def _event_key(e: Mapping[str, Any]) -> tuple[Any, ...]:
    return (e.get("step"), e.get("layer"), e.get("kind"), e.get("reading"))


def _write_spectra(sig: Signatures, path: Path) -> None:
    """``<layer>/x_spectrum`` etc. and the floors, compressed; written atomically."""
    arrays: dict[str, np.ndarray] = {}
    for name, layer in sig.layers.items():
        arrays[f"{name}/x_spectrum"] = np.asarray(layer.x_spectrum, dtype=np.float64)
        arrays[f"{name}/g_spectrum"] = np.asarray(layer.g_spectrum, dtype=np.float64)
        if layer.param_spectrum is not None:
            arrays[f"{name}/param_spectrum"] = np.asarray(layer.param_spectrum, dtype=np.float64)
        for floor in ("floor_x", "floor_g", "param_floor"):
            value = getattr(layer, floor)
            if value is not None:
                arrays[f"{name}/{floor}"] = np.asarray(float(value))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _remove_files(record: Mapping[str, Any]) -> None:
    """Delete a delivered record's outbox folder."""
    for local, _ in record.get("files", []):
        folder = Path(local).parent
        if folder.parent.name == "outbox":
            shutil.rmtree(folder, ignore_errors=True)


def _note(directory: Path) -> str:
    return (
        f"{_NOTE_HEADER}\n\n"
        f"Checkpoints of `{directory}` read by ddsmon, one probe pass each, "
        "logged at each checkpoint's training step.\n\n"
        "* **Plots** (Artifacts): `plots/trajectories.png`, every layer's scale-free "
        "readings over steps with events as vertical lines (red: transition); "
        "`plots/spectra.png`, the latest checkpoint's spectra with their trust floors.\n"
        "* **Metrics** `dds/<layer>/<reading>`: `lambda_ratio` = lambda_min/lambda_max of the "
        "per-sample-gradient Fisher-Gram G, `sigma_ratio` = sigma_min/sigma_max of the layer "
        "outputs X, `log_volume` = log det+(G) - rank * log lambda_max, `g_rank`/`x_rank` "
        "(values above the trust floor) and `g_dead`/`x_dead`, `param_*` for the "
        "parameter-side Gram. `dds/checkpoint` = 1 marks each checkpoint read; "
        "`train/*` are the trainer's own scalars.\n"
        "* **Events** (collapse, revival, rank_change, transition, nonfinite): metric "
        "`dds/events/<kind>` (magnitude), tags `dds.event.<step>.<layer>.<kind>` (message), "
        "artifact `events.jsonl`.\n"
        "* **Spectra** of every checkpoint: artifact `spectra/step_<step>.npz`.\n"
    )
