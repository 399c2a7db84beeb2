"""Alert outputs: an events file (``--events-json``) and a command hook (``--on-event``).

Both see only events (never plain readings or failures), one record per event:
:func:`event_record` is the event's own fields (``Event.to_dict()``: step, layer, kind,
reading, before, after, magnitude, message) plus ``checkpoint`` (the checkpoint's path)
and ``time`` (UTC, ISO 8601, when the sink received it). Non-finite numbers become
``null`` so every line is strict JSON.

:class:`EventsJsonSink` appends one record a line and syncs the file to disk once per
checkpoint. :class:`CommandHookSink` runs a shell command per event, in order, on a
worker thread of its own, so a slow hook delays neither the reading of the next
checkpoint nor the other sinks; a hook that fails or hangs is logged and forgotten.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ddsmon.errors import ConfigError

if TYPE_CHECKING:
    from ddsmon.events import Event
    from ddsmon.records import CheckpointFailure, CheckpointReading
    from ddsmon.sinks import RunInfo

__all__ = (
    "HOOK_ENV_PREFIX",
    "CommandHookSink",
    "EventsJsonSink",
    "event_environment",
    "event_record",
)

logger = logging.getLogger(__name__)

#: Prefix of the environment variables a hook receives.
HOOK_ENV_PREFIX = "DDSMON_EVENT_"

_STDERR_TAIL = 800  # characters of a failing hook's stderr kept in the warning


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, paths to str."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def event_record(
    event: Event, checkpoint: Path | str | None, when: datetime | None = None
) -> dict[str, Any]:
    """The JSON object written for one event: ``event.to_dict()`` + checkpoint + time."""
    record = _clean(dict(event.to_dict()))
    record["checkpoint"] = None if checkpoint is None else str(checkpoint)
    when = when if when is not None else datetime.now(timezone.utc)
    record["time"] = when.isoformat(timespec="milliseconds")
    return record


def _env_number(x: float | int | None) -> str:
    """A number as a hook sees it: full precision (``repr``), empty when unresolved."""
    if x is None:
        return ""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return repr(float(x))


def event_environment(record: dict[str, Any]) -> dict[str, str]:
    """The ``DDSMON_EVENT_*`` variables for one :func:`event_record`.

    KIND, STEP, LAYER, READING, BEFORE, AFTER, MAGNITUDE, MESSAGE, CHECKPOINT, TIME and
    JSON (the whole record). Unresolved numbers are empty strings.
    """
    p = HOOK_ENV_PREFIX
    env = {
        f"{p}KIND": str(record.get("kind", "")),
        f"{p}STEP": _env_number(record.get("step")),
        f"{p}LAYER": str(record.get("layer", "")),
        f"{p}READING": str(record.get("reading") or ""),
        f"{p}BEFORE": _env_number(record.get("before")),
        f"{p}AFTER": _env_number(record.get("after")),
        f"{p}MAGNITUDE": _env_number(record.get("magnitude")),
        f"{p}MESSAGE": str(record.get("message", "")),
        f"{p}CHECKPOINT": str(record.get("checkpoint") or ""),
        f"{p}TIME": str(record.get("time", "")),
        f"{p}JSON": json.dumps(record, allow_nan=False),
    }
    return {k: v.replace("\0", "") for k, v in env.items()}


class EventsJsonSink:
    """``--events-json FILE``: one JSON object a line per event, appended.

    The file and its parent folders are created at :meth:`start` (or at the first
    event); an existing file is appended to, so a restarted daemon continues the log.
    Lines of one checkpoint are written together, flushed and fsynced before
    :meth:`on_reading` returns.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()

    def _open(self) -> IO[str]:
        if self._fh is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"--events-json {self.path}: cannot open for appending: {exc.strerror or exc}"
                ) from exc
        return self._fh

    def start(self, info: RunInfo) -> None:
        with self._lock:
            self._open()

    def on_queue(self, pending: int) -> None:
        pass

    def on_reading(self, reading: CheckpointReading, events: list[Event]) -> None:
        if not events:
            return
        lines = [
            json.dumps(event_record(e, reading.path), allow_nan=False, sort_keys=False) + "\n"
            for e in events
        ]
        with self._lock:
            fh = self._open()
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())

    def on_failure(self, failure: CheckpointFailure) -> None:
        pass  # a clean event log: failures go to the terminal and the tracking run

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


_STOP = object()


class CommandHookSink:
    """``--on-event COMMAND``: run ``COMMAND`` through the shell once per event.

    The command sees the event in ``DDSMON_EVENT_*`` variables (see
    :func:`event_environment`) on top of the daemon's own environment, stdin closed.
    Hooks run one at a time, in event order, on a worker thread; each in a session of
    its own, so that on ``timeout`` the whole process group (the shell and anything it
    started) is terminated, then killed. A hook that exits non-zero, times out or cannot
    start is logged as a warning with its status and the tail of its stderr; it never
    raises into the daemon. Its stdout is logged at debug level.

    :meth:`close` waits for queued hooks to finish, for at most ``close_timeout``
    seconds in all (default: ``timeout``); hooks still queued then are skipped, with a
    warning, and a running one is terminated.

    A hook that starts something in the background should redirect that process's
    output: the hook counts as finished when its stdout and stderr close.
    """

    def __init__(
        self, command: str, *, timeout: float = 30.0, close_timeout: float | None = None
    ) -> None:
        if not command or not command.strip():
            raise ConfigError("--on-event: the command is empty")
        if not timeout > 0:
            raise ConfigError(f"--on-event: timeout must be positive, got {timeout}")
        self.command = command
        self.timeout = float(timeout)
        self.close_timeout = float(timeout if close_timeout is None else close_timeout)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: counts of hooks run, failed (non-zero, timed out, not started) and skipped
        self.ran = 0
        self.failed = 0
        self.skipped = 0

    # -- Sink protocol --------------------------------------------------------------

    def start(self, info: RunInfo) -> None:
        with self._lock:
            self._ensure_worker()

    def on_queue(self, pending: int) -> None:
        pass

    def on_reading(self, reading: CheckpointReading, events: list[Event]) -> None:
        if not events:
            return
        with self._lock:
            if self._closed:
                logger.warning("--on-event: sink closed; %d event(s) not run", len(events))
                return
            self._ensure_worker()
            for event in events:
                self._queue.put(event_record(event, reading.path))

    def on_failure(self, failure: CheckpointFailure) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(_STOP)
        if thread is None:
            return
        thread.join(self.close_timeout)
        if thread.is_alive():
            self._abandon.set()
            thread.join(5.0)
            if thread.is_alive():  # pragma: no cover - only if killpg itself hangs
                logger.warning("--on-event: hook worker did not stop")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued hook has run; True unless ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                done.wait(left)
        return True

    # -- internals ------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="ddsmon-on-event", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._abandon.is_set():
                    self.skipped += 1
                    logger.warning(
                        "--on-event: skipped the %s event at step %s (daemon closing)",
                        item.get("kind"),
                        item.get("step"),
                    )
                    continue
                self._run(item)
            except Exception:  # never let one hook end the worker
                logger.exception("--on-event: hook for %r failed unexpectedly", item)
            finally:
                self._queue.task_done()

    def _run(self, record: dict[str, Any]) -> None:
        env = {**os.environ, **event_environment(record)}
        what = f"{record.get('kind')} event at step {record.get('step')} ({record.get('layer')})"
        self.ran += 1
        try:
            proc = subprocess.Popen(
                self.command,
                shell=True,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self.failed += 1
            logger.warning(
                "--on-event hook %r could not start for the %s: %s", self.command, what, exc
            )
            return
        assert proc.stdout is not None and proc.stderr is not None
        # each stream read to its end on a thread of its own, its last bytes kept: a hook
        # that prints without end (a loop, `yes`, a log it tails) costs no memory; before,
        # everything it printed in its `timeout` was held, and the daemon could run out
        tails = (_Tail(proc.stdout), _Tail(proc.stderr))
        deadline = time.monotonic() + self.timeout
        timed_out = False
        while True:
            wait = min(0.1, max(deadline - time.monotonic(), 0.0))
            if _finished(proc, tails, wait):
                break
            if self._abandon.is_set() or time.monotonic() >= deadline:
                timed_out = True
                self._terminate(proc, tails)
                break
        out, err = tails[0].data(), tails[1].data()
        if out:
            logger.debug("--on-event hook stdout for the %s: %s", what, _tail(out))
        if timed_out:
            self.failed += 1
            reason = "daemon closing" if self._abandon.is_set() else f"after {self.timeout:g}s"
            logger.warning(
                "--on-event hook %r timed out (%s) for the %s; terminated. stderr: %s",
                self.command,
                reason,
                what,
                _tail(err) or "(empty)",
            )
        elif proc.returncode != 0:
            self.failed += 1
            logger.warning(
                "--on-event hook %r exited with status %d for the %s. stderr: %s",
                self.command,
                proc.returncode,
                what,
                _tail(err) or "(empty)",
            )

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], tails: tuple[_Tail, _Tail]) -> None:
        """SIGTERM the hook's process group, SIGKILL it a second later."""
        for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            if _finished(proc, tails, grace):
                return
        proc.kill()  # pragma: no cover - the group survived SIGKILL
        proc.wait()  # pragma: no cover


#: bytes of each of a hook's streams kept (the rest is read and dropped)
_KEEP_BYTES = 16 * 1024


class _Tail:
    """A hook's stdout or stderr, read to its end on a thread; only the last
    :data:`_KEEP_BYTES` are kept."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._read, args=(stream,), name="ddsmon-on-event-output", daemon=True
        )
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        fd = stream.fileno()
        try:
            while chunk := os.read(fd, 65536):
                with self._lock:
                    self._buf += chunk
                    if len(self._buf) > 2 * _KEEP_BYTES:
                        del self._buf[: len(self._buf) - _KEEP_BYTES]
        except OSError:
            pass
        finally:
            stream.close()

    def closed(self, timeout: float) -> bool:
        """Whether the stream reached its end (waiting up to ``timeout`` seconds)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def data(self) -> bytes:
        with self._lock:
            return bytes(self._buf[-_KEEP_BYTES:])


def _finished(proc: subprocess.Popen[bytes], tails: tuple[_Tail, _Tail], wait: float) -> bool:
    """Whether the hook is done: both its streams closed and its process exited (waiting
    up to ``wait`` seconds in all)."""
    end = time.monotonic() + wait
    if not all(t.closed(max(end - time.monotonic(), 0.0)) for t in tails):
        return False
    try:
        proc.wait(timeout=max(end - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        return False
    return True


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if len(text) > _STDERR_TAIL:
        text = "…" + text[-_STDERR_TAIL:]
    return text
