"""The MLflow sink against a real ``mlflow server`` process on loopback, stopped and restarted.

The server runs in its own process group (its uvicorn worker is a child), is waited for
on ``/health`` with a deadline, and is always stopped by the fixture's finalizer.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from fixtures_models import mlp, mlp_probe
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer

from ddsmon import compute_signatures
from ddsmon.events import Event
from ddsmon.records import CheckpointReading
from ddsmon.signature import Signatures
from ddsmon.sinks import RunInfo
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    event_tag_key,
    event_tag_value,
    metric_key,
    reading_metric_key,
)
from ddsmon.sinks.plot_schedule import DASHBOARD_FILE
from ddsmon.sinks.tracking import MlflowSink
from ddsmon.state import StateDir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sigs() -> dict[int, Signatures]:
    inputs, targets = mlp_probe()
    return {s: compute_signatures(mlp(seed=s), inputs, targets) for s in (0, 10, 20, 30, 40)}


def _reading(step: int, sig: Signatures, where: Path) -> CheckpointReading:
    return CheckpointReading(
        step=step, path=where / f"ckpt_{step}.pt", signatures=sig, meta={"val_acc": step / 40}
    )


def _steps(client: MlflowClient, run_id: str, key: str = CHECKPOINT_METRIC) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_logs_over_http_with_proxied_artifacts(server, sigs, tmp_path, capfd):
    watched = tmp_path / "ckpts"
    watched.mkdir()
    sink = MlflowSink(
        tracking_uri=server.uri,
        experiment="over-http",
        run_id=None,
        state=StateDir.for_directory(watched),
        plot_interval=3600.0,
    )
    sink.start(RunInfo(watched, "scan", {"probe_size": "32"}))
    event = Event(10, "2", "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "fell")
    sink.on_reading(_reading(0, sigs[0], watched), [])
    sink.on_reading(_reading(10, sigs[10], watched), [event])
    sink.close()
    # MLflow's client prints "View run ... at: URL" to stdout on ending a run against a
    # server; stdout is ddsmon's record of the readings (scan | head, a CI log)
    assert "View run" not in capfd.readouterr().out
    run_id = sink.run_id
    assert run_id is not None
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["probe_size"] == "32"
    assert run.data.tags[event_tag_key(10, "2", "collapse")] == event_tag_value(
        10, "2", "collapse", "lambda_ratio", 3.0, "fell"
    )
    assert _steps(client, run_id) == [0, 10]
    assert [
        (m.step, m.value)
        for m in client.get_metric_history(run_id, reading_metric_key("2", "lambda_min"))
    ] == [(s, sigs[s].layers["2"].lambda_min) for s in (0, 10)]
    assert _steps(client, run_id, metric_key("dds", "events", "collapse")) == [10]
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"spectra", "plots", "events.jsonl"} <= names
    # the artifacts went through the server's proxy into its artifact destination
    stored = {p.name for p in (server.root / "artifacts").rglob("*") if p.is_file()}
    assert {
        "step_0.npz",
        "step_10.npz",
        "events.jsonl",
        "trajectories.png",
        "spectra.png",
        DASHBOARD_FILE,
    } <= stored


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_server_down_spools_and_replays_in_order_once(server, sigs, tmp_path, monkeypatch):
    # ddsmon's own fail-fast HTTP settings, not the test suite's
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    watched = tmp_path / "ckpts"
    watched.mkdir()
    state = StateDir.for_directory(watched)
    sink = MlflowSink(
        tracking_uri=server.uri,
        experiment="spool",
        run_id=None,
        state=state,
        plot_interval=3600.0,  # plots on close only
        retry_interval=0.0,
    )
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    sink.start(RunInfo(watched, "watch", {"probe_size": "32"}))
    sink.on_reading(_reading(0, sigs[0], watched), [])
    sink.on_reading(_reading(10, sigs[10], watched), [])
    run_id = sink.run_id
    assert run_id is not None

    server.stop()
    assert not server.answers()
    for step in (20, 30):
        started = time.monotonic()
        sink.on_reading(_reading(step, sigs[step], watched), [])  # no exception
        assert time.monotonic() - started < 10.0, "a down server must fail in seconds"
    assert [r["step"] for r in state.spool_pending()] == [20, 30]
    assert sink.recorded_steps() == {20, 30}  # the server cannot say; the spool can

    server.start()
    sink.on_reading(_reading(40, sigs[40], watched), [])
    assert state.spool_pending() == []
    sink.close()

    client = MlflowClient(server.uri)
    assert _steps(client, run_id) == [0, 10, 20, 30, 40]  # each step exactly once
    assert _steps(client, run_id, reading_metric_key("0", "g_rank")) == [0, 10, 20, 30, 40]
    assert _steps(client, run_id, "train/val_acc") == [0, 10, 20, 30, 40]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run_id, "spectra")} == {
        f"spectra/step_{s}.npz" for s in (0, 10, 20, 30, 40)
    }
    # delivery order, as the server's database recorded the inserts
    with sqlite3.connect(server.db) as db:
        order = [
            row[0]
            for row in db.execute(
                "SELECT step FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY rowid",
                (run_id, CHECKPOINT_METRIC),
            )
        ]
    assert order == [0, 10, 20, 30, 40]


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_spool_is_replayed_once_the_server_answers_with_no_new_checkpoint(server, sigs, tmp_path):
    """A retry timer (exponential backoff, capped) replays the spool in the background:
    after an outage the records arrive within the cap, with no checkpoint to carry them."""
    watched = tmp_path / "ckpts"
    watched.mkdir()
    state = StateDir.for_directory(watched)
    cap = 2.0
    sink = MlflowSink(
        tracking_uri=server.uri,
        experiment="retry-timer",
        run_id=None,
        state=state,
        plot_interval=3600.0,
        retry_first=0.25,
        retry_max=cap,
    )
    sink.start(RunInfo(watched, "watch", {"probe_size": "32"}))
    sink.on_reading(_reading(0, sigs[0], watched), [])
    run_id = sink.run_id
    assert run_id is not None
    server.stop()
    try:
        for step in (10, 20):
            sink.on_reading(_reading(step, sigs[step], watched), [])
        assert [r["step"] for r in state.spool_pending()] == [10, 20]
        time.sleep(2 * cap)  # attempts fail meanwhile; the pause grows to the cap
        assert sink.undelivered_steps() == [10, 20]
    finally:
        server.start()
    answered = time.monotonic()
    client = MlflowClient(server.uri)
    deadline = answered + cap + 20
    while _steps(client, run_id) != [0, 10, 20]:
        assert time.monotonic() < deadline, f"not replayed: {state.spool_pending()}"
        time.sleep(0.1)
    delay = time.monotonic() - answered
    assert state.spool_pending() == [] and sink.undelivered_steps() == []
    sink.close()
    assert not sink._retrier.running  # stopped at close
    assert _steps(client, run_id) == [0, 10, 20]
    assert delay < cap + 10, f"replayed {delay:.1f}s after the server answered"
