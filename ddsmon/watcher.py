"""Watch a checkpoint directory and hand over each checkpoint once it is complete.

A watchdog observer (inotify on Linux, or a polling observer for NFS and bind
mounts where inotify is silent) reports changes under the directory; each change is
mapped to the checkpoint it belongs to (:func:`ddsmon.checkpoints.checkpoint_for`:
the file itself, or the hf/dcp folder holding it) and that checkpoint becomes
*pending*. A pending checkpoint is *ready* when

    (a) it was closed after writing (inotify's close-write) or renamed into place, and
        its fingerprint ``(size, mtime_ns)`` has not changed since (fast path, files
        only), or
    (b) ``quiet`` seconds have passed with no event for it and its fingerprint
        unchanged (the only path for folders, and for observers without close events),

and :func:`ddsmon.checkpoints.check_complete` finds it complete. A ready checkpoint is
handed to ``on_ready`` once per (path, fingerprint): a later change of the file (a
rewrite, a fix) hands it over again. A checkpoint still incomplete after its quiet
period (zero bytes, truncated, random bytes, a lying header) is *rejected*: dropped
until its next change and reported to ``on_rejected(path, reason)`` once per (path,
fingerprint), by default a warning (:func:`log_rejected`). A file that is merely still
being written is never rejected: a close-write alone does not reject an incomplete file,
only a quiet period without change does; and under native events a file whose last
event was a write, with no close-after-write since, is still held open by its writer
(a copy or a save stalled on a slow filesystem): it is rejected only after
:func:`open_write_grace` seconds without change, not after ``quiet``. hf/dcp folders are rejected only when the file
their writer puts down last is there (``trainer_state.json``; a dcp folder's
``.metadata`` completes it), as a folder waiting for it is still being written. One that
vanishes before it is ready is dropped and reported to ``on_vanished``.

Paths and reasons in log lines go through :func:`ddsmon.shown.shown`, so a file name
holding a newline cannot forge a log line.

One timer thread does the checks and calls the callbacks; it sleeps on an event until
the earliest pending deadline (no busy loop). The observer is running when
:meth:`CheckpointWatcher.start` returns, so a caller that lists the directory after
``start()`` misses nothing: a file written in between is both listed and reported
(the caller drops the duplicate by path and fingerprint).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ddsmon.checkpoints import (
    CheckpointRef,
    check_complete,
    checkpoint_for,
    classify,
    excluded,
    fingerprint,
    hf_weights,
    is_hf_folder_name,
    list_folder,
)
from ddsmon.errors import ConfigError
from ddsmon.shown import shown

__all__ = ("MAX_SECONDS", "CheckpointWatcher", "log_rejected")

log = logging.getLogger(__name__)

_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileAttribEvent,  # a chmod that makes an unreadable checkpoint readable
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
    DirAttribEvent,  # a folder readable again
]
_FOLDER_KINDS = ("hf", "dcp")

_MIN_WAIT = 0.01  # seconds; floor of a timer wait, so a due entry can never spin
#: Largest poll interval / quiet period accepted (one day): larger ones are mistakes, and
#: beyond ``threading.TIMEOUT_MAX`` a wait raises in the observer's or the timer's thread.
MAX_SECONDS = 86400.0


#: Under native events, a file written and not closed since is rejected after this many
#: seconds without change (or 4 quiet periods, if longer), not after one quiet period.
OPEN_WRITE_GRACE = 60.0


def open_write_grace(quiet: float) -> float:
    """Seconds an incomplete file still open for writing is waited for."""
    return max(OPEN_WRITE_GRACE, 4 * quiet)


#: Seconds between checks that the watched directory is still the one watched.
_ROOT_CHECK = 1.0


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a directory, None when it is not one (or gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


def _within_path(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _has_weights(folder: Path) -> bool:
    """Whether a Hugging Face folder holds its weights file or shard index (a variant's
    too), or weights of several variants (:func:`~ddsmon.checkpoints.hf_weights`)."""
    try:
        chosen = hf_weights(os.listdir(folder))
    except OSError:
        return False
    return chosen.name is not None or chosen.problem is not None


def log_rejected(path: Path, reason: str) -> None:
    """The default ``on_rejected``: one warning naming the file and the reason."""
    log.warning(
        "%s is not a complete checkpoint: %s (not read; looked at again when it changes)",
        shown(path),
        shown(reason),
    )


def _seconds(value: object, option: str, what: str, *, zero_ok: bool) -> float:
    """``value`` as finite seconds within (0 or more, :data:`MAX_SECONDS`), else a
    ConfigError naming the option."""
    bound = ">= 0" if zero_ok else "> 0"
    problem = f"{option}: the {what} must be a finite number of seconds {bound}"
    if isinstance(value, bool):
        raise ConfigError(f"{problem}, got {value!r}")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{problem}, got {shown(repr(value))}") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        raise ConfigError(f"{problem}, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ConfigError(f"{problem} and at most {MAX_SECONDS:g} (one day), got {value!r}")
    return seconds


@dataclass
class _Pending:
    """A checkpoint seen changing and not yet handed over (absolute path as key).

    fp: fingerprint at the last event (None if it could not be taken).
    changed_at: monotonic time of the last event or fingerprint change.
    closed_fp: fingerprint when the file was closed after writing / renamed into
        place; ready without waiting for quiet while the fingerprint still equals it.
    due: when the timer looks at it next. gen: bumped by every event.
    writing: the last event was a write to the file itself under native events, with no
        close-after-write since: its writer still holds it open.
    """

    ref: CheckpointRef
    fp: tuple[int, int] | None
    changed_at: float
    due: float
    closed_fp: tuple[int, int] | None = None
    gen: int = 0
    writing: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: CheckpointWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(event)
        except Exception:  # never let one odd event kill the observer thread
            log.exception("ddsmon watcher: failed to handle %r", event)


class CheckpointWatcher:
    """Hands each checkpoint written into ``directory`` to ``on_ready`` once complete.

    directory: the folder to watch (its entries and one level of subfolders, as
        :func:`ddsmon.checkpoints.discover` lists them).
    on_ready: called with a :class:`CheckpointRef` (path under ``directory`` as given)
        from the watcher's thread; keep it short and thread-safe (e.g. put it on a queue).
    poll: seconds between directory scans with watchdog's PollingObserver; None for
        the platform's native events (inotify on Linux).
    quiet: seconds without change before a checkpoint counts as settled.
        ``poll`` and ``quiet`` must be finite and at most :data:`MAX_SECONDS` (``poll``
        > 0, ``quiet`` >= 0); anything else (``inf``, ``nan``, ``0`` for poll) is a
        ConfigError naming ``--poll`` / ``--quiet``.
    on_vanished: called with the path of a pending checkpoint that disappeared before
        it was ready (e.g. a Trainer rotating old folders); optional.
    on_rejected: called with ``(path, reason)`` for a checkpoint that settled and is
        not complete (the reason is :func:`~ddsmon.checkpoints.check_complete`'s), once
        until it changes; from the watcher's thread. None (the default) is
        :func:`log_rejected`, a warning; pass ``lambda path, reason: None`` to silence it.
    exclude: globs of checkpoints never handed over nor reported
        (:func:`ddsmon.checkpoints.excluded`: ``--exclude``).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        directory: Path,
        on_ready: Callable[[CheckpointRef], None],
        *,
        poll: float | None = None,
        quiet: float = 1.0,
        on_vanished: Callable[[Path], None] | None = None,
        on_rejected: Callable[[Path, str], None] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.exclude = tuple(exclude)
        self.poll: float | None = (
            None if poll is None else _seconds(poll, "--poll", "polling interval", zero_ok=False)
        )
        self.quiet = _seconds(quiet, "--quiet", "quiet period", zero_ok=True)
        self.directory = Path(directory)
        self._root = Path(os.path.abspath(self.directory))
        self._real_root = self._root  # where the observer's watch is (see _below_root)
        #: folders that could not be read, listed again at each root check (_relist)
        self._unlisted: set[Path] = set()
        self._said_unreadable: set[Path] = set()  # said once until wholly read again
        self._on_ready = on_ready
        self._on_vanished = on_vanished
        self._named_gone: set[Path] = set()
        self._on_rejected = on_rejected if on_rejected is not None else log_rejected
        self._lock = threading.Lock()
        self._pending: dict[Path, _Pending] = {}
        self._handed: dict[Path, tuple[int, int]] = {}
        self._rejected: dict[Path, tuple[int, int]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._observer: BaseObserver | None = None
        self._root_id: tuple[int, int] | None = None
        self._timer: threading.Thread | None = None
        self._state = "new"  # new -> running -> stopped
        self._state_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the observer and the timer thread. The observer's watches are in
        place when this returns. Raises ConfigError when the directory is missing or
        the platform refuses a watch (inotify limits: use ``poll``)."""
        with self._state_lock:
            if self._state == "running":
                return
            if self._state == "stopped":
                raise RuntimeError("a CheckpointWatcher cannot be restarted; make a new one")
            if not self._root.is_dir():
                raise ConfigError(
                    f"{shown(self.directory)}: not a directory (checkpoint directory to watch)"
                )
            try:
                observer = self._observe()
            except OSError as exc:
                raise ConfigError(
                    f"{shown(self.directory)}: cannot watch ({exc.strerror or exc}); "
                    "use a polling observer (--poll SECONDS)"
                ) from exc
            self._observer = observer
            self._root_id = _identity(self._root)
            self._note_unread_subfolders()
            self._timer = threading.Thread(target=self._run, name="ddsmon-watcher", daemon=True)
            self._timer.start()
            self._state = "running"
        log.debug(
            "watching %s (%s, quiet %.3g s)",
            shown(self.directory),
            f"polling every {self.poll:g} s" if self.poll is not None else "native events",
            self.quiet,
        )

    def _note_unread_subfolders(self) -> None:
        """The root's subfolders that cannot be listed or searched as the watch begins
        (another user's, a mode set wrong): each is listed again at the root checks and
        read once it can be (:meth:`_relist`), as a folder found unreadable later is.
        Without this a folder unreadable when the watch began was never read, whatever
        its mode became. Not said here: :func:`ddsmon.checkpoints.discover` says it."""
        try:
            entries = list(os.scandir(self._root))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.is_symlink() or not entry.is_dir():
                    continue
            except OSError:
                continue
            folder = Path(entry.path)
            try:
                list_folder(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._unreadable(folder, exc, say=False)

    def _observe(self) -> BaseObserver:
        """A started observer of the directory (OSError when the platform refuses it)."""
        observer: BaseObserver = (
            PollingObserver(timeout=self.poll) if self.poll is not None else Observer()
        )
        # on the directory itself: watchdog's inotify does not follow a link (a watched
        # directory that is a symbolic link, or was replaced by one, gave no event at
        # all); its events are mapped back below the path as given (_below_root)
        self._real_root = Path(os.path.realpath(self._root))
        observer.schedule(
            _Handler(self), str(self._real_root), recursive=True, event_filter=_EVENTS
        )
        observer.start()
        return observer

    def _check_root(self) -> None:
        """The watched directory deleted, or replaced (deleted and made again, moved away
        and another put in its place): an observer's watch dies with the directory it was
        put on, so without this nothing written into the new one would ever be seen. Said
        once; when the directory is there again, a new observer watches it and what is in
        it already becomes pending (handed over once complete, as any other)."""
        current = _identity(self._root)
        if current == self._root_id:
            return
        if current is None:
            if self._root_id is not None:
                log.warning(
                    "%s was deleted or moved away; waiting for it to be created again",
                    shown(self.directory),
                )
            self._root_id = None
            return
        old, self._observer = self._observer, None
        if old is not None:
            old.stop()
            if old is not threading.current_thread():
                old.join(timeout=10)
        try:
            self._observer = self._observe()
        except OSError as exc:
            log.warning("%s: cannot watch it again (%s)", shown(self.directory), exc)
            return  # tried again at the next check
        self._root_id = current
        log.warning("%s is there again (a new directory); watching it", shown(self.directory))
        from ddsmon.checkpoints import discover

        try:
            found = discover(self._root, self.exclude)
        except (OSError, ConfigError):
            return
        for ref in found:
            self._touch(ref.path, settled=False)

    def stop(self) -> None:
        """Stop watching and join the threads; pending checkpoints are dropped.
        Idempotent; safe to call from ``on_ready`` (the timer thread is then not joined)."""
        with self._state_lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopped"
        self._stopping.set()
        self._wake.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()  # first: the timer may put a new observer in place
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
        with self._lock:
            self._pending.clear()

    def track(self, path: Path) -> None:
        """A checkpoint the caller found incomplete in its own listing (the daemon's at
        start): pending, as if written and not yet closed, so a file still being written
        when the watch began is waited for (:func:`open_write_grace` under native events,
        a quiet period under polling) and rejected only if it then stays incomplete."""
        try:
            self._touch(Path(path), settled=False, writing=self.poll is None)
        except OSError as exc:
            self._unreadable(Path(path).parent, exc)
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._state == "running"

    def pending(self) -> int:
        """How many checkpoints are seen changing and not yet handed over or dropped."""
        with self._lock:
            return len(self._pending)

    def __enter__(self) -> CheckpointWatcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ events
    def _on_event(self, event: FileSystemEvent) -> None:
        """One observer event. A path that cannot be looked at (a folder made
        unreadable: ``Path.is_symlink`` raises on EACCES) marks its folder to be listed
        again once it can be (:meth:`_unreadable`), instead of dropping the event."""
        src = self._below_root(event.src_path)
        try:
            self._on_event_at(event, src)
        except OSError as exc:
            self._unreadable(src.parent if src is not None else self._root, exc)

    def _on_event_at(self, event: FileSystemEvent, src: Path | None) -> None:
        kind = event.event_type
        if kind == "moved":
            if src is not None:
                self._gone(src)
            if event.dest_path:
                self._touch(self._below_root(event.dest_path) or self._root, settled=True)
        elif kind == "deleted":
            if src is not None:
                self._gone(src)
        elif kind in ("created", "modified", "closed") and src is not None:
            # inotify reports every close of a file opened for writing: until then a
            # write's file is still open (a polling observer never sees a close)
            writing = kind != "closed" and self.poll is None and not event.is_directory
            self._touch(src, settled=kind == "closed", writing=writing)
            if kind == "created" and event.is_directory:
                self._touch_entries(src)
        elif kind == "attrib" and src is not None:
            # a chmod, chown or touch: no write, so a writer's open file stays open; a
            # checkpoint rejected as unreadable is looked at again
            if event.is_directory:
                if src in self._unlisted:
                    self._relist()
            else:
                self._touch(src, settled=False, writing=None)

    def _below_root(self, raw: bytes | str | None) -> Path | None:
        """An event's path as a path below the directory as given: the observer watches
        the directory a symbolic link leads to (:meth:`_observe`), and reports paths
        below it."""
        if not raw:
            return None
        path = Path(os.fsdecode(raw))
        real = self._real_root
        if real != self._root and _within_path(path, real) and not _within_path(path, self._root):
            return self._root / path.relative_to(real)
        return path

    def _unreadable(self, folder: Path, exc: OSError, say: bool = True) -> None:
        """``folder`` (below the root, or the root) could not be looked into: said once
        until it can be again (``say`` False: taken as said already); it is listed again
        at each root check, and when that works what is in it becomes pending
        (:meth:`_relist`)."""
        folder = folder if _within_path(folder, self._root) else self._root
        with self._lock:
            new = folder not in self._said_unreadable
            self._unlisted.add(folder)
            self._said_unreadable.add(folder)
        if new and say:
            log.warning(
                "%s cannot be read (%s): its checkpoints are read once it can be again",
                shown(self._out(folder)),
                exc.strerror or exc,
            )

    def _relist(self) -> None:
        """List again the folders that could not be read; each that can be now is said
        so, and its checkpoints become pending (handed over once, as any other)."""
        with self._lock:
            folders = sorted(self._unlisted)
        for folder in folders:
            try:
                list_folder(folder)
            except FileNotFoundError:  # gone: nothing to read there
                with self._lock:
                    self._unlisted.discard(folder)
                continue
            except OSError:  # still unlisted, or listed but not searched (r--)
                continue
            with self._lock:
                self._unlisted.discard(folder)
            from ddsmon.checkpoints import discover

            try:
                found = discover(self._root, self.exclude)
            except (OSError, ConfigError):
                continue
            for ref in found:
                try:
                    self._touch(ref.path, settled=False, writing=None)
                except OSError as exc:
                    self._unreadable(ref.path.parent, exc)
            with self._lock:  # listed, but its entries not all looked at: still unread
                whole = folder not in self._unlisted
                if whole:
                    self._said_unreadable.discard(folder)
            if whole:
                log.warning(
                    "%s can be read again; looking at what is in it", shown(self._out(folder))
                )

    def _touch_entries(self, folder: Path) -> None:
        """A subfolder was created: what is in it already is touched as if written. A
        file written into it before the observer's watch on it was in place has no
        event of its own (watchdog lists the folder when it adds the watch, a race a
        loaded machine loses: CI saw ``run1/step_1.pt`` never handed over); a file also
        seen by an event is one pending entry, handed over once."""
        try:
            entries = [Path(e.path) for e in os.scandir(folder)]
        except OSError:
            return
        for entry in entries:
            self._touch(entry, settled=False, writing=self.poll is None)

    def _touch(self, path: Path, *, settled: bool, writing: bool | None = False) -> None:
        """``path`` was written (or closed / renamed into place when ``settled``);
        ``writing``: by a writer that has not closed it yet; None: as it was (an
        attribute change, a file seen again: no write, and no close)."""
        ref = checkpoint_for(path, self._root)
        if ref is None:
            self._gone_unseen(path)
            return
        if excluded(ref.path, self._root, self.exclude):
            return
        try:
            fp: tuple[int, int] | None = fingerprint(ref)
        except OSError:
            fp = None
        fast = settled and ref.path == path and ref.kind not in _FOLDER_KINDS and fp is not None
        now = time.monotonic()
        with self._lock:
            entry = self._pending.get(ref.path)
            if entry is None:
                entry = self._pending[ref.path] = _Pending(ref, fp, now, now + self.quiet)
            entry.ref = ref
            entry.fp = fp
            entry.changed_at = now
            entry.gen += 1
            entry.closed_fp = fp if fast else None
            if writing is not None:
                entry.writing = writing and ref.path == path and ref.kind not in _FOLDER_KINDS
            entry.due = now if fast else now + self.quiet
        self._wake.set()

    def _gone_unseen(self, path: Path) -> None:
        """A write inside a ``checkpoint-N/`` folder that is gone by the time the event
        is handled (a trainer's rotation, faster than the watcher): the folder cannot be
        classified any more, but its name says what it was, so it is reported to
        ``on_vanished`` once rather than never named."""
        try:
            rel = path.relative_to(self._root)
        except ValueError:
            return
        if not rel.parts:
            return
        folder = self._root / rel.parts[0]
        if (
            not is_hf_folder_name(folder.name)
            or os.path.lexists(folder)
            or folder in self._named_gone
        ):
            return
        self._named_gone.add(folder)
        with self._lock:
            pending = folder in self._pending or folder in self._handed
        if not pending and self._on_vanished is not None:
            try:
                self._on_vanished(folder)
            except Exception:
                log.exception("ddsmon watcher: on_vanished(%s) failed", shown(folder))

    def _gone(self, path: Path) -> None:
        """``path`` was deleted or moved away: look at every pending checkpoint it
        was, held, or lay in now; forget hand-overs of it and of anything under it."""
        now = time.monotonic()
        with self._lock:
            for key, entry in self._pending.items():
                if key == path or path in key.parents or key in path.parents:
                    entry.due = now
            for seen in (self._handed, self._rejected):
                for key in [k for k in seen if k == path or path in k.parents]:
                    if not os.path.lexists(key):
                        del seen[key]
        self._wake.set()

    # ------------------------------------------------------------------ timer
    def _run(self) -> None:
        next_root_check = 0.0
        while True:
            self._wake.clear()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            if now >= next_root_check:
                next_root_check = now + _ROOT_CHECK
                try:
                    self._check_root()
                    if self._unlisted:
                        self._relist()
                except Exception:
                    log.exception("ddsmon watcher: checking %s failed", shown(self.directory))
            with self._lock:
                due = [key for key, entry in self._pending.items() if entry.due <= now]
            for key in due:
                if self._stopping.is_set():
                    return
                try:
                    self._check(key)
                except OSError as exc:  # its folder unreadable: listed again later
                    with self._lock:
                        self._pending.pop(key, None)
                    self._unreadable(key.parent, exc)
                except Exception:
                    log.exception("ddsmon watcher: checking %s failed", shown(key))
                    with self._lock:
                        self._pending.pop(key, None)
            with self._lock:
                next_due = min((e.due for e in self._pending.values()), default=None)
            timeout = max(_MIN_WAIT, next_root_check - time.monotonic())
            if next_due is not None:
                timeout = min(timeout, max(_MIN_WAIT, next_due - time.monotonic()))
            self._wake.wait(timeout)

    def _check(self, key: Path) -> None:
        """Decide about one due pending checkpoint: wait on, drop, or hand over."""
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                return
            gen, last_fp, changed_at, closed_fp, writing = (
                entry.gen,
                entry.fp,
                entry.changed_at,
                entry.closed_fp,
                entry.writing,
            )
        ref = classify(key, self._root)
        if ref is None:
            if not os.path.lexists(key):
                self._vanished(key, entry, gen)
            else:
                self._drop(key, entry, gen, "no longer looks like a checkpoint")
            return
        try:
            fp = fingerprint(ref)
        except FileNotFoundError:
            self._vanished(key, entry, gen)
            return
        except OSError as exc:  # e.g. permissions: look again at its next change
            self._drop(key, entry, gen, f"cannot be read ({exc.strerror or exc})")
            return
        now = time.monotonic()
        by_close = closed_fp is not None and fp == closed_fp
        quiet = fp == last_fp and now - changed_at >= self.quiet
        if not (by_close or quiet):
            self._wait(entry, gen, fp, "still changing")
            return
        with self._lock:
            already = self._handed.get(key) == fp
        if already:
            self._drop(key, entry, gen, None)
            return
        reason = check_complete(ref)
        if reason is not None and by_close and not quiet:
            with self._lock:
                if entry.gen == gen:
                    entry.closed_fp = None
                    entry.due = changed_at + self.quiet
            log.debug(
                "%s closed but not complete yet (%s); waiting for quiet", shown(key), shown(reason)
            )
            return
        grace = open_write_grace(self.quiet)
        if reason is not None and writing and now - changed_at < grace:
            with self._lock:
                if entry.gen == gen:
                    entry.due = changed_at + grace
            log.debug(
                "%s incomplete (%s) and still open for writing; waiting up to %g s",
                shown(key),
                shown(reason),
                grace,
            )
            return
        try:
            after = fingerprint(ref)
        except FileNotFoundError:
            self._vanished(key, entry, gen)
            return
        except OSError as exc:
            self._drop(key, entry, gen, f"cannot be read ({exc.strerror or exc})")
            return
        if after != fp:  # changed while it was being checked
            self._wait(entry, gen, after, "changed during the check")
            return
        if reason is None:
            self._hand_over(key, entry, gen, ref, fp)
        else:
            self._reject(key, entry, gen, ref, fp, reason)

    def _wait(self, entry: _Pending, gen: int, fp: tuple[int, int] | None, why: str) -> None:
        """Not ready: note a changed fingerprint and look again after a quiet period."""
        now = time.monotonic()
        with self._lock:
            if entry.gen != gen:  # an event came meanwhile and rescheduled it
                return
            if fp is None or fp != entry.fp:
                entry.fp = fp
                entry.changed_at = now
                entry.closed_fp = None
            entry.due = max(now + _MIN_WAIT, entry.changed_at + self.quiet)
        log.debug("%s not ready: %s", shown(entry.ref.path), why)

    def _drop(self, key: Path, entry: _Pending, gen: int, why: str | None) -> None:
        with self._lock:
            if self._pending.get(key) is entry and entry.gen == gen:
                del self._pending[key]
        if why is not None:
            log.debug("%s not handed over: %s", shown(self._out(key)), shown(why))

    def _reject(
        self,
        key: Path,
        entry: _Pending,
        gen: int,
        ref: CheckpointRef,
        fp: tuple[int, int],
        reason: str,
    ) -> None:
        """Settled and incomplete: drop it until it changes; report it once per version."""
        final = ref.kind not in _FOLDER_KINDS or (  # else: still being written
            ref.kind == "hf"
            and (
                # a Trainer writes trainer_state.json last: until then a checkpoint-N/
                # with incomplete weights may be one still being written, not reported
                os.path.lexists(key / "trainer_state.json")
                if is_hf_folder_name(key.name)
                else _has_weights(key)  # shards: the index
            )
        )
        with self._lock:
            if self._pending.get(key) is not entry or entry.gen != gen:
                return  # an event came meanwhile: it is changing again
            del self._pending[key]
            report = final and self._rejected.get(key) != fp
            if report:
                self._rejected[key] = fp
            self._handed.pop(key, None)
        path = self._out(key)
        log.debug("%s not handed over: settled but incomplete: %s", shown(path), shown(reason))
        if not report:
            return
        try:
            self._on_rejected(path, reason)
        except Exception:
            log.exception("ddsmon watcher: on_rejected(%s) failed", shown(path))

    def _vanished(self, key: Path, entry: _Pending, gen: int) -> None:
        with self._lock:
            if self._pending.get(key) is not entry or entry.gen != gen:
                entry.due = time.monotonic() + _MIN_WAIT  # re-created meanwhile: look again
                return
            del self._pending[key]
            self._handed.pop(key, None)
            self._rejected.pop(key, None)
        path = self._out(key)
        log.debug("%s vanished before it was ready", shown(path))
        if self._on_vanished is not None:
            try:
                self._on_vanished(path)
            except Exception:
                log.exception("ddsmon watcher: on_vanished(%s) failed", shown(path))

    def _hand_over(
        self, key: Path, entry: _Pending, gen: int, ref: CheckpointRef, fp: tuple[int, int]
    ) -> None:
        with self._lock:
            self._handed[key] = fp
            self._rejected.pop(key, None)
            if self._pending.get(key) is entry and entry.gen == gen:
                del self._pending[key]
        out = CheckpointRef(self._out(key), ref.kind)
        log.debug("%s ready (%s, %d bytes)", shown(out.path), out.kind, fp[0])
        try:
            self._on_ready(out)
        except Exception:
            log.exception("ddsmon watcher: on_ready(%s) failed", shown(out.path))

    def _out(self, key: Path) -> Path:
        """The path as the caller names it: under ``directory`` as it was given."""
        return self.directory / key.relative_to(self._root)
