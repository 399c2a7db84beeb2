"""Checkpoints whose content is wrong in ways a shape check does not see, and layouts
that mix runs, through a real ``ddsmon scan`` and the MLflow store read back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fault_helpers import REPO, cli_args, finish, only_run_steps, spawn

sys.path.insert(0, str(REPO / "tests"))
from fixtures_models import mlp


def test_complex_weights_are_refused_not_cast_to_real(tmp_path: Path, probe: Path) -> None:
    """A complex tensor at a real parameter's key: load_state_dict would copy its real
    part with a UserWarning; it is that checkpoint's failure, naming the key, and the
    other checkpoints are read."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    good = mlp(0).state_dict()
    torch.save({"model": good, "step": 1}, ckpts / "step_1.pt")
    bad = {k: v.to(torch.complex64) if k == "2.weight" else v for k, v in good.items()}
    torch.save({"model": bad, "step": 2}, ckpts / "step_2.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, err = finish(spawn(cli_args("scan", ckpts, probe, uri)))
    assert rc == 0, err
    assert "1 read" in err and "1 failed" in err, err
    assert "step_2.pt" in err and "'2.weight' is complex64" in err, err
    assert "Casting complex values" not in err, err
    assert only_run_steps(uri) == [1]


@pytest.mark.slow  # 15-19 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_two_run_folders_under_one_directory_are_said_to_mix(tmp_path: Path, probe: Path) -> None:
    """A restarted Lightning run's ``version_0/`` and ``version_1/`` (or two trainings)
    under the watched directory are read as one run: said once, naming both folders.
    Step folders of one run (``checkpoint_1/``, ``checkpoint_2/``) are not."""
    ckpts = tmp_path / "ckpts"
    for version, steps in (("version_0", [10, 20]), ("version_1", [15, 25])):
        (ckpts / version).mkdir(parents=True)
        for step in steps:
            torch.save({"model": mlp(step).state_dict(), "step": step},
                       ckpts / version / f"epoch=0-step={step}.ckpt")  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, err = finish(spawn(cli_args("scan", ckpts, probe, uri)))
    assert rc == 0, err
    assert err.count("are read as one run") == 1, err
    assert "(version_0/, version_1/)" in err, err
    assert only_run_steps(uri) == [10, 15, 20, 25]

    steps = tmp_path / "steps"
    for step in (1, 2):
        (steps / f"checkpoint_{step}").mkdir(parents=True)
        torch.save(mlp(step).state_dict(), steps / f"checkpoint_{step}" / "model.pt")
    rc, err = finish(spawn(cli_args("scan", steps, probe, f"sqlite:///{tmp_path / 'b.db'}")))
    assert rc == 0, err
    assert "2 read" in err and "read as one run" not in err, err


def test_a_symlinked_run_folder_is_named_not_silently_skipped(tmp_path: Path, probe: Path) -> None:
    """``ckpts/run -> /scratch/run``: links are not followed into folders of
    checkpoints (they may lead back up, and watch events do not follow them), and the
    scan says so, naming the link and its target; a linked checkpoint file is read."""
    from fault_helpers import write_checkpoints

    scratch, ckpts = tmp_path / "scratch" / "run", tmp_path / "ckpts"
    write_checkpoints(scratch, [1, 2])
    ckpts.mkdir()
    (ckpts / "run").symlink_to(scratch)
    (ckpts / "step_000003.pt").symlink_to(scratch / "step_000002.pt")
    (ckpts / "up").symlink_to(tmp_path)  # a link up the tree: no warning, no loop
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, err = finish(spawn(cli_args("scan", ckpts, probe, uri)))
    assert rc == 0, err
    assert f"{ckpts / 'run'} is a symbolic link to the folder {scratch}" in err, err
    assert err.count("is a symbolic link to the folder") == 1, err
    assert "1 read" in err, err
    assert only_run_steps(uri) == [2]  # the linked file's content says step 2


def test_a_link_to_a_folder_inside_the_watched_tree_is_not_named(tmp_path: Path) -> None:
    """``ckpts/alias -> ckpts/run``: the run folder is read under its own name, so the
    link to it is no checkpoints left unread and is not named; a link out of the tree
    is (review)."""
    from fault_helpers import write_checkpoints

    from ddsmon.checkpoints import discover, linked_folders

    ckpts, outside = tmp_path / "ckpts", tmp_path / "scratch"
    write_checkpoints(ckpts / "run", [1])
    write_checkpoints(outside, [2])
    (ckpts / "alias").symlink_to(ckpts / "run")
    (ckpts / "away").symlink_to(outside)
    assert [ref.path.name for ref in discover(ckpts)] == ["step_000001.pt"]
    assert linked_folders(ckpts) == [(ckpts / "away", outside.resolve())]
