"""Helpers of the fault tests that run real ``ddsmon`` processes against a real store:
checkpoints of the fixture MLP, the CLI as a subprocess, the run read back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"


def write_checkpoints(directory: Path, steps: list[int], *, seed: int = 0) -> None:
    """Checkpoints of the fixture MLP at ``steps``, written atomically (temp + rename)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    directory.mkdir(parents=True, exist_ok=True)
    model = mlp(seed=seed)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        tmp = directory / f".step_{step:06d}.pt.tmp"
        torch.save({"model": state, "step": step, "val_acc": step / 1000}, tmp)
        os.replace(tmp, directory / f"step_{step:06d}.pt")


def cli_args(mode: str, directory: Path, probe: Path, uri: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ddsmon.cli", mode, str(directory),
        "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri, "--no-plots",
        *extra,
    ]  # fmt: skip


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A ddsmon process; its stderr is kept (read with ``communicate``)."""
    return subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for ``proc`` (killed past ``timeout``): its exit status and stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"ddsmon did not finish in {timeout}s:\n{err[-3000:]}") from None
    return proc.returncode, err


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def runs_of(uri: str, experiment: str = "ddsmon") -> list:
    """The active runs of ``experiment`` (none when it does not exist yet)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id]))


def logged_steps(uri: str, run_id: str, key: str = CHECKPOINT_METRIC) -> list[int]:
    """Every row's step of ``key`` in the run, sorted, duplicates kept."""
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def only_run_steps(uri: str, key: str = CHECKPOINT_METRIC) -> list[int]:
    """The steps of the experiment's single run ([] before it has one)."""
    runs = runs_of(uri)
    if not runs:
        return []
    assert len(runs) == 1, f"expected one run, got {[r.info.run_id for r in runs]}"
    return logged_steps(uri, runs[0].info.run_id, key)
