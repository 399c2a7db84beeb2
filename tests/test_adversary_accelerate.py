"""Accelerate's ``save_state`` with two prepared models writes ``model.safetensors`` and
``model_1.safetensors`` into one ``checkpoint_<i>/``: two models of one save, one step.
``--model`` says which is read: each save is logged once at its step, from the model
the factory builds, and the other is named as not read (never a duplicate step, never
a failure per save). Real Accelerate, a real ``ddsmon scan``, the store read back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fault_helpers import REPO, cli_args, finish, only_run_steps, spawn

from ddsmon.checkpoints import accelerate_models, discover

pytest.importorskip("accelerate")

_SECOND = """
import torch


def second():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(8, 4))
"""


def _save_states(project: Path, second_factory) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    accelerator = Accelerator(
        project_config=ProjectConfiguration(
            project_dir=str(project), automatic_checkpoint_naming=True
        ),
        cpu=True,
    )
    first, second = mlp(0), second_factory()
    opt = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.1)
    first, second, opt = accelerator.prepare(first, second, opt)
    for _ in range(3):
        with torch.no_grad():
            for p in [*first.parameters(), *second.parameters()]:
                p.mul_(0.9)
        accelerator.save_state()
    return project / "checkpoints"


@pytest.mark.slow  # 15-19 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_the_second_model_of_a_save_is_no_checkpoint_of_its_own(
    tmp_path: Path, probe: Path
) -> None:
    models = tmp_path / "second.py"
    models.write_text(_SECOND)
    sys.path.insert(0, str(tmp_path))
    from second import second

    ckpts = _save_states(tmp_path / "project", second)
    assert sorted(p.name for p in (ckpts / "checkpoint_0").iterdir()) >= [
        "model.safetensors",
        "model_1.safetensors",
    ]
    assert [r.path.relative_to(ckpts).as_posix() for r in discover(ckpts)] == [
        f"checkpoint_{i}/model.safetensors" for i in range(3)
    ]
    assert [p.name for p in accelerate_models(ckpts / "checkpoint_0" / "model.safetensors")] == [
        "model.safetensors",
        "model_1.safetensors",
    ]

    uri = f"sqlite:///{tmp_path / 'first.db'}"
    args = cli_args("scan", ckpts, probe, uri)
    args.insert(3, "-v")  # which weights were read is said at INFO
    rc, err = finish(spawn(args))
    assert rc == 0, err
    assert "3 read" in err and "0 failed" in err and "already has" not in err, err
    assert "model_1.safetensors, Accelerate's other models" in err, err
    assert only_run_steps(uri) == [0, 1, 2]

    # --model building the second model: the same saves, read from model_1
    uri = f"sqlite:///{tmp_path / 'second.db'}"
    args = cli_args("scan", ckpts, probe, uri, "--state-dir", str(tmp_path / "state2"))
    args[args.index("--model") + 1] = f"{models}:second"
    args.insert(3, "-v")
    rc, err = finish(spawn(args))
    assert rc == 0, err
    assert "3 read" in err and "0 failed" in err, err
    assert "in model_1.safetensors; Accelerate's model 1 of this save" in err, err
    assert only_run_steps(uri) == [0, 1, 2]


def test_a_flat_folder_of_model_n_files_is_still_a_run_of_steps(tmp_path: Path) -> None:
    """``model_<N>`` files of a custom loop (no Accelerate save folder) stay checkpoints
    at step N, also beside a final ``model.safetensors``."""
    from safetensors.torch import save_file

    for name in ("model.safetensors", "model_100.safetensors", "model_200.safetensors"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / name))
    found = [(r.path.name, r.name_step) for r in discover(tmp_path)]
    assert found == [
        ("model_100.safetensors", 100),
        ("model_200.safetensors", 200),
        ("model.safetensors", None),
    ]


def test_report_reads_the_second_model_when_named(tmp_path: Path, probe: Path) -> None:
    import subprocess

    models = tmp_path / "second.py"
    models.write_text(_SECOND)
    sys.path.insert(0, str(tmp_path))
    from second import second

    ckpts = _save_states(tmp_path / "project", second)
    out = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "report", str(ckpts / "checkpoint_2" / "model_1.safetensors"),
         "--model", f"{models}:second", "--probe", str(probe), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout)["step"] == 2


def test_a_damaged_first_model_is_the_save_s_failure_not_the_other_model_s_reading(
    tmp_path: Path, probe: Path
) -> None:
    """Two models of one architecture (a model and its EMA copy): when the first model's
    file cannot be read (here a complex tensor at a real key), that save fails naming it;
    the other model's weights are not logged at its step in its place. Only another
    model's keys make ddsmon look at the save's other models (review)."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    ckpts = _save_states(tmp_path / "project", lambda: mlp(1))
    damaged = ckpts / "checkpoint_1" / "model.safetensors"
    tensors = load_file(str(damaged))
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.complex64)
    save_file(tensors, str(damaged))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, err = finish(spawn(cli_args("scan", ckpts, probe, uri)))
    assert rc == 0, err  # a checkpoint's failure is that checkpoint's, not the scan's
    assert "2 read" in err and "1 failed" in err, err
    assert "complex" in err and key in err, err
    assert only_run_steps(uri) == [0, 2]
