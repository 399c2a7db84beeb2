"""The daemon: checkpoints in, readings and events out, nothing read twice.

Composition, in order, for every checkpoint::

    watcher / discover  ->  queue (step order)  ->  load (one ahead, in a thread)
        ->  compute_signatures  ->  EventDetector.update  ->  sinks  ->  state.mark_done

Guarantees: a checkpoint is read once per (path, fingerprint); a step already recorded
in the MLflow run is not logged again (kill -9 between logging and the state write);
a checkpoint that fails to load is reported with its path and reason and retried only
when the file changes; a stop request finishes the current checkpoint, then sinks flush.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ddsmon import __version__
from ddsmon.checkpoints import CheckpointRef, check_complete, discover, fingerprint
from ddsmon.config import Config, redact_uri
from ddsmon.engine import compute_signatures, resolve_device
from ddsmon.errors import CheckpointError, ConfigError, DDSError
from ddsmon.events import Event, EventConfig, EventDetector
from ddsmon.loading import (
    VANISHED,
    LoadedCheckpoint,
    load_checkpoint,
    load_probe,
    resolve_callable,
    resolve_factory,
)
from ddsmon.probe import probe_batch_size
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.sinks import RunInfo, Sink
from ddsmon.state import StateDir

__all__ = ("Daemon", "Summary", "resolve_loss")

log = logging.getLogger(__name__)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class Summary:
    """What a scan or watch did: counts and every event flagged."""

    read: int = 0
    failed: int = 0
    skipped: int = 0
    events: list[Event] = field(default_factory=list)
    failures: list[CheckpointFailure] = field(default_factory=list)

    def flagged(self, kinds: Iterable[str]) -> list[Event]:
        wanted = set(kinds)
        return [e for e in self.events if e.kind in wanted]


class Daemon:
    """Reads checkpoints of one directory with the engine and hands results to sinks.

    Construction checks everything that can be checked before the first checkpoint
    (factory, probe, directory, device, event settings) and raises ConfigError.
    ``tracking`` is the MLflow sink when there is one: it is also asked which steps
    the run already holds.
    """

    def __init__(self, config: Config, sinks: list[Sink], *, tracking: Any | None = None) -> None:
        if config.directory is None or not config.directory.is_dir():
            raise ConfigError(f"checkpoint directory {config.directory} does not exist")
        if config.probe is None:
            raise ConfigError("no probe: give --probe FILE or --probe MODULE:FUNCTION")
        if config.forward_dtype not in _DTYPES:
            raise ConfigError(
                f"forward dtype must be float64 or float32, got {config.forward_dtype!r}"
            )
        limit_threads(config.threads)
        self.config = config
        self.sinks = list(sinks)
        self.tracking = tracking
        self.factory: Callable[[], torch.nn.Module] | None = (
            resolve_factory(config.model) if config.model else None
        )
        self.inputs, self.targets = load_probe(config.probe, trust=config.trust_checkpoints)
        self.n = probe_batch_size(self.inputs, self.targets)
        self.device = resolve_device(config.device)
        self.loss = resolve_loss(config.loss)
        try:
            self.event_config = EventConfig(**dict(config.events))
        except TypeError as exc:
            raise ConfigError(f"bad [events] settings: {exc}") from exc
        self.state = StateDir(config.resolved_state_dir)
        self.detector = EventDetector(self.event_config)
        self._queue: list[tuple[float, int, CheckpointRef]] = []
        self._queued: set[tuple[str, tuple[int, int]]] = set()
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._arrival = itertools.count()
        self._stop = threading.Event()
        self._recorded: set[int] = set()
        self.summary = Summary()

    # ------------------------------------------------------------------ lifecycle
    def params(self) -> dict[str, str]:
        """The run's settings, as MLflow params."""
        c = self.config
        return {
            "ddsmon_version": __version__,
            "probe_size": str(self.n),
            "probe": str(c.probe),
            "model": str(c.model),
            "loss": c.loss,
            "layers": c.layers or "default (leaf modules with outputs of width >= 2)",
            "fisher": c.fisher,
            "recipe": f"{c.forward_dtype} probe pass, float64 spectra, no ridge, "
            "smallest positive above floor dim*eps*max",
            "device": str(self.device),
            "torch_threads": str(torch.get_num_threads()),
            "directory": str(c.directory),
        }

    def stop(self) -> None:
        """Ask the loop to stop after the current checkpoint."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _start(self, mode: str) -> None:
        self.state.claim()
        saved = self.state.get("detector")
        if saved:
            try:
                self.detector = EventDetector.from_state(saved, self.event_config)
            except Exception as exc:  # a detector state from another version
                log.warning("could not restore event history (%s); starting fresh", exc)
        if self.tracking is not None:
            try:
                self._recorded = set(self.tracking.recorded_steps())
            except Exception as exc:
                log.warning("could not read recorded steps from MLflow: %s", exc)
        info = RunInfo(directory=self.config.directory, mode=mode, params=self.params())
        for sink in self.sinks:
            if sink is self.tracking:
                try:
                    sink.start(info)
                except Exception as exc:  # refused credentials, a bad URI: stop before reading
                    self.state.release()
                    raise ConfigError(
                        f"MLflow at {redact_uri(self.config.tracking_uri)} refused the run: {exc}"
                    ) from exc
            else:
                self._call(sink, "start", info)
        log.info(
            "ddsmon %s: %s %s -> %s",
            __version__,
            mode,
            self.config.directory,
            redact_uri(self.config.tracking_uri),
        )

    def _finish(self) -> None:
        for sink in self.sinks:
            self._call(sink, "close")
        self.state.release()

    # ------------------------------------------------------------------ queue
    def enqueue(self, ref: CheckpointRef) -> None:
        """Queue a complete checkpoint (thread-safe); duplicates are dropped."""
        try:
            key = (str(ref.path), fingerprint(ref))
        except OSError:
            return
        with self._cond:
            if key in self._queued:
                return
            self._queued.add(key)
            step = ref.name_step
            heapq.heappush(
                self._queue, (float("inf") if step is None else step, next(self._seq), ref)
            )
            pending = len(self._queue)
            self._cond.notify_all()
        for sink in self.sinks:
            self._call(sink, "on_queue", pending)

    def _next(self, block: bool) -> CheckpointRef | None:
        with self._cond:
            while not self._queue:
                if not block or self._stop.is_set():
                    return None
                self._cond.wait(timeout=0.5)
            return heapq.heappop(self._queue)[2]

    # ------------------------------------------------------------------ modes
    def scan(self) -> Summary:
        """Read what is in the directory now, in step order, then return."""
        self._start("scan")
        try:
            for ref in discover(self.config.directory):
                reason = check_complete(ref)
                if reason is not None:
                    self._fail(ref, f"incomplete: {reason}")
                    continue
                self.enqueue(ref)
            self._drain(block=False)
        finally:
            self._finish()
        return self.summary

    def watch(self) -> Summary:
        """Read what is there, then every checkpoint that completes, until stop()."""
        from ddsmon.watcher import CheckpointWatcher

        self._start("watch")
        watcher = CheckpointWatcher(
            self.config.directory,
            self.enqueue,
            poll=self.config.poll,
            quiet=self.config.quiet,
            on_vanished=lambda p: log.info("%s vanished before it was read; skipped", p),
        )
        try:
            watcher.start()
            for ref in discover(self.config.directory):
                if check_complete(ref) is None:
                    self.enqueue(ref)
            self._drain(block=True)
        finally:
            watcher.stop()
            self._finish()
        return self.summary

    # ------------------------------------------------------------------ reading
    def _drain(self, block: bool) -> None:
        """Read queued checkpoints; load the next one while reading the current one."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddsmon-load") as pool:
            current = self._next(block)
            future = self._submit(pool, current)
            while current is not None and not self._stop.is_set():
                upcoming = self._next(False) if self.config.prefetch else None
                loaded = future.result() if future is not None else None
                future = self._submit(pool, upcoming)
                self._process(current, loaded)
                if upcoming is None:
                    upcoming = self._next(block)
                    future = self._submit(pool, upcoming)
                current = upcoming
            if future is not None:
                future.cancel()

    def _submit(self, pool: ThreadPoolExecutor, ref: CheckpointRef | None) -> Future | None:
        if ref is None:
            return None
        if self._is_done(ref):
            return pool.submit(lambda: None)
        return pool.submit(self._load, ref)

    def _is_done(self, ref: CheckpointRef) -> bool:
        try:
            return self.state.is_done(str(ref.path), fingerprint(ref))
        except OSError:
            return False

    def _load(self, ref: CheckpointRef) -> LoadedCheckpoint | CheckpointError:
        started = time.perf_counter()
        try:
            loaded = load_checkpoint(ref, self.factory, trust=self.config.trust_checkpoints)
        except CheckpointError as exc:
            return exc
        except Exception as exc:  # a factory or format we did not foresee: still a report
            return CheckpointError(ref.path, f"{type(exc).__name__}: {exc}")
        loaded.meta["_load_seconds"] = time.perf_counter() - started
        return loaded

    def _process(
        self, ref: CheckpointRef, loaded: LoadedCheckpoint | CheckpointError | None
    ) -> None:
        try:
            fp = fingerprint(ref)
        except OSError:
            log.info("%s vanished before it was read; skipped", ref.path)
            self.summary.skipped += 1
            return
        if loaded is None or self.state.is_done(str(ref.path), fp):
            self.summary.skipped += 1
            return
        if isinstance(loaded, CheckpointError):
            if loaded.reason == VANISHED:
                log.info("%s vanished before it was read; skipped", ref.path)
                self.summary.skipped += 1
                return
            self._fail(ref, loaded.reason)
            return
        step = loaded.step if loaded.step is not None else ref.name_step
        if step is None:
            step = next(self._arrival)
        if step in self._recorded:
            log.info("step %d (%s) is already in the MLflow run; not logged again", step, ref.path)
            self.state.mark_done(str(ref.path), fp, step)
            self.summary.skipped += 1
            return
        load_seconds = float(loaded.meta.pop("_load_seconds", 0.0))
        try:
            sig = compute_signatures(
                loaded.model,
                self.inputs,
                self.targets,
                loss=self.loss,
                layers=_layers_arg(loaded.model, self.config.layers),
                device=self.device,
                fisher=self.config.fisher,
                forward_dtype=_DTYPES[self.config.forward_dtype],
                max_probe_rows=self.config.max_probe_rows,
            )
        except DDSError as exc:
            self._fail(ref, str(exc), step)
            return
        del loaded.model
        events = self.detector.update(step, {name: s.to_dict() for name, s in sig.layers.items()})
        reading = CheckpointReading(
            step=step,
            path=ref.path,
            signatures=sig,
            fingerprint=fp,
            meta={k: float(v) for k, v in loaded.meta.items()},
            load_seconds=load_seconds,
            read_seconds=sig.seconds,
        )
        if self.tracking is not None:
            try:
                self.tracking.on_reading(reading, events)
            except Exception as exc:
                # not recorded (the sink spools what it cannot send; this is anything else):
                # not marked done, so a restart reads it again
                self._fail(ref, f"readings not recorded in MLflow: {exc}", step)
                return
        for sink in self.sinks:
            if sink is not self.tracking:
                self._call(sink, "on_reading", reading, events)
        self._recorded.add(step)
        self.state.mark_done(str(ref.path), fp, step)
        self.state.set("detector", self.detector.to_state())
        self.summary.read += 1
        self.summary.events.extend(events)

    def _fail(self, ref: CheckpointRef, reason: str, step: int | None = None) -> None:
        failure = CheckpointFailure(path=ref.path, reason=reason, step=step)
        log.warning("cannot read %s: %s", ref.path, reason)
        self.summary.failed += 1
        self.summary.failures.append(failure)
        for sink in self.sinks:
            self._call(sink, "on_failure", failure)

    @staticmethod
    def _call(sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:
            log.exception("sink %s.%s failed", type(sink).__name__, method)


def limit_threads(threads: int | None) -> None:
    """``--threads N`` / ``threads = N``: torch's intra-op CPU threads for this process
    (``torch.set_num_threads``; the eigensolvers and matrix products run on these).
    None leaves torch's default: ``OMP_NUM_THREADS`` if set, else the physical cores."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def resolve_loss(spec: str) -> str | Callable[..., Any]:
    """``--loss``: ``ce``, ``mse``, or ``MODULE:FUNCTION`` naming a per-sample loss callable."""
    if spec in ("ce", "mse"):
        return spec
    if ":" not in spec:
        raise ConfigError(f"unknown loss {spec!r}: use ce, mse or MODULE:FUNCTION")
    return resolve_callable(spec, "loss")


def _layers_arg(model: torch.nn.Module, spec: str | None) -> str | list[str] | None:
    """``--layers``: comma-separated module names, one exact name, or else a regex."""
    if not spec:
        return None
    names = {name for name, _ in model.named_modules() if name}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if "," in spec or all(p in names for p in parts):
        return parts
    return spec
