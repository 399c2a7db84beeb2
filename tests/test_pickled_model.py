"""Checkpoints that hold the pickled model itself (``torch.save(model)``, common in
research code), read with ``--trust-checkpoints`` and no ``--model``.

Before: the loader could already use such a model, but ``scan``, ``watch`` and ``report``
refused at start-up, "no model factory: give --model", although the file holds the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

REPO = Path(__file__).resolve().parents[1]


def _ddsmon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def _folder(tmp_path: Path, *, whole: bool, steps: tuple[int, ...] = (10, 20)) -> Path:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in steps:
        torch.manual_seed(step)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        torch.save(model if whole else model.state_dict(), ckpts / f"model_step{step}.pt")
    torch.manual_seed(0)
    torch.save(
        {"inputs": torch.randn(16, 4), "targets": torch.randint(0, 3, (16,))}, tmp_path / "probe.pt"
    )
    return ckpts


def test_pickled_models_are_read_with_trust_and_no_factory(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    ckpts = _folder(tmp_path, whole=True)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    proc = _ddsmon("scan", str(ckpts), "--trust-checkpoints", "--probe", str(tmp_path / "probe.pt"),
                   "--tracking-uri", uri, "--no-plots", "--threads", "1", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 read" in proc.stderr and "0 failed" in proc.stderr, proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    assert sorted(
        m.step for m in client.get_metric_history(run.info.run_id, CHECKPOINT_METRIC)
    ) == [10, 20]
    assert any(k.endswith("/0") for k in run.data.metrics), sorted(run.data.metrics)

    # without --trust-checkpoints: refused at start-up, and the error says what to pass
    refused = _ddsmon("report", str(ckpts / "model_step10.pt"), "--probe", str(tmp_path / "probe.pt"),
                      cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "no model factory" in refused.stderr and "--trust-checkpoints" in refused.stderr


@pytest.mark.slow  # a scan of three failing checkpoints, about 8 s
def test_state_dicts_with_trust_and_no_factory_are_a_settings_fault(tmp_path: Path) -> None:
    """Trust without --model over state dicts: each says it has nothing to load into,
    and three in a row stop the scan as a settings fault (exit 2), naming --model."""
    ckpts = _folder(tmp_path, whole=False, steps=(10, 20, 30))
    proc = _ddsmon("scan", str(ckpts), "--trust-checkpoints", "--probe", str(tmp_path / "probe.pt"),
                   "--tracking-uri", f"sqlite:///{tmp_path / 'ml.db'}", "--no-plots", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no model factory to load this state dict into" in proc.stderr + proc.stdout
    assert "--model" in proc.stderr
