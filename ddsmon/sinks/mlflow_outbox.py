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
    checkpoint, failure or start) and, regardless of the interval, on start and close
    (``force``). Any other error (a bad request) is raised to the caller.
Acknowledgement
    A spooled record is acknowledged (:meth:`StateDir.spool_ack
    <ddsmon.state.StateDir.spool_ack>`, dropped from the spool) once it was delivered,
    once the run was found to hold its step already, or once the store rejected it or
    it could not be read back (both logged as errors: retrying could not help). The
    acknowledgement is written when the replay stops (all delivered, or the store went
    down again part-way), for the records handled so far; the rest stay spooled, in
    order, for the next replay.
Exactly once per step
    Before a replay the run is resolved and asked which steps it holds
    (``dds/checkpoint``); a spooled reading of a step it holds is acknowledged without
    being sent. A crash between delivery and acknowledgement therefore leaves a record
    that the next replay drops, and a reading cut off part-way (the checkpoint marker is
    its last metric) is sent again whole, its rows identical (fixed timestamps).
Files
    A reading's artifact files live in ``<state>/outbox/<step>-<random>/`` from the time
    the record is built until it is delivered or acknowledged; :meth:`Outbox.clean`
    (on start) removes folders no spooled record refers to (left by a crash).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ddsmon.redaction import scrub
from ddsmon.sinks.mlflow_http import Unreachable
from ddsmon.sinks.mlflow_record import (
    ReadingRecord,
    Record,
    RecordFormatError,
    StartRecord,
    record_from_json,
)
from ddsmon.state import StateDir

__all__ = ("OUTBOX_FOLDER", "Outbox")

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
    ) -> None:
        self.state = state
        self.retry_interval = float(retry_interval)
        self.display_uri = display_uri
        self._open_run = open_run
        self._deliver = deliver
        self._clock = clock
        self._down_until = 0.0
        self._announced = False

    # ------------------------------------------------------------------ the store's state
    def waiting(self) -> bool:
        """True while the store is known to be down (within ``retry_interval`` of a
        failure)."""
        return self._clock() < self._down_until

    def mark_down(self, exc: BaseException) -> None:
        """The store did not answer: wait ``retry_interval`` before trying again."""
        self._down_until = self._clock() + self.retry_interval
        log.debug("MLflow at %s unreachable: %s", self.display_uri, exc)

    def _back_up(self) -> None:
        if self._announced:
            log.warning("MLflow at %s answers again", self.display_uri)
        self._announced = False
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
        self.state.spool_append(record.to_json())
        what = f"step {record.step}" if isinstance(record, ReadingRecord) else record.kind
        if not self._announced:
            log.warning(
                "MLflow at %s unreachable: %s spooled to %s; records are replayed in order "
                "once it answers",
                self.display_uri,
                what,
                self.state.root,
            )
            self._announced = True
        else:
            log.info("MLflow still unreachable: %s spooled", what)

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
                else:
                    try:
                        self._deliver(rec)
                        self.remove_files(rec)
                        replayed += 1
                        if isinstance(rec, ReadingRecord):
                            held.add(rec.step)
                    except Unreachable:
                        raise
                    except Exception as exc:
                        log.error(
                            "MLflow rejected a spooled %s record (%s); dropped",
                            rec.kind,
                            scrub(str(exc)),
                        )
                done += 1
        except Unreachable as exc:
            self.mark_down(exc)
            return False
        finally:
            self.state.spool_ack(done)
            for rec in pending[:done]:
                if not isinstance(rec, RecordFormatError):
                    self.remove_files(rec)
        if replayed:
            log.warning("replayed %d spooled records into MLflow run %s", replayed, run_id)
        self._back_up()
        return True
