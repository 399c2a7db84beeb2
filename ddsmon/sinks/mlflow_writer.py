"""The MLflow calls that write a record into a run, through one :class:`MlflowClient`.

:class:`MlflowWriter` owns the client (made on first use; nothing connects before) and
writes a resolved run id's records:

* :meth:`~MlflowWriter.log_batch`: params, tags and metrics in ``log_batch`` calls within
  MLflow's batch limits (:data:`~ddsmon.sinks.mlflow_keys.LIMITS`): a constant number of
  calls per checkpoint. Metrics keep their order across the calls, so the last metric of
  a record (the checkpoint marker) goes in the last call: a step counts as held only once
  every earlier call of its record went through.
* :meth:`~MlflowWriter.write_start`: the params (immutable in MLflow: one the run already
  holds is skipped, a changed one warned about once and not logged), the tags that
  identify a ddsmon run, and the run's note (``mlflow.note.content``; a run given by id
  keeps a note of its own, and gets ``ddsmon.note`` instead).
* :meth:`~MlflowWriter.write_reading`: a checkpoint's artifact files, ``events.jsonl``
  when it raised events, then its metrics and tags.
* :meth:`~MlflowWriter.delete_tags`: tags deleted, one ``delete_tag`` call each; a tag
  the run does not hold (deleted already) is no error.

Every call goes through :func:`ddsmon.sinks.mlflow_http.call`: a store that does not
answer raises :class:`~ddsmon.sinks.mlflow_http.Unreachable` (the caller spools), any
other error (a bad request) is raised as it is. A record half written when the store
went down is written again whole: metric rows carry fixed timestamps, so the re-sent rows
are identical, and MLflow's stores keep one of each.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsmon.errors import ConfigError
from ddsmon.events import EVENT_KINDS
from ddsmon.redaction import redact_uri, scrub
from ddsmon.sinks.mlflow_http import call, is_unreachable, store_fault
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    CHECKPOINT_METRICS,
    DIRECTORY_ID_TAG,
    DIRECTORY_TAG,
    LIMITS,
    NOTE_TAG,
    directory_id,
    param_key,
    truncate,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ddsmon.sinks.mlflow_record import MetricRow, ReadingRecord, ScalarsRecord, StartRecord

__all__ = (
    "NOTE_HEADER",
    "STORE_INIT_ATTEMPTS",
    "MlflowWriter",
    "open_client",
    "run_note",
    "sqlite_path",
)

log = logging.getLogger(__name__)

#: First line of the note ddsmon writes (a note starting so is ddsmon's to rewrite).
NOTE_HEADER = "### ddsmon: dead-direction readings"


#: MLflow's switch for the run URLs its client prints to stdout on ending a run.
_SUPPRESS_URL = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@contextlib.contextmanager
def _url_printing_off() -> Iterator[None]:
    """MLflow's run-URL print to stdout off for the duration, unless the user set it."""
    if _SUPPRESS_URL in os.environ:
        yield
        return
    os.environ[_SUPPRESS_URL] = "true"
    try:
        yield
    finally:
        os.environ.pop(_SUPPRESS_URL, None)


class MlflowWriter:
    """MLflow calls for one tracking URI (``None``: MLflow's default); ``client``: one
    already made (else it is made on first use)."""

    def __init__(self, tracking_uri: str | None, *, client: MlflowClient | None = None) -> None:
        self.tracking_uri = tracking_uri
        self._client = client
        self._warned_params: set[str] = set()

    @property
    def display_uri(self) -> str:
        """The tracking URI with any credentials redacted (what ddsmon ever prints)."""
        if self.tracking_uri is None:
            return "(MLflow default)"
        return redact_uri(self.tracking_uri)

    @property
    def client(self) -> MlflowClient:
        """The client, made on first use (:func:`open_client`); :class:`Unreachable` or
        :class:`ConfigError`."""
        if self._client is None:
            try:
                self._client = open_client(self.tracking_uri)
            except Exception as exc:
                fault = store_fault(exc)
                if fault is not None:
                    raise fault from exc
                raise ConfigError(
                    f"MLflow tracking URI {self.display_uri}: {scrub(str(exc))}"
                ) from exc
        return self._client

    # ------------------------------------------------------------------ single calls
    def checkpoint_steps(self, run_id: str) -> set[int]:
        """Steps the run holds a checkpoint of: the histories of its marker under every
        name it has had (``ddsmon/checkpoint``, and ``dds/checkpoint`` of older runs)."""
        steps: set[int] = set()
        for key in CHECKPOINT_METRICS:
            steps |= {int(m.step) for m in call(self.client.get_metric_history, run_id, key)}
        return steps

    def log_artifact(self, run_id: str, local: str, artifact_dir: str | None = None) -> None:
        call(self.client.log_artifact, run_id, local, artifact_dir)

    def log_artifacts(self, run_id: str, folder: str, artifact_dir: str) -> None:
        call(self.client.log_artifacts, run_id, folder, artifact_dir)

    def set_terminated(self, run_id: str, status: str) -> None:
        """End the run. On a server, MLflow's client first prints "View run ... at: URL"
        and "View experiment at: URL" to stdout, which is ddsmon's record of the readings
        (``scan | head``, a CI log), and fetches the run again to do so; that print is
        off for the call (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``, unless the user
        set it)."""
        with _url_printing_off():
            call(self.client.set_terminated, run_id, status=status)

    def delete_run(self, run_id: str) -> None:
        call(self.client.delete_run, run_id)

    # ------------------------------------------------------------------ records
    def write_start(self, run_id: str, record: StartRecord, *, owned: bool) -> None:
        """Params not yet in the run, the identifying tags and the note. A param the run
        holds with another value keeps it (params cannot change), warned of once, unless
        the daemon chose it itself (``record.automatic``: ``torch_threads`` picked per
        process), which is no conflicting setting."""
        directory = Path(record.directory)
        run = call(self.client.get_run, run_id)
        existing = run.data.params
        params: dict[str, str] = {}
        for key, value in record.params.items():
            k = param_key(key)
            v = truncate(value, LIMITS["param_value"])
            if k in existing:
                automatic = key in record.automatic
                if existing[k] != v and not automatic and k not in self._warned_params:
                    self._warned_params.add(k)
                    log.warning(
                        "MLflow param %r of run %s is %r, now %r; params cannot change, "
                        "the run keeps the first value",
                        k,
                        run_id,
                        truncate(existing[k], 80),
                        truncate(v, 80),
                    )
                continue
            params[k] = v
        from ddsmon import __version__

        tags = {
            "ddsmon.version": __version__,
            DIRECTORY_TAG: str(directory),
            DIRECTORY_ID_TAG: directory_id(directory),
        }
        note = run_note(directory)
        current = run.data.tags.get(NOTE_TAG)
        if owned or not current or current.startswith(NOTE_HEADER):
            tags[NOTE_TAG] = note
        else:
            tags["ddsmon.note"] = note  # keep the training run's own note
        self.log_batch(run_id, params=params, tags=tags)

    def write_reading(
        self, run_id: str, record: ReadingRecord, *, events_file: Path | None = None
    ) -> None:
        """The record's files (one gone missing is warned about and skipped), then
        ``events_file`` when given, existing and the record raised events, then its
        metrics and tags."""
        for local, artifact_dir in record.files:
            if Path(local).exists():
                self.log_artifact(run_id, local, artifact_dir)
            else:
                log.warning("spooled artifact %s is gone; not uploaded", local)
        if events_file is not None and record.events and events_file.exists():
            self.log_artifact(run_id, str(events_file))
        self.log_batch(run_id, metrics=record.metrics, tags=record.tags)

    def write_scalars(self, run_id: str, record: ScalarsRecord) -> list[MetricRow]:
        """An alias's scalars (:class:`~ddsmon.sinks.mlflow_record.ScalarsRecord`): each
        row whose key the run holds no value of at the row's step, asked of the run now
        (one ``get_metric_history`` per key), so a scalar a step has is never
        overwritten; the rows logged."""
        fresh = []
        for row in record.metrics:
            held = call(self.client.get_metric_history, run_id, row.key)
            if all(int(m.step) != row.step for m in held):
                fresh.append(row)
        self.log_batch(run_id, metrics=fresh)
        return fresh

    def delete_tags(self, run_id: str, keys: Iterable[str]) -> None:
        """Delete each of ``keys`` from the run. A key it does not hold (never set, or
        deleted by an earlier delivery of the same record) is skipped: MLflow answers
        ``RESOURCE_DOES_NOT_EXIST`` for it, which is the only error ignored here (the run
        itself was found just before, by the lease's check)."""
        from mlflow.exceptions import MlflowException

        for key in keys:
            try:
                call(self.client.delete_tag, run_id, key)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.debug("tag %s is not in run %s; nothing to delete", key, run_id)

    def log_batch(
        self,
        run_id: str,
        metrics: Iterable[MetricRow] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """``log_batch`` in chunks within MLflow's limits: params, then tags, then metrics
        in their order, so the last metric goes in the last call."""
        from mlflow.entities import Metric, Param, RunTag

        ents: list[tuple[str, Any]] = [("p", Param(k, v)) for k, v in (params or {}).items()]
        ents += [("t", RunTag(k, v)) for k, v in (tags or {}).items()]
        ents += [("m", Metric(k, float(v), int(ts), int(s))) for k, v, s, ts in metrics]
        chunk: dict[str, list[Any]] = {"m": [], "p": [], "t": []}

        def send() -> None:
            if any(chunk.values()):
                call(
                    self.client.log_batch,
                    run_id,
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


# ---------------------------------------------------------------------- opening the store
#: Attempts at opening a store whose schema another process is creating or migrating.
STORE_INIT_ATTEMPTS = 6
_INIT_RACE = (
    "already exists",
    "duplicate column",
    "database is locked",
    "no such table",
    "alembic",
    "migration",
)


def _init_race(exc: BaseException) -> bool:
    """Whether ``exc`` is what a concurrent schema creation or migration looks like
    (``table _alembic_tmp_experiments already exists``, ``database is locked``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__module__.startswith("alembic"):
            return True
        if any(m in str(cur).lower() for m in _INIT_RACE):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def sqlite_path(tracking_uri: str | None) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI (None for any other store, or an
    in-memory one); ``None`` means MLflow's default URI."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    if not str(tracking_uri).startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(str(tracking_uri)).database
    except Exception:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute()


@contextlib.contextmanager
def _init_lock(tracking_uri: str | None, wait: float = 300.0) -> Iterator[None]:
    """For a SQLite store, an flock on ``<database>.ddsmon-init.lock`` while the store is
    opened: ddsmon processes on one machine create or migrate its schema one at a time
    (MLflow's own migration is not safe against a second one running at once: it can
    leave a ``_alembic_tmp_*`` table behind for good). Other stores: nothing."""
    db = sqlite_path(tracking_uri)
    if db is None or not db.parent.is_dir():
        yield
        return
    lock = db.with_name(db.name + ".ddsmon-init.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.debug("cannot open %s (%s); opening the store unlocked", lock, exc)
        yield
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("%s still locked after %.0fs; opening the store anyway", lock, wait)
                    break
                time.sleep(0.05 + random.random() * 0.1)
        yield
    finally:
        os.close(fd)  # drops the flock


def open_client(
    tracking_uri: str | None,
    *,
    attempts: int = STORE_INIT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> MlflowClient:
    """``MlflowClient(tracking_uri)``, which opens the store (for a database: creates or
    migrates its schema). A SQLite store is opened under :func:`_init_lock`; an error that
    looks like another process creating or migrating the schema at the same moment is
    retried, ``attempts`` times in all, after a jittered, growing pause (0.2-0.6 s, then
    doubling). Anything else is raised at once."""
    from mlflow.tracking import MlflowClient

    for attempt in range(1, attempts + 1):
        try:
            with _init_lock(tracking_uri):
                return MlflowClient(tracking_uri)
        except Exception as exc:
            if attempt >= attempts or is_unreachable(exc) or not _init_race(exc):
                raise
            pause = (0.2 + random.random() * 0.4) * 2 ** (attempt - 1)
            log.info(
                "opening the MLflow store failed (%s); attempt %d of %d in %.1fs",
                scrub(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__),
                attempt + 1,
                attempts,
                pause,
            )
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def run_note(directory: Path) -> str:
    """The run's note (Markdown): what it holds and where to look."""
    return (
        f"{NOTE_HEADER}\n\n"
        f"Checkpoints of `{directory}` read by ddsmon, one probe pass each, "
        "logged at each checkpoint's training step.\n\n"
        "* **Plots** (Artifacts): `plots/dashboard.html`, an interactive dashboard (readings "
        "per layer over steps, a checkpoint's spectra with their floors, the events, the "
        "trainer's scalars); `plots/heatmaps/<reading>.png`, a layer x step heatmap per "
        "headline reading with events marked; `plots/trajectories.png` and "
        "`plots/spectra.png`.\n"
        "* **Metrics** `dds/<reading>/<layer>`, the headline readings: `lambda_ratio` = "
        "lambda_min/lambda_max of the per-sample-gradient Fisher-Gram G, `sigma_ratio` = "
        "sigma_min/sigma_max of the layer outputs X, `log_volume` = log det+(G) - rank * log "
        "lambda_max, `g_dead`/`x_dead`, `dying_directions`; `dds_detail/<reading>/<layer>`, "
        "every other reading and the trust floors. `"
        + CHECKPOINT_METRIC
        + "` = 1 marks each checkpoint read; `train/*` are the trainer's own scalars.\n"
        "* **Events** (" + ", ".join(EVENT_KINDS) + "): metric `dds/events/<kind>` "
        "(magnitude), tags `dds.event.<step>.<layer>.<kind>` whose value says the kind, "
        "reading, step, layer, magnitude and message; artifact `events.jsonl`.\n"
        "* **Spectra** of every checkpoint: artifact `spectra/step_<step>.npz`.\n"
    )
