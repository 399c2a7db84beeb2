"""An alias's trainer scalars land at the step it aliases.

Lightning with two ``ModelCheckpoint`` callbacks (a periodic one and a ``monitor=
"val_loss"`` one) saves the same weights twice at a step: ``epoch=1-step=8.ckpt`` and
``best-epoch=1-val_loss=1.389.ckpt``. Only the best file holds the monitored score (its
callback's state, its name). Before, the file read second was an alias "not logged
again", and its scalars were dropped with it: a run read in name order never had
``train/val_loss``. Now the alias's scalars that the step lacks are logged there
(``train/<key>``, never overwriting a value the step has), and the local history's
``train`` gets them too, whichever file is read first. Real files, the real CLI and a
real SQLite store read back with MlflowClient; one test trains with real Lightning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_helpers import REPO, cli_args, finish, only_run_steps, runs_of, spawn, wait_for

from ddsmon.sinks.history import LocalHistory
from ddsmon.sinks.mlflow_writer import open_client
from ddsmon.state import StateDir

sys.path.insert(0, str(REPO / "tests"))
from fixtures_models import mlp


def _history(uri: str, key: str) -> list[tuple[int, float]]:
    runs = runs_of(uri)
    if not runs:
        return []
    (run,) = runs
    rows = open_client(uri).get_metric_history(run.info.run_id, key)
    return sorted((m.step, m.value) for m in rows)


def _save(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(content, tmp)
    os.replace(tmp, path)


@pytest.mark.parametrize("first", ["periodic", "best"])
def test_an_alias_adds_its_scalars_to_its_step_whichever_arrives_first(
    tmp_path: Path, probe: Path, first: str
) -> None:
    ckpts, state = tmp_path / "ckpts", tmp_path / "state"
    ckpts.mkdir()
    weights = mlp(seed=3).state_dict()
    files = {
        "periodic": (ckpts / "step_000008.pt", {"model": weights, "step": 8, "epoch": 1, "lr": 0.1}),
        "best": (ckpts / "best.pt", {"model": weights, "step": 8, "val_loss": 1.25, "lr": 0.5}),
    }  # fmt: skip
    second = "best" if first == "periodic" else "periodic"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = spawn(cli_args("watch", ckpts, probe, uri, "--state-dir", str(state),
                          "--quiet", "0.3", "--threads", "1"))  # fmt: skip
    try:
        _save(*files[first])
        wait_for(lambda: only_run_steps(uri) == [8], 120, f"step 8 from the {first} file")
        _save(*files[second])
        wait_for(
            lambda: _history(uri, "train/val_loss") and _history(uri, "train/epoch"),
            60,
            "the alias's scalars at step 8",
        )
        proc.send_signal(signal.SIGTERM)
        rc, err = finish(proc)
    finally:
        proc.kill()
    assert rc == 0, err
    assert "an alias, not logged again" in err, err
    assert only_run_steps(uri) == [8]
    assert _history(uri, "train/val_loss") == [(8, 1.25)]
    assert _history(uri, "train/epoch") == [(8, 1.0)]
    kept_lr = files[first][1]["lr"]  # the step's own value is never overwritten
    assert _history(uri, "train/lr") == [(8, pytest.approx(kept_lr))]
    train = LocalHistory(StateDir(state)).train()  # read back from history.jsonl
    assert train == {
        "epoch": [(8, 1.0)],
        "lr": [(8, pytest.approx(kept_lr))],
        "val_loss": [(8, 1.25)],
    }, train
    assert LocalHistory(StateDir(state)).layers(), "the step's readings are kept"


LIGHTNING = """
import sys, warnings
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from fixtures_models import mlp, mlp_probe


class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp(seed=0)

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


x, y = mlp_probe()
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.repeat(4, 1), y.repeat(4)),
                                   batch_size=32)
periodic = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=4, save_top_k=-1,
                           filename="{{epoch}}-{{step}}")
best = ModelCheckpoint(dirpath=sys.argv[1], monitor="val_loss", save_top_k=2,
                       filename="best-{{epoch}}-{{val_loss:.3f}}")
trainer = L.Trainer(max_epochs=2, callbacks=[periodic, best], logger=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(Lit(), data, data)
"""


@pytest.mark.slow
def test_lightning_periodic_and_best_callbacks_log_val_loss(tmp_path: Path, probe: Path) -> None:
    pytest.importorskip("lightning")
    script, ckpts = tmp_path / "train.py", tmp_path / "ckpts"
    script.write_text(LIGHTNING.format(tests=str(REPO / "tests")))
    done = subprocess.run([sys.executable, str(script), str(ckpts)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in ckpts.iterdir())
    assert len(names) == 4 and sum(n.startswith("best-") for n in names) == 2, names
    best = {
        int(torch.load(ckpts / n, weights_only=True)["global_step"]): float(
            n.rsplit("val_loss=", 1)[1].removesuffix(".ckpt")
        )
        for n in names
        if n.startswith("best-")
    }
    assert sorted(best) == [4, 8], names  # each an alias of the periodic file of its step
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("scan", ckpts, probe, uri, "--threads", "1")
    done = subprocess.run(args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("an alias, not logged again") == 2, done.stderr
    assert only_run_steps(uri) == [4, 8]
    logged = _history(uri, "train/val_loss")
    assert [s for s, _ in logged] == [4, 8], logged
    for step, value in logged:
        assert value == pytest.approx(best[step], abs=5e-4)  # the callback's own score
