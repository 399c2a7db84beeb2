"""What a checkpoint says beside its weights: the trainer's log at its own steps, the
checkpoint's own scalars (never a tensor of the state dict), and which weights were read."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ddsmon
from ddsmon.loading import LoadedCheckpoint, load_checkpoint
from ddsmon.records import CheckpointReading

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(ddsmon.__file__).resolve().parents[1]  # the ddsmon these tests import
MODELS = REPO / "tests" / "trainer_scripts" / "models.py"
sys.path.insert(0, str(MODELS.parent))

from models import EmaLit, one_output_mlp, one_output_probe  # noqa: E402


@dataclass
class Ref:
    path: Path
    kind: str


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=folder)


def hf_folder(root: Path, state: dict, src: nn.Module, *, shards: int = 1) -> Path:
    folder = root / f"checkpoint-{state['global_step']}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if shards == 1:
        save_file(sd, folder / "model.safetensors")
        return folder
    keys = list(sd)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[i % shards] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: sd[k] for k in keys if weight_map[k] == name}, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


# --------------------------------------------------------------------------- trainer log

# logging_steps=10, eval every 10, save_steps=25: the checkpoint at 25 logged nothing at 25
LOG_HISTORY = [
    {"loss": 3.0, "grad_norm": 1.5, "learning_rate": 0.001, "epoch": 0.4, "step": 10},
    {"eval_loss": 2.9, "eval_runtime": 0.1, "epoch": 0.4, "step": 10},
    {"loss": 2.5, "learning_rate": 0.0008, "epoch": 0.8, "step": 20},
    {"eval_loss": 2.4, "epoch": 0.8, "step": 20, "note": "strings are not numbers"},
    {"loss": 9.0},  # no step: cannot be placed
    {"loss": 9.0, "step": "twenty"},
    {"loss": 9.0, "step": 12.5},
    {"loss": 9.0, "step": -1},
    {"flag": True, "nested": {"x": 1.0}, "step": 15},  # nothing numeric: no entry
    "not an entry",
]

EXPECTED_LOG = [
    (10, {"loss": 3.0, "grad_norm": 1.5, "learning_rate": 0.001, "epoch": 0.4,
          "eval_loss": 2.9, "eval_runtime": 0.1}),
    (20, {"loss": 2.5, "learning_rate": 0.0008, "epoch": 0.8, "eval_loss": 2.4}),
]  # fmt: skip


def test_hf_log_history_entries_come_at_their_own_steps(tmp_path: Path) -> None:
    src = one_output_mlp(seed=1)
    state = {"global_step": 25, "epoch": 1.0, "best_metric": None, "log_history": LOG_HISTORY}
    loaded = load_checkpoint(Ref(hf_folder(tmp_path, state, src), "hf"), one_output_mlp)
    assert same_weights(loaded.model, src)
    assert loaded.step == 25
    assert loaded.trainer_log == EXPECTED_LOG
    # nothing was logged at step 25: the step-20 loss is not the checkpoint's
    assert loaded.meta == {"epoch": 1.0}


def test_hf_meta_holds_the_entries_of_the_checkpoints_own_step(tmp_path: Path) -> None:
    src = one_output_mlp(seed=2)
    history = [e for e in LOG_HISTORY if not isinstance(e, dict) or e.get("step") != 20]
    history.append({"loss": 2.5, "learning_rate": 0.0008, "epoch": 0.8, "step": 20})
    history.append({"eval_loss": 2.4, "epoch": 0.8, "step": 20})
    state = {"global_step": 20, "epoch": 0.8, "best_metric": 2.4, "log_history": history}
    loaded = load_checkpoint(Ref(hf_folder(tmp_path, state, src), "hf"), one_output_mlp)
    assert loaded.meta == {
        "loss": 2.5, "learning_rate": 0.0008, "eval_loss": 2.4, "epoch": 0.8, "best_metric": 2.4,
    }  # fmt: skip
    assert [s for s, _ in loaded.trainer_log] == [10, 20]


def test_trainer_log_is_empty_where_there_is_none(tmp_path: Path) -> None:
    torch.save({"model": one_output_mlp().state_dict(), "step": 4, "loss": 0.5}, tmp_path / "a.pt")
    loaded = load_checkpoint(Ref(tmp_path / "a.pt", "torch"), one_output_mlp)
    assert loaded.trainer_log == [] and loaded.meta == {"loss": 0.5}
    state = {"global_step": 3, "log_history": "not a list"}
    loaded = load_checkpoint(
        Ref(hf_folder(tmp_path, state, one_output_mlp()), "hf"), one_output_mlp
    )
    assert loaded.trainer_log == [] and loaded.meta == {}


def test_checkpoint_reading_carries_the_trainer_log_empty_by_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(CheckpointReading)}
    assert "trainer_log" in fields
    assert fields["trainer_log"].default_factory() == []  # type: ignore[misc]
    assert {f.name for f in dataclasses.fields(LoadedCheckpoint)} >= {"trainer_log", "source"}


# --------------------------------------------------------------------------- weights are not scalars


class Scaled(nn.Module):
    """A model with a dotless 0-dim parameter of its own (``scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(x)


def test_a_one_element_bias_of_a_bare_state_dict_is_not_a_trainer_scalar(tmp_path: Path) -> None:
    src = one_output_mlp(seed=3)
    assert src.state_dict()["4.bias"].numel() == 1
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    loaded = load_checkpoint(Ref(tmp_path / "bare.pt", "torch"), one_output_mlp)
    assert same_weights(loaded.model, src)
    assert loaded.meta == {} and loaded.step is None
    # scalars beside the weights are still the checkpoint's
    content = {
        **src.state_dict(),
        "val_acc": 0.5,
        "step": torch.tensor(3),
        "acc": torch.tensor(0.25),
    }
    torch.save(content, tmp_path / "mixed.pt")
    loaded = load_checkpoint(Ref(tmp_path / "mixed.pt", "torch"), one_output_mlp)
    assert loaded.meta == {"val_acc": 0.5, "acc": 0.25} and loaded.step == 3


def test_an_ema_copys_one_element_bias_is_not_a_trainer_scalar(tmp_path: Path) -> None:
    lit = EmaLit(seed=4)
    torch.save(lit.state_dict(), tmp_path / "lit_bare.ckpt")
    loaded = load_checkpoint(Ref(tmp_path / "lit_bare.ckpt", "lightning"), one_output_mlp)
    assert same_weights(loaded.model, lit.model) and loaded.meta == {}
    ckpt = {"state_dict": lit.state_dict(), "epoch": 1, "global_step": 4, "4.bias": torch.ones(1)}
    torch.save(ckpt, tmp_path / "lit.ckpt")
    loaded = load_checkpoint(Ref(tmp_path / "lit.ckpt", "lightning"), one_output_mlp)
    assert loaded.meta == {"epoch": 1.0}  # a top-level key naming a model key is a weight


@pytest.mark.parametrize("kind", ["torch", "dcp"])
def test_the_models_own_dotless_scalar_parameter_is_not_a_trainer_scalar(
    tmp_path: Path, kind: str
) -> None:
    src = Scaled()
    with torch.no_grad():
        src.scale.fill_(3.0)
    path = tmp_path / ("scaled.pt" if kind == "torch" else "scaled")
    state = {**src.state_dict(), "loss": torch.tensor(0.5)}
    if kind == "torch":
        torch.save(state, path)
    else:
        dcp_save(state, path)
    loaded = load_checkpoint(Ref(path, kind), Scaled)
    assert same_weights(loaded.model, src)
    assert loaded.meta == {"loss": 0.5}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", *args],
        capture_output=True, text=True, timeout=240, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )  # fmt: skip


def test_report_and_scan_do_not_take_the_bias_for_a_trainer_scalar(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (10, 20):
        torch.save(one_output_mlp(seed=step).state_dict(), ckpts / f"step_{step}.pt")
    probe = tmp_path / "probe.pt"
    x, y = one_output_probe()
    torch.save({"inputs": x, "targets": y}, probe)
    model = f"{MODELS}:one_output_mlp"
    report = _cli("report", str(ckpts / "step_10.pt"), "--model", model, "--probe", str(probe),
                  "--loss", "mse", "--json", cwd=tmp_path)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["meta"] == {}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scan = _cli("scan", str(ckpts), "--model", model, "--probe", str(probe), "--loss", "mse",
                "--tracking-uri", uri, "--no-plots", cwd=tmp_path)  # fmt: skip
    assert scan.returncode == 0, scan.stderr
    assert "4.bias" not in scan.stdout + scan.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    marker = client.get_metric_history(run.info.run_id, CHECKPOINT_METRIC)
    assert sorted(m.step for m in marker) == [10, 20]
    assert not [k for k in run.data.metrics if k.startswith("train/")], run.data.metrics


# --------------------------------------------------------------------------- which weights were read


def test_source_names_the_prefix_and_what_was_ignored_beside_it(tmp_path: Path) -> None:
    lit = EmaLit(seed=5)
    assert not same_weights(lit.model, lit.ema_model)
    torch.save({"state_dict": lit.state_dict(), "global_step": 8}, tmp_path / "ema.ckpt")
    loaded = load_checkpoint(Ref(tmp_path / "ema.ckpt", "lightning"), one_output_mlp)
    assert same_weights(loaded.model, lit.model)
    assert loaded.source == (
        "under ['state_dict'], prefix 'model.' stripped (ignored: 'ema_model.' 6 keys, "
        "the model's keys again; 'criterion.' 1 key)"
    )


def test_source_of_a_bare_state_dict_and_of_a_second_copy_elsewhere(tmp_path: Path) -> None:
    src, ema = one_output_mlp(seed=6), one_output_mlp(seed=7)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    assert load_checkpoint(Ref(tmp_path / "bare.pt", "torch"), one_output_mlp).source == (
        "at the top level"
    )
    torch.save({"model": src.state_dict(), "ema": ema.state_dict()}, tmp_path / "two.pt")
    loaded = load_checkpoint(Ref(tmp_path / "two.pt", "torch"), one_output_mlp)
    assert same_weights(loaded.model, src)
    assert loaded.source == "under ['model']; also matching the model, not loaded: under ['ema']"


def test_source_of_folders_and_safetensors_files(tmp_path: Path) -> None:
    src = one_output_mlp(seed=8)
    one = hf_folder(tmp_path / "a", {"global_step": 5}, src)
    assert load_checkpoint(Ref(one, "hf"), one_output_mlp).source == "in model.safetensors"
    two = hf_folder(tmp_path / "b", {"global_step": 5}, src, shards=2)
    assert load_checkpoint(Ref(two, "hf"), one_output_mlp).source == (
        "in 2 shards (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)"
    )
    lit = EmaLit(seed=9)
    dcp_save({"model": lit.model.state_dict(), "ema": lit.ema_model.state_dict(), "step": 3},
             tmp_path / "dcp")  # fmt: skip
    loaded = load_checkpoint(Ref(tmp_path / "dcp", "dcp"), one_output_mlp)
    assert same_weights(loaded.model, lit.model)
    assert loaded.source == (
        "in the DCP folder, prefix 'model.' stripped (ignored: 'ema.' 6 keys, the model's keys again)"
    )
    save_file({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = load_checkpoint(Ref(tmp_path / "w.safetensors", "safetensors"), one_output_mlp)
    assert loaded.source == "in w.safetensors, prefix 'module.' stripped"


# --------------------------------------------------------------------------- rotation while read


def test_a_folder_rotated_away_while_it_is_read_has_vanished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_total_limit deletes the folder file by file: what is missing then was
    deleted, not forgotten by the trainer; a file missing from the start is reported."""
    import ddsmon.loading.huggingface as hf
    from ddsmon.errors import CheckpointError
    from ddsmon.loading import VANISHED

    src = one_output_mlp(seed=10)
    folder = hf_folder(tmp_path, {"global_step": 5}, src)
    (folder / "config.json").write_text("{}")
    real = hf._hf_model_from_config

    def rotated_meanwhile(path: Path) -> nn.Module:
        for name in ("config.json", "model.safetensors"):
            (path / name).unlink()
        return real(path)

    monkeypatch.setattr(hf, "_hf_model_from_config", rotated_meanwhile)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(Ref(folder, "hf"), None)
    assert caught.value.reason == VANISHED
    monkeypatch.setattr(hf, "_hf_model_from_config", real)
    other = hf_folder(tmp_path / "never", {"global_step": 5}, src)  # no config.json at all
    with pytest.raises(CheckpointError, match=r"no config\.json to build the model from"):
        load_checkpoint(Ref(other, "hf"), None)
