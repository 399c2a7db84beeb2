"""A Lightning ModelCheckpoint's saved ``current_score`` is the score of the last file
that callback saved: in ``last.ckpt`` written after an epoch outside its top k (or in
another callback's file) it is stale. Before, it was read as the checkpoint's own
validation scalar: the last checkpoint of a run carried the score of an earlier one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddsmon.loading.step_and_meta import _lightning_meta

TRAIN = """
import sys, warnings
import torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn


class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, i):
        self.log("val_score", float(self.global_step))  # rises: only the first is top 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
loader = torch.utils.data.DataLoader(data, batch_size=8)
checkpoints = ModelCheckpoint(
    dirpath=sys.argv[1], every_n_train_steps=2, filename="{step}", monitor="val_score",
    mode="min", save_top_k=1, save_last=True)
trainer = L.Trainer(
    max_steps=6, val_check_interval=2, callbacks=[checkpoints], logger=False,
    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(Lit(), loader, loader)
"""


def test_a_score_is_read_only_from_the_callback_that_saved_the_file() -> None:
    state = {
        "monitor": "val_loss",
        "current_score": torch.tensor(0.5),  # the newest file this callback saved
        "best_k_models": {"/run/ckpts/step=4.ckpt": torch.tensor(0.5)},
    }
    obj = {"callbacks": {"ModelCheckpoint{...}": state}}
    assert _lightning_meta(obj, "step=4") == {"val_loss": 0.5}
    assert _lightning_meta(obj, "last") == {}
    assert _lightning_meta(obj, "step=8-val_loss=0.61") == {"val_loss": 0.61}  # its name's


@pytest.mark.slow
def test_last_ckpt_does_not_carry_an_earlier_checkpoints_score(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    ckpts = tmp_path / "ckpts"
    done = subprocess.run(
        [sys.executable, str(script), str(ckpts)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=2.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    (state,) = last["callbacks"].values()
    assert float(state["current_score"]) == 2.0  # stale: step 2's score, saved at step 6
    assert _lightning_meta(last, "last") == {}
    first = torch.load(ckpts / "step=2.ckpt", weights_only=False)
    assert _lightning_meta(first, "step=2") == {"val_score": 2.0}
