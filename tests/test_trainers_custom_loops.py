"""Custom training loops, the way people write them with the real libraries:

* transformers' ``save_pretrained`` into ``out/step_<N>/`` every few steps of a plain
  torch loop, watched live by a real ``ddsmon watch`` started before the folder exists
  and given no ``--model`` (the folder's config.json builds it);
* Accelerate's ``Accelerator.save_state`` with automatic checkpoint naming
  (``checkpoints/checkpoint_<i>/`` holding ``model.safetensors``, ``optimizer.bin``,
  ``scheduler.bin``, ``random_states_0.pkl``), read by a real ``ddsmon scan``.

What landed in the sqlite MLflow store is read back with MlflowClient.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))

from live import Watcher, env, only_run, reading_key, steps_of, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_save_pretrained_folders_watched_live_without_a_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from models import gpt2_probe, tiny_gpt2, token_data

    out, probe = tmp_path / "out", tmp_path / "probe.pt"
    inputs, targets = gpt2_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    watcher = Watcher([out, "--probe", probe, "--loss", "ce", "--tracking-uri", uri,
                       "--no-plots", "--quiet", "1", "--threads", "1"], cwd=tmp_path)  # fmt: skip
    saved = [4, 8, 12]
    try:
        watcher.wait_for("waiting for", timeout=120)
        model = tiny_gpt2()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        seq = token_data(32, 8, seed=0)
        for step in range(1, saved[-1] + 1):
            loss = model(input_ids=seq[:, :-1], labels=seq[:, :-1]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in saved:
                model.save_pretrained(out / f"step_{step}")
        wait_until(lambda: saved[-1] in steps_of(uri), 300, "the watcher to read step_12")
    finally:
        status = watcher.stop()
    output = watcher.text()
    assert status == 0, output
    assert steps_of(uri) == saved, output
    run = only_run(uri)
    names = [name for name, _ in tiny_gpt2().named_modules() if name]
    layers = [name for name in names if reading_key(name, "finite") in run.data.metrics]
    assert len(layers) >= 10, sorted(run.data.metrics)
    for layer in layers:
        assert steps_of(uri, reading_key(layer, "sigma_max")) == saved, layer
    assert "no training step" not in output and "FAILED" not in output, output

    # the model built from config.json builds no key/value cache in the probe pass
    from ddsmon.checkpoints import classify
    from ddsmon.loading import load_checkpoint

    loaded = load_checkpoint(classify(out / "step_4", out), None)
    assert loaded.step is None and loaded.model.config.use_cache is False
    assert model.config.use_cache is True  # the trainer's own model is left as it was


def test_accelerate_save_state_folders_are_read_at_their_steps(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from models import classifier, classifier_data, classifier_probe

    project = ProjectConfiguration(
        project_dir=str(tmp_path / "project"), automatic_checkpoint_naming=True
    )
    accelerator = Accelerator(project_config=project, cpu=True)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    x, y = classifier_data(64, seed=0)
    for _ in range(3):
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            sched.step()
        accelerator.save_state()
    ckpts = tmp_path / "project" / "checkpoints"
    files = sorted(p.name for p in (ckpts / "checkpoint_0").iterdir())
    assert "model.safetensors" in files and "optimizer.bin" in files, files

    probe = tmp_path / "probe.pt"
    torch.save(dict(zip(("inputs", "targets"), classifier_probe(), strict=True)), probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    models = Path(__file__).resolve().parent / "trainer_scripts" / "models.py"
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model",
         f"{models}:classifier", "--probe", str(probe), "--loss", "ce",
         "--tracking-uri", uri, "--no-plots", "--threads", "1"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scan: 3 read, 0 skipped, 0 failed" in proc.stderr, proc.stderr
    assert steps_of(uri) == [0, 1, 2], proc.stderr
    # pointed at the project_dir, one level too high: it says where they are
    above = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(tmp_path / "project"), "--model",
         f"{models}:classifier", "--probe", str(probe), "--tracking-uri",
         f"sqlite:///{tmp_path / 'other.db'}", "--no-plots", "--threads", "1"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert above.returncode == 0, above.stderr
    assert f"watch {ckpts} instead" in above.stderr, above.stderr
