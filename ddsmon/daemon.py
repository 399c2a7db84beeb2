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

import dataclasses
import hashlib
import heapq
import itertools
import json
import logging
import os
import queue
import signal
import sysconfig
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsmon import __version__
from ddsmon.aliases import MAX_STEP, weights_digest
from ddsmon.checkpoints import (
    CheckpointRef,
    check_complete,
    classify,
    discover,
    fingerprint,
    folder_step,
    linked_folders,
    where_checkpoints_are,
)
from ddsmon.config import Config, WatchSettings
from ddsmon.errors import CheckpointError, ConfigError, DDSError
from ddsmon.events import Event, EventDetector
from ddsmon.faults import RepeatedFault
from ddsmon.loading import VANISHED, LoadedCheckpoint, checkpoint_step
from ddsmon.reader import Reader
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.redaction import redact_uri
from ddsmon.shown import shown
from ddsmon.sinks import RunInfo, Sink
from ddsmon.sinks.mlflow_http import StoreNotUsable
from ddsmon.sinks.mlflow_lease import RunLeaseError
from ddsmon.state import StateDir, StateError
from ddsmon.threads import keep_this_thread_single

__all__ = (
    "Daemon",
    "Summary",
    "checkpoint_step",
    "has_hf_folders",
    "run_until_signalled",
    "wait_for_directory",
)

log = logging.getLogger(__name__)

#: Weights digests kept for recognising aliases (best.pt, last.ckpt) of steps read.
_MAX_DIGESTS = 4096


@dataclass
class Summary:
    """What a scan or watch did: counts and every event flagged."""

    read: int = 0
    failed: int = 0
    skipped: int = 0
    events: list[Event] = field(default_factory=list)
    failures: list[CheckpointFailure] = field(default_factory=list)
    #: checkpoints without a step that hold the weights of a step read: (path, step)
    aliases: list[tuple[Path, int]] = field(default_factory=list)
    #: checkpoints without a step that match none read: not logged
    unstepped: list[Path] = field(default_factory=list)
    #: checkpoints deleted before they could be read (a trainer's rotation)
    vanished: list[Path] = field(default_factory=list)
    #: checkpoints holding other weights at a step the run already has: (path, step)
    duplicates: list[tuple[Path, int]] = field(default_factory=list)
    #: steps read where every layer was non-finite (the run diverged?)
    nonfinite: list[int] = field(default_factory=list)

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
        self.config = config
        self.watching: WatchSettings = config.watch
        self.reader = reader if reader is not None else Reader.from_settings(config.read)
        self.sinks = list(sinks)
        self.tracking = tracking
        self.state = StateDir(self.watching.state_dir)
        self.detector = EventDetector(config.events)
        self._queue: list[tuple[float, int, CheckpointRef]] = []
        self._queued: set[tuple[str, tuple[int, int]]] = set()
        #: checkpoints taken off the queue (the one read, the one loading ahead) and not
        #: yet done with: still pending for the sinks' progress count
        self._in_hand = 0
        self._unsettled = False
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        #: seconds the last readings took (the median says when one is slow: _slow_after)
        self._read_seconds: deque[float] = deque(maxlen=32)
        #: seconds the last loads took (the same for a load: _slow_load_after)
        self._load_seconds: deque[float] = deque(maxlen=32)
        #: True once the main loop abandoned the checkpoint in hand after :meth:`hurry`
        self.abandoning = False
        self._recorded: set[int] = set()
        #: steps read again into a run that did not hold them (the state's read-set was
        #: kept for another run): the hooks and the events file had them already
        self._told_before: set[int] = set()
        self._rejections: list[tuple[Path, str]] = []
        self._detector_step = -1
        self._faults = RepeatedFault()
        self._source = ""
        self._aliased: set[Path] = set()
        #: checkpoints with no step matching none read yet (:meth:`_unstepped`)
        self._held: dict[Path, _Held] = {}
        self._read_paths: set[Path] = set()
        #: folders below the directory holding checkpoint files (:meth:`_note_run_folder`)
        self._run_folders: list[str] = []
        #: what a failure is remembered with: the read settings it happened under
        self._settings_id = hashlib.sha256(
            json.dumps(dataclasses.asdict(config.read), sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        self.summary = Summary()
        #: True once the claim, the restart state and the sinks' start succeeded
        self.reading_started = False
        #: why the MLflow sink gave up replaying its spool (the run gone or another
        #: daemon's), from its retry thread: the loop stops and raises it (exit 2)
        self._gave_up: ConfigError | None = None
        if tracking is not None and hasattr(tracking, "on_give_up"):
            tracking.on_give_up = self._tracking_gave_up

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

    def hurry(self) -> None:
        """Ask the loop to stop now (a second signal): it abandons the checkpoint in hand
        at its next look (at least every half second while it waits for a load, a
        reading or the queue), raising KeyboardInterrupt there; that checkpoint is read
        by the next run. Safe from any thread; takes no lock the main thread holds long."""
        self._hurry.set()
        self.stop()

    def _abandon_if_hurried(self) -> None:
        """Called by the main loop where it waits: KeyboardInterrupt after :meth:`hurry`."""
        if self._hurry.is_set():
            self.abandoning = True
            raise KeyboardInterrupt

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _start(self, mode: str) -> None:
        self.state.claim()
        saved = self.state.get("detector")
        self._detector_step = int(self.state.get("detector_step", -1) or -1) if saved else -1
        if saved:
            try:
                self.detector = EventDetector.from_state(saved, self.config.events)
            except Exception as exc:  # a detector state from another version
                log.warning("could not restore event history (%s); starting fresh", exc)
        if self.tracking is not None:
            try:
                self._recorded = set(self.tracking.recorded_steps())
            except (RunLeaseError, StoreNotUsable):  # another daemon's run; a proxy's page,
                self.state.release()  # a certificate refused: settings errors, exit 2
                raise
            except ConfigError as exc:  # a deleted experiment or --run-id: said once, exit 2
                self.state.release()
                raise self._refused(exc) from exc
            except Exception as exc:
                log.warning("could not read recorded steps from MLflow: %s", exc)
            else:
                self._read_set_of_another_run()
        info = RunInfo(
            directory=self.config.directory,
            mode=mode,
            params=self.params(),
            automatic=frozenset(self.reader.automatic_params()),
        )
        for sink in self.sinks:
            if sink is self.tracking:
                try:
                    sink.start(info)
                except (StateError, RunLeaseError, StoreNotUsable):
                    self.state.release()
                    raise
                except Exception as exc:  # a bad URI, a request refused: stop before reading
                    self.state.release()
                    raise self._refused(exc) from exc
            else:
                self._call(sink, "start", info)
        self.reading_started = True
        log.info(
            "ddsmon %s: %s %s -> %s",
            __version__,
            mode,
            self.config.directory,
            redact_uri(self.config.tracking.tracking_uri),
        )

    def _refused(self, exc: Exception) -> ConfigError:
        uri = redact_uri(self.config.tracking.tracking_uri)
        return ConfigError(f"MLflow at {uri} refused the run: {exc}")

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
            mixed = self._note_run_folder(ref)
            step = ref.name_step
            heapq.heappush(
                self._queue, (float("inf") if step is None else step, next(self._seq), ref)
            )
            pending = len(self._queue) + self._in_hand
            self._cond.notify_all()
        if mixed:
            log.warning(
                "checkpoints in more than one folder of %s (%s) are read as one run, in "
                "step order: if they are different runs (two trainings, a restarted "
                "Lightning version_<n>/), their readings mix and equal steps are logged "
                "once; watch each folder on its own",
                shown(self.config.directory),
                ", ".join(f"{shown(name)}/" for name in mixed),
            )
        for sink in self.sinks:
            self._call(sink, "on_queue", pending)

    def _note_run_folder(self, ref: CheckpointRef) -> list[str]:
        """Note the folder a checkpoint (a file, or a Trainer's ``checkpoint-N/``) lies
        in, below the watched directory, when that folder is not a step's
        (``checkpoint_3/``, ``global_step800/``: one save of the run): a run's folder.
        The folders, when this one makes two such (said once), else []."""
        try:
            rel = ref.path.relative_to(self.config.directory)
        except ValueError:
            return []
        if len(rel.parts) != 2 or folder_step(rel.parts[0]) is not None:
            return []
        if ref.name_step is None or rel.parts[0] in self._run_folders:
            return []
        self._run_folders.append(rel.parts[0])
        return list(self._run_folders) if len(self._run_folders) == 2 else []

    def _settle(self) -> None:
        """The checkpoint being processed is done with (read, failed or skipped): one
        fewer pending, told to the sinks before its reading or failure is, so that a
        progress display never counts it twice (read and still queued)."""
        if not self._unsettled:
            return
        self._unsettled = False
        with self._cond:
            self._in_hand -= 1
            pending = len(self._queue) + self._in_hand
        for sink in self.sinks:
            self._call(sink, "on_queue", pending)

    def _next(self, block: bool) -> CheckpointRef | None:
        self._report_rejections()
        with self._cond:
            while not self._queue:
                if not block or self._stop.is_set():
                    return None
                if self._rejections:
                    break
                self._cond.wait(timeout=0.5)
                self._abandon_if_hurried()
            if self._queue:
                self._in_hand += 1
                return heapq.heappop(self._queue)[2]
        return self._next(block)

    # ------------------------------------------------------------------ modes
    def _check_directory(self, *, waiting: bool) -> None:
        """The directory exists (scan) and a factory or Hugging Face folders are there to
        build the model; ``waiting`` (watch) says what it waits for instead of failing."""
        directory = self.config.directory
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"checkpoint directory {shown(directory)} is not a directory")
        if not directory.is_dir():
            if not waiting:
                raise ConfigError(f"checkpoint directory {shown(directory)} does not exist")
            wait_for_directory(directory, self._stop)
        if (
            self.reader.factory is None
            and not self.reader.settings.trust_checkpoints  # torch.save(model) files
            and not has_hf_folders(directory)
        ):
            if waiting:
                log.warning(
                    "no --model: waiting for a Hugging Face folder in %s (checkpoint-N/, or "
                    "save_pretrained's config.json and weights), built from its config.json "
                    "(other checkpoints need --model)",
                    shown(directory),
                )
                return
            why = "".join(f"; {i} was ignored (not allowed)" for i in self.config.ignored)
            raise ConfigError(
                "no model factory: give --model MODULE:FACTORY (or model = ... in ddsmon.toml; "
                "checkpoints that hold the pickled model itself, torch.save(model), are read "
                "with --trust-checkpoints)" + why
            )

    def scan(self) -> Summary:
        """Read what is in the directory now, in step order, then return."""
        self._check_directory(waiting=False)
        self._start("scan")
        try:
            found = discover(self.config.directory, self.watching.exclude)
            self._say_where_they_are(found)
            for ref in found:
                reason = check_complete(ref)
                if reason is not None:
                    self._fail(ref, f"incomplete: {reason}")
                    continue
                self.enqueue(ref)
            self._drain(block=False)
            self._raise_if_gave_up()
        finally:
            self._finish()
        return self.summary

    def watch(self) -> Summary:
        """Read what is there, then every checkpoint that completes, until stop()."""
        from ddsmon.watcher import CheckpointWatcher

        self._check_directory(waiting=True)
        if self._stop.is_set():
            return self.summary
        watcher = CheckpointWatcher(
            self.config.directory,
            self.enqueue,
            poll=self.watching.poll,
            quiet=self.watching.quiet,
            on_vanished=self._vanished,
            on_rejected=self._rejected,
            exclude=self.watching.exclude,
        )
        self._start("watch")
        try:
            watcher.start()
            found = discover(self.config.directory, self.watching.exclude)
            self._say_where_they_are(found)
            for ref in found:
                if check_complete(ref) is None:
                    self.enqueue(ref)
                else:  # perhaps still being written: the watcher waits, then judges it
                    watcher.track(ref.path)
            self._drain(block=True)
            self._raise_if_gave_up()
        finally:
            watcher.stop()
            self._finish()
        return self.summary

    def _tracking_gave_up(self, exc: ConfigError) -> None:
        """The MLflow sink cannot write its run any more (its retry thread found it gone,
        or another daemon's): stop now, rather than idle until the next checkpoint meets
        the same error; :meth:`watch` then raises it (exit 2, the spool kept; started
        again, ddsmon logs into a new run, :meth:`_read_set_of_another_run`)."""
        self._gave_up = exc
        self.stop()

    def _raise_if_gave_up(self) -> None:
        if self._gave_up is not None:
            raise self._gave_up

    def _say_where_they_are(self, found: list[CheckpointRef]) -> None:
        """Nothing found at start: say so where a look below finds why
        (:func:`ddsmon.checkpoints.where_checkpoints_are`)."""
        for link, target in linked_folders(self.config.directory):
            log.warning(
                "%s is a symbolic link to the folder %s, which holds checkpoints: not read "
                "(links are not followed into folders); watch %s itself",
                shown(link),
                shown(target),
                shown(target),
            )
        if not found:
            why = where_checkpoints_are(self.config.directory)
            if why is not None:
                log.warning("%s", shown(why))

    def _rejected(self, path: Path, reason: str) -> None:
        """A file that settled incomplete (watcher thread): reported by the reading loop."""
        with self._cond:
            self._rejections.append((Path(path), reason))
            self._cond.notify_all()

    def _report_rejections(self) -> None:
        with self._cond:
            pending, self._rejections = self._rejections, []
        for path, reason in pending:
            self._fail_path(path, f"incomplete: {reason}")

    # ------------------------------------------------------------------ reading
    def _drain(self, block: bool) -> None:
        """Read queued checkpoints; load the next one while reading the current one.

        A stop never waits for a load: not for the one ahead while the current checkpoint
        is read (the loader is a daemon thread, left to finish or be dropped at exit), nor
        for the one the loop waits on. A checkpoint loaded and not read is not marked
        done, so the next run reads it. A checkpoint with no step that matches no step
        read is held and judged after each later reading, said to have no step once the
        queue runs dry (under ``watch``) or at the end (:meth:`_say_held`)."""
        loader = _Loader()
        try:
            current = self._next(block)
            future = self._submit(loader, current)
            while current is not None and not self._stop.is_set():
                upcoming = self._next(False) if self.watching.prefetch else None
                loaded = self._result(future, current)
                if loaded is _STOPPED:
                    break
                future = self._submit(loader, upcoming)
                self._unsettled = True
                try:
                    self._process(current, loaded)
                finally:
                    self._settle()
                if upcoming is None:
                    if block and self._held and not self._queue:  # watch: said, kept
                        self._say_held(final=False)
                    upcoming = self._next(block)
                    future = self._submit(loader, upcoming)
                current = upcoming
            self._say_held(final=True)
        finally:
            loader.close()

    def _result(self, future: Future | None, ref: CheckpointRef | None = None) -> Any:
        """The load of ``ref``'s result, waited for until it comes or the daemon is asked
        to stop (then :data:`_STOPPED`). A wait past :meth:`_slow_load_after` seconds (the
        user's model factory hanging, or a filesystem that does not answer) is said once,
        naming the checkpoint and the factory."""
        if future is None:
            return None
        started = time.monotonic()
        said_slow = False
        while True:
            try:
                result = future.result(timeout=0.1)
            except FutureTimeout:
                self._abandon_if_hurried()
                if self._stop.is_set():
                    future.cancel()
                    return _STOPPED
                waited = time.monotonic() - started
                if not said_slow and ref is not None and waited > self._slow_load_after():
                    said_slow = True
                    log.warning(
                        "still loading %s after %.0f s of waiting for it (a load usually "
                        "takes %s): it reads the file and runs --model %s, user code that "
                        "may hang, from a filesystem that may stall; a signal stops now (it "
                        "is read next time)",
                        shown(ref.path),
                        waited,
                        _usual(self._load_seconds),
                        shown(self.config.read.model),
                    )
                continue
            if isinstance(result, LoadedCheckpoint):
                self._load_seconds.append(float(result.meta.get("_load_seconds", 0.0)))
            return result

    def _submit(self, loader: _Loader, ref: CheckpointRef | None) -> Future | None:
        if ref is None:
            return None
        if self._is_done(ref):
            done: Future = Future()
            done.set_result(None)
            return done
        return loader.submit(lambda: self._load(ref))

    def _is_done(self, ref: CheckpointRef) -> bool:
        try:
            return self.state.is_done(str(ref.path), fingerprint(ref))
        except OSError:
            return False

    def _read_set_of_another_run(self) -> None:
        """Which steps count as recorded comes from the run this daemon now logs into
        (and the spool, replayed into it): every step the read-set marks as read that
        neither holds is taken out of the read-set, so its checkpoint is read again into
        this run. Before, a run holding any of them was taken for this run's own history
        and left as it was: a server restarted on a wiped store while readings were
        spooled got only the spooled steps, the earlier ones lost without a word.

        * None of the steps held (``--tracking-uri`` or ``--experiment`` changed,
          ``--run-id`` given, the store deleted to start over, nothing spooled): every
          checkpoint is read again with a fresh event history, and the checkpoints whose
          reading failed are read again too (their failures were told to the other run
          only; a fault of the file fails again and is recorded here, one the user has
          fixed since is read).
        * Some held (a run or its store gone while readings were spooled, a store
          restored from an older backup): the missing steps are read again, the event
          history kept (it has seen them: their readings are logged, no event is judged
          again for them, :meth:`_process`).

        Either way the hooks and ``--events-json`` are not told those steps again, and a
        missing step whose checkpoint file is gone (rotated away) is said once, by step,
        as lost for this run, and dropped from the read-set."""
        held = getattr(self.tracking, "run_steps", None)
        if held is None:  # not known (the server unreachable): keep the read-set
            return
        done = self.state.done_steps()
        missing = done - self._recorded
        if not missing:
            return
        run_id = getattr(self.tracking, "run_id", None)
        every = missing == done
        failed = (self.state.get("failed") or {}) if every else {}
        paths = self.state.done_paths(missing)
        gone = {step for path, step in paths.items() if not Path(path).exists()}
        gone -= {step for path, step in paths.items() if Path(path).exists()}
        log.warning(
            "the state %s marks %d checkpoint(s) as read (steps %s), but MLflow run %s "
            "holds %s: they were recorded elsewhere (another tracking URI, experiment or "
            "run, or a run or store since deleted); reading them again into this run%s",
            shown(self.state.root),
            len(missing),
            _steps_shown(missing),
            run_id,
            "none of them" if every else "only the others (or has them spooled)",
            f", and the {len(failed)} that failed, so that it records their failures too"
            if failed
            else "",
        )
        if gone:
            log.warning(
                "step%s %s: the checkpoint file%s gone, so MLflow run %s will not hold "
                "%s (lost for this run)",
                "" if len(gone) == 1 else "s",
                _steps_shown(gone),
                " is" if len(gone) == 1 else "s are",
                run_id,
                "it" if len(gone) == 1 else "them",
            )
        self.state.forget(missing)
        self._told_before |= missing
        if not every:
            return
        if failed:  # their failures (ddsmon.failure.<file> tags) are the other run's too
            self.state.set("failed", {})
        self.detector = EventDetector(self.config.events)
        self._detector_step = -1
        self.state.update({"detector": self.detector.to_state(), "detector_step": -1})

    def _load(self, ref: CheckpointRef) -> LoadedCheckpoint | CheckpointError:
        started = time.perf_counter()
        try:
            before: tuple[int, int] | None = fingerprint(ref)
        except OSError:
            before = None  # gone: the load says so
        try:
            loaded = self.reader.load(ref)
        except CheckpointError as exc:
            return exc
        except ConfigError as exc:  # the model factory raised or returned no module
            return _SettingFault(ref.path, str(exc))
        except SystemExit as exc:  # user code called sys.exit: a failure, not our exit
            return _SettingFault(ref.path, f"the model factory called sys.exit({exc.code!r})")
        except KeyboardInterrupt as exc:  # on the loader's thread: user code raised it
            return _SettingFault(
                ref.path,
                f"KeyboardInterrupt raised while loading (--model {self.config.read.model})"
                f"{_raised_at(exc)}; not a signal: a failure of this checkpoint",
            )
        except Exception as exc:  # a factory or format we did not foresee: still a report
            return CheckpointError(ref.path, f"{type(exc).__name__}: {exc}")
        loaded.meta["_load_seconds"] = time.perf_counter() - started
        loaded.fingerprint = before
        return loaded

    def _process(
        self, ref: CheckpointRef, loaded: LoadedCheckpoint | CheckpointError | None
    ) -> None:
        # the version loaded: the file may have been rewritten since (a latest.pt saved
        # again while it was loaded ahead), and that version is read on its own, or
        # deleted (a trainer's rotation), and what was loaded is still read
        fp = loaded.fingerprint if isinstance(loaded, LoadedCheckpoint) else None
        if fp is None:
            try:
                fp = fingerprint(ref)
            except OSError:
                self._vanished(ref.path)
                return
        if loaded is None or self.state.is_done(str(ref.path), fp):
            self.summary.skipped += 1
            return
        earlier = self._failed_before(ref, fp)
        if earlier is not None:
            log.warning(
                "%s failed in an earlier run and has not changed since; not read again (%s)",
                shown(ref.path),
                shown(earlier),
            )
            self.summary.skipped += 1
            return
        if isinstance(loaded, _SettingFault):  # fails on every checkpoint: said once, stop
            self._reading_failed(ref, fp, loaded.reason, ref.name_step)
            return
        if isinstance(loaded, CheckpointError):
            if loaded.reason == VANISHED:
                self._vanished(ref.path)
                return
            self._fail(ref, loaded.reason)
            return
        step = checkpoint_step(ref, loaded)
        try:
            digest = weights_digest(loaded.model)
        except Exception as exc:  # the user's model holds tensors that cannot be read
            self._reading_failed(ref, fp, f"{type(exc).__name__}: {exc}", step)
            return
        if step is None:
            self._unstepped(ref, fp, digest, loaded)
            return
        if not 0 <= step <= MAX_STEP:
            self._fail(ref, f"step {step} is outside MLflow's range 0..2^63-1", None)
            return
        replaying = step in self._recorded
        self._say_source(ref, loaded)
        if replaying and step <= self._detector_step:
            self._already_recorded(ref, step, digest, loaded)
            self.state.mark_done(str(ref.path), fp, step)
            self._read_unlogged(ref)
            self.summary.skipped += 1
            return
        load_seconds = float(loaded.meta.pop("_load_seconds", 0.0))
        try:
            sig = self._read(loaded.model, ref.path)
        except DDSError as exc:
            self._reading_failed(ref, fp, str(exc), step)
            return
        except Exception as exc:  # the user's model, probe or loss raised: this checkpoint's
            self._reading_failed(ref, fp, f"{type(exc).__name__}: {exc}", step)
            return
        del loaded.model
        self._faults.success()
        meta = {k: float(v) for k, v in loaded.meta.items()}
        events: list[Event] = []
        if step in self._told_before and step <= self._detector_step:
            pass  # read again for a run that lacked it: the event history has seen it
        else:
            events = self.detector.update(
                step,
                {name: s.to_dict() for name, s in sig.layers.items()},
                meta=meta,
                probe_loss=sig.fitted_loss,
            )
            sig = sig.with_derived(self.detector.last_derived)  # dying_directions, per layer
        reading = CheckpointReading(
            step=step,
            path=ref.path,
            signatures=sig,
            fingerprint=fp,
            meta=meta,
            trainer_log=list(loaded.trainer_log),
            load_seconds=load_seconds,
            read_seconds=sig.seconds,
        )
        if replaying:
            # in MLflow already (a kill between its write and the state write): the
            # detector sees the step again, MLflow is not written twice
            self._read_unlogged(ref)
            log.info(
                "step %d (%s) is already in the MLflow run; its readings fed the event "
                "history again, not logged again",
                step,
                shown(ref.path),
            )
        elif self.tracking is not None:
            try:
                self.tracking.on_reading(reading, events)
            except (StateError, RunLeaseError):
                # the state directory (its spool) cannot be written, or another daemon took
                # the run over: stop; nothing is lost (the new holder reads this checkpoint)
                raise
            except Exception as exc:
                # not recorded (the sink spools what it cannot send; this is anything else):
                # not marked done, so a restart reads it again
                self._fail(ref, f"readings not recorded in MLflow: {exc}", step)
                return
        self._settle()
        for sink in self.sinks:
            if sink is self.tracking:
                continue
            if step in self._told_before and _told_once(sink):
                # read again for a run that lacked it: its events were run through the
                # hooks and written to --events-json when first read (no second page)
                continue
            self._call(sink, "on_reading", reading, events)
        self._recorded.add(step)
        self._remember(digest, step, ref)
        self._judge_held(digest, step, ref)
        self._read_paths.add(ref.path)
        self.state.mark_done(str(ref.path), fp, step)
        self._detector_step = max(self._detector_step, step)
        self.state.update(
            {
                "detector": self.detector.to_state(),
                "detector_step": self._detector_step,
                **self._failure_forgotten(ref),
            }
        )
        self.summary.read += 1
        self.summary.events.extend(events)
        if sig.layers and not any(s.finite for s in sig.layers.values()):
            self.summary.nonfinite.append(step)

    def _read(self, model: Any, path: Path | None = None) -> Any:
        """The reading, in a worker thread when called from the main thread, so that
        signals are handled at once even during a long eigensolve (two SIGINTs 0.2 s
        apart stay two: the second abandons the checkpoint).

        A reading that runs past :meth:`_slow_after` seconds (the user's model or loss
        hanging: a lock, a network call, an endless loop) is said once, naming the
        checkpoint and the code it runs; a stop asked meanwhile is said once too (the
        first signal waits for the checkpoint in hand), with how to stop at once."""
        if threading.current_thread() is not threading.main_thread():
            try:
                return self.reader.read(model)
            except SystemExit as exc:
                raise RuntimeError(f"sys.exit({exc.code!r}) called during the reading") from None
            except KeyboardInterrupt as exc:
                raise self._user_interrupt(exc) from None
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = self.reader.read(model)
            except SystemExit as exc:  # the user's model or loss called sys.exit
                box["error"] = RuntimeError(f"sys.exit({exc.code!r}) called during the reading")
            except KeyboardInterrupt as exc:  # raised by user code: signals never reach here
                box["error"] = self._user_interrupt(exc)
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=work, name="ddsmon-read", daemon=True)
        started = time.monotonic()
        slow_after = self._slow_after()
        said_slow = said_stop = False
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.05)
            self._abandon_if_hurried()
            elapsed = time.monotonic() - started
            if not said_slow and elapsed > slow_after:
                said_slow = True
                log.warning(
                    "the reading of %s has run %.0f s (usually %s): its probe pass runs the "
                    "model and --loss %s, user code that may hang; still waiting (a second "
                    "signal stops at once)",
                    shown(path),
                    elapsed,
                    self._usual_reading(),
                    shown(self.config.read.loss),
                )
            if not said_stop and self._stop.is_set() and elapsed > _STOP_SAID_AFTER:
                said_stop = True
                log.warning(
                    "waiting for the reading of %s to finish (running %.0f s); signal again "
                    "to stop now (it is read again next time)",
                    shown(path),
                    elapsed,
                )
        if "error" in box:
            raise box["error"]
        self._read_seconds.append(time.monotonic() - started)
        return box["value"]

    def _slow_after(self) -> float:
        """Seconds after which a reading is said to be slow: ten times the median of the
        last readings, at least :data:`SLOW_READING` (a first reading of a large model on
        a busy machine takes minutes)."""
        return max(SLOW_READING, 10.0 * _median_or_zero(self._read_seconds))

    def _slow_load_after(self) -> float:
        """The same for a load: ten times the median of the last loads, at least
        :data:`SLOW_READING`."""
        return max(SLOW_READING, 10.0 * _median_or_zero(self._load_seconds))

    def _usual_reading(self) -> str:
        return _usual(self._read_seconds, "no reading done yet")

    def _user_interrupt(self, exc: KeyboardInterrupt) -> RuntimeError:
        """A KeyboardInterrupt raised during a reading, on a thread that no signal reaches
        (ddsmon's own stop requests are handled on its signals' thread, and a second
        one is raised by the main loop, :meth:`hurry`): the user's code raised it (the
        loss, the model, the probe's code), and it is that checkpoint's failure, naming
        the loss and where it was raised, as any other exception of theirs is."""
        return RuntimeError(
            f"KeyboardInterrupt raised during the reading (--loss {self.config.read.loss})"
            f"{_raised_at(exc)}; not a signal: a failure of this checkpoint"
        )

    def _reading_failed(
        self, ref: CheckpointRef, fp: tuple[int, int], reason: str, step: int | None
    ) -> None:
        """A reading that raised: that checkpoint's failure, not retried unless the file
        changes; the same error on several checkpoints in a row before any success is a
        setting's fault (the probe, the loss, the layers): said once, and the daemon stops."""
        self._fail(ref, reason, step)
        self._mark_failed(ref, fp, reason)
        if self._faults.failure(reason, str(ref.path)):
            paths = self._faults.paths
            raise ConfigError(
                f"the same error ended the reading of {len(paths)} checkpoints in a row "
                f"({', '.join(shown(Path(p).name) for p in paths)}), and none was read: the "
                f"probe, the loss or the layer selection is at fault (or the model factory), "
                f"not the checkpoints: {shown(reason)}"
            )

    def _mark_failed(self, ref: CheckpointRef, fp: tuple[int, int], reason: str) -> None:
        failed = dict(self.state.get("failed") or {})
        failed[str(ref.path)] = [fp[0], fp[1], self._settings_id, reason]
        self.state.set("failed", failed)

    def _read_unlogged(self, ref: CheckpointRef) -> None:
        """``ref`` was read without fault and logs no reading (an alias, a step the run
        holds, no step): a failure told of it before is cleared, the tracking sink's
        ``ddsmon.failure.<file>`` tag (``on_file_read``, where the sink has it) and the
        state's entry. A tag that cannot be cleared now stays spooled, or is warned of."""
        hook = getattr(self.tracking, "on_file_read", None)
        if hook is not None:
            try:
                hook(ref.path)
            except (StateError, RunLeaseError):
                raise  # as on_reading: the spool cannot be written, or the run is taken
            except Exception as exc:
                log.warning("%s: its failure tag was not cleared: %s", shown(ref.path), exc)
        forgotten = self._failure_forgotten(ref)
        if forgotten:
            self.state.update(forgotten)

    def _failure_forgotten(self, ref: CheckpointRef) -> dict[str, Any]:
        """The state's ``failed`` without ``ref``'s entry, as ``{"failed": ...}`` to
        write, when it has one (an earlier version of the file failed, this one was
        read); else ``{}``."""
        failed = dict(self.state.get("failed") or {})
        if failed.pop(str(ref.path), None) is None:
            return {}
        return {"failed": failed}

    def _failed_before(self, ref: CheckpointRef, fp: tuple[int, int]) -> str | None:
        """The reason an unchanged checkpoint failed in an earlier run with the same read
        settings, or None (a changed file, or other settings, is read again)."""
        entry = (self.state.get("failed") or {}).get(str(ref.path))
        if (
            isinstance(entry, list)
            and len(entry) == 4
            and (entry[0], entry[1]) == tuple(fp)
            and entry[2] == self._settings_id
        ):
            return str(entry[3])
        return None

    def _remember(self, digest: str, step: int, ref: CheckpointRef) -> None:
        digests = dict(self.state.get("digests") or {})
        digests[digest] = [step, ref.path.name]
        if len(digests) > _MAX_DIGESTS:
            digests = dict(list(digests.items())[-_MAX_DIGESTS:])
        self.state.set("digests", digests)

    def _vanished(self, path: Path) -> None:
        """A checkpoint deleted before it could be read (a trainer's rotation,
        ``save_total_limit``): said at the default level, named and counted."""
        if Path(path) in self._read_paths:  # read before the trainer rotated it away
            return
        log.warning(
            "%s was deleted before it could be read (rotated away by the trainer?); not logged",
            shown(path),
        )
        self.summary.skipped += 1
        self.summary.vanished.append(Path(path))

    def _say_source(self, ref: CheckpointRef, loaded: LoadedCheckpoint) -> None:
        """Which weights were read (a prefix stripped, an EMA copy ignored): said once per
        run at INFO (``-v``: it is how a normal read went, not a problem; a load that
        fails says why at the default level), and again only when it changes."""
        source = loaded.source
        if source and source != self._source:
            self._source = source
            log.info("%s: read the state dict %s", shown(ref.path), shown(source))

    def _already_recorded(
        self, ref: CheckpointRef, step: int, digest: str, loaded: LoadedCheckpoint
    ) -> None:
        """A step the run holds already: an alias (``last.ckpt``) when another file with
        these weights was read at that step, said once per path, its trainer scalars
        that the step lacks added to it (:meth:`_alias_scalars`); else a plain repeat."""
        known = (self.state.get("digests") or {}).get(digest)
        if known is not None and known[1] != ref.path.name:
            meta = {k: float(v) for k, v in loaded.meta.items() if not k.startswith("_")}
            added = self._alias_scalars(ref, step, meta) if int(known[0]) == step else {}
            if ref.path not in self._aliased:
                self._aliased.add(ref.path)
                log.warning(
                    "%s holds the same weights as step %d (%s): an alias, not logged again%s",
                    shown(ref.path),
                    step,
                    shown(known[1]),
                    _scalars_added(added),
                )
                self.summary.aliases.append((ref.path, step))
                return
            if added:
                log.info("%s: %s", shown(ref.path), _scalars_added(added).lstrip("; "))
            return
        if known is None and self._read_before_at(ref, step):
            # the same file saved again with other weights: a run resumed from an earlier
            # checkpoint re-saving a step it had saved before it was stopped
            log.warning(
                "%s was saved again at step %d with other weights (a run resumed from an "
                "earlier checkpoint?): the MLflow run keeps the readings of the version "
                "read first; not logged again",
                shown(ref.path),
                step,
            )
            self.summary.duplicates.append((ref.path, step))
            return
        if known is None:  # other weights at a step the run holds: a duplicate step
            log.warning(
                "%s holds step %d, which the run already has from another checkpoint with "
                "other weights: not logged again (two checkpoints saved with one step?)",
                shown(ref.path),
                step,
            )
            self.summary.duplicates.append((ref.path, step))
            return
        log.info(
            "step %d (%s) is already in the MLflow run; not logged again", step, shown(ref.path)
        )

    def _read_before_at(self, ref: CheckpointRef, step: int) -> bool:
        """Whether a file of this name was read at ``step`` (the weights digests kept)."""
        for value in (self.state.get("digests") or {}).values():
            if isinstance(value, list) and len(value) == 2:
                if value[0] == step and value[1] == ref.path.name:
                    return True
        return False

    def _alias_scalars(
        self, ref: CheckpointRef, step: int, meta: dict[str, float]
    ) -> dict[str, float]:
        """An alias's trainer scalars (its ``meta``: a Lightning ``best-*.ckpt``'s
        monitored ``val_loss``) added to ``step``, the step whose weights it holds, where
        the step has no value of them (:meth:`MlflowSink.on_alias
        <ddsmon.sinks.tracking.MlflowSink.on_alias>`): what a reading of the file would
        have logged, whichever of the two files was read first. The scalars added."""
        hook = getattr(self.tracking, "on_alias", None)
        if not meta or hook is None:
            return {}
        try:
            return dict(hook(step, ref.path, meta))
        except (StateError, RunLeaseError):
            raise  # as on_reading: the spool cannot be written, or the run is taken
        except Exception as exc:
            log.warning(
                "%s: its trainer scalars were not added to step %d: %s",
                shown(ref.path),
                step,
                shown(exc),
            )
            return {}

    def _unstepped(
        self, ref: CheckpointRef, fp: tuple[int, int], digest: str, loaded: LoadedCheckpoint
    ) -> None:
        """A checkpoint with no step in its content or name: an alias of the step read
        with these weights (its trainer scalars added to that step,
        :meth:`_alias_scalars`), else held (:class:`_Held`) and judged again after each
        later reading (:meth:`_judge_held`): a Trainer's final ``save_model()`` file is
        ready before the ``checkpoint-N/`` folders (they wait for ``trainer_state.json``
        to settle), so under ``watch`` it comes first, and it is an alias once the step
        with its weights is read, as in a ``scan``. A file still unmatched when the queue
        runs dry is said to have no step (:meth:`_say_held`)."""
        known = (self.state.get("digests") or {}).get(digest)
        meta = {k: float(v) for k, v in loaded.meta.items() if not k.startswith("_")}
        if known is not None:
            self._aliased_unstepped(ref, fp, int(known[0]), str(known[1]), meta)
            self.summary.skipped += 1
            return
        self._held[ref.path] = _Held(ref, fp, digest, meta)
        log.info(
            "%s has no training step and holds the weights of no checkpoint read so far: "
            "held, and compared again with each checkpoint read next",
            shown(ref.path),
        )

    def _aliased_unstepped(
        self, ref: CheckpointRef, fp: tuple[int, int], step: int, name: str, meta: dict[str, float]
    ) -> None:
        """An unstepped checkpoint holding the weights of ``step`` (file ``name``)."""
        added = self._alias_scalars(ref, step, meta)
        log.warning(
            "%s holds the same weights as step %d (%s): an alias, not logged again%s",
            shown(ref.path),
            step,
            shown(name),
            _scalars_added(added),
        )
        self.summary.aliases.append((ref.path, step))
        self.state.mark_done(str(ref.path), fp, None)
        self._read_unlogged(ref)

    def _judge_held(self, digest: str, step: int, ref: CheckpointRef) -> None:
        """After a reading of ``step`` (``ref``, weights ``digest``): a held unstepped
        checkpoint with these weights is an alias of it now."""
        for path, held in list(self._held.items()):
            if held.digest != digest or path == ref.path:
                continue
            del self._held[path]
            if held.said:  # said to have no step when the queue ran dry: not any more
                self.summary.unstepped.remove(path)
            else:
                self.summary.skipped += 1
            self._aliased_unstepped(held.ref, held.fp, step, ref.path.name, held.meta)

    def _say_held(self, *, final: bool) -> None:
        """The queue ran dry: each held checkpoint not said yet is said to have no step
        (at the default level, counted in the summary). Under ``watch`` (not ``final``)
        it stays held and becomes an alias if a checkpoint read later holds its
        weights. ``final`` (the end of a scan or watch): the held ones are marked done,
        so the next run does not say it again, unless a stop left checkpoints queued
        (then the next run judges them again)."""
        for path, held in list(self._held.items()):
            if not held.said:
                held.said = True
                later = "" if final else " so far (an alias if a checkpoint read later holds them)"
                log.warning(
                    "%s has no training step (none in its content or its name) and holds "
                    "the weights of no checkpoint read%s: not logged, since readings are "
                    "logged against steps (save the step in it, e.g. torch.save("
                    "{'state_dict': ..., 'step': N}), or name it step_N)",
                    shown(path),
                    later,
                )
                self.summary.unstepped.append(path)
                self.summary.skipped += 1
            if final:
                del self._held[path]
                with self._cond:  # none queued, none taken off the queue and left unread
                    drained = not self._queue and self._in_hand == 0
                if drained:
                    self.state.mark_done(str(path), held.fp, None)
                    self._read_unlogged(held.ref)

    def _fail(self, ref: CheckpointRef, reason: str, step: int | None = None) -> None:
        self._fail_path(ref.path, reason, step)

    def _fail_path(self, path: Path, reason: str, step: int | None = None) -> None:
        failure = CheckpointFailure(path=path, reason=reason, step=step)
        where = "" if step is None else f" (step {step})"
        log.warning("cannot read %s%s: %s", shown(path), where, shown(reason))
        self.summary.failed += 1
        self.summary.failures.append(failure)
        self._settle()  # a failure of the checkpoint in hand (a no-op for a rejection)
        for sink in self.sinks:
            self._call(sink, "on_failure", failure)

    @staticmethod
    def _call(sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            log.warning("sink %s.%s failed: %s", type(sink).__name__, method, shown(exc))
            log.debug("sink %s.%s failed", type(sink).__name__, method, exc_info=True)
        except SystemExit as exc:
            # rich's answer to a closed stdout pipe (`ddsmon scan DIR | head`): it points
            # stdout at /dev/null and raises SystemExit(1). The terminal is a view of the
            # readings, not their record: the daemon goes on recording without it.
            if sink not in _ENDED_SINKS:
                _ENDED_SINKS.add(sink)
                log.warning(
                    "sink %s.%s ended (exit %s: its output closed?); reading and recording "
                    "go on without its output",
                    type(sink).__name__,
                    method,
                    exc.code,
                )


#: Sinks that raised SystemExit (see :meth:`Daemon._call`), said once each.
_ENDED_SINKS: weakref.WeakSet[Any] = weakref.WeakSet()

_STOPPED = object()
"""What :meth:`Daemon._result` returns when the daemon stopped before the load ended."""


class _Loader:
    """The thread that loads the next checkpoint ahead: one daemon thread, one job at a
    time, each a Future. Unlike a ThreadPoolExecutor (whose exit, and the interpreter's,
    joins its worker), closing it never waits for a load in flight (a torch.load of a
    large file can take minutes): the job still running is left to finish, its result
    dropped, and queued ones are cancelled."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddsmon-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            keep_this_thread_single()
        except Exception:  # a thread setting: loads still work without it
            log.debug("keep_this_thread_single failed in the loader", exc_info=True)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, work = job
            if self._closed.is_set():
                future.cancel()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, work: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((future, work))
        return future

    def close(self) -> None:
        """Stop after the job in flight (not waited for); jobs not started are cancelled."""
        self._closed.set()
        self._jobs.put(None)


@dataclass
class _Held:
    """A checkpoint with no step whose weights match no step read yet
    (:meth:`Daemon._unstepped`): judged again after each reading; ``said``: said to
    have no step once the queue ran dry."""

    ref: CheckpointRef
    fp: tuple[int, int]
    digest: str
    meta: dict[str, float]
    said: bool = False


class _SettingFault(CheckpointError):
    """A load that failed because of a setting (the model factory), not the file."""


def wait_for_directory(directory: Path, stop: threading.Event | None = None) -> bool:
    """Wait until ``directory`` exists (start the watcher, then the trainer), saying so;
    False when ``stop`` was set first. Nothing is created meanwhile: the state directory
    inside it is claimed only once the trainer made it."""
    if directory.is_dir():
        return True
    log.warning("waiting for %s to be created", shown(directory))
    stop = stop or threading.Event()
    while not directory.is_dir():
        if directory.exists():
            raise ConfigError(f"checkpoint directory {shown(directory)} is not a directory")
        if stop.wait(0.25):
            return False
    log.warning("%s exists now; watching it", shown(directory))
    return True


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _detach_from_terminal(fds: list[int]) -> None:
    """Point ``fds`` (standard streams that were on the terminal) at ``/dev/null``."""
    if not fds:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in fds:
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


def _told_once(sink: Sink) -> bool:
    """Whether ``sink`` is told of a step once, whatever run it goes to (the hooks, the
    events file): a step read again into another run
    (:meth:`Daemon._read_set_of_another_run`) is not passed to it a second time."""
    from ddsmon.sinks.alerts import CommandHookSink, EventsJsonSink

    return isinstance(sink, (CommandHookSink, EventsJsonSink))


def _scalars_added(added: dict[str, float]) -> str:
    """``; its val_loss=1.389 logged at that step`` for an alias's scalars added to its
    step, else ``""``."""
    if not added:
        return ""
    return "; its " + ", ".join(f"{k}={v:.4g}" for k, v in added.items()) + " logged at that step"


def _raised_at(exc: BaseException) -> str:
    """`` at FILE:LINE in FUNCTION``: the innermost frame of ``exc``'s traceback outside
    ddsmon, torch and the standard library (the user's code), else ``""``."""
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _is_user_code(code.co_filename):
            found = f" at {shown(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"
        tb = tb.tb_next
    return found


_OWN_CODE = (
    str(Path(__file__).resolve().parent),
    sysconfig.get_paths()["stdlib"],
    sysconfig.get_paths()["purelib"],
    sysconfig.get_paths()["platlib"],
)


def _is_user_code(filename: str) -> bool:
    """Whether ``filename`` is the user's code: not ddsmon's, the standard library's or
    an installed package's (torch), nor frozen or built-in."""
    if filename.startswith("<"):
        return False
    try:
        resolved = str(Path(filename).resolve())
    except OSError:
        resolved = filename
    return not any(resolved.startswith(p) for p in _OWN_CODE) and "site-packages" not in resolved


def _steps_shown(steps: Iterable[int], most: int = 8) -> str:
    """``1, 2, 3`` or ``1, 2, ..., 500`` (a few, then the last)."""
    ordered = sorted(steps)
    if len(ordered) <= most:
        return ", ".join(map(str, ordered))
    return ", ".join(map(str, ordered[: most - 1])) + f", ..., {ordered[-1]}"


def has_hf_folders(directory: Path) -> bool:
    """True when ``directory`` holds a Hugging Face folder, a Trainer's ``checkpoint-N/``
    or a ``save_pretrained`` one (built from its ``config.json``, so no model factory is
    needed)."""
    try:
        return any(
            (ref := classify(p, directory)) is not None and ref.kind == "hf"
            for p in directory.iterdir()
        )
    except OSError:
        return False


#: The least seconds after which a reading, or a load, is said to be slow
#: (:meth:`Daemon._read`, :meth:`Daemon._result`).
SLOW_READING = 300.0


def _median_or_zero(seconds: Iterable[float]) -> float:
    done = sorted(seconds)
    return done[len(done) // 2] if done else 0.0


def _usual(seconds: Iterable[float], none: str = "none done yet") -> str:
    """The median of ``seconds`` for a log line, or ``none``."""
    done = list(seconds)
    return f"{_median_or_zero(done):.1f} s" if done else none


#: A stop asked during a reading that has run this long is said (the first signal waits).
_STOP_SAID_AFTER = 5.0

#: Seconds a second signal gives the main loop to notice it and abandon the checkpoint
#: (it looks at least every half second while it waits for a load, a reading or the
#: queue) before the process exits at once: a main thread busy elsewhere (an MLflow
#: request that hangs) still stops.
_HURRY_GRACE = 3.0

#: The exit status of an interrupted run, as the CLI's (128 + SIGINT).
_EXIT_INTERRUPTED = 130


class _Signals:
    """The daemon's signals, handled on a thread of their own (``ddsmon-signals``).

    The handler Python runs on the main thread does nothing but note a hangup: the
    signal number reaches this thread through :func:`signal.set_wakeup_fd` (a byte written
    by the C-level handler: no lock taken, nothing raised, even while the main thread is
    blocked in C code). A handler that took a lock (``Daemon.stop``'s condition) or
    raised (KeyboardInterrupt for the second signal) could deadlock the daemon: handlers
    run nested, and a second signal microseconds after the first (GNU ``timeout`` signals
    its child and its process group) raised inside the first one's lock acquire, leaving
    the lock held by a thread that then waited on it for good.

    The first SIGINT/SIGTERM/SIGHUP calls ``daemon.stop()`` (the current checkpoint is
    finished, then sinks flush); a second one calls ``daemon.hurry()``: the main loop
    abandons the checkpoint at its next look (KeyboardInterrupt, raised there), or, when
    it has not within :data:`_HURRY_GRACE` seconds (a third signal: at once), the process
    exits with status 130 from this thread."""

    def __init__(self, daemon: Any, signals: Iterable[int], on_terminal: list[int]) -> None:
        self.daemon = daemon
        self.signals = set(signals)
        self.on_terminal = on_terminal
        self.count = 0
        self.hangup = False
        self.hurried = False
        self.finished = threading.Event()
        self._read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self._thread = threading.Thread(target=self._run, name="ddsmon-signals", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """After the wakeup fd is put back: the signals already noted are handled, then
        the thread ends."""
        self.finished.set()
        os.close(self.write_fd)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            os.close(self._read_fd)

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.signals:
                    self._one(signum)

    def _one(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.hangup = True
            _detach_from_terminal(self.on_terminal)
            if self.count:
                # a hangup comes twice (the kernel signals the terminal's foreground job,
                # then the shell, hung up too, each of its jobs): not someone asking again
                return
        self.count += 1
        if self.count == 1:
            log.warning("signal %d: finishing the current checkpoint, then stopping", signum)
            self.daemon.stop()
            return
        self.hurried = True
        hurry = getattr(self.daemon, "hurry", None)
        if hurry is not None:
            hurry()
        else:
            self.daemon.stop()
        if self.count == 2:
            threading.Thread(target=self._exit_unless_abandoned, args=(_HURRY_GRACE,),
                             name="ddsmon-hurry", daemon=True).start()  # fmt: skip
        else:  # asked a third time: now
            self._exit_unless_abandoned(0.0, said=True)

    def _exit_unless_abandoned(self, grace: float, said: bool = False) -> None:
        if self.finished.wait(grace):
            return
        if not said and getattr(self.daemon, "abandoning", False):
            return  # the main loop abandoned the checkpoint and is on its way out
        try:
            log.warning("the daemon did not stop in %.0f s of a second signal: exiting now", grace)
            os.write(
                2,
                b"ddsmon: interrupted; what was recorded before is kept "
                b"(a checkpoint being read is read again next time)\n",
            )
        finally:
            os._exit(_EXIT_INTERRUPTED)


def run_until_signalled(daemon: Daemon, mode: str) -> Summary:
    """Run ``daemon.scan()`` or ``daemon.watch()``; the first SIGINT/SIGTERM asks it to stop
    after the current checkpoint, a second one abandons that checkpoint (KeyboardInterrupt,
    raised by the main loop, never by a signal handler: :class:`_Signals`).

    SIGHUP (the terminal went away: an ssh session dropped, a window closed) stops it in
    the same order, unless the parent set it to be ignored (``nohup``); a SIGHUP after the
    first signal changes nothing (a dropped ssh session hangs up its foreground job twice:
    the kernel, then the shell), it never abandons the checkpoint. Standard streams
    on a terminal then point at ``/dev/null``: the terminal is gone, and what is still
    said on the way out would fail on it. Before, a hangup killed the daemon where it
    stood, the checkpoint being read lost and the MLflow run left running.

    A state lock held by someone else is waited for, said after a second
    (:func:`ddsmon.state._take_flock`); once the daemon is asked to stop, that wait
    ends with a StateError (exit 4), the checkpoint in hand read again next time."""
    on_terminal = [fd for fd in (1, 2) if _isatty(fd)]
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
        signals.append(signal.SIGHUP)
    handling = _Signals(daemon, signals, on_terminal)
    hung_up: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        # nothing else here (no lock, no raise): the work is done on the signals' thread
        if signum == signal.SIGHUP:
            hung_up.append(signum)

    from ddsmon import state as state_module

    waiting_before = state_module.stop_waiting
    state_module.stop_waiting = lambda: bool(getattr(daemon, "stopping", False))
    previous = {s: signal.signal(s, on_signal) for s in signals}
    wakeup_before = signal.set_wakeup_fd(handling.write_fd, warn_on_full_buffer=False)
    handling.start()
    try:
        summary = daemon.scan() if mode == "scan" else daemon.watch()
    finally:
        if hung_up:
            # the terminal is gone: a late second hangup (the shell's) must not end the
            # exit under way (the summary, the status) with -SIGHUP
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for s, handler in previous.items():
            if not (hung_up and s == signal.SIGHUP):
                signal.signal(s, handler)
        signal.set_wakeup_fd(wakeup_before)
        handling.close()
        state_module.stop_waiting = waiting_before
    if handling.hurried:  # a second signal after the loop's last look: still abandoned
        raise KeyboardInterrupt
    return summary
