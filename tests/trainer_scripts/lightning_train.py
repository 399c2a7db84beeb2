"""Train the classifier with Lightning's Trainer, as a user's script would.

    python lightning_train.py OUT MANIFEST [--max-steps 30] [--every 5] [--step-seconds 0.1]

The LightningModule holds the model as ``self.model``, an EMA copy as
``self.ema_model`` (updated after every step) and its loss as ``self.criterion`` (with a
class-weight buffer). ``ModelCheckpoint(dirpath=OUT, every_n_train_steps=--every,
save_top_k=-1, save_last=True)`` writes ``step=N.ckpt`` and rewrites ``last.ckpt``; one
JSON line per step saved goes to MANIFEST (``{"step": N}``). One CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from models import classifier, classifier_data  # noqa: E402
from torch import nn  # noqa: E402


class EmaClassifier(L.LightningModule):
    def __init__(self, decay: float = 0.8) -> None:
        super().__init__()
        self.model = classifier(seed=0)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(4))
        self.decay = decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = self.criterion(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
                e.mul_(self.decay).add_(p, alpha=1 - self.decay)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.model.parameters(), lr=1e-2)


class Manifest(Callback):
    def __init__(self, path: Path, every: int, seconds: float) -> None:
        self.path, self.every, self.seconds = path, every, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step  # steps done; ModelCheckpoint saved after the last one
        if step and step % self.every == 0:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step}) + "\n")
        time.sleep(self.seconds)

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step % self.every == 0:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--step-seconds", type=float, default=0.1)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    L.seed_everything(0, verbose=False)
    x, y = classifier_data(512, seed=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True
    )
    checkpoints = ModelCheckpoint(
        dirpath=a.out, filename="{step}", every_n_train_steps=a.every, save_top_k=-1,
        save_last=True,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=a.max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[Manifest(a.manifest, a.every, a.step_seconds), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=a.out.parent,
    )
    trainer.fit(EmaClassifier(), loader)


if __name__ == "__main__":
    main()
