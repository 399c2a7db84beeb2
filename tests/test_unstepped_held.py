"""A checkpoint with no step that comes before the checkpoint whose weights it holds.

Under ``watch`` a Hugging Face Trainer's final ``save_model()`` (``output_dir/
model.safetensors``) is ready at once, while ``checkpoint-N/`` waits for its
``trainer_state.json`` to settle, so the final file is judged first. Before, it was
judged once: "holds the weights of no checkpoint read: not logged", marked done, and
never an alias, while a ``scan`` of the same folder (which reads unstepped files last)
called it an alias. Now it is held and compared with every checkpoint read after it.
Real files, the real CLI (watch, then scan of a copy), a real SQLite store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from fault_helpers import REPO, cli_args, finish, only_run_steps, wait_for, watching

sys.path.insert(0, str(REPO / "tests"))
from fixtures_models import mlp


def _save(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(content, tmp)
    os.replace(tmp, path)


def test_an_unstepped_file_read_first_becomes_an_alias_of_a_later_step(
    tmp_path: Path, probe: Path
) -> None:
    ckpts, err_file = tmp_path / "ckpts", tmp_path / "watch.err"
    ckpts.mkdir()
    weights = mlp(seed=5).state_dict()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with watching(ckpts, probe, uri, stderr_to=err_file, cwd=tmp_path) as proc:
        _save(ckpts / "final.pt", {"model": weights})  # the final save_model(): no step
        wait_for(lambda: "final.pt has no training step" in err_file.read_text(), 120,
                 "final.pt judged while nothing else was read")  # fmt: skip
        _save(ckpts / "step_000002.pt", {"model": mlp(seed=6).state_dict(), "step": 2})
        _save(ckpts / "step_000004.pt", {"model": weights, "step": 4})
        wait_for(lambda: "an alias" in err_file.read_text(), 60, "final.pt as an alias")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc, _ = finish(proc)
    err = err_file.read_text()
    assert rc == 0, err
    assert only_run_steps(uri) == [2, 4]
    assert "final.pt holds the same weights as step 4 (step_000004.pt): an alias" in err, err
    assert "read so far" in err, err  # said when the queue ran dry, kept held

    # a later scan of the watched folder: final.pt is done (an alias), not judged anew
    rescan = subprocess.run(cli_args("scan", ckpts, probe, uri), cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert rescan.returncode == 0, rescan.stderr
    assert "no training step" not in rescan.stderr, rescan.stderr
    # a scan of a copy, into another store, says what the watch said
    copy = tmp_path / "copy"
    shutil.copytree(ckpts, copy, ignore=shutil.ignore_patterns(".ddsmon*"))
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    scanned = subprocess.run(cli_args("scan", copy, probe, fresh), cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=240)  # fmt: skip
    assert scanned.returncode == 0, scanned.stderr
    assert "final.pt holds the same weights as step 4" in scanned.stderr, scanned.stderr
    assert "1 aliases of a step read" in scanned.stderr, scanned.stderr
    assert only_run_steps(fresh) == [2, 4]


def test_a_scan_says_an_unmatched_unstepped_file_once_and_marks_it_done(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    _save(ckpts / "final.pt", {"model": mlp(seed=7).state_dict()})
    _save(ckpts / "step_000004.pt", {"model": mlp(seed=8).state_dict(), "step": 4})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outs = []
    for _ in range(2):
        outs.append(subprocess.run(cli_args("scan", ckpts, probe, uri), cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=240))  # fmt: skip
    assert all(o.returncode == 0 for o in outs), outs[0].stderr + outs[1].stderr
    assert outs[0].stderr.count("final.pt has no training step") == 1, outs[0].stderr
    assert "read so far" not in outs[0].stderr  # a scan's verdict is final
    assert "1 without a step (not logged)" in outs[0].stderr, outs[0].stderr
    assert "no training step" not in outs[1].stderr, outs[1].stderr  # marked done
