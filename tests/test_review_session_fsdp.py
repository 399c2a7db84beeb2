"""A Hugging Face Trainer run under FSDP with sharded state dicts: each
``checkpoint-N/`` holds ``pytorch_model_fsdp_0/`` (a torch.distributed.checkpoint of
``{"model": state_dict}``, as accelerate's ``save_fsdp_model`` writes it), the
optimizer's ``optimizer_0/`` (another), ``trainer_state.json`` and the Trainer's side
files, and no model weights file or config.json. Before, every checkpoint failed
"incomplete: no weights file". Built here with the real ``torch.distributed.checkpoint``
API in one process, laid out as accelerate lays it out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))
from models import classifier, classifier_probe

from ddsmon import compute_signatures

dist_cp = pytest.importorskip("torch.distributed.checkpoint")

MODELS = Path(__file__).resolve().parent / "trainer_scripts" / "models.py"
STEPS = (4, 8)


def _trained(step: int) -> torch.nn.Module:
    model = classifier(seed=0)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step + i).view(p.shape))
    return model


def _save_checkpoint(out: Path, step: int, *, metadata: bool = True) -> None:
    """One ``checkpoint-<step>/`` as the Trainer writes it under FSDP's SHARDED_STATE_DICT."""
    model = _trained(step)
    folder = out / f"checkpoint-{step}"
    sharded = folder / "pytorch_model_fsdp_0"
    sharded.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process
        dist_cp.save(
            {"model": model.state_dict()}, storage_writer=dist_cp.FileSystemWriter(sharded)
        )
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 8)).sum().backward()
        opt.step()  # its state, not the weights saved
        dist_cp.save(
            {"optimizer": opt.state_dict()},
            storage_writer=dist_cp.FileSystemWriter(folder / "optimizer_0"),
        )
    for side in ("scheduler.pt", "rng_state_0.pth", "training_args.bin"):
        torch.save({}, folder / side)
    state = {"global_step": step, "log_history": [{"loss": 1.0 / step, "step": step}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if not metadata:  # dist_cp writes .metadata last: a save still under way
        (sharded / ".metadata").unlink()


def _ddsmon(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ddsmon.cli", *map(str, args), "--threads", "1"]
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=240, env={**os.environ}
    )


def test_fsdp_sharded_trainer_checkpoints_are_read_at_their_steps(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    run = tmp_path / "run"
    for step in STEPS:
        _save_checkpoint(run, step)
    _save_checkpoint(run, 12, metadata=False)
    probe = tmp_path / "probe.pt"
    inputs, targets = classifier_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _ddsmon(
        "scan", run, "--model", f"{MODELS}:classifier", "--probe", probe, "--loss", "ce",
        "--tracking-uri", uri, "--no-plots", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scan: 2 read" in done.stderr + done.stdout, done.stderr[-3000:]
    assert "checkpoint-12" in done.stderr and ".metadata" in done.stderr  # not yet complete
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    for step in STEPS:
        want = compute_signatures(_trained(step).eval(), inputs, targets, loss="ce", device="cpu")
        for name, layer in want.layers.items():
            for key in ("lambda_max", "lambda_min", "sigma_max"):
                history = client.get_metric_history(mlrun.info.run_id, f"dds_detail/{key}/{name}")
                (got,) = [m.value for m in history if m.step == step]
                expected = getattr(layer, key)
                assert got == pytest.approx(expected, rel=1e-10), (step, name, key)


def test_fsdp_sharded_checkpoint_without_a_model_says_to_pass_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_checkpoint(run, 4)
    probe = tmp_path / "probe.pt"
    inputs, targets = classifier_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    done = _ddsmon("report", run / "checkpoint-4", "--probe", probe, "--json", cwd=tmp_path)
    assert done.returncode != 0
    said = done.stderr
    assert "pytorch_model_fsdp_0" in said and "--model" in said, said[-2000:]
    assert "Traceback" not in said, said[-3000:]
