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
    rewrite).

Append-only files tolerate a torn last line (a crash mid-write): a last line that is not
newline-terminated is ignored when read and cut off before the next append. A damaged
line elsewhere is skipped with a warning naming the file and line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddsmon.errors import ConfigError

__all__ = ("DEFAULT_STATE_NAME", "AlreadyWatched", "StateDir", "append_jsonl_lines", "read_jsonl")

log = logging.getLogger(__name__)

#: Name of the state directory inside a watched directory.
DEFAULT_STATE_NAME = ".ddsmon"

_LOCK = "lock"
_DONE = "done.jsonl"
_KV = "state.json"
_SPOOL = "spool.jsonl"


class AlreadyWatched(ConfigError):
    """Another ddsmon process holds the claim on this state directory.

    ``holder`` is what that process wrote into the lock file (pid, host, started), or
    empty when it could not be read.
    """

    def __init__(self, root: Path, holder: dict[str, Any]) -> None:
        self.root = root
        self.holder = holder
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            f" (since {holder.get('started', '?')})"
            if holder
            else "another process (its lock file is empty)"
        )
        super().__init__(
            f"{root.parent if root.name == DEFAULT_STATE_NAME else root} is already watched by "
            f"{who}; lock {root / _LOCK}. Stop that daemon first, or give another --state-dir."
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
    flock).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._done: dict[str, tuple[tuple[int, int], int | None]] = {}
        self._done_sig: tuple[int, int] | None = None

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
            raise ConfigError(f"cannot create state directory {self.root}: {exc}") from exc
        if not self.root.is_dir():
            raise ConfigError(f"state directory {self.root} exists and is not a directory")

    # ------------------------------------------------------------------ claim
    @property
    def claimed(self) -> bool:
        return self._lock_fd is not None

    def claim(self) -> None:
        """Take the advisory lock, or raise :class:`AlreadyWatched` naming the holder.

        Idempotent for the object that holds it.
        """
        with self._mutex:
            if self._lock_fd is not None:
                return
            path = self.path(_LOCK)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise AlreadyWatched(self.root, _read_holder(path)) from None
                raise ConfigError(f"cannot lock {path}: {exc}") from exc
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            self._lock_fd = fd
            log.debug("claimed %s as pid %d", self.root, info["pid"])

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
                log.warning("%s: skipping a malformed record %r", path, rec)
        self._done, self._done_sig = done, sig

    def is_done(self, path: str, fingerprint: tuple[int, int]) -> bool:
        """Whether ``path`` was read with this exact ``(size, mtime_ns)`` fingerprint."""
        with self._mutex:
            self._refresh_done()
            entry = self._done.get(str(path))
            return entry is not None and entry[0] == (int(fingerprint[0]), int(fingerprint[1]))

    def mark_done(self, path: str, fingerprint: tuple[int, int], step: int | None) -> None:
        """Record that ``path`` (at ``fingerprint``) was read and logged at ``step``; durable
        (fsynced) when this returns."""
        rec = {
            "path": str(path),
            "fp": [int(fingerprint[0]), int(fingerprint[1])],
            "step": None if step is None else int(step),
        }
        with self._mutex:
            self._refresh_done()
            _append_jsonl(self.path(_DONE), [rec])
            self._done[rec["path"]] = ((rec["fp"][0], rec["fp"][1]), rec["step"])
            st = (self.root / _DONE).stat()
            self._done_sig = (st.st_size, st.st_mtime_ns)

    def done_steps(self) -> set[int]:
        """Steps of every checkpoint recorded as read (latest version of each path)."""
        with self._mutex:
            self._refresh_done()
            return {step for _, step in self._done.values() if step is not None}

    # ------------------------------------------------------------------ key-value
    def get(self, key: str, default: Any = None) -> Any:
        """A value from ``state.json`` (``default`` when absent or unreadable)."""
        return self._read_kv().get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable ``value`` under ``key`` (atomic, durable; other keys,
        possibly written by another ``StateDir`` object, are kept)."""
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"state value for {key!r} is not JSON-serialisable: {exc}") from exc
        with self._mutex, self._flocked(_KV + ".lock"):
            data = self._read_kv()
            data[key] = value
            _atomic_write(self.root / _KV, json.dumps(data, sort_keys=True).encode())

    def delete(self, key: str) -> None:
        """Remove ``key`` (no-op when absent)."""
        with self._mutex, self._flocked(_KV + ".lock"):
            data = self._read_kv()
            if data.pop(key, None) is not None:
                _atomic_write(self.root / _KV, json.dumps(data, sort_keys=True).encode())

    def _read_kv(self) -> dict[str, Any]:
        path = self.root / _KV
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("state file %s is unreadable (%s); starting from an empty one", path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("state file %s does not hold a JSON object; ignored", path)
            return {}
        return data

    @contextlib.contextmanager
    def _flocked(self, name: str) -> Iterator[None]:
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    # ------------------------------------------------------------------ spool
    def spool_append(self, record: dict[str, Any]) -> None:
        """Append one undelivered record to the spool; durable (fsynced) when this returns."""
        line = json.dumps(record)  # fail before touching the file
        with self._mutex, self._flocked(_SPOOL + ".lock"):
            append_jsonl_lines(self.path(_SPOOL), [line])

    def spool_pending(self) -> list[dict[str, Any]]:
        """Every record not yet acknowledged, oldest first."""
        with self._mutex, self._flocked(_SPOOL + ".lock"):
            return list(read_jsonl(self.root / _SPOOL))

    def spool_ack(self, count: int) -> None:
        """Drop the first ``count`` records (delivered); atomic."""
        if count <= 0:
            return
        with self._mutex, self._flocked(_SPOOL + ".lock"):
            path = self.root / _SPOOL
            rest = list(read_jsonl(path))[count:]
            if rest:
                _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rest).encode())
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                _fsync_dir(self.root)

    def spool_count(self) -> int:
        """Number of records waiting in the spool."""
        return len(self.spool_pending())


# ---------------------------------------------------------------------- file helpers
def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records (JSON objects) of a JSONL file; a torn (unterminated) last line is
    ignored, a damaged line elsewhere skipped with a warning."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    lines = raw.split(b"\n")
    # The element after the last newline is empty, or a torn record: ignore it.
    torn = lines.pop()
    if torn.strip():
        log.info("%s: ignoring a torn last line (%d bytes)", path, len(torn))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not JSON; skipped", path, number)
            continue
        if isinstance(rec, dict):
            yield rec
        else:
            log.warning("%s line %d is not a JSON object; skipped", path, number)


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    append_jsonl_lines(path, [json.dumps(r) for r in records])


def append_jsonl_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` (each one JSON document, no newline) and fsync; a torn tail
    left by a crash is cut off first so the new lines start clean."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A crash mid-append left a partial record: cut back to the last newline.
            keep = _last_newline_end(fd, size)
            log.info("%s: cutting a torn last line (%d bytes)", path, size - keep)
            os.ftruncate(fd, keep)
            size = keep
        data = "".join(line + "\n" for line in lines).encode()
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], size + written)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


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
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
