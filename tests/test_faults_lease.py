"""Exactly once per MLflow run, injected for real: two ``ddsmon`` processes on one
directory with different ``--state-dir`` (so the state directory's flock does not stop
them) started at once against one store (SQLite, and a real ``mlflow server``), a
holder killed with SIGKILL whose lease is taken over after the bound, and several
daemons opening a fresh SQLite store at the same moment (MLflow's schema migration
race)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from fault_helpers import (
    cli_args,
    finish,
    logged_steps,
    only_run_steps,
    runs_of,
    spawn,
    wait_for,
    write_checkpoints,
)
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer

from ddsmon.sinks.mlflow_lease import LEASE_TIMEOUT_ENV, RunClaimed
from ddsmon.sinks.mlflow_run import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from ddsmon.sinks.tracking import MlflowSink
from ddsmon.state import StateDir

pytestmark = pytest.mark.timeout(420)


def _refusal(err: str, holder_pid: int, holder_state: Path) -> None:
    """The refused daemon names the holder: host, pid and state directory."""
    assert "already written by ddsmon" in err, err[-3000:]
    assert f"pid {holder_pid} on host {socket.gethostname()}" in err, err[-3000:]
    assert str(holder_state) in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_two_watchers_with_different_state_dirs_log_each_step_once(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [0, 10, 20])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # fresh: they also race on its schema
    states = [tmp_path / "state-a", tmp_path / "state-b"]
    procs = [
        spawn(cli_args("watch", ckpts, probe, uri, "--quiet", "0.5", "--state-dir", str(s)))
        for s in states
    ]  # started at once
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), 240, "one to be refused")
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        rc, err = finish(procs[loser])
        assert rc == 2, err[-3000:]
        _refusal(err, procs[winner].pid, states[winner])
        assert procs[winner].poll() is None, "the holder keeps watching"
        # checkpoints arriving while it watches
        write_checkpoints(tmp_path / "more", [30, 40], seed=1)
        for step in (30, 40):
            os.replace(tmp_path / "more" / f"step_{step:06d}.pt", ckpts / f"step_{step:06d}.pt")
        wait_for(lambda: only_run_steps(uri) == [0, 10, 20, 30, 40], 180, "every step")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    rc, err = finish(procs[winner], timeout=120)
    assert rc == 0, err[-3000:]
    assert only_run_steps(uri) == [0, 10, 20, 30, 40]  # each step exactly once, one run
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddsmon.lease.1.heartbeat"] == "released"  # a clean stop releases


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_two_scans_at_once_against_a_real_server_log_each_step_once(
    tmp_path: Path, probe: Path
) -> None:
    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    ckpts = tmp_path / "ckpts"
    steps = list(range(0, 200, 10))
    write_checkpoints(ckpts, steps)
    server.start()
    try:
        states = [tmp_path / "state-a", tmp_path / "state-b"]
        procs = [
            spawn(cli_args("scan", ckpts, probe, server.uri, "--state-dir", str(s))) for s in states
        ]
        results = [finish(p, timeout=300) for p in procs]
        codes = [rc for rc, _ in results]
        assert sorted(codes) == [0, 2], [err[-2000:] for _, err in results]
        winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
        _refusal(results[loser][1], procs[winner].pid, states[winner])
        assert only_run_steps(server.uri) == steps
        (run,) = runs_of(server.uri)
        assert logged_steps(server.uri, run.info.run_id, "train/val_acc") == steps
    finally:
        server.stop()


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_lease_of_a_killed_holder_is_taken_over_after_the_bound(
    tmp_path: Path, probe: Path
) -> None:
    bound = 6.0
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [0, 10])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {LEASE_TIMEOUT_ENV: str(bound)}
    holder = spawn(
        cli_args("watch", ckpts, probe, uri, "--quiet", "0.5", "--state-dir", str(tmp_path / "a")),
        env,
    )
    try:
        wait_for(lambda: only_run_steps(uri) == [0, 10], 180, "the holder's readings")
        holder.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
        finish(holder)
    write_checkpoints(tmp_path / "more", [20, 30], seed=1)
    for step in (20, 30):
        os.replace(tmp_path / "more" / f"step_{step:06d}.pt", ckpts / f"step_{step:06d}.pt")

    # at once: the dead holder's heartbeat is still fresh, another daemon is refused
    early = MlflowSink(
        tracking_uri=uri, experiment="ddsmon", run_id=None, lease_timeout=bound,
        state=StateDir(tmp_path / "early"), plots=False,
    )  # fmt: skip
    early.state.set("directory", str(ckpts.resolve()))
    with pytest.raises(RunClaimed, match=f"pid {holder.pid} on host"):
        early.recorded_steps()
    assert time.monotonic() - killed_at < bound, "the check must come before the bound"

    # a daemon with another state directory takes the lease over once it is stale
    time.sleep(max(0.0, killed_at + bound + 0.5 - time.monotonic()))
    rc, err = finish(
        spawn(cli_args("scan", ckpts, probe, uri, "--state-dir", str(tmp_path / "b")), env)
    )
    assert rc == 0, err[-3000:]
    assert "no heartbeat for over 6s; taken over" in err, err[-3000:]
    assert only_run_steps(uri) == [0, 10, 20, 30]  # the dead holder's steps not again
    (run,) = runs_of(uri)
    assert "ddsmon.lease.2" in run.data.params


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_daemons_opening_a_fresh_sqlite_store_at_once_all_succeed(
    tmp_path: Path, probe: Path
) -> None:
    """MLflow migrates a new SQLite store's schema on first use; two processes doing it at
    once fail (``table _alembic_tmp_... already exists``) or leave it broken."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    dirs = [tmp_path / f"ckpts{i}" for i in range(4)]
    for d in dirs:
        write_checkpoints(d, [0])
    procs = [spawn(cli_args("scan", d, probe, uri)) for d in dirs]
    results = [finish(p) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0, 0], [err[-2000:] for _, err in results]
    runs = runs_of(uri)
    assert len(runs) == 4
    assert all(logged_steps(uri, r.info.run_id) == [0] for r in runs)
    exp = MlflowClient(uri).get_experiment_by_name("ddsmon")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
