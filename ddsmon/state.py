"""The state directory: what survives a restart of the daemon.

One directory per watched checkpoint directory, by default ``<watched dir>/.ddsmon/``
(a dot-directory, so never taken for a checkpoint). It holds:

``lock``
    The claim. ``fcntl.flock(LOCK_EX | LOCK_NB)`` on this file, which also records the
    holder's pid, host and start time. A second daemon on the same directory fails to
    take it and is told who holds it (:class:`AlreadyWatched`). The kernel drops the lock
    when its holder's file is closed, so a daemon killed with ``kill -9`` leaves no stale
    claim behind. (flock locks are advisory and per open file: two :class:`StateDir`
    objects in one process exclude each other too. On NFS, flock is only as good as the
    server's lock manager.)
``done.jsonl``
    The read-set, one ``{"path", "fp", "step"}`` object a line, appended and fsynced per
    checkpoint: ``fp`` is the ``(size, mtime_ns)`` fingerprint it had when read, so a
    rewritten file is read again.
``state.json``
    A small JSON dict (``get``/``set``): the MLflow run id used for this directory, the
    event detector's history. Rewritten atomically (temporary file, fsync,
    ``os.replace``, fsync of the directory) under an flock of ``state.json.lock``.
``spool.jsonl``
    Records a sink could not deliver (the tracking server was down), appended and fsynced
    in order; :meth:`StateDir.spool_ack` drops the first ``count`` once delivered (atomic
    rewrite). Each line is ``{"sum": <sha256 prefix>, "record": {...}}``: a line whose
    record no longer matches its checksum (garbled in place, even into valid JSON) is
    skipped with a warning, like a line that is not JSON. Lines of older versions (a bare
    record) are read as they are.

The spool's ledger (key ``spooled_steps`` of ``state.json``)
    The steps whose reading was spooled and is not yet known delivered
    (:meth:`StateDir.note_spooled`, written *before* the spool line;
    :meth:`StateDir.note_delivered`). A step of the ledger that is neither in the spool
    nor in the run was lost from the spool (a garbled line, a truncated, emptied or
    deleted spool): :meth:`StateDir.forget` takes its checkpoint out of the read-set so
    that it is read again.

``history.jsonl``, ``events.jsonl``, ``outbox/``
    The MLflow sink's local copies (for plots) and the artifact files it has not sent yet.

Append-only files tolerate a torn last line (a crash mid-write): a last line that is not
newline-terminated is ignored when read and cut off before the next append. A damaged
line elsewhere is skipped with a warning naming the file and line.

Faults of the state directory itself are :class:`StateError` (a :class:`ConfigError`),
never a raw ``OSError``; the message names the file, what is wrong and what to do:

* a state file that is not a regular file (a directory, a FIFO, a dangling link in its
  place): found at :meth:`StateDir.claim` for every file listed in :data:`STATE_FILES`
  (and :data:`STATE_FOLDERS`), and by every read and write of one;
* a failed write (``ENOSPC``: "no space left on device writing <path>", a quota, a
  read-only filesystem): every write is all-or-nothing. A rewrite goes through a
  temporary file that is removed when the write fails; a failed append is cut back to
  where it started. The state on disk is the one before the call.

:meth:`StateDir.claim` also removes temporary files left by a process that died while
rewriting a file (``.<name>.<pid>.<thread>.<host>.tmp`` of a pid no longer alive on this
host, or of another host when older than an hour).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ddsmon.errors import ConfigError
from ddsmon.shown import shown

__all__ = (
    "DEFAULT_STATE_NAME",
    "STATE_FILES",
    "STATE_FOLDERS",
    "AlreadyWatched",
    "StateDir",
    "StateError",
    "append_jsonl_lines",
    "read_jsonl",
    "rewrite_jsonl_lines",
)

log = logging.getLogger(__name__)
# (state directory, sha256 of a damaged state.json) already warned of in this process
_KV_WARNED: set[tuple[str, str]] = set()

#: Name of the state directory inside a watched directory.
DEFAULT_STATE_NAME = ".ddsmon"

_LOCK = "lock"
_DONE = "done.jsonl"
_KV = "state.json"
_SPOOL = "spool.jsonl"
_LEDGER = "spooled_steps"

#: Every file the state directory may hold (the daemon's and its sinks'): each must be a
#: regular file when present, checked by :meth:`StateDir.claim`. A new state file goes here.
STATE_FILES: tuple[str, ...] = (
    _LOCK,
    _DONE,
    _DONE + ".lock",
    _KV,
    _KV + ".lock",
    _SPOOL,
    _SPOOL + ".lock",
    "history.jsonl",
    "events.jsonl",
)
#: Folders of the state directory (must be directories when present).
STATE_FOLDERS: tuple[str, ...] = ("outbox",)

_REMEDY = "remove it, or give another --state-dir"
_HOST_TAG = hashlib.sha1(socket.gethostname().encode(errors="replace")).hexdigest()[:8]
_TMP_NAME = re.compile(
    r"^\.(?P<name>.+?)\.(?P<pid>\d+)\.(?P<tid>\d+)(?:\.(?P<host>[0-9a-f]{8}))?\.tmp$"
)
_FOREIGN_TMP_AGE = 3600.0  # seconds; a temporary file of another host older than this is an orphan


class StateError(ConfigError):
    """A file of the state directory cannot be used (not a regular file, a failed write).

    ``path`` is the state file (or directory) at fault, ``errno`` the OS error number when
    an OS call failed (``errno.ENOSPC`` for a full disk), else None. The message names the
    path, what is wrong and what to do. A daemon should report it and stop: the read-set
    can no longer be kept.
    """

    def __init__(self, path: Path | str, message: str, errno: int | None = None) -> None:
        self.path = Path(path)
        self.errno = errno
        super().__init__(message)


class AlreadyWatched(ConfigError):
    """Another ddsmon process holds the claim on this state directory.

    ``holder`` is what that process wrote into the lock file (pid, host, started), or
    empty when it could not be read.
    """

    def __init__(self, root: Path, holder: dict[str, Any]) -> None:
        self.root = root
        self.holder = holder
        who = (
            f"pid {shown(holder.get('pid', '?'))} on host {shown(holder.get('host', '?'))}"
            f" (since {shown(holder.get('started', '?'))})"
            if holder
            else "another process (its lock file is empty)"
        )
        watched = root.parent if root.name == DEFAULT_STATE_NAME else root
        super().__init__(
            f"{shown(watched)} is already watched by {who}; lock {shown(root / _LOCK)}. "
            "Stop that daemon first, or give another --state-dir."
        )


class StateDir:
    """Restart state of one watched directory (see the module docstring for the files).

    >>> s = StateDir(tmp / ".ddsmon")                        # doctest: +SKIP
    >>> with s:                                              # claim(), then release()
    ...     if not s.is_done("ckpt_10.pt", (1024, 17)):
    ...         s.mark_done("ckpt_10.pt", (1024, 17), step=10)

    The directory is created on first write, not on construction. Every method is safe
    to call from several threads; ``set`` and the spool are also safe across processes
    and across several ``StateDir`` objects on one directory (a read-modify-write under
    flock). Every method raises :class:`StateError` (never a raw ``OSError``) when a state
    file cannot be read or written.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._done: dict[str, tuple[tuple[int, int], int | None]] = {}
        self._done_sig: tuple[int, int] | None = None
        self._warned: set[tuple[int, str]] = set()

    @classmethod
    def for_directory(cls, directory: Path | str) -> StateDir:
        """The default state directory of a watched directory: ``<directory>/.ddsmon``."""
        return cls(Path(directory) / DEFAULT_STATE_NAME)

    def __repr__(self) -> str:
        return f"StateDir({str(self.root)!r}, claimed={self.claimed})"

    def path(self, name: str) -> Path:
        """A file inside the state directory (the directory is created if missing)."""
        self._ensure()
        return self.root / name

    def _ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                self.root,
                f"cannot create state directory {shown(self.root)}: {_strerror(exc)}; "
                "give another --state-dir",
                exc.errno,
            ) from exc
        if not self.root.is_dir():
            raise StateError(
                self.root,
                f"state directory {shown(self.root)} exists and is not a directory; {_REMEDY}",
            )

    def check(self) -> None:
        """Raise :class:`StateError` for the first entry of :data:`STATE_FILES` that is
        there but not a regular file (or of :data:`STATE_FOLDERS` not a directory),
        naming it and what to do. :meth:`claim` calls it."""
        for name in STATE_FILES:
            path = self.root / name
            problem = _not_a_file(path)
            if problem is not None:
                raise StateError(path, f"state file {shown(path)} {problem}; {_REMEDY}")
        for name in STATE_FOLDERS:
            path = self.root / name
            problem = _not_a_folder(path)
            if problem is not None:
                raise StateError(path, f"state folder {shown(path)} {problem}; {_REMEDY}")

    # ------------------------------------------------------------------ claim
    @property
    def claimed(self) -> bool:
        return self._lock_fd is not None

    def claim(self) -> None:
        """Take the advisory lock, or raise :class:`AlreadyWatched` naming the holder.

        Checks first that every state file is a regular file (:meth:`check`), and once
        the lock is held removes temporary files left by a crashed writer. Raises
        :class:`StateError` for a bad state file and when the claim cannot be written
        (a full disk). Idempotent for the object that holds it.
        """
        with self._mutex:
            if self._lock_fd is not None:
                return
            self._ensure()
            self.check()
            path = self.root / _LOCK
            fd = _open_regular(path, os.O_RDWR | os.O_CREAT, "opening")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise AlreadyWatched(self.root, _read_holder(path)) from None
                raise StateError(
                    path, f"cannot lock {shown(path)}: {_strerror(exc)}", exc.errno
                ) from exc
            try:
                self._remove_orphans()
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                with _guard(path, "writing"):
                    os.ftruncate(fd, 0)
                    _pwrite_all(fd, (json.dumps(info) + "\n").encode(), 0)
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # drops the flock
                raise
            self._lock_fd = fd
            log.debug("claimed %s as pid %d", shown(self.root), info["pid"])

    def _remove_orphans(self) -> None:
        """Remove temporary files of rewrites whose writer died (see the module docstring)."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        now = time.time()
        for entry in entries:
            match = _TMP_NAME.match(entry.name)
            if match is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            host = match.group("host")
            if host is None or host == _HOST_TAG:
                if _pid_alive(int(match.group("pid"))):
                    continue
            elif now - st.st_mtime < _FOREIGN_TMP_AGE:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning(
                    "cannot remove orphan temporary file %s: %s", shown(entry.path), _strerror(exc)
                )
                continue
            log.info(
                "removed %s, a temporary file left by a writer that died (%d bytes)",
                shown(entry.path),
                st.st_size,
            )

    def release(self) -> None:
        """Drop the claim (no-op when not held). The lock file stays; it is harmless."""
        with self._mutex:
            fd, self._lock_fd = self._lock_fd, None
            if fd is None:
                return
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its current (or last) holder."""
        return _read_holder(self.root / _LOCK)

    def __enter__(self) -> StateDir:
        self.claim()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ read-set
    def _refresh_done(self) -> None:
        path = self.root / _DONE
        try:
            st = path.stat()
        except FileNotFoundError:
            self._done, self._done_sig = {}, None
            return
        except OSError as exc:
            raise _state_error(exc, path, "reading") from exc
        sig = (st.st_size, st.st_mtime_ns)
        if sig == self._done_sig:
            return
        done: dict[str, tuple[tuple[int, int], int | None]] = {}
        for rec in read_jsonl(path):
            try:
                fp = (int(rec["fp"][0]), int(rec["fp"][1]))
                step = None if rec.get("step") is None else int(rec["step"])
                done[str(rec["path"])] = (fp, step)
            except (KeyError, TypeError, ValueError, IndexError):
                log.warning("%s: skipping a malformed record %s", shown(path), shown(repr(rec)))
        self._done, self._done_sig = done, sig

    def is_done(self, path: str, fingerprint: tuple[int, int]) -> bool:
        """Whether ``path`` was read with this exact ``(size, mtime_ns)`` fingerprint."""
        with self._mutex:
            self._refresh_done()
            entry = self._done.get(str(path))
            return entry is not None and entry[0] == (int(fingerprint[0]), int(fingerprint[1]))

    def mark_done(self, path: str, fingerprint: tuple[int, int], step: int | None) -> None:
        """Record that ``path`` (at ``fingerprint``) was read and logged at ``step``; durable
        (fsynced) when this returns. On a failed write (:class:`StateError`, e.g. a full
        disk) nothing is recorded."""
        key = str(path)
        fp = (int(fingerprint[0]), int(fingerprint[1]))
        at = None if step is None else int(step)
        rec = {"path": key, "fp": list(fp), "step": at}
        with self._mutex, self._flocked(_DONE + ".lock"):
            self._refresh_done()
            done = self.path(_DONE)
            _append_jsonl(done, [rec])
            self._done[key] = (fp, at)
            with _guard(done, "reading"):
                st = done.stat()
            self._done_sig = (st.st_size, st.st_mtime_ns)

    def done_steps(self) -> set[int]:
        """Steps of every checkpoint recorded as read (latest version of each path)."""
        with self._mutex:
            self._refresh_done()
            return {step for _, step in self._done.values() if step is not None}

    def done_paths(self, steps: Iterable[int]) -> dict[str, int]:
        """The checkpoints recorded as read at ``steps`` (latest version of each path):
        path -> step."""
        wanted = {int(s) for s in steps}
        with self._mutex:
            self._refresh_done()
            return {p: step for p, (_, step) in self._done.items() if step in wanted}

    def forget(self, steps: Iterable[int]) -> list[str]:
        """Take the checkpoints recorded as read at ``steps`` out of the read-set (every
        line of a path whose latest record is at one of them), so that they are read
        again; return their paths. Atomic: the read-set is the old one or the new one.
        Meant for the start, before checkpoints are read (another process appending at
        the same moment is excluded by a lock shared with :meth:`mark_done`)."""
        wanted = {int(s) for s in steps}
        if not wanted:
            return []
        with self._mutex, self._flocked(_DONE + ".lock"):
            self._done_sig = None
            self._refresh_done()
            gone = sorted(p for p, (_, step) in self._done.items() if step in wanted)
            if not gone:
                return []
            path = self.root / _DONE
            drop = set(gone)
            kept = [r for r in read_jsonl(path) if str(r.get("path")) not in drop]
            _atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            self._done_sig = None
            self._refresh_done()
        log.info("read-set %s: forgot %s", shown(path), ", ".join(shown(g) for g in gone))
        return gone

    # ------------------------------------------------------------------ key-value
    def get(self, key: str, default: Any = None) -> Any:
        """A value from ``state.json`` (``default`` when absent or not JSON)."""
        return self._read_kv().get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable ``value`` under ``key`` (atomic, durable; other keys,
        possibly written by another ``StateDir`` object, are kept)."""
        self.update({key: value})

    def update(self, values: Mapping[str, Any]) -> None:
        """:meth:`set` for several keys at once: one atomic, durable write of all of them."""
        for key, value in values.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"state value for {key!r} is not JSON-serialisable: {exc}") from exc
        with self._mutex, self._flocked(_KV + ".lock"):
            data = self._read_kv()
            data.update(values)
            _atomic_write(self.root / _KV, json.dumps(data, sort_keys=True).encode())

    def delete(self, key: str) -> None:
        """Remove ``key`` (no-op when absent)."""
        with self._mutex, self._flocked(_KV + ".lock"):
            data = self._read_kv()
            if data.pop(key, None) is not None:
                _atomic_write(self.root / _KV, json.dumps(data, sort_keys=True).encode())

    def _read_kv(self) -> dict[str, Any]:
        path = self.root / _KV
        raw = _read_regular(path)
        if raw is None:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            self._warn_kv_once(
                raw, "state file %s is not JSON (%s); starting from an empty one", shown(path), exc
            )
            return {}
        if not isinstance(data, dict):
            self._warn_kv_once(
                raw, "state file %s does not hold a JSON object; ignored", shown(path)
            )
            return {}
        return data

    def _warn_kv_once(self, raw: bytes, message: str, *args: object) -> None:
        """Say a damaged ``state.json`` once per content, not once per read of it (a start
        reads it for several keys, through more than one StateDir, before the first write
        replaces it): once per process, state directory and content."""
        said = (str(self.root), hashlib.sha256(raw).hexdigest())
        if said not in _KV_WARNED:
            _KV_WARNED.add(said)
            log.warning(message, *args)

    @contextlib.contextmanager
    def _flocked(self, name: str) -> Iterator[None]:
        fd = _open_regular(self.path(name), os.O_RDWR | os.O_CREAT, "opening")
        try:
            _take_flock(fd, self.path(name))
            yield
        finally:
            os.close(fd)  # closing drops the flock

    # ------------------------------------------------------------------ spool
    def spool_append(self, record: dict[str, Any]) -> None:
        """Append one undelivered record to the spool (with its checksum); durable
        (fsynced) when this returns."""
        line = _spool_line(record)  # fail before touching the file
        with self._mutex, self._flocked(_SPOOL + ".lock"):
            append_jsonl_lines(self.path(_SPOOL), [line])

    def spool_pending(self) -> list[dict[str, Any]]:
        """Every record not yet acknowledged, oldest first; a line that is not JSON or
        fails its checksum is skipped with a warning (naming its step when readable)."""
        with self._mutex, self._flocked(_SPOOL + ".lock"):
            return self._spool_records()

    def _spool_records(self) -> list[dict[str, Any]]:
        path = self.root / _SPOOL
        out = []
        for number, line in enumerate(read_jsonl(path), start=1):
            record = _spool_record(line)
            if record is None:
                inner = line.get("record")
                step = inner.get("step") if isinstance(inner, dict) else None
                said = (number, str(line.get("sum")))
                if said not in self._warned:
                    self._warned.add(said)
                    log.warning(
                        "%s: a record%s fails its checksum (garbled in place); skipped",
                        shown(path),
                        "" if step is None else f" of step {shown(step)}",
                    )
                continue
            out.append(record)
        return out

    def spool_ack(self, count: int) -> None:
        """Drop the first ``count`` records (delivered); atomic."""
        if count <= 0:
            return
        with self._mutex, self._flocked(_SPOOL + ".lock"):
            path = self.root / _SPOOL
            rest = self._spool_records()[count:]
            if rest:
                _atomic_write(path, "".join(_spool_line(r) + "\n" for r in rest).encode())
            else:
                with (
                    contextlib.suppress(FileNotFoundError),
                    _guard(path, "removing", absent_ok=True),
                ):
                    path.unlink()
                _fsync_dir(self.root)

    def spool_count(self) -> int:
        """Number of records waiting in the spool."""
        return len(self.spool_pending())

    # ------------------------------------------------------------------ the spool's ledger
    def spooled_steps(self) -> builtins.set[int]:
        """Steps whose reading was spooled and is not yet known delivered (the ledger)."""
        raw = self.get(_LEDGER) or []
        out: builtins.set[int] = builtins.set()
        for step in raw if isinstance(raw, list) else []:
            with contextlib.suppress(TypeError, ValueError):
                out.add(int(step))
        return out

    def note_spooled(self, step: int) -> None:
        """``step``'s reading is about to be spooled (call before :meth:`spool_append`)."""
        with self._mutex, self._flocked(_KV + ".lock"):
            data = self._read_kv()
            steps = builtins.set(data.get(_LEDGER) or [])
            if int(step) in steps:
                return
            data[_LEDGER] = sorted(steps | {int(step)})
            _atomic_write(self.root / _KV, json.dumps(data, sort_keys=True).encode())

    def note_delivered(self, steps: Iterable[int]) -> None:
        """``steps`` are in the run now (or beyond help): out of the ledger."""
        drop = {int(s) for s in steps}
        if not drop:
            return
        with self._mutex, self._flocked(_KV + ".lock"):
            data = self._read_kv()
            steps_now = builtins.set(data.get(_LEDGER) or [])
            if not steps_now & drop:
                return
            rest = sorted(steps_now - drop)
            if rest:
                data[_LEDGER] = rest
            else:
                data.pop(_LEDGER, None)
            _atomic_write(self.root / _KV, json.dumps(data, sort_keys=True).encode())


# ---------------------------------------------------------------------- errors
#: Seconds a state lock is waited for before it is said to be held (once per wait).
LOCK_SAID_AFTER = 1.0

#: Asked every 50 ms once a state lock was said to be held: True ends the wait with a
#: :class:`StateError` (set by :func:`ddsmon.daemon.run_until_signalled` to "the daemon
#: was asked to stop", so that a signal stops a daemon that waits on a lock held by
#: someone else, a backup tool or a hung NFS lock, instead of waiting as long as it is).
stop_waiting: Callable[[], bool] | None = None


def _take_flock(fd: int, path: Path) -> None:
    """``flock(fd, LOCK_EX)``, polled: a lock held for over :data:`LOCK_SAID_AFTER` s
    is said once (naming the file and, from ``/proc/locks``, its holder) and waited for;
    while :data:`stop_waiting` says so, the wait ends with :class:`StateError`."""
    started = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            if said:
                log.warning("%s is free again after %.0f s; going on", path,
                            time.monotonic() - started)  # fmt: skip
            return
        waited = time.monotonic() - started
        if waited >= LOCK_SAID_AFTER:
            if not said:
                said = True
                log.warning(
                    "%s is locked by %s: ddsmon waits for it (its state cannot be written "
                    "meanwhile; a signal stops the wait)",
                    path,
                    _flock_holder(fd),
                )
            give_up = stop_waiting
            if give_up is not None and give_up():
                raise StateError(
                    path,
                    f"{path} is still locked by another holder after {waited:.0f} s; stopped "
                    "waiting for it, as a stop was asked (a checkpoint not marked read is "
                    "read again next time)",
                )
        time.sleep(0.05)


def _flock_holder(fd: int) -> str:
    """``pid 123 (flock)`` holding the flock on ``fd``'s file, from ``/proc/locks``
    (Linux), else ``another process``."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                _major, minor, inode = fields[5].split(":")
                if int(inode) == st.st_ino and int(minor, 16) == os.minor(st.st_dev):
                    pid = int(fields[4])
                    if pid == os.getpid():
                        return "this process (another of its writers)"
                    try:
                        comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    except OSError:
                        comm = "?"
                    return f"pid {pid} ({comm})"
    except (OSError, ValueError):
        pass
    return "another process"


def _strerror(exc: OSError) -> str:
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return text[:1].lower() + text[1:]


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISREG(mode):
        return "a file"
    return "not a regular file"


def _not_a_file(path: Path) -> str | None:
    """What is wrong with ``path`` as a state file ("is a directory, expected a file"),
    or None when it is a regular file (through symbolic links) or absent."""
    return _wrong_kind(path, stat.S_ISREG, "a file")


def _not_a_folder(path: Path) -> str | None:
    """The same for a state folder: None when it is a directory or absent."""
    return _wrong_kind(path, stat.S_ISDIR, "a directory")


def _wrong_kind(path: Path, is_expected: Callable[[int], bool], expected: str) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"is a dangling symbolic link, expected {expected}" if os.path.islink(path) else None
    except OSError as exc:
        return f"cannot be examined ({_strerror(exc)})"
    if is_expected(st.st_mode):
        return None
    return f"is {_kind(st.st_mode)}, expected {expected}"


def _state_error(exc: OSError, path: Path, doing: str) -> StateError:
    """The :class:`StateError` for ``exc`` raised while ``doing`` ("writing") ``path``."""
    problem = _not_a_file(path) if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENOTDIR) else None
    if problem is not None:
        return StateError(path, f"state file {shown(path)} {problem}; {_REMEDY}", exc.errno)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {
            errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large (the file size limit)",
        }[exc.errno]
        remedy = "free space there (or raise the limit), or give another --state-dir"
        return StateError(path, f"{what} {doing} {shown(path)}; {remedy}", exc.errno)
    return StateError(
        path,
        f"{_strerror(exc)} {doing} state file {shown(path)}; fix it, or give another --state-dir",
        exc.errno,
    )


@contextlib.contextmanager
def _guard(path: Path, doing: str, *, absent_ok: bool = False) -> Iterator[None]:
    """Turn an OSError of the block into the :class:`StateError` naming ``path``
    (``FileNotFoundError`` passes through as it is when ``absent_ok``)."""
    try:
        yield
    except FileNotFoundError as exc:
        if absent_ok:
            raise
        raise _state_error(exc, path, doing) from exc
    except OSError as exc:
        raise _state_error(exc, path, doing) from exc


# ---------------------------------------------------------------------- file helpers
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # maybe another StateDir object of this process, writing right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _open_regular(path: Path, flags: int, doing: str, *, absent_ok: bool = False) -> int:
    """``os.open`` that refuses (with :class:`StateError`) anything but a regular file,
    without blocking on a FIFO put in its place."""
    with _guard(path, doing, absent_ok=absent_ok):
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StateError(
                path, f"state file {shown(path)} is {_kind(mode)}, expected a file; {_REMEDY}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_regular(path: Path) -> bytes | None:
    """The bytes of state file ``path``, None when it is absent; :class:`StateError` when
    it is not a regular file or cannot be read."""
    try:
        fd = _open_regular(path, os.O_RDONLY, "reading", absent_ok=True)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        with _guard(path, "reading"):
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        raw = _read_regular(path)
        data = json.loads(raw or b"{}")
    except (OSError, ValueError, StateError):
        return {}
    return data if isinstance(data, dict) else {}


def _checksum(record: dict[str, Any]) -> str:
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _spool_line(record: dict[str, Any]) -> str:
    """The spool line of ``record``: the record and its checksum (TypeError when the
    record is not JSON-serialisable)."""
    return json.dumps({"sum": _checksum(record), "record": record})


def _spool_record(line: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a spool line; None when it fails its checksum. A line of an older
    version (a bare record, no checksum) is the record itself."""
    if set(line) != {"sum", "record"}:
        return line
    record = line["record"]
    if not isinstance(record, dict):
        return None
    try:
        ok = _checksum(record) == line["sum"]
    except (TypeError, ValueError):
        return None
    return record if ok else None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records (JSON objects) of a JSONL file; a torn (unterminated) last line is
    ignored, a damaged line elsewhere skipped with a warning. Nothing when the file is
    absent; :class:`StateError` when it is not a regular file or cannot be read."""
    raw = _read_regular(path)
    if raw is None:
        return
    lines = raw.split(b"\n")
    # The element after the last newline is empty, or a torn record: ignore it.
    torn = lines.pop()
    if torn.strip():
        log.info("%s: ignoring a torn last line (%d bytes)", shown(path), len(torn))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not JSON; skipped", shown(path), number)
            continue
        if isinstance(rec, dict):
            yield rec
        else:
            log.warning("%s line %d is not a JSON object; skipped", shown(path), number)


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    append_jsonl_lines(path, [json.dumps(r) for r in records])


def rewrite_jsonl_lines(path: Path, lines: list[str]) -> None:
    """Replace the JSONL file ``path`` by ``lines`` (each one JSON document), whole: a
    reader sees the old file or the new one (:func:`_atomic_write`); :class:`StateError`
    when it cannot be written, the old file left as it was."""
    _atomic_write(path, "".join(line + "\n" for line in lines).encode())


def append_jsonl_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` (each one JSON document, no newline) and fsync; a torn tail
    left by a crash is cut off first so the new lines start clean.

    All or nothing: when the write fails (:class:`StateError`: a full disk, a quota) the
    file is cut back to where it was, so no partial line stays behind."""
    data = "".join(line + "\n" for line in lines).encode()
    created = not os.path.lexists(path)
    fd = _open_regular(path, os.O_RDWR | os.O_CREAT, "opening")
    try:
        with _guard(path, "reading"):
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash mid-append left a partial record: cut back to the last newline.
                keep = _last_newline_end(fd, size)
                log.info("%s: cutting a torn last line (%d bytes)", shown(path), size - keep)
                os.ftruncate(fd, keep)
                size = keep
        try:
            _pwrite_all(fd, data, size)
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # drop what did get written
                os.fsync(fd)
            raise _state_error(exc, path, "writing") from exc
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def _last_newline_end(fd: int, size: int) -> int:
    """Offset just past the last b'\\n' in the file (0 when there is none)."""
    pos = size
    chunk = 65536
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        idx = block.rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        pos = start
    return 0


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, whole.

    The temporary file is removed when anything fails (a full disk: :class:`StateError`),
    leaving the old file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{_HOST_TAG}.tmp")
    problem = _not_a_file(path)
    if problem is not None:  # os.replace would put the file inside a directory's place
        raise StateError(path, f"state file {shown(path)} {problem}; {_REMEDY}")
    with _guard(path, "writing"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _state_error(exc, path, "writing") from exc
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
