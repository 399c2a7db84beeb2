"""A fault in one checkpoint is that checkpoint's failure; a setting that fails on every
checkpoint is said once and stops the daemon (exit 2); checkpoints without a step are
aliases or said to be unplaceable, never logged at made-up steps.

Every fault is injected for real: a model whose forward raises on NaN weights, a probe
the model rejects, targets out of range, a loss that raises, files without a step, a
step beyond MLflow's range, a state directory that lost its writes. Each run is a real
``ddsmon scan`` subprocess against a real SQLite MLflow store read back with MlflowClient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fixtures_models import mlp, mlp_probe
from test_cli import REPO, ddsmon, run_of, write_run
from test_faults_state import _fill, small_fs

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

STRICT = f"{REPO / 'tests' / 'fixtures_models.py'}:strict_mlp"
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"


def _steps(uri: str) -> list[int]:
    client, run = run_of(uri)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, CHECKPOINT_METRIC))


def _scan(ckpts: Path, probe: Path, uri: str, *extra: str, model: str = STRICT):
    return ddsmon("scan", str(ckpts), "--model", model, "--probe", str(probe),
                  "--tracking-uri", uri, "--fisher", "activation", "--no-plots", *extra)  # fmt: skip


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_a_model_that_raises_fails_that_checkpoint_only(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30], nan_at=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _scan(ckpts, probe, uri)
    assert first.returncode == 0, first.stderr
    assert "3 read" in first.stderr and "1 failed" in first.stderr
    assert "step_000020.pt (step 20): ValueError: NaN in weight 0.weight" in first.stderr
    assert "Traceback" not in first.stderr
    assert _steps(uri) == [0, 10, 30]
    # a restart does not die on it again, nor retry it while it is unchanged
    again = _scan(ckpts, probe, uri)
    assert again.returncode == 0, again.stderr
    assert "failed in an earlier run and has not changed" in again.stderr
    assert "0 read" in again.stderr
    # rewritten (the trainer saved it again, healthy): read
    write_run(tmp_path / "fixed", [20])
    os.replace(tmp_path / "fixed" / "step_000020.pt", ckpts / "step_000020.pt")
    third = _scan(ckpts, probe, uri)
    assert third.returncode == 0 and "1 read" in third.stderr, third.stderr
    assert _steps(uri) == [0, 10, 20, 30]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("probe_shape", "mat1 and mat2 shapes cannot be multiplied"),
        ("targets_out_of_range", "the targets hold 99 at (0,), but the logits have 4 classes"),
        ("loss_raises", "the loss is broken on purpose"),
    ],
)
def test_a_setting_that_fails_everywhere_is_said_once_and_exits_2(
    tmp_path: Path, fault: str, expected: str
) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30, 40])
    x, y = mlp_probe()
    extra: list[str] = []
    if fault == "probe_shape":
        x = x[:, :7]
    elif fault == "targets_out_of_range":
        y = y + 99
    else:
        extra = ["--loss", f"{REPO / 'tests' / 'fixtures_models.py'}:raising_loss"]
    probe = tmp_path / "probe.pt"
    torch.save({"inputs": x, "targets": y}, probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _scan(ckpts, probe, uri, *extra, model=FACTORY)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "the probe, the loss or the layer selection is at fault" in result.stderr
    assert expected in result.stderr
    # it stopped after three identical failures: the last two were never tried
    assert result.stderr.count("cannot read") == 3
    assert "step_000040.pt" not in result.stderr.split("at fault")[0].split("cannot read")[-1]


def _save(path: Path, model: torch.nn.Module, **extra: object) -> None:
    torch.save({"model": model.state_dict(), **extra}, path)


def test_files_without_a_step_are_aliases_or_said_unplaceable(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20])
    state = torch.load(ckpts / "step_000010.pt", weights_only=True)["model"]
    torch.save({"model": state}, ckpts / "best.pt")  # the weights of step 10, no step
    _save(ckpts / "final.pt", mlp(seed=7))  # weights of no step read, no step
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _scan(ckpts, probe, uri, model=FACTORY)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "best.pt holds the same weights as step 10 (step_000010.pt): an alias" in err
    assert "final.pt has no training step" in err
    assert "1 aliases of a step read" in err and "1 without a step" in err
    assert _steps(uri) == [0, 10, 20]  # nothing at made-up steps 0, 1, 2


def test_a_step_beyond_mlflows_range_is_a_failure_naming_it(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0])
    _save(ckpts / "big.pt", mlp(seed=3), step=2**62)  # in range: logged at its step
    _save(ckpts / "huge.pt", mlp(seed=4), step=2**70)  # beyond int64: a failure, never step 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _scan(ckpts, probe, uri, model=FACTORY)
    assert result.returncode == 0, result.stderr
    assert "huge.pt" in result.stderr and f"step {2**70} is outside MLflow's range" in result.stderr
    assert _steps(uri) == [0, 2**62]


def test_the_event_history_sees_steps_recorded_before_a_lost_state_write(
    tmp_path: Path, probe: Path
) -> None:
    """A kill -9 between the MLflow write and the state write: MLflow has the steps, the
    state has not. Injected by deleting what the state write would have recorded. The
    rerun logs nothing twice and the detector's history holds every step."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _scan(ckpts, probe, uri, model=FACTORY).returncode == 0
    state = ckpts / ".ddsmon"
    saved = json.loads((state / "state.json").read_text())
    assert saved["detector_step"] == 30
    (state / "done.jsonl").unlink()
    for key in ("detector", "detector_step"):
        saved.pop(key)
    (state / "state.json").write_text(json.dumps(saved))
    again = _scan(ckpts, probe, uri, model=FACTORY)
    assert again.returncode == 0, again.stderr
    assert _steps(uri) == [0, 10, 20, 30]  # none doubled
    after = json.loads((state / "state.json").read_text())
    assert after["detector_step"] == 30
    assert after["detector"], "the detector history was rebuilt from the readings"


@pytest.mark.slow  # 15-19 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_a_full_disk_under_the_state_directory_stops_cleanly_and_loses_nothing(
    tmp_path: Path, probe: Path, request: pytest.FixtureRequest
) -> None:
    """The state directory on a real tmpfs that fills during the scan: exit 4 naming
    ENOSPC and the file, no traceback; once space is freed, a rerun logs every step once."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, list(range(0, 60, 10)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = request.getfixturevalue(small_fs.__name__)
    state = small / "state"
    fillers = _fill(small)
    for extra in fillers[-3:]:  # leave ~12 KiB: the first checkpoints fit, the rest do not
        extra.unlink()
    full = _scan(ckpts, probe, uri, "--state-dir", str(state), model=FACTORY)
    assert full.returncode == 4, full.stderr
    assert "no space left on device" in full.stderr and "Traceback" not in full.stderr
    assert "nothing recorded was lost" in full.stderr
    assert not [p for p in state.rglob("*") if ".tmp" in p.name], "no temporary left behind"
    for filler in fillers[:-3]:
        filler.unlink()
    again = _scan(ckpts, probe, uri, "--state-dir", str(state), model=FACTORY)
    assert again.returncode == 0, again.stderr
    assert _steps(uri) == list(range(0, 60, 10)), (full.stderr, again.stderr)


def test_two_sigints_during_a_long_reading_stay_two(tmp_path: Path, probe: Path) -> None:
    """The first SIGINT asks to finish the checkpoint, the second, 0.2 s later and while
    the reading is inside long eigensolves, abandons it: the process ends within seconds
    and the checkpoint is not marked read."""
    import signal
    import subprocess
    import sys
    import time

    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    marker = tmp_path / "reading"
    args = [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model", FACTORY,
            "--probe", str(probe), "--loss", f"{REPO / 'tests' / 'fixtures_models.py'}:slow_loss",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-plots",
            "--fisher", "activation"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDSMON_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), "the reading never started"
        time.sleep(1.0)  # inside the eigensolves
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _out, err = proc.communicate(timeout=40)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert took < 30, f"the second SIGINT did not abandon the reading ({took:.1f} s)"
    assert "finishing the current checkpoint" in err
    done = ckpts / ".ddsmon" / "done.jsonl"
    assert not done.exists() or "step_000000" not in done.read_text()


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_scan_with_readings_left_in_the_spool_exits_3_naming_the_steps(
    tmp_path: Path, probe: Path
) -> None:
    """A real ``mlflow server`` stopped between two scans: the second scan reads the new
    checkpoint, cannot deliver it, says which steps wait in the spool and exits 3; with the
    server back, a third scan delivers them, each step once."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    server.start()
    try:
        first = _scan(ckpts, probe, server.uri, model=FACTORY)
        assert first.returncode == 0, first.stderr
        server.stop()
        write_run(tmp_path / "more", [20])
        os.replace(tmp_path / "more" / "step_000020.pt", ckpts / "step_000020.pt")
        down = _scan(ckpts, probe, server.uri, model=FACTORY)
        assert down.returncode == 3, down.stderr
        assert "not delivered to MLflow (steps 20)" in down.stderr
        server.start()
        up = _scan(ckpts, probe, server.uri, model=FACTORY)
        assert up.returncode == 0, up.stderr
        assert _steps(server.uri) == [0, 10, 20]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("model", "loss", "expected"),
    [
        ("broken_factory", None, "the factory is broken on purpose"),
        ("not_a_module", None, "expected torch.nn.Module"),
        ("exiting_factory", None, "sys.exit(0)"),
        ("mlp", "exiting_loss", "sys.exit(0)"),
    ],
)
def test_user_code_that_fails_everywhere_or_exits_stops_with_exit_2(
    tmp_path: Path, probe: Path, model: str, loss: str | None, expected: str
) -> None:
    """A factory that raises or returns no module, and user code calling sys.exit, fail
    each checkpoint (never a silent exit 0 with nothing read), then stop with exit 2."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30])
    fixtures = REPO / "tests" / "fixtures_models.py"
    extra = ["--loss", f"{fixtures}:{loss}"] if loss else []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _scan(ckpts, probe, uri, *extra, model=f"{fixtures}:{model}")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "is at fault" in result.stderr
    assert result.stderr.count("cannot read") == 3


def test_two_checkpoints_with_one_step_are_said_at_the_default_level(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    _save(ckpts / "a.pt", mlp(seed=1), step=100)
    _save(ckpts / "b.pt", mlp(seed=2), step=100)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _scan(ckpts, probe, uri, model=FACTORY)
    assert result.returncode == 0, result.stderr
    assert "holds step 100, which the run already has from another checkpoint" in result.stderr
    assert "1 with a step the run already had" in result.stderr
    assert _steps(uri) == [100]


def test_file_names_cannot_forge_lines_on_stdout(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0])
    os.replace(ckpts / "step_000000.pt", ckpts / "step_1\nFORGED LINE\x1b[2J.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _scan(ckpts, probe, uri, model=FACTORY)
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert not any(line.startswith("FORGED LINE") for line in stream.splitlines())
        assert "\x1b[2J" not in stream
    assert "\\nFORGED LINE" in result.stdout
