"""Shared test settings: headless matplotlib, fast-failing MLflow HTTP, seeded torch."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """Torch seeded per test and no inherited MLFLOW_TRACKING_URI, so a test neither
    depends on another's randomness nor logs into a store it did not name."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    yield


@pytest.fixture
def probe(tmp_path):
    """The fixture MLP's probe saved as a torch file: ``--probe`` for CLI tests."""
    from fixtures_models import mlp_probe

    x, y = mlp_probe()
    path = tmp_path / "probe.pt"
    torch.save({"inputs": x, "targets": y}, path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store per test module (creating one costs seconds), its URI;
    MLflow's default artifact root (./mlruns) lands in a temporary working directory."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    old = os.getcwd()
    os.chdir(root)
    try:
        uri = f"sqlite:///{root}/mlflow.db"
        MlflowClient(uri).search_experiments()  # create the schema once
        yield uri
    finally:
        os.chdir(old)
