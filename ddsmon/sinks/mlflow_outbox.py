"""Records that could not be sent: spooled in order, replayed in order, none doubled.

:class:`Outbox` stands between the sink and the store. Its contract:

Order
    A record is sent only after every record spooled before it has been replayed:
    :meth:`Outbox.send` first replays the spool (:meth:`Outbox.flush`), and sends the new
    record only if the spool is then empty; otherwise the record is spooled behind the
    others. So the run receives records in the order they were built.
When the store is down
    A send failing with :class:`~ddsmon.sinks.mlflow_http.Unreachable` spools the whole
    record (:meth:`StateDir.spool_append <ddsmon.state.StateDir.spool_append>`, fsynced
    before :meth:`Outbox.send` returns) and marks the store down for ``retry_interval``
    seconds, during which new records go straight to the spool without trying the
    store. Replay is attempted at the next :meth:`Outbox.send` after that (the next
    checkpoint, failure or start), regardless of the interval on start and close
    (``force``), and by a :class:`Retrier` (a background thread, exponential backoff up
    to a cap) while records wait, so that they arrive once the store answers again even
    when no checkpoint comes. A store that answers but is not usable as configured
    (:class:`~ddsmon.sinks.mlflow_http.Misconfigured`: a certificate refused, a sign-in
    page, credentials refused) is spooled the same way, its cause said instead of
    "unreachable", and said again when the cause changes. Any other error (a bad
    request) is raised to the caller;
    a :class:`~ddsmon.errors.ConfigError` (the run is another daemon's: the lease) stops
    the replay and is raised, the records staying spooled.
The ledger
    A reading's step is noted (:meth:`StateDir.note_spooled
    <ddsmon.state.StateDir.note_spooled>`) before its record is spooled, and noted
    delivered once it was delivered or dropped, so that a record lost from the spool (a
    garbled line, a spool truncated, emptied or deleted) is known by its step: see
    :meth:`Outbox.lost_steps`.
Acknowledgement
    A spooled record is acknowledged (:meth:`StateDir.spool_ack
    <ddsmon.state.StateDir.spool_ack>`, dropped from the spool) once it was delivered,
    once the run was found to hold its step already, or once the store rejected it or
    it could not be read back (both logged as errors: retrying could not help). The
    acknowledgement is written when the replay stops (all delivered, or the store went
    down again part-way), for the records handled so far; the rest stay spooled, in
    order, for the next replay.
Exactly once per step
    Before a replay the run is resolved and asked which steps it holds (the history of
    its checkpoint marker, ``ddsmon/checkpoint``, and of ``dds/checkpoint`` in older
    runs); a spooled reading of a step it holds is acknowledged without being sent. A
    crash between delivery and acknowledgement therefore leaves a record that the next
    replay drops, and a reading cut off part-way (the checkpoint marker is
    its last metric) is sent again whole, its rows identical (fixed timestamps). Tags
    set again are equal, and a tag deletion sent again finds nothing to delete, which is
    no error (:meth:`MlflowWriter.delete_tags
    <ddsmon.sinks.mlflow_writer.MlflowWriter.delete_tags>`).
Files
    A reading's artifact files live in ``<state>/outbox/<step>-<random>/`` from the time
    the record is built until it is delivered or acknowledged; :meth:`Outbox.clean`
    (on start) removes folders no spooled record refers to (left by a crash).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from ddsmon.errors import ConfigError
from ddsmon.redaction import scrub
from ddsmon.sinks.mlflow_http import Misconfigured, Unreachable
from ddsmon.sinks.mlflow_record import (
    ReadingRecord,
    Record,
    RecordFormatError,
    StartRecord,
    record_from_json,
)
from ddsmon.state import StateDir

__all__ = ("OUTBOX_FOLDER", "Outbox", "Retrier")

log = logging.getLogger(__name__)

#: Folder of the state directory holding artifact files not yet delivered.
OUTBOX_FOLDER = "outbox"

#: ``open_run(directory)``: resolve the run (``directory``: the watched directory as the
#: spool knows it, or None) and return its id and the steps it holds.
OpenRun = Callable[[Path | None], tuple[str, set[int]]]
#: ``deliver(record)``: write one record into the run; Unreachable when the store is down.
Deliver = Callable[[Record], None]


class Outbox:
    """The spool of one state directory, and when to try the store (module docstring).

    display_uri: the tracking URI as shown in log messages (credentials redacted).
    retry_interval: seconds after a failure during which records are spooled untried.
    """

    def __init__(
        self,
        state: StateDir,
        *,
        open_run: OpenRun,
        deliver: Deliver,
        display_uri: str,
        retry_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_spooled: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self._on_spooled = on_spooled
        self.retry_interval = float(retry_interval)
        self.display_uri = display_uri
        self._open_run = open_run
        self._deliver = deliver
        self._clock = clock
        self._down_until = 0.0
        #: the failure already said ("" when none was): "unreachable", or the cause of a
        #: store not usable (:class:`~ddsmon.sinks.mlflow_http.Misconfigured`)
        self._announced = ""
        self._kind = "unreachable"
        #: the first line of the last failure's message (said when records are spooled)
        self._reason = ""

    # ------------------------------------------------------------------ the store's state
    def waiting(self) -> bool:
        """True while the store is known to be down (within ``retry_interval`` of a
        failure)."""
        return self._clock() < self._down_until

    def mark_down(self, exc: BaseException) -> None:
        """The store did not answer: wait ``retry_interval`` before trying again."""
        self._down_until = self._clock() + self.retry_interval
        if isinstance(exc, Misconfigured):
            self._kind, self._reason = "not usable", str(exc)
        else:
            self._kind, self._reason = "unreachable", _first_line(exc)
        log.debug("MLflow at %s %s: %s", self.display_uri, self._kind, exc)

    @property
    def down_reason(self) -> str:
        """The last failure as said after ``MLflow at URI``: ``unreachable`` or ``not
        usable (<cause>)``."""
        return self._kind if self._kind == "unreachable" else f"{self._kind} ({self._reason})"

    def _back_up(self) -> None:
        if self._announced:
            log.warning("MLflow at %s answers again", self.display_uri)
        self._announced = ""
        self._down_until = 0.0

    # ------------------------------------------------------------------ the spool
    def _read(self) -> list[Record | RecordFormatError]:
        out: list[Record | RecordFormatError] = []
        for raw in self.state.spool_pending():
            try:
                out.append(record_from_json(raw))
            except RecordFormatError as exc:
                out.append(exc)
        return out

    def pending(self) -> list[Record]:
        """The spooled records, oldest first (lines that are no record left out)."""
        return [r for r in self._read() if not isinstance(r, RecordFormatError)]

    def pending_steps(self) -> set[int]:
        """Steps of the spooled readings."""
        return {r.step for r in self.pending() if isinstance(r, ReadingRecord)}

    def count(self) -> int:
        """Number of lines waiting in the spool."""
        return self.state.spool_count()

    def lost_steps(self, held: Iterable[int] | None) -> tuple[set[int], set[int]]:
        """Steps the ledger says were spooled and not delivered, that are neither in the
        spool nor among ``held`` (the run's steps; None when the store cannot say):
        ``(lost, settled)``: ``lost`` were recorded as read (the read-set) and so will
        never be sent unless read again; ``settled`` (in the run already, or never
        recorded as read) only leave the ledger. Reads, changes nothing."""
        ledger = self.state.spooled_steps()
        if not ledger:
            return set(), set()
        held_set = set(held or ())
        missing = ledger - self.pending_steps() - held_set
        lost = missing & self.state.done_steps()
        return lost, (ledger & held_set) | (missing - lost)

    # ------------------------------------------------------------------ files
    def new_folder(self, step: int) -> Path:
        """A fresh folder for the artifact files of the reading of ``step``."""
        folder = self.state.path(OUTBOX_FOLDER) / f"{step}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def clean(self) -> None:
        """Remove outbox folders of records that are neither spooled nor being sent
        (left by a crash between delivery and clean-up)."""
        outbox = self.state.root / OUTBOX_FOLDER
        if not outbox.is_dir():
            return
        keep = {
            str(Path(f.local).parent)
            for rec in self.pending()
            if isinstance(rec, ReadingRecord)
            for f in rec.files
        }
        for folder in outbox.iterdir():
            if str(folder) not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def remove_files(record: Record) -> None:
        """Delete a delivered (or abandoned) record's outbox folder."""
        if not isinstance(record, ReadingRecord):
            return
        for f in record.files:
            folder = Path(f.local).parent
            if folder.parent.name == OUTBOX_FOLDER:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ sending
    def send(self, record: Record, *, force: bool = False) -> None:
        """Send ``record`` after whatever waits in the spool, or spool it behind them.
        ``force``: replay now even within ``retry_interval`` of a failure."""
        if self.flush(force=force):
            try:
                self._deliver(record)
                self.remove_files(record)
                self._back_up()
                return
            except Unreachable as exc:
                self.mark_down(exc)
            except Exception:
                self.remove_files(record)
                raise
        self._spool(record)

    def _spool(self, record: Record) -> None:
        if isinstance(record, ReadingRecord):
            self.state.note_spooled(record.step)  # before: a lost line is known by its step
        self.state.spool_append(record.to_json())
        if self._on_spooled is not None:
            self._on_spooled()
        what = f"step {record.step}" if isinstance(record, ReadingRecord) else record.kind
        # said at the first failure, and again when it changes kind (or cause, for a
        # store not usable: each is another setting to fix)
        said = self._kind if self._kind == "unreachable" else self._reason
        if self._announced != said:
            if self._kind == "unreachable":
                log.warning(
                    "MLflow at %s unreachable: %s spooled to %s%s; records are replayed in "
                    "order once it answers",
                    self.display_uri,
                    what,
                    self.state.root,
                    f" ({self._reason})" if self._reason else "",
                )
            else:
                log.warning(
                    "MLflow at %s answers, but not as an MLflow server ddsmon can use: %s; "
                    "%s spooled to %s, records are replayed in order once it does",
                    self.display_uri,
                    self._reason,
                    what,
                    self.state.root,
                )
            self._announced = said
        else:
            log.info("MLflow still %s: %s spooled", self._kind, what)

    def flush(self, *, force: bool = False) -> bool:
        """Replay the spool in order; True when it is empty afterwards. Within
        ``retry_interval`` of a failure (unless ``force``) nothing is tried."""
        pending = self._read()
        if not pending:
            return True
        if not force and self.waiting():
            return False
        directory = next(
            (Path(r.directory) for r in pending if isinstance(r, StartRecord) and r.directory),
            None,
        )
        done = 0
        replayed = 0
        settled: list[int] = []
        run_id = None
        try:
            run_id, held = self._open_run(directory)
            for rec in pending:
                if isinstance(rec, RecordFormatError):
                    log.error(
                        "spooled record %d in %s cannot be read (%s); dropped",
                        done + 1,
                        self.state.root,
                        rec,
                    )
                elif isinstance(rec, ReadingRecord) and rec.step in held:
                    log.info("spooled step %s is already in the run; dropped", rec.step)
                    settled.append(rec.step)
                else:
                    try:
                        self._deliver(rec)
                        self.remove_files(rec)
                        replayed += 1
                        if isinstance(rec, ReadingRecord):
                            held.add(rec.step)
                            settled.append(rec.step)
                    except (Unreachable, ConfigError):
                        raise
                    except Exception as exc:
                        log.error(
                            "MLflow rejected a spooled %s record (%s); dropped",
                            rec.kind,
                            scrub(str(exc)),
                        )
                        if isinstance(rec, ReadingRecord):
                            settled.append(rec.step)
                done += 1
        except Unreachable as exc:
            self.mark_down(exc)
            return False
        finally:
            self.state.spool_ack(done)
            for rec in pending[:done]:
                if not isinstance(rec, RecordFormatError):
                    self.remove_files(rec)
            self.state.note_delivered(settled)
        if replayed:
            log.warning("replayed %d spooled records into MLflow run %s", replayed, run_id)
        self._back_up()
        return True


class Retrier:
    """A background thread replaying the spool while records wait in it.

    ``attempt()`` replays (True when the spool is empty afterwards); ``pending()`` says
    whether records wait. The first attempt comes ``first`` seconds after records were
    found waiting (or :meth:`poke`), each failed one doubles the pause up to ``cap``; a
    success starts over. Idle, the thread sleeps until poked (and looks again every
    ``cap`` seconds). A :class:`~ddsmon.errors.ConfigError` from ``attempt`` (the run is
    another daemon's, or gone: deleted, or not in a store restarted empty) ends the
    thread, said once and handed to ``on_give_up`` (the daemon stops then, rather than
    idling until the next checkpoint); any other error counts as a failed attempt.
    :meth:`stop` ends it and waits for it (an attempt under way finishes first).
    """

    def __init__(
        self,
        attempt: Callable[[], bool],
        pending: Callable[[], bool],
        *,
        first: float = 1.0,
        cap: float = 30.0,
        name: str = "ddsmon-mlflow-retry",
        on_give_up: Callable[[ConfigError], None] | None = None,
    ) -> None:
        self.on_give_up = on_give_up
        self.first = max(0.01, min(float(first), float(cap)))
        self.cap = max(self.first, float(cap))
        self._attempt = attempt
        self._pending = pending
        self._name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: attempts made (for tests and logs)
        self.attempts = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Records were spooled: look again."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        delay = self.first
        while not self._stop.is_set():
            try:
                waiting = self._pending()
            except Exception as exc:
                log.debug("retry: cannot read the spool: %s", exc)
                waiting = True
            if not waiting:
                delay = self.first
                self._wake.wait(self.cap)
                self._wake.clear()
                continue
            if self._stop.wait(delay):
                return
            self.attempts += 1
            try:
                ok = self._attempt()
            except ConfigError as exc:
                log.error("spooled records are not replayed any more: %s", exc)
                if self.on_give_up is not None:
                    self.on_give_up(exc)
                return
            except Exception as exc:
                log.warning("replaying the spool failed: %s", scrub(str(exc)))
                ok = False
            delay = self.first if ok else min(delay * 2, self.cap)


def _first_line(exc: BaseException, most: int = 200) -> str:
    """Why the store did not answer: the first line of the innermost cause's message
    (``database is locked``, ``[Errno 111] Connection refused``, not the SQL or the URL
    wrapped around them), credentials scrubbed, at most ``most`` characters."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not seen for seen in chain):
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for each in reversed(chain):
        lines = scrub(str(each)).strip().splitlines()
        if lines and lines[0].strip():
            line = lines[0].strip()
            return line if len(line) <= most else line[: most - 1] + "…"
    return ""
