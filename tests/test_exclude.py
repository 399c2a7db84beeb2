"""``--exclude GLOB`` (``exclude = [...]`` in ddsmon.toml): checkpoints a run writes
beside its model's own that are not the model to watch (an EMA copy at every step, a
teacher). Without it the first file read at a step won (``ema_*`` sorts before
``model_*`` in a scan, while watch took the first to land), and the other was "a step
the run already has", so scan and watch of one run logged different weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent / "trainer_scripts"
sys.path.insert(0, str(SCRIPTS))

from models import classifier, classifier_probe  # noqa: E402


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir(exist_ok=True)
    for step in (10, 20):
        torch.save({"model": classifier(seed=step).state_dict(), "step": step},
                   ckpts / f"model_step{step}.pt")  # fmt: skip
        torch.save({"model": classifier(seed=100 + step).state_dict(), "step": step},
                   ckpts / f"ema_step{step}.pt")  # fmt: skip
    probe = tmp_path / "probe.pt"
    inputs, targets = classifier_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    db = tmp_path / "mlflow.db"
    done = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model",
         f"{SCRIPTS / 'models.py'}:classifier", "--probe", str(probe), "--loss", "ce",
         "--tracking-uri", f"sqlite:///{db}", "--no-plots", "--threads", "1", *extra],
        cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return done, db


@pytest.mark.parametrize("how", ["flag", "config"])
def test_scan_reads_only_what_is_not_excluded(tmp_path: Path, how: str) -> None:
    from mlflow import MlflowClient

    if how == "flag":
        extra: tuple[str, ...] = ("--exclude", "ema_*")
    else:
        config = tmp_path / "settings.toml"
        config.write_text('exclude = ["ema_*"]\n')
        extra = ("--config", str(config))
    done, db = _run(tmp_path, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    read = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [Path(r.split("=", 1)[1]).name for r in read] == ["model_step10.pt", "model_step20.pt"]
    assert "already has" not in done.stderr, done.stderr[-3000:]
    assert "scan: 2 read, 0 skipped, 0 failed" in done.stderr, done.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [k for k in run.data.tags if k.startswith("ddsmon.failure")]


def test_without_exclude_the_ema_file_takes_the_step(tmp_path: Path) -> None:
    done, _ = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ema_step10.pt" in done.stdout and "model_step10.pt" not in done.stdout
    assert "which the run already has from another checkpoint" in done.stderr


def test_a_bad_exclude_is_a_settings_error_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text("exclude = [3]\n")
    done, _ = _run(tmp_path, "--config", str(config))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "exclude must be shell globs" in done.stderr, done.stderr[-2000:]
