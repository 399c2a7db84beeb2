"""The parts of the MLflow sink on their own, without a tracking store: the typed record
and its spool line, the outbox (order, acknowledgement, exactly once), the writer's
batches, the local history and the plot schedule."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ddsmon.events import Event
from ddsmon.readings import HEADLINE_READINGS, SCALAR_READINGS
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.signature import LayerSignature, Signatures
from ddsmon.sinks.history import HistoryEntry, LocalHistory
from ddsmon.sinks.mlflow_http import Unreachable
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    LIMITS,
    event_tag_key,
    event_tag_value,
    metric_key,
    reading_metric_key,
)
from ddsmon.sinks.mlflow_outbox import Outbox
from ddsmon.sinks.mlflow_record import (
    FLOOR_READINGS,
    ArtifactFile,
    ReadingRecord,
    Record,
    RecordFormatError,
    StartRecord,
    TagsRecord,
    failure_record,
    reading_record,
    record_from_json,
    start_record,
    write_spectra,
)
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.sinks.plot_schedule import DASHBOARD_FILE, HEATMAP_FOLDER, PlotScheduler
from ddsmon.state import StateDir


def _signatures(n_layers: int = 2, value: float = 0.5) -> Signatures:
    layers = {
        f"l{i}": LayerSignature(
            name=f"l{i}", n=4, N=4, d=3, lambda_min=value, lambda_max=1.0, g_rank=3,
            floor_g=1e-12, sigma_min=float("nan"), x_spectrum=np.ones(3), g_spectrum=np.ones(3),
        )
        for i in range(n_layers)
    }  # fmt: skip
    return Signatures(
        layers=layers, n=4, device="cpu", forward_dtype="float64", fisher="both", loss="ce"
    )


def _reading(step: int, sig: Signatures | None = None, **meta: float) -> CheckpointReading:
    return CheckpointReading(
        step=step,
        path=Path(f"/ckpts/c{step}.pt"),
        signatures=sig or _signatures(),
        meta=dict(meta),
        load_seconds=0.1,
        read_seconds=float("inf"),
    )


def _record(step: int, files: tuple[ArtifactFile, ...] = ()) -> ReadingRecord:
    reading = _reading(step)
    return reading_record(
        reading, [], entry=HistoryEntry.of(reading), timestamp=1000 + step, files=files
    )


# ---------------------------------------------------------------------- records
def test_reading_record_rows_in_order_with_the_marker_last():
    reading = _reading(7, val_acc=0.25, bad=float("nan"))
    events = [
        Event(7, "l0", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "fell"),
        Event(7, "l1", "collapse", "lambda_ratio", 1e-2, 1e-4, 2.0, "fell less"),
        Event(
            7,
            "l1",
            "nonfinite",
            "lambda_min",
            None,
            None,
            float("nan"),
            "x" * (LIMITS["tag_value"] + 9),
        ),
    ]
    rec = reading_record(reading, events, entry=HistoryEntry.of(reading), timestamp=42)
    keys = [m.key for m in rec.metrics]
    layers = {n: ls.to_dict() for n, ls in reading.signatures.layers.items()}

    def finite_readings(name: str, readings: tuple[str, ...]) -> list[str]:
        values = layers[name]
        return [
            reading_metric_key(name, r)
            for r in readings
            if values[r] is not None and np.isfinite(values[r])
        ]

    headline = [k for n in layers for k in finite_readings(n, HEADLINE_READINGS)]
    detail_readings = tuple(r for r in SCALAR_READINGS if r not in HEADLINE_READINGS)
    details = [
        k
        for n in layers
        for k in (reading_metric_key(n, "finite"), *finite_readings(n, detail_readings))
    ]
    assert reading_metric_key("l0", "lambda_ratio") in headline  # a headline reading
    assert reading_metric_key("l0", "g_dominance") in details  # a detail
    events_rows = [
        metric_key("dds", "events", "collapse"),
        metric_key("dds", "events", "nonfinite"),
    ]
    # headline readings, events, train, details, ddsmon's own, the marker: the table's order
    assert keys == [
        *headline,
        *events_rows,
        "train/val_acc",  # train/bad is NaN: left out
        *details,
        "ddsmon/load_seconds",  # read_seconds is inf: left out
        CHECKPOINT_METRIC,
    ]
    assert reading_metric_key("l0", "sigma_min") not in keys  # NaN: not a metric
    by_key = {m.key: m for m in rec.metrics}
    assert by_key["dds/events/collapse"].value == 3.0  # the largest magnitude of the kind
    assert by_key["dds/events/nonfinite"].value == 1.0  # no finite magnitude
    assert {(m.step, m.timestamp) for m in rec.metrics} == {(7, 42)}
    tag = rec.tags[event_tag_key(7, "l1", "nonfinite")]
    assert tag == event_tag_value(7, "l1", "nonfinite", "lambda_min", None, events[2].message)
    assert tag.startswith("nonfinite of lambda_min | step 7 | layer l1 | xxx")  # no magnitude
    assert len(tag) == LIMITS["tag_value"] and tag.endswith("x...")  # cut to MLflow's length
    assert rec.tags[event_tag_key(7, "l0", "collapse")] == (
        "collapse of lambda_ratio | step 7 | layer l0 | magnitude 3 decades | fell"
    )
    assert rec.events == 3


@pytest.mark.parametrize(
    "record",
    [
        StartRecord(directory="/w", params={"a": "1", "odd/key": "v"}),
        _record(3, files=(ArtifactFile("/s/outbox/3-ab/step_3.npz", "spectra"),)),
        TagsRecord(tags={"ddsmon.failure.c.pt": "truncated"}),
        failure_record(CheckpointFailure(Path("/w/c 1.pt"), "bad zip")),
        start_record(Path("/w"), {1: 2}),
    ],
)
def test_records_round_trip_through_their_spool_line(record: Record):
    line = json.dumps(record.to_json())
    assert record_from_json(json.loads(line)) == record
    assert json.loads(line)["kind"] == record.kind


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"kind": "mystery"},
        {"kind": "reading", "metrics": []},  # no step
        {"kind": "reading", "step": "x", "metrics": []},
        {"kind": "reading", "step": 1, "metrics": [["k", 1.0, 1]]},  # a short row
        {"kind": "reading", "step": 1},  # no metrics
        {"kind": "start", "params": {}},
        {"kind": "start", "directory": "/w", "params": {"a": 1}},
        {"kind": "tags", "tags": ["a"]},
    ],
)
def test_a_line_that_is_no_record_is_refused(raw: dict[str, Any]):
    with pytest.raises(RecordFormatError):
        record_from_json(raw)


def test_spectra_file_holds_spectra_and_floors(tmp_path):
    sig = _signatures(1)
    write_spectra(sig, tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as npz:
        assert set(npz) == {"l0/x_spectrum", "l0/g_spectrum", "l0/floor_g"}
        assert float(npz["l0/floor_g"]) == 1e-12
    assert FLOOR_READINGS == ("floor_x", "floor_g", "param_floor")
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------- the outbox
class FakeRun:
    """A run behind a store that is up or down: what was delivered, in order."""

    def __init__(self, held: set[int] | None = None) -> None:
        self.up = True
        self.held = set(held or ())
        self.delivered: list[Record] = []
        self.reject: set[int] = set()
        self.down_after: int | None = None  # go down after this many deliveries

    def open(self, directory: Path | None) -> tuple[str, set[int]]:
        if not self.up:
            raise Unreachable("refused")
        return "run-1", set(self.held)

    def deliver(self, record: Record) -> None:
        if self.down_after is not None and len(self.delivered) >= self.down_after:
            self.up = False
        if not self.up:
            raise Unreachable("refused")
        if isinstance(record, ReadingRecord):
            if record.step in self.reject:
                raise ValueError("bad request")
            self.held.add(record.step)
        self.delivered.append(record)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _outbox(state: StateDir, run: FakeRun, clock: Clock, retry: float = 10.0) -> Outbox:
    return Outbox(
        state,
        open_run=run.open,
        deliver=run.deliver,
        display_uri="http://***@host",
        retry_interval=retry,
        clock=clock,
    )


def _steps(records: list[Record]) -> list[int | str]:
    return [r.step if isinstance(r, ReadingRecord) else r.kind for r in records]


def test_outbox_spools_while_down_and_replays_in_order_before_new_records(tmp_path, caplog):
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock)
    box.send(_record(0))
    run.up = False
    with caplog.at_level(logging.INFO, logger="ddsmon.sinks"):
        box.send(_record(10))
        box.send(TagsRecord(tags={"t": "v"}))  # within retry_interval: not even tried
    assert "unreachable: step 10 spooled" in caplog.text
    assert _steps(box.pending()) == [10, "tags"] and box.pending_steps() == {10}
    run.up = True
    clock.now += 5
    box.send(_record(20))  # still within retry_interval: queued behind the others
    assert _steps(box.pending()) == [10, "tags", 20]
    assert box.waiting()
    clock.now += 6
    with caplog.at_level(logging.WARNING, logger="ddsmon.sinks"):
        box.send(_record(30))
    assert "replayed 3 spooled records into MLflow run run-1" in caplog.text
    assert "answers again" in caplog.text
    assert _steps(run.delivered) == [0, 10, "tags", 20, 30]
    assert box.pending() == [] and not box.waiting()


def test_outbox_force_replays_within_the_retry_interval(tmp_path):
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock, retry=3600.0)
    run.up = False
    box.send(_record(1))
    run.up = True
    assert not box.flush()
    assert box.flush(force=True)
    assert _steps(run.delivered) == [1]


def test_outbox_drops_held_steps_and_acknowledges_what_it_handled(tmp_path, caplog):
    """A replay cut off part-way acknowledges the records before the cut, keeps the rest in
    order; a step the run already holds is acknowledged unsent; nothing is doubled."""
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(held={10}), Clock()
    box = _outbox(state, run, clock, retry=0.0)
    run.up = False
    for step in (10, 20, 30, 40):
        box.send(_record(step))
    run.up, run.down_after = True, 1  # 20 goes through, then the store is gone again
    assert not box.flush()
    assert _steps(run.delivered) == [20]
    assert _steps(box.pending()) == [30, 40]
    run.up, run.down_after = True, None
    run.held.add(30)  # e.g. delivered, then killed before the acknowledgement
    with caplog.at_level(logging.INFO, logger="ddsmon.sinks"):
        assert box.flush()
    assert "spooled step 30 is already in the run; dropped" in caplog.text
    assert _steps(run.delivered) == [20, 40]
    assert box.pending() == []


def test_outbox_drops_rejected_and_unreadable_records_and_goes_on(tmp_path, caplog):
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock, retry=0.0)
    run.up = False
    box.send(_record(1))
    state.spool_append({"kind": "reading", "metrics": []})  # damaged: no step
    box.send(_record(2))
    box.send(_record(3))
    assert box.pending_steps() == {1, 2, 3}  # the damaged line is no step
    run.up, run.reject = True, {2}
    with caplog.at_level(logging.ERROR, logger="ddsmon.sinks"):
        assert box.flush()
    assert "spooled record 2 in" in caplog.text and "cannot be read" in caplog.text
    assert "MLflow rejected a spooled reading record (bad request); dropped" in caplog.text
    assert _steps(run.delivered) == [1, 3]
    assert state.spool_pending() == []


def test_outbox_send_raises_a_bad_request_and_removes_its_files(tmp_path):
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock)
    folder = box.new_folder(5)
    (folder / "step_5.npz").write_bytes(b"x")
    run.reject = {5}
    with pytest.raises(ValueError, match="bad request"):
        box.send(_record(5, files=(ArtifactFile(str(folder / "step_5.npz"), "spectra"),)))
    assert not folder.exists() and box.pending() == []


def test_outbox_files_live_until_delivered_and_orphans_are_cleaned(tmp_path):
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock, retry=0.0)
    kept, orphan = box.new_folder(1), box.new_folder(2)
    (kept / "step_1.npz").write_bytes(b"x")
    run.up = False
    box.send(_record(1, files=(ArtifactFile(str(kept / "step_1.npz"), "spectra"),)))
    box.clean()
    assert kept.exists() and not orphan.exists()
    run.up = True
    assert box.flush()
    assert not kept.exists()
    assert list((state.root / "outbox").iterdir()) == []


def test_outbox_ledger_names_the_steps_lost_from_the_spool(tmp_path):
    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock, retry=0.0)
    run.up = False
    for step in (10, 20, 30):
        box.send(_record(step))
        state.mark_done(f"c{step}.pt", (step, step), step)  # what the daemon does
    assert state.spooled_steps() == {10, 20, 30}
    assert box.lost_steps(held=None) == (set(), set())
    lines = (state.root / "spool.jsonl").read_text().splitlines()
    (state.root / "spool.jsonl").write_text(lines[0] + "\nnot json\n" + lines[2] + "\n")
    state.note_spooled(40)  # killed between the ledger and the spool: never marked done
    assert box.lost_steps(held={30}) == ({20}, {30, 40})
    assert box.lost_steps(held=None) == ({20}, {40})
    run.up = True
    assert box.flush()  # delivered: out of the ledger
    assert _steps(run.delivered) == [10, 30]
    assert state.spooled_steps() == {20, 40}


def test_outbox_stops_on_a_config_error_and_keeps_the_spool(tmp_path):
    from ddsmon.errors import ConfigError

    state, run, clock = StateDir(tmp_path / "st"), FakeRun(), Clock()
    box = _outbox(state, run, clock, retry=0.0)
    run.up = False
    box.send(_record(1))
    box.send(_record(2))
    run.up = True
    delivered: list[Record] = []

    def deliver(record: Record) -> None:
        if delivered:
            raise ConfigError("the run is another daemon's")
        delivered.append(record)

    box._deliver = deliver
    with pytest.raises(ConfigError):
        box.flush()
    assert _steps(delivered) == [1] and _steps(box.pending()) == [2]  # not "rejected"


def test_retrier_backs_off_to_its_cap_and_stops(tmp_path):
    from ddsmon.sinks.mlflow_outbox import Retrier

    times: list[float] = []
    outcome = {"ok": False}

    def attempt() -> bool:
        times.append(time.monotonic())
        return outcome["ok"]

    retrier = Retrier(attempt, lambda: not outcome["ok"], first=0.05, cap=0.2)
    retrier.start()
    try:
        deadline = time.monotonic() + 10
        while len(times) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(times) >= 6
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[0] < gaps[-1]  # growing
        assert max(gaps) < 0.2 + 0.5  # capped (with room for a loaded machine)
        outcome["ok"] = True
        time.sleep(0.5)
        settled = len(times)
        time.sleep(0.5)
        assert len(times) == settled  # nothing waits: idle until poked
        outcome["ok"] = False
        retrier.poke()
        deadline = time.monotonic() + 5
        while len(times) == settled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(times) > settled
    finally:
        retrier.stop()
    assert not retrier.running
    stopped = len(times)
    time.sleep(0.3)
    assert len(times) == stopped


def test_retrier_ends_on_a_config_error():
    from ddsmon.errors import ConfigError
    from ddsmon.sinks.mlflow_outbox import Retrier

    calls: list[int] = []

    def attempt() -> bool:
        calls.append(1)
        raise ConfigError("lease lost")

    retrier = Retrier(attempt, lambda: True, first=0.01, cap=0.02)
    retrier.start()
    deadline = time.monotonic() + 5
    while retrier.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not retrier.running and calls == [1]
    retrier.stop()


def test_opening_a_store_retries_a_schema_race_only(monkeypatch, tmp_path):
    import mlflow.tracking

    from ddsmon.sinks import mlflow_writer

    class OperationalError(Exception):
        pass

    failures = [
        OperationalError("table _alembic_tmp_experiments already exists"),
        OperationalError("(sqlite3.OperationalError) database is locked"),
    ]
    made: list[str] = []

    def fake_client(uri):
        if failures:
            raise failures.pop(0)
        made.append(uri)
        return "client"

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", fake_client)
    pauses: list[float] = []
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert mlflow_writer.open_client(uri, sleep=pauses.append) == "client"
    assert made == [uri] and len(pauses) == 2  # jittered, growing
    assert 0.2 <= pauses[0] <= 0.6 and 0.4 <= pauses[1] <= 1.2
    assert (tmp_path / "m.db.ddsmon-init.lock").exists()  # opened one at a time

    def bad_uri(uri):
        raise ValueError("unsupported URI scheme 'nope'")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", bad_uri)
    pauses.clear()
    with pytest.raises(ValueError):
        mlflow_writer.open_client("nope://x", sleep=pauses.append)
    assert pauses == []  # not a race: raised at once

    def always(uri):
        raise OperationalError("duplicate column name: step")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", always)
    with pytest.raises(OperationalError):
        mlflow_writer.open_client(uri, attempts=3, sleep=pauses.append)
    assert len(pauses) == 2  # bounded
    assert mlflow_writer.sqlite_path("sqlite:///rel.db") == Path("rel.db").absolute()
    assert mlflow_writer.sqlite_path("http://host") is None
    assert mlflow_writer.sqlite_path("sqlite://") is None


# ---------------------------------------------------------------------- the writer
class FakeClient:
    def __init__(self) -> None:
        self.batches: list[dict[str, list[Any]]] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.batches.append({"m": list(metrics), "p": list(params), "t": list(tags)})


def test_log_batch_stays_within_mlflow_limits_and_sends_the_marker_last():
    client = FakeClient()
    writer = MlflowWriter("sqlite:///x.db", client=client)  # type: ignore[arg-type]
    rows = _record(1).metrics
    rec = ReadingRecord(
        step=1,
        path="p",
        metrics=rows[:-1] * 300 + rows[-1:],  # thousands of rows, the marker last
        tags={f"t{i}": "v" for i in range(250)},
    )
    params = {f"p{i}": "v" for i in range(30)}
    writer.log_batch("run", metrics=rec.metrics, params=params, tags=rec.tags)
    assert len(client.batches) > 3
    for batch in client.batches:
        assert len(batch["m"]) + len(batch["p"]) + len(batch["t"]) <= LIMITS["entities"]
        assert len(batch["m"]) <= LIMITS["metrics"]
        assert len(batch["p"]) + len(batch["t"]) <= LIMITS["params_tags"]
    sent = [m.key for b in client.batches for m in b["m"]]
    assert sent == [m.key for m in rec.metrics]
    assert client.batches[-1]["m"][-1].key == CHECKPOINT_METRIC
    assert sum(len(b["t"]) for b in client.batches) == 250
    assert sum(len(b["p"]) for b in client.batches) == 30


def test_display_uri_never_shows_credentials():
    assert MlflowWriter("http://u:pw@host:5000").display_uri == "http://***@host:5000"
    assert MlflowWriter(None).display_uri == "(MLflow default)"


# ---------------------------------------------------------------------- history
def test_history_survives_a_restart_and_keeps_each_event_once(tmp_path):
    state = StateDir(tmp_path / "st")
    history = LocalHistory(state)
    event = Event(5, "l0", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "fell").to_dict()
    for step in (5, 0):
        history.append(HistoryEntry.of(_reading(step, val_acc=step / 10)), [event])
    history.append(
        HistoryEntry.of(_reading(5, _signatures(value=0.25), val_acc=0.5)), [event]
    )  # read again
    with open(state.root / "history.jsonl", "a") as f:
        f.write('{"step": 9, "lay')  # torn by a crash
    again = LocalHistory(StateDir(tmp_path / "st"))
    layers = again.layers()
    assert [s for s, _ in layers["l0"]] == [0, 5]
    assert layers["l0"][1][1]["lambda_min"] == 0.25  # the later entry of a step wins
    assert layers["l0"][0][1]["sigma_min"] is None and layers["l0"][0][1]["finite"] is True
    assert again.train() == {"val_acc": [(0, 0.0), (5, 0.5)]}
    assert again.events() == [event]
    assert (state.root / "events.jsonl").read_text().count("\n") == 1


# ---------------------------------------------------------------------- plot schedule
@pytest.fixture
def drawn(monkeypatch) -> list[str]:
    """Stand-ins for ddsmon.plots' two functions: they write a file and say so."""
    import ddsmon.plots

    calls: list[str] = []

    def fake(name: str):
        def draw(data: Any, path: Path, *args: Any, **kwargs: Any) -> Path:
            calls.append(name)
            Path(path).write_bytes(b"png")
            return Path(path)

        return draw

    monkeypatch.setattr(ddsmon.plots, "plot_trajectories", fake("trajectories"))
    monkeypatch.setattr(ddsmon.plots, "plot_spectra", fake("spectra"))
    return calls


def test_plots_are_drawn_when_dirty_and_due_and_kept_dirty_until_uploaded(tmp_path, drawn):
    clock = Clock()
    plots = PlotScheduler(
        LocalHistory(StateDir(tmp_path / "st")), interval=10.0, heavy_interval=10.0, clock=clock
    )
    uploads: list[set[str]] = []
    answer = [True]

    def upload(folder: Path) -> bool:
        uploads.append({p.name for p in folder.iterdir()})
        return answer[0]

    plots.refresh(upload, force=True)
    assert uploads == []  # nothing noted yet: not dirty
    plots.note(1, _signatures())
    plots.refresh(upload)
    assert uploads == [{"trajectories.png", "spectra.png", HEATMAP_FOLDER, DASHBOARD_FILE}]
    assert not plots.dirty
    plots.note(2, _signatures())
    plots.refresh(upload)  # within the interval
    clock.now += 11
    plots.refresh(upload, down=True)  # the store is down
    assert len(uploads) == 1
    answer[0] = False
    plots.refresh(upload)
    assert len(uploads) == 2 and plots.dirty  # not taken: tried again later
    plots.refresh(upload, force=True, down=True)  # on close
    assert len(uploads) == 3
    off = PlotScheduler(LocalHistory(StateDir(tmp_path / "st")), enabled=False, clock=clock)
    off.note(1, _signatures())
    off.refresh(upload, force=True)
    assert len(uploads) == 3


def test_the_interval_counts_from_the_end_of_a_drawing(tmp_path, monkeypatch):
    """A drawing slower than the interval (a busy machine) must still leave ``interval``
    seconds for reading before the next one, not draw again after every checkpoint."""
    import ddsmon.plots

    clock = Clock()

    def slow(name: str):
        def draw(data: Any, path: Path, *args: Any, **kwargs: Any) -> Path:
            clock.now += 15  # longer than the 10 s interval
            Path(path).write_bytes(b"png")
            return Path(path)

        return draw

    monkeypatch.setattr(ddsmon.plots, "plot_trajectories", slow("trajectories"))
    monkeypatch.setattr(ddsmon.plots, "plot_spectra", slow("spectra"))
    plots = PlotScheduler(
        LocalHistory(StateDir(tmp_path / "st")), interval=10.0, heavy_interval=1e9, clock=clock
    )
    uploads: list[float] = []

    def upload(folder: Path) -> bool:
        uploads.append(clock.now)
        return True

    plots.note(1, _signatures())
    plots.refresh(upload)  # the first drawing: 30 s (two figures)
    assert len(uploads) == 1
    for step in range(2, 6):  # checkpoints read 1 s apart after it
        clock.now += 1
        plots.note(step, _signatures())
        plots.refresh(upload)
    assert len(uploads) == 1  # 4 s of reading since the drawing ended: not due
    clock.now += 6
    plots.refresh(upload)
    assert len(uploads) == 2


def test_a_plot_that_cannot_be_drawn_is_skipped_until_the_next_checkpoint(
    tmp_path, monkeypatch, caplog
):
    import ddsmon.plots

    def broken(*args: Any, **kwargs: Any) -> Path:
        raise RuntimeError("no font")

    monkeypatch.setattr(ddsmon.plots, "plot_trajectories", broken)
    plots = PlotScheduler(LocalHistory(StateDir(tmp_path / "st")), interval=0.0)
    plots.note(1, _signatures())
    uploads: list[set[str]] = []

    def upload(folder: Path) -> bool:
        uploads.append({p.name for p in folder.iterdir()})
        return True

    with caplog.at_level(logging.ERROR, logger="ddsmon.sinks"):
        plots.refresh(upload)
    assert "could not draw the plots" in caplog.text and not plots.dirty
    assert len(uploads) == 1 and "trajectories.png" not in uploads[0]  # the others went
    assert "spectra.png" in uploads[0]
