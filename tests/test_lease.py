"""The run's lease, the experiment's kind and the undelivered steps, in one process against
a real local SQLite store (the fault tests with real processes: tests/test_faults_lease.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from fixtures_models import mlp, mlp_probe
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ddsmon import compute_signatures
from ddsmon.records import CheckpointReading
from ddsmon.signature import Signatures
from ddsmon.sinks import RunInfo
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    DIRECTORY_ID_TAG,
    DIRECTORY_TAG,
    OWNED_TAG,
    directory_id,
)
from ddsmon.sinks.mlflow_lease import LeaseLost, RunClaimed, RunGone, RunLease
from ddsmon.sinks.mlflow_run import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.sinks.tracking import MlflowSink
from ddsmon.state import StateDir

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sig() -> Signatures:
    inputs, targets = mlp_probe()
    return compute_signatures(mlp(), inputs, targets)


def _reading(step: int, sig: Signatures, where: Path) -> CheckpointReading:
    return CheckpointReading(step=step, path=where / f"ckpt_{step}.pt", signatures=sig)


def _sink(uri: str, state: Path, experiment: str, **kw) -> MlflowSink:
    kw.setdefault("plots", False)
    kw.setdefault("artifacts", False)
    kw.setdefault("retry_interval", 0.0)
    return MlflowSink(
        tracking_uri=uri, experiment=experiment, run_id=kw.pop("run_id", None),
        state=StateDir(state), **kw,
    )  # fmt: skip


def _steps(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, CHECKPOINT_METRIC))


def _watched(tmp_path: Path) -> Path:
    watched = tmp_path / "ckpts"
    watched.mkdir()
    return watched.resolve()


# ---------------------------------------------------------------------- what the lease rests on
def test_the_installed_mlflow_refuses_to_change_a_param(store, tmp_path):
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("immutable", str(tmp_path)))
    client.log_param(run.info.run_id, "ddsmon.lease.1", "a")
    client.log_param(run.info.run_id, "ddsmon.lease.1", "a")  # the same value: accepted
    with pytest.raises(MlflowException) as refused:
        client.log_param(run.info.run_id, "ddsmon.lease.1", "b")
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert client.get_run(run.info.run_id).data.params["ddsmon.lease.1"] == "a"


# ---------------------------------------------------------------------- refused, released
def test_a_second_daemon_on_the_run_is_refused_naming_the_holder(store, sig, tmp_path):
    watched = _watched(tmp_path)
    first = _sink(store, tmp_path / "a", "refused")
    first.start(RunInfo(watched, "watch", {}))
    first.on_reading(_reading(0, sig, watched), [])
    run_id = first.run_id
    assert run_id is not None

    second = _sink(store, tmp_path / "b", "refused")
    second.state.set("directory", str(watched))
    for attempt in (second.recorded_steps, lambda: second.start(RunInfo(watched, "watch", {}))):
        with pytest.raises(RunClaimed) as info:
            attempt()
        message = str(info.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert str(tmp_path / "a") in message and run_id in message and str(watched) in message
        assert info.value.holder["epoch"] == 1
    second.close()
    assert second.run_id is None
    first.on_reading(_reading(10, sig, watched), [])
    first.close()
    run = MlflowClient(store).get_run(run_id)
    assert run.data.tags["ddsmon.lease.1.heartbeat"] == "released"

    third = _sink(store, tmp_path / "c", "refused")  # released: taken at once
    started = time.monotonic()
    third.start(RunInfo(watched, "scan", {}))
    assert time.monotonic() - started < 20  # no waiting for the bound (60 s)
    assert third.run_id == run_id and third.lease is not None and third.lease.epoch == 2
    third.on_reading(_reading(20, sig, watched), [])
    third.close()
    assert _steps(store, run_id) == [0, 10, 20]


def test_restart_on_the_same_state_dir_takes_its_own_lease_at_once(store, sig, tmp_path):
    """kill -9 and restart: the old lease is this state directory's (its nonce is kept
    there), so no waiting; the old object, were it alive, could not write again."""
    watched = _watched(tmp_path)
    old = _sink(store, tmp_path / "st", "own")
    old.start(RunInfo(watched, "watch", {}))
    old.on_reading(_reading(0, sig, watched), [])
    new = _sink(store, tmp_path / "st", "own")
    started = time.monotonic()
    assert new.recorded_steps() == {0}
    assert time.monotonic() - started < 20
    new.start(RunInfo(watched, "watch", {}))
    new.on_reading(_reading(10, sig, watched), [])
    with pytest.raises(LeaseLost, match="taken over"):
        old.on_reading(_reading(20, sig, watched), [])
    assert old.undelivered_steps() == []  # not spooled either: the holder reads it
    old.close()
    new.close()
    assert _steps(store, new.run_id or "") == [0, 10]
    assert MlflowClient(store).get_run(new.run_id or "").info.status == "FINISHED"


# ---------------------------------------------------------------------- stale, lost
def test_a_stale_lease_is_taken_over_and_the_old_holder_stops(store, sig, tmp_path):
    watched = _watched(tmp_path)
    bound = 1.5
    old = _sink(store, tmp_path / "a", "stale", lease_timeout=bound)
    old.start(RunInfo(watched, "watch", {}))
    old.on_reading(_reading(0, sig, watched), [])
    assert old.lease is not None
    old.lease.stop(release=False)  # its heartbeat stops, as if the process were frozen
    time.sleep(bound + 0.2)
    new = _sink(store, tmp_path / "b", "stale", lease_timeout=bound)
    new.start(RunInfo(watched, "watch", {}))  # stale: watched for bound/3, then taken
    assert new.run_id == old.run_id and new.lease is not None and new.lease.epoch == 2
    new.on_reading(_reading(10, sig, watched), [])
    with pytest.raises(LeaseLost) as lost:
        old.on_reading(_reading(20, sig, watched), [])  # verified before writing: nothing
    assert str(tmp_path / "b") in str(lost.value)
    old.close()  # does not set the status of a run it lost
    run_id = new.run_id or ""
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"
    new.close()
    assert _steps(store, run_id) == [0, 10]


def test_an_alive_holder_with_a_clock_behind_is_not_taken_over(store, tmp_path):
    """Its heartbeat looks old by this machine's clock, but it moves: refused."""
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("skew", str(tmp_path))).info.run_id
    writer = MlflowWriter(store)
    behind = RunLease(
        writer, StateDir(tmp_path / "a"), run_id, timeout=1.2, clock=lambda: time.time() - 100
    )
    behind.acquire()
    try:
        other = RunLease(writer, StateDir(tmp_path / "b"), run_id, timeout=1.2)
        with pytest.raises(RunClaimed, match="last heartbeat 10"):
            other.acquire()
        behind.verify()  # still ours
    finally:
        behind.stop(release=True)
    other.acquire()  # released: taken at once
    other.stop(release=True)


def test_the_lease_costs_one_get_run_per_checkpoint(store, sig, tmp_path):
    watched = _watched(tmp_path)
    sink = _sink(store, tmp_path / "st", "cost")
    sink.start(RunInfo(watched, "watch", {}))
    calls: list[str] = []
    lock = threading.Lock()
    client = sink.client
    for name in ("get_run", "log_batch", "log_artifact", "get_metric_history", "set_tag"):
        real = getattr(client, name)

        def counted(*a, _real=real, _name=name, **k):
            with lock:
                calls.append(_name)
            return _real(*a, **k)

        setattr(client, name, counted)
    for step in (0, 10, 20):
        sink.on_reading(_reading(step, sig, watched), [])
    assert calls.count("get_run") == 3  # the verification before each record
    assert calls.count("log_batch") == 3 and len(calls) == 6
    sink.close()


# ---------------------------------------------------------------------- runs created at once
@pytest.mark.parametrize("order", ["created sorts first", "created sorts last"])
def test_runs_created_in_a_race_end_as_one_run(store, sig, tmp_path, order):
    """A daemon whose first search missed the other's new run creates a second run; it
    is refused on the first run's lease, and deletes its own, empty run at once, whether
    it had leased it (its id sorts first) or was refused before reaching it, when it
    deletes it unleased (CI: two scans left two runs when it sorted last)."""
    experiment = f"race, {order}"  # the store is shared by the module
    watched = _watched(tmp_path)
    first = _sink(store, tmp_path / "a", experiment)
    first.start(RunInfo(watched, "watch", {}))
    first.on_reading(_reading(0, sig, watched), [])
    assert first.run_id is not None
    second = _sink(store, tmp_path / "b", experiment)
    second.state.set("directory", str(watched))
    client = second.client
    real_search, real_create = client.search_runs, client.create_run
    missed = {"once": False}
    created: list[str] = []

    def search_runs(*a, **k):
        if not missed["once"]:  # its first search came before the other's run existed
            missed["once"] = True
            return []
        return real_search(*a, **k)

    def create_run(*a, **k):  # a run whose id sorts on the side the case asks for
        while True:
            run = real_create(*a, **k)
            if (run.info.run_id < first.run_id) == (order == "created sorts first"):
                created.append(run.info.run_id)
                return run
            MlflowClient(store).delete_run(run.info.run_id)

    client.search_runs = search_runs  # type: ignore[method-assign]
    client.create_run = create_run  # type: ignore[method-assign]
    with pytest.raises(RunClaimed):
        second.recorded_steps()
    second.close()
    exp = MlflowClient(store).get_experiment_by_name(experiment)
    runs = MlflowClient(store).search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]  # the duplicate is gone at once
    if order == "created sorts last":  # retired, not leased, on its way out: a lease
        # there would refuse a winner that reached it next (both refused, no run written)
        params = MlflowClient(store).get_run(created[0]).data.params
        assert json.loads(params["ddsmon.lease.1"])["retired"] is True
    first.close()
    third = _sink(store, tmp_path / "c", experiment)
    third.start(RunInfo(watched, "scan", {}))
    third.close()
    assert third.run_id == first.run_id
    assert _steps(store, first.run_id) == [0]


def test_a_retired_run_reads_as_gone_and_a_leased_one_cannot_be_retired(store, tmp_path):
    """retire() is the lease's compare-and-set: it lands only on a run no one leased,
    and from then on every daemon's acquire reads that run as deleted (before it is)."""
    client = MlflowClient(store)
    exp = client.create_experiment("retire", str(tmp_path))
    writer = MlflowWriter(store)
    fresh, leased = (client.create_run(exp).info.run_id for _ in range(2))
    assert RunLease(writer, StateDir(tmp_path / "loser"), fresh).retire()
    assert client.get_run(fresh).info.lifecycle_stage == "active"
    with pytest.raises(RunGone):
        RunLease(writer, StateDir(tmp_path / "winner"), fresh).acquire()
    holder = RunLease(writer, StateDir(tmp_path / "holder"), leased)
    holder.acquire()
    try:
        assert not RunLease(writer, StateDir(tmp_path / "late"), leased).retire()
        holder.verify()  # still the holder's
    finally:
        holder.stop(release=True)


def test_of_several_runs_of_a_directory_the_one_with_checkpoints_is_kept(store, sig, tmp_path):
    watched = _watched(tmp_path)
    client = MlflowClient(store)
    exp = client.create_experiment("several", str(tmp_path / "art"))
    tags = {
        OWNED_TAG: "true",
        DIRECTORY_TAG: str(watched),
        DIRECTORY_ID_TAG: directory_id(watched),
    }
    empty = client.create_run(exp, tags=tags).info.run_id
    full = client.create_run(exp, tags=tags).info.run_id
    client.log_metric(full, CHECKPOINT_METRIC, 1.0, step=5)
    sink = _sink(store, tmp_path / "st", "several")
    sink.state.set("directory", str(watched))
    assert sink.recorded_steps() == {5}
    assert sink.run_id == full
    sink.close()
    assert client.get_run(empty).info.lifecycle_stage == "deleted"


# ---------------------------------------------------------------------- the experiment's kind
def test_experiments_are_tagged_for_the_model_training_view(store, sig, tmp_path):
    watched = _watched(tmp_path)
    client = MlflowClient(store)
    sink = _sink(store, tmp_path / "a", "kind-new")
    sink.start(RunInfo(watched, "scan", {}))
    sink.close()
    assert client.get_experiment_by_name("kind-new").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    untagged = client.create_experiment("kind-old", str(tmp_path / "o"))
    inferred = client.create_experiment(
        "kind-inferred",
        str(tmp_path / "i"),
        tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"},
    )
    chosen = client.create_experiment(
        "kind-chosen", str(tmp_path / "c"), tags={EXPERIMENT_KIND_TAG: "finetuning"}
    )
    for name in ("kind-old", "kind-inferred", "kind-chosen"):
        s = _sink(store, tmp_path / name, name)
        s.start(RunInfo(watched, "scan", {}))
        s.close()
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(inferred).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"  # a choice

    training_exp = client.create_experiment("kind-training", str(tmp_path / "t"))
    training = client.create_run(training_exp).info.run_id
    given = _sink(store, tmp_path / "given", "ignored", run_id=training)
    given.start(RunInfo(watched, "scan", {}))
    given.close()
    assert client.get_experiment(training_exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


# ---------------------------------------------------------------------- undelivered steps
def test_undelivered_steps_after_close_name_what_the_server_did_not_get(store, sig, tmp_path):
    watched = _watched(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = _sink(f"http://127.0.0.1:{port}", tmp_path / "st", "undelivered")
    down.start(RunInfo(watched, "scan", {}))
    for step in (0, 10):
        down.on_reading(_reading(step, sig, watched), [])
    down.close()
    assert down.undelivered_steps() == [0, 10]
    up = _sink(store, tmp_path / "st", "undelivered")
    up.start(RunInfo(watched, "scan", {}))  # the spool is replayed
    up.close()
    assert up.undelivered_steps() == []
    assert _steps(store, up.run_id or "") == [0, 10]
