"""The MLflow sink against a real local SQLite tracking store, read back with MlflowClient."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from fixtures_models import mlp, mlp_probe
from mlflow.tracking import MlflowClient

from ddsmon import __version__, compute_signatures
from ddsmon.errors import ConfigError
from ddsmon.events import Event
from ddsmon.readings import SCALAR_READINGS
from ddsmon.records import CheckpointFailure, CheckpointReading
from ddsmon.redaction import scrub
from ddsmon.signature import LayerSignature, Signatures
from ddsmon.sinks import RunInfo
from ddsmon.sinks.mlflow_http import HTTP_ENV_DEFAULTS, configure_http_env, is_unreachable
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    LIMITS,
    event_tag_key,
    event_tag_keys,
    event_tag_value,
    metric_key,
    reading_metric_key,
)
from ddsmon.sinks.plot_schedule import DASHBOARD_FILE, HEATMAP_FOLDER
from ddsmon.sinks.tracking import MlflowSink
from ddsmon.state import StateDir


@pytest.fixture(scope="module")
def sigs() -> dict[int, Signatures]:
    """Real engine readings of three 'checkpoints' (the MLP at three seeds)."""
    inputs, targets = mlp_probe()
    return {step: compute_signatures(mlp(seed=step), inputs, targets) for step in (0, 10, 20)}


def _reading(step: int, sig: Signatures, tmp: Path, **meta: float) -> CheckpointReading:
    return CheckpointReading(
        step=step,
        path=tmp / f"ckpt_{step}.pt",
        signatures=sig,
        fingerprint=(step + 1, step + 2),
        meta=dict(meta),
        load_seconds=0.01,
        read_seconds=0.2,
    )


def _sink(uri: str, state: StateDir, experiment: str, **kw) -> MlflowSink:
    kw.setdefault("plot_interval", 3600.0)  # plots only on close: keeps the test fast
    kw.setdefault("retry_interval", 0.0)
    return MlflowSink(
        tracking_uri=uri, experiment=experiment, run_id=kw.pop("run_id", None), state=state, **kw
    )


def _run_id(sink: MlflowSink) -> str:
    assert sink.run_id is not None, "the sink has not resolved its run"
    return sink.run_id


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _tag(event: Event) -> str:
    """The value of ``event``'s tag: its kind, reading, step, layer, magnitude, message."""
    return event_tag_value(
        event.step, event.layer, event.kind, event.reading, event.magnitude, event.message
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the full record
def test_run_holds_metrics_events_params_and_artifacts(store, sigs, tmp_path):
    watched = tmp_path / "ckpts"
    watched.mkdir()
    state = StateDir.for_directory(watched)
    sink = _sink(store, state, "full", plots=True)
    long_value = "x" * (LIMITS["param_value"] + 50)
    sink.start(RunInfo(watched, "scan", {"probe_size": "32", "layers": long_value}))
    layer = "2"
    collapse = Event(
        20, layer, "collapse", "lambda_ratio", 1e-2, 1e-5, 3.0, "lambda_ratio fell 3 decades"
    )
    rank = Event(20, "0", "rank_change", "g_rank", 4.0, 3.0, 1.0, "g_rank 4 -> 3")
    for step, acc in ((0, 0.1), (10, 0.5), (20, 0.9)):
        events = [collapse, rank] if step == 20 else []
        sink.on_reading(_reading(step, sigs[step], watched, val_acc=acc), events)
    sink.on_failure(CheckpointFailure(watched / "ckpt_30.pt", "truncated zip: no end record"))
    run_id = _run_id(sink)
    sink.close()

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["probe_size"] == "32"
    assert run.data.params["layers"] == long_value[: LIMITS["param_value"] - 3] + "..."
    tags = run.data.tags
    assert tags["ddsmon.directory"] == str(watched.resolve())
    assert tags["ddsmon.version"] == __version__
    assert "dds/<reading>/<layer>" in tags["mlflow.note.content"]
    assert tags[event_tag_key(20, layer, "collapse")] == _tag(collapse)
    assert tags[event_tag_key(20, "0", "rank_change")] == _tag(rank)
    assert _tag(collapse).startswith("collapse of lambda_ratio | step 20 | layer 2 | magnitude 3")
    assert _tag(collapse).endswith("| lambda_ratio fell 3 decades")
    assert tags["ddsmon.failure.ckpt_30.pt"] == "truncated zip: no end record"

    # every finite scalar reading of every layer, at each checkpoint's step
    for step, sig in sigs.items():
        for name, ls in sig.layers.items():
            values = ls.to_dict()
            for reading in SCALAR_READINGS:
                value = values[reading]
                hist = dict(_history(client, run_id, reading_metric_key(name, reading)))
                if value is None or not math.isfinite(value):
                    assert step not in hist, (name, reading)
                else:
                    assert hist[step] == pytest.approx(value, rel=1e-12), (name, reading, step)
    assert _history(client, run_id, CHECKPOINT_METRIC) == [(0, 1.0), (10, 1.0), (20, 1.0)]
    assert _history(client, run_id, "train/val_acc") == [(0, 0.1), (10, 0.5), (20, 0.9)]
    assert _history(client, run_id, "dds/events/collapse") == [(20, 3.0)]
    assert _history(client, run_id, "dds/events/rank_change") == [(20, 1.0)]
    assert _history(client, run_id, reading_metric_key("0", "finite")) == [
        (0, 1.0),
        (10, 1.0),
        (20, 1.0),
    ]

    # artifacts
    listed = {f.path for f in client.list_artifacts(run_id)}
    assert {"spectra", "plots", "events.jsonl"} <= listed
    assert {f.path for f in client.list_artifacts(run_id, "spectra")} == {
        f"spectra/step_{s}.npz" for s in (0, 10, 20)
    }
    assert {f.path for f in client.list_artifacts(run_id, "plots")} == {
        "plots/trajectories.png",
        "plots/spectra.png",
        f"plots/{HEATMAP_FOLDER}",
        f"plots/{DASHBOARD_FILE}",
    }
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, tracking_uri=store, dst_path=str(tmp_path / "dl")
        )
    )
    with np.load(local / "spectra" / "step_10.npz") as npz:
        for name, ls in sigs[10].layers.items():
            np.testing.assert_array_equal(npz[f"{name}/x_spectrum"], ls.x_spectrum)
            np.testing.assert_array_equal(npz[f"{name}/g_spectrum"], ls.g_spectrum)
            assert float(npz[f"{name}/floor_g"]) == ls.floor_g
            if ls.param_spectrum is not None:
                np.testing.assert_array_equal(npz[f"{name}/param_spectrum"], ls.param_spectrum)
    lines = (local / "events.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [collapse.to_dict(), rank.to_dict()]
    png = (local / "plots" / "trajectories.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # nothing left in the outbox once delivered; the spool is empty
    assert state.spool_pending() == []
    assert not any((state.root / "outbox").iterdir())


def test_restart_reuses_the_run_and_logs_each_step_once(store, sigs, tmp_path, caplog):
    watched = tmp_path / "ckpts"
    watched.mkdir()
    state = StateDir.for_directory(watched)
    first = _sink(store, state, "restart", plots=False)
    first.start(RunInfo(watched, "watch", {"probe_size": "32", "device": "cpu"}))
    first.on_reading(_reading(0, sigs[0], watched), [])
    first.on_reading(_reading(10, sigs[10], watched), [])
    run_id = _run_id(first)
    # kill -9 here: no close(), the run stays RUNNING, the state file was not told
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"

    second = _sink(store, StateDir.for_directory(watched), "restart", plots=False)
    assert second.recorded_steps() == {0, 10}  # asked before start(), as the daemon does
    with caplog.at_level(logging.WARNING, logger="ddsmon.sinks"):
        second.start(RunInfo(watched, "watch", {"probe_size": "64", "device": "cpu"}))
    assert second.run_id == run_id
    assert "probe_size" in caplog.text and "'32'" in caplog.text  # a conflict is reported
    second.on_reading(_reading(10, sigs[10], watched), [])  # already there: not logged again
    second.on_reading(_reading(20, sigs[20], watched), [])
    second.close()

    # state directory lost: the run is found again by its directory tag
    third = _sink(store, StateDir(tmp_path / "elsewhere"), "restart", plots=False)
    third.start(RunInfo(watched, "scan", {"probe_size": "32"}))
    assert third.run_id == run_id
    assert third.recorded_steps() == {0, 10, 20}
    third.close(status="KILLED")

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.params["probe_size"] == "32"  # params are immutable: the first stays
    assert run.info.status == "KILLED"
    assert [s for s, _ in _history(client, run_id, CHECKPOINT_METRIC)] == [0, 10, 20]
    assert [s for s, _ in _history(client, run_id, reading_metric_key("0", "lambda_min"))] == [
        0,
        10,
        20,
    ]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_given_run_keeps_its_status_and_note(store, sigs, tmp_path):
    client = MlflowClient(store)
    exp = client.create_experiment("training", artifact_location=str(tmp_path / "art"))
    training = client.create_run(exp, tags={"mlflow.note.content": "my training run"})
    client.set_terminated(training.info.run_id, status="FINISHED")
    watched = tmp_path / "ckpts"
    watched.mkdir()
    sink = _sink(
        store, StateDir.for_directory(watched), "ignored", run_id=training.info.run_id, plots=False
    )
    assert sink.recorded_steps() == set()
    sink.start(RunInfo(watched, "scan", {"probe_size": "32"}))
    sink.on_reading(_reading(0, sigs[0], watched), [])
    sink.close()
    run = client.get_run(training.info.run_id)
    assert run.info.status == "FINISHED"  # untouched by ddsmon
    assert run.data.tags["mlflow.note.content"] == "my training run"
    assert CHECKPOINT_METRIC in run.data.tags["ddsmon.note"]
    assert _history(client, training.info.run_id, CHECKPOINT_METRIC) == [(0, 1.0)]
    assert client.get_experiment_by_name("ignored") is None


def test_bad_run_id_and_deleted_experiment_are_config_errors(store, tmp_path):
    sink = _sink(store, StateDir(tmp_path / "a"), "x", run_id="0123456789abcdef0123456789abcdef")
    with pytest.raises(ConfigError, match="0123456789abcdef0123456789abcdef"):
        sink.start(RunInfo(tmp_path, "scan", {}))
    client = MlflowClient(store)
    client.delete_experiment(
        client.create_experiment("gone", artifact_location=str(tmp_path / "g"))
    )
    sink = _sink(store, StateDir(tmp_path / "b"), "gone")
    with pytest.raises(ConfigError, match="'gone' is deleted"):
        sink.start(RunInfo(tmp_path, "scan", {}))


def test_batches_respect_mlflow_limits(store, tmp_path):
    """60 layers x 25 metrics > 1000 per batch, and > 100 event tags: all land."""
    d = 4
    stored = {f.name for f in dataclasses.fields(LayerSignature)}

    def fields(i: int) -> dict[str, Any]:  # every reading a field holds (the rest are properties)
        return {r: float(i + 1) for r in SCALAR_READINGS if r in stored}

    # flat spectra above the floors (i + 1): x_entropy 1, g_dominance 1/d, both finite
    layers = {
        f"block{i}.mlp": LayerSignature(
            name=f"block{i}.mlp", n=8, N=8, d=d, **fields(i),
            x_spectrum=np.full(d, i + 2.0), g_spectrum=np.full(d, i + 2.0),
        )
        for i in range(60)
    }  # fmt: skip
    assert all(
        v is not None
        for ls in layers.values()
        for r, v in ls.to_dict().items()
        if r in SCALAR_READINGS
    )
    sig = Signatures(
        layers=layers, n=8, device="cpu", forward_dtype="float64", fisher="both", loss="ce"
    )
    events = [
        Event(5, name, "collapse", "log_volume", 0.0, -9.0, 4.0, f"{name} collapsed")
        for name in layers
    ]
    events += [Event(5, name, "revival", "log_volume", -9.0, 0.0, 2.0, "back") for name in layers]
    watched = tmp_path / "w"
    watched.mkdir()
    sink = _sink(store, StateDir.for_directory(watched), "limits", plots=False)
    sink.start(RunInfo(watched, "scan", {}))
    sink.on_reading(_reading(5, sig, watched), events)
    sink.close()
    client = MlflowClient(store)
    run = client.get_run(_run_id(sink))
    per_layer = [k for k in run.data.metrics if k.rsplit("/", 1)[-1].startswith("block")]
    assert len(per_layer) == 60 * (len(SCALAR_READINGS) + 1)  # every reading and finite
    assert {reading_metric_key(n, r) for n in layers for r in (*SCALAR_READINGS, "finite")} == set(
        per_layer
    )
    assert len([k for k in run.data.tags if k.startswith("dds.event.5.")]) == 120
    assert reading_metric_key("block59.mlp", "lambda_ratio") == "dds/lambda_ratio/block59.mlp"
    assert run.data.metrics["dds/lambda_ratio/block59.mlp"] == 1.0  # 60/60
    assert _history(client, _run_id(sink), "dds/events/collapse") == [(5, 4.0)]
    assert _history(client, _run_id(sink), CHECKPOINT_METRIC) == [(5, 1.0)]


def test_names_are_sanitised_to_mlflow_characters(store, tmp_path):
    assert reading_metric_key("enc/attn:q", "lambda_min") == "dds_detail/lambda_min/enc_attn_q"
    assert reading_metric_key("", "x_rank") == "dds_detail/x_rank/model"
    assert reading_metric_key("..", "x_rank") == "dds_detail/x_rank/_.."
    assert reading_metric_key("0", "finite") == "dds_detail/finite/0"
    assert reading_metric_key("a:b", "log_volume") == "dds/log_volume/a_b"  # a headline one
    assert metric_key("dds", "events", "collapse") == "dds/events/collapse"
    assert event_tag_key(7, "0,blocks.2", "transition") == "dds.event.7.0_blocks.2.transition"
    long = reading_metric_key("L" * 400, "lambda_min")
    assert len(long) == LIMITS["key"] and long != reading_metric_key("L" * 401, "lambda_min")
    assert long.startswith("dds_detail/lambda_min/LLL")  # cut at the end: the section kept
    names = ["enc/attn:q", "", "a b", "ü.1", "x" * 300]
    layers = {n: LayerSignature(name=n, n=2, N=2, d=2, lambda_min=0.5, x_rank=2) for n in names}
    sig = Signatures(
        layers=layers, n=2, device="cpu", forward_dtype="float64", fisher="both", loss="ce"
    )
    watched = tmp_path / "w"
    watched.mkdir()
    sink = _sink(store, StateDir.for_directory(watched), "names", plots=False, artifacts=False)
    event = Event(1, "enc/attn:q,a b", "transition", "lambda_ratio", None, None, 2.0, "t")
    sink.start(RunInfo(watched, "scan", {"odd/param:key": "v"}))
    sink.on_reading(
        _reading(1, sig, watched, **{"val acc/top-1": 0.5}),
        [event],
    )
    sink.close()
    run = MlflowClient(store).get_run(_run_id(sink))
    assert run.data.metrics["dds_detail/lambda_min/enc_attn_q"] == 0.5
    assert run.data.metrics["dds_detail/x_rank/a b"] == 2.0
    assert run.data.metrics["dds_detail/lambda_min/ü.1"] == 0.5
    assert run.data.metrics[reading_metric_key("x" * 300, "lambda_min")] == 0.5
    assert run.data.metrics["train/val acc_top-1"] == 0.5
    assert run.data.tags["dds.event.1.enc_attn_q_a b.transition"] == _tag(event)
    assert run.data.params["odd_param_key"] == "v"


def test_two_readings_with_events_of_one_kind_at_one_layer_and_step_keep_a_tag_each(
    store, tmp_path
):
    """A layer whose lambda_ratio and log_volume both revive at one step: two events of
    one (step, layer, kind). The second's tag key ends in its reading; neither
    overwrites the other (the review's tag list showed one of them only)."""
    layers = {"0": LayerSignature(name="0", n=2, N=2, d=2, lambda_min=0.5, x_rank=2)}
    sig = Signatures(
        layers=layers, n=2, device="cpu", forward_dtype="float64", fisher="both", loss="ce"
    )
    watched = tmp_path / "w"
    watched.mkdir()
    sink = _sink(store, StateDir.for_directory(watched), "pair", plots=False, artifacts=False)
    ratio = Event(120, "0", "revival", "lambda_ratio", 0.0037, 0.019, 0.71, "r")
    volume = Event(120, "0", "revival", "log_volume", -48.7, -18.3, 13.2, "v")
    sink.start(RunInfo(watched, "scan", {}))
    sink.on_reading(_reading(120, sig, watched), [ratio, volume])
    sink.close()
    tags = MlflowClient(store).get_run(_run_id(sink)).data.tags
    assert tags["dds.event.120.0.revival"] == _tag(ratio)
    assert tags["dds.event.120.0.revival.log_volume"] == _tag(volume)
    assert event_tag_keys([(1, "a", "collapse", "x")] * 3) == [
        "dds.event.1.a.collapse",
        "dds.event.1.a.collapse.x",
        "dds.event.1.a.collapse.x.2",
    ]


# ---------------------------------------------------------------------- spool without a server
def test_unreachable_server_spools_then_replays_in_order(store, sigs, tmp_path, caplog):
    """Records spooled while http://127.0.0.1:<closed port> refuses connections are
    replayed, in order and once each, by the next sink on the same state directory."""
    watched = tmp_path / "ckpts"
    watched.mkdir()
    state = StateDir.for_directory(watched)
    port = _free_port()
    down = _sink(f"http://127.0.0.1:{port}", state, "spooled", plots=True)
    with caplog.at_level(logging.WARNING, logger="ddsmon.sinks"):
        assert down.recorded_steps() == set()
        down.start(RunInfo(watched, "watch", {"probe_size": "32"}))
        for step in (0, 10):
            down.on_reading(_reading(step, sigs[step], watched), [])
        down.close()
    assert "unreachable" in caplog.text
    pending = state.spool_pending()
    assert [(r["kind"], r.get("step")) for r in pending] == [
        ("start", None),
        ("reading", 0),
        ("reading", 10),
    ]
    assert down.recorded_steps() == {0, 10}  # spooled steps count as recorded
    # a spooled record's files survive until delivered
    assert all(Path(f).exists() for r in pending for f, _ in r.get("files", []))

    up = _sink(store, StateDir.for_directory(watched), "spooled", plots=False)
    up.start(RunInfo(watched, "watch", {"probe_size": "32"}))
    up.on_reading(_reading(10, sigs[10], watched), [])  # already queued: not doubled
    up.on_reading(_reading(20, sigs[20], watched), [])
    up.close()
    client = MlflowClient(store)
    assert _history(client, _run_id(up), CHECKPOINT_METRIC) == [(0, 1.0), (10, 1.0), (20, 1.0)]
    assert [s for s, _ in _history(client, _run_id(up), reading_metric_key("2", "lambda_min"))] == [
        0,
        10,
        20,
    ]
    assert client.get_run(_run_id(up)).data.params["probe_size"] == "32"
    assert state.spool_pending() == []
    assert {f.path for f in client.list_artifacts(_run_id(up), "spectra")} == {
        f"spectra/step_{s}.npz" for s in (0, 10, 20)
    }
    # kill -9 between a replay and its acknowledgement: the record is still spooled
    # at the next start, and the run already holds its step, so it is dropped
    state.spool_append(pending[1])
    again = _sink(store, StateDir.for_directory(watched), "spooled", plots=False)
    again.start(RunInfo(watched, "watch", {"probe_size": "32"}))
    again.close()
    assert state.spool_pending() == []
    assert _history(client, _run_id(up), CHECKPOINT_METRIC) == [(0, 1.0), (10, 1.0), (20, 1.0)]
    assert [s for s, _ in _history(client, _run_id(up), reading_metric_key("2", "lambda_min"))] == [
        0,
        10,
        20,
    ]


def test_credentials_are_never_logged(tmp_path, sigs, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-token")
    port = _free_port()
    uri = f"http://alice:s3cr3t-pw@127.0.0.1:{port}"
    state = StateDir(tmp_path / "st")
    sink = _sink(uri, state, "secret", plots=False)
    assert "s3cr3t" not in repr(sink) and "***@127.0.0.1" in sink.display_uri
    with caplog.at_level(logging.DEBUG):
        sink.start(RunInfo(tmp_path, "scan", {}))
        sink.on_reading(_reading(0, sigs[0], tmp_path), [])
        sink.close()
    assert "unreachable" in caplog.text and f"***@127.0.0.1:{port}" in caplog.text
    assert "s3cr3t" not in caplog.text and "hunter2" not in caplog.text
    for path in state.root.rglob("*"):
        if path.is_file():
            assert b"s3cr3t" not in path.read_bytes(), path
    assert scrub("API request to https://u:p@host/x failed; token hunter2-token") == (
        "API request to https://***@host/x failed; token ***"
    )


def test_connection_failures_are_told_from_bad_requests(store, tmp_path):
    port = _free_port()
    client = MlflowClient(f"http://127.0.0.1:{port}")
    with pytest.raises(Exception) as refused:
        client.get_experiment_by_name("x")
    assert is_unreachable(refused.value)
    local = MlflowClient(store)
    run = local.create_run(local.create_experiment("bad", artifact_location=str(tmp_path)))
    with pytest.raises(Exception) as bad:
        local.log_metric(run.info.run_id, "bad*name", 1.0)
    assert not is_unreachable(bad.value)
    assert is_unreachable(ConnectionRefusedError())


def test_http_env_defaults_only_fill_gaps():
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    applied = configure_http_env(env)
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # the user's setting wins
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert applied == {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    }
