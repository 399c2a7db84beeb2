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
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsmon import __version__
from ddsmon.checkpoints import CheckpointRef, check_complete, discover, fingerprint
from ddsmon.config import Config, WatchSettings
from ddsmon.errors import CheckpointError, ConfigError, DDSError
from ddsmon.events import Event, EventDetector
from ddsmon.loading import VANISHED, LoadedCheckpoint
from ddsmon.reader import Reader
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.redaction import redact_uri
from ddsmon.sinks import RunInfo, Sink
from ddsmon.state import StateDir

__all__ = ("Daemon", "Summary", "has_hf_folders", "run_until_signalled")

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        config: Config,
        sinks: list[Sink],
        *,
        tracking: Any | None = None,
        reader: Reader | None = None,
    ) -> None:
        if config.watch is None:
            raise ConfigError("the daemon needs a checkpoint directory")
        if not config.directory.is_dir():
            raise ConfigError(f"checkpoint directory {config.directory} does not exist")
        self.config = config
        self.watching: WatchSettings = config.watch
        self.reader = reader if reader is not None else Reader.from_settings(config.read)
        if self.reader.factory is None and not has_hf_folders(config.directory):
            why = "".join(f"; {i} was ignored (not allowed)" for i in config.ignored)
            raise ConfigError(
                "no model factory: give --model MODULE:FACTORY (or model = ... in ddsmon.toml)"
                + why
            )
        self.sinks = list(sinks)
        self.tracking = tracking
        self.state = StateDir(self.watching.state_dir)
        self.detector = EventDetector(config.events)
        self._queue: list[tuple[float, int, CheckpointRef]] = []
        self._queued: set[tuple[str, tuple[int, int]]] = set()
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._arrival = itertools.count()
        self._stop = threading.Event()
        self._recorded: set[int] = set()
        self.summary = Summary()

    @classmethod
    def from_config(cls, config: Config, *, console: Any | None = None) -> Daemon:
        """The daemon with its sinks, as the CLI runs it: MLflow, the terminal (rich's
        console unless given), and the ``--events-json`` and ``--on-event`` alerts."""
        from ddsmon.sinks.alerts import CommandHookSink, EventsJsonSink
        from ddsmon.sinks.terminal import TerminalSink
        from ddsmon.sinks.tracking import MlflowSink

        if config.watch is None:
            raise ConfigError("the daemon needs a checkpoint directory")
        reader = Reader.from_settings(config.read)
        t = config.tracking
        tracking = MlflowSink(
            tracking_uri=t.tracking_uri,
            experiment=t.experiment,
            run_id=t.run_id,
            state=StateDir(config.watch.state_dir),
            run_name=t.run_name,
            plots=t.plots,
        )
        if console is None:
            import rich

            console = rich.get_console()
        sinks: list[Sink] = [tracking, TerminalSink(console=console)]
        events_json = config.alerts.events_json
        if events_json is not None:
            try:
                events_json.parent.mkdir(parents=True, exist_ok=True)
                with open(events_json, "a"):
                    pass
            except OSError as exc:
                raise ConfigError(f"--events-json {events_json}: cannot write ({exc})") from exc
            sinks.append(EventsJsonSink(events_json))
        if config.alerts.on_event:
            sinks.append(CommandHookSink(config.alerts.on_event))
        return cls(config, sinks, tracking=tracking, reader=reader)

    # ------------------------------------------------------------------ lifecycle
    def params(self) -> dict[str, str]:
        """The run's settings, as MLflow params."""
        return {**self.reader.params(), "directory": str(self.config.directory)}

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
                self.detector = EventDetector.from_state(saved, self.config.events)
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
                        f"MLflow at {redact_uri(self.config.tracking.tracking_uri)} refused the run: {exc}"
                    ) from exc
            else:
                self._call(sink, "start", info)
        log.info(
            "ddsmon %s: %s %s -> %s",
            __version__,
            mode,
            self.config.directory,
            redact_uri(self.config.tracking.tracking_uri),
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
            poll=self.watching.poll,
            quiet=self.watching.quiet,
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
                upcoming = self._next(False) if self.watching.prefetch else None
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
            loaded = self.reader.load(ref)
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
            sig = self.reader.read(loaded.model)
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


def has_hf_folders(directory: Path) -> bool:
    """True when ``directory`` holds a Hugging Face ``checkpoint-N/`` folder (built from
    its ``config.json``, so no model factory is needed)."""
    try:
        return any(p.is_dir() and p.name.startswith("checkpoint-") for p in directory.iterdir())
    except OSError:
        return False


def run_until_signalled(daemon: Daemon, mode: str) -> Summary:
    """Run ``daemon.scan()`` or ``daemon.watch()``; the first SIGINT/SIGTERM asks it to stop
    after the current checkpoint, a second one abandons that checkpoint."""
    interrupts = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:
        interrupts["count"] += 1
        if interrupts["count"] > 1:
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current checkpoint, then stopping", signum)
        daemon.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return daemon.scan() if mode == "scan" else daemon.watch()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
