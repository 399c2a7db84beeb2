"""Lightning's ModelCheckpoint as its docs show it: ``every_n_train_steps`` with
``filename="{epoch}-{step}-{val_loss:.2f}"``, ``monitor="val_loss"``, a LightningModule
holding its model as ``self.net``, with and without ``save_weights_only``.

A Lightning checkpoint keeps its validation scalars off its top level: the monitored
score sits in the ModelCheckpoint callback's saved state (``current_score``), and with
``save_weights_only=True`` no callback state is saved, so the file's name holds the
only copy. Before, neither was read: such a run carried no validation scalar, and its
transitions were labelled ``unknown``. Now ``val_loss`` is each checkpoint's meta, logged
as ``train/val_loss`` at its step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddsmon.loading.step_and_meta import _lightning_meta

SCRIPTS = Path(__file__).resolve().parent / "trainer_scripts"

TRAIN = """
import sys, warnings
import torch
sys.path.insert(0, {scripts!r})
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from models import classifier, classifier_data


class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = classifier(seed=0)
        self.criterion = nn.CrossEntropyLoss()

    def training_step(self, batch, i):
        x, y = batch
        return self.criterion(self.net(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", self.criterion(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loader(n, seed, batch):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*classifier_data(n, seed)), batch_size=batch)


checkpoints = ModelCheckpoint(
    dirpath=sys.argv[1], every_n_train_steps=4, filename="{{epoch}}-{{step}}-{{val_loss:.2f}}",
    monitor="val_loss", save_top_k=-1, save_weights_only=sys.argv[2] == "1")
trainer = L.Trainer(
    max_steps=12, val_check_interval=4, callbacks=[checkpoints], logger=False,
    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(Lit(), loader(256, 0, 32), loader(64, 1, 64))
"""


def _scan(tmp_path: Path, ckpts: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """``ddsmon -v scan ckpts`` with the classifier and its probe, into a fresh SQLite
    store: the finished process and the store's URI."""
    sys.path.insert(0, str(SCRIPTS))
    from models import classifier_probe

    probe = tmp_path / "probe.pt"
    inputs, targets = classifier_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "-v", "scan", str(ckpts), "--model",
         f"{SCRIPTS / 'models.py'}:classifier", "--probe", str(probe), "--loss", "ce",
         "--tracking-uri", uri, "--no-plots", "--threads", "1"],
        cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return done, uri


def test_the_validation_scalars_of_a_lightning_checkpoints_name() -> None:
    assert _lightning_meta({}, "epoch=2-step=24-val_loss=0.61") == {"val_loss": 0.61}
    assert _lightning_meta({}, "epoch=2-step=24-val_loss=0.61-v1") == {"val_loss": 0.61}
    assert _lightning_meta({}, "epoch=0_step=8_val_loss=-1.5e-3_val_acc=0.75") == {
        "val_loss": -1.5e-3,
        "val_acc": 0.75,
    }
    for stem in ("last", "step=5", "epoch=3", "model-val_loss=nan", "val_loss=1.2x"):
        assert _lightning_meta({}, stem) == {}, stem
    state = {"callbacks": {"ModelCheckpoint{...}": {"monitor": "val_loss",
                           "current_score": torch.tensor(1.25), "best_model_score": 0.5,
                           "best_k_models": {"/ck/epoch=0-step=4-val_loss=1.30.ckpt": torch.tensor(1.25)}}}}  # fmt: skip
    assert _lightning_meta(state, "epoch=0-step=4-val_loss=1.30") == {"val_loss": 1.25}


@pytest.mark.slow
@pytest.mark.parametrize("weights_only", [False, True])
def test_lightning_val_loss_is_logged_at_each_checkpoints_step(
    tmp_path: Path, weights_only: bool
) -> None:
    pytest.importorskip("lightning")
    from mlflow import MlflowClient

    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(scripts=str(SCRIPTS)))
    ckpts = tmp_path / "ckpts"
    flag = "1" if weights_only else "0"
    done = subprocess.run(
        [sys.executable, str(script), str(ckpts), flag], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in ckpts.iterdir())
    assert len(names) == 3 and all("-val_loss=" in n for n in names), names
    saved = {
        int(n.split("step=")[1].split("-")[0]): torch.load(ckpts / n, weights_only=True)
        for n in names
    }
    assert all(("callbacks" in c) is not weights_only for c in saved.values())
    done, uri = _scan(tmp_path, ckpts)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prefix 'net.' stripped" in done.stderr  # which weights were read: INFO (-v)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "train/val_loss")
    assert [m.step for m in history] == [4, 8, 12]
    for m in history:
        name = next(n for n in names if f"step={m.step}-" in n)
        shown = float(name.rsplit("val_loss=", 1)[1].removesuffix(".ckpt"))
        assert m.value == pytest.approx(shown, abs=0.005)  # the name's value, rounded
        if not weights_only:  # the callback's own score, unrounded
            state = next(iter(saved[m.step]["callbacks"].values()))
            assert m.value == pytest.approx(float(state["current_score"]), rel=1e-6)


EPOCH_NAMES = (
    TRAIN.split("checkpoints = ModelCheckpoint(")[0]
    + """
checkpoints = ModelCheckpoint(
    dirpath=sys.argv[1], filename="sample-{{epoch:02d}}-{{val_loss:.2f}}", monitor="val_loss",
    save_top_k=-1)
trainer = L.Trainer(
    max_epochs=4, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
    enable_model_summary=False, accelerator="cpu")
trainer.fit(Lit(), loader(64, 0, 32), loader(64, 1, 64))
"""
)


@pytest.mark.slow
def test_lightning_names_without_a_step_are_read_in_step_order(tmp_path: Path) -> None:
    """The template of Lightning's ModelCheckpoint docs, ``sample-{epoch:02d}-{val_loss:.2f}``:
    no step in the names, and their last integers are the loss's digits. Before, the
    scan read them in the order of those digits (``val_loss=1.35`` as step 35), and the
    event detector ignored every checkpoint after the first, as not after the last."""
    pytest.importorskip("lightning")
    from mlflow import MlflowClient

    script = tmp_path / "train.py"
    script.write_text(EPOCH_NAMES.format(scripts=str(SCRIPTS)))
    ckpts = tmp_path / "ckpts"
    done = subprocess.run(
        [sys.executable, str(script), str(ckpts)], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in ckpts.iterdir())
    steps = {n: int(torch.load(ckpts / n, weights_only=True)["global_step"]) for n in names}
    assert sorted(steps.values()) == [2, 4, 6, 8], steps
    digits = sorted(names, key=lambda n: int(n.removesuffix(".ckpt").rsplit(".", 1)[1]))
    assert digits != sorted(names, key=steps.__getitem__), "the losses' digits run in step order"
    done, uri = _scan(tmp_path, ckpts)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is not after the last step" not in done.stderr, done.stderr[-3000:]
    read = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("step ")]
    assert read == [2, 4, 6, 8], done.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "train/val_loss")
    assert [m.step for m in history] == [2, 4, 6, 8]
