"""What a normal read says, and at which level.

Before, every read logged where its state dict came from at WARNING (``WARNING
ddsmon.daemon: ...: read the state dict under ['model']``), and a ``watch`` then a
``scan`` of one run with another automatic thread count warned ``MLflow param
'torch_threads' ... is '1', now '2'; params cannot change``. Neither is a problem: the
first is INFO now (``-v``), and a param ddsmon chose itself (``torch_threads`` without
``--threads``) is kept unwarned, while a conflicting setting is still warned of. Real
files, the CLI as a subprocess, a real SQLite store read back with MlflowClient.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fault_helpers import REPO, cli_args, runs_of, write_checkpoints


def _scan(ckpts: Path, probe: Path, uri: str, *extra: str, verbose: bool = False,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    args = cli_args("scan", ckpts, probe, uri, *extra)
    if verbose:
        args.insert(args.index("scan"), "-v")
    return subprocess.run(args, cwd=ckpts.parent, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip


def test_where_the_state_dict_came_from_is_info(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    quiet = _scan(ckpts, probe, f"sqlite:///{tmp_path / 'a.db'}")
    assert quiet.returncode == 0, quiet.stderr
    assert "read the state dict" not in quiet.stderr, quiet.stderr
    assert "WARNING" not in quiet.stderr, quiet.stderr
    told = _scan(ckpts, probe, f"sqlite:///{tmp_path / 'b.db'}", "--state-dir",
                 str(tmp_path / "state_b"), verbose=True)  # fmt: skip
    said = [line for line in told.stderr.splitlines() if "read the state dict" in line]
    assert len(said) == 1 and "INFO" in said[0] and "under ['model']" in said[0], told.stderr


def test_an_automatic_thread_count_is_no_changed_param(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _scan(ckpts, probe, uri, "--threads", "3")
    assert first.returncode == 0, first.stderr
    write_checkpoints(ckpts, [2])
    auto = _scan(ckpts, probe, uri, env={"OMP_NUM_THREADS": "2"})  # 1 or 2 threads, not 3
    assert auto.returncode == 0, auto.stderr
    assert "param 'torch_threads'" not in auto.stderr, auto.stderr  # chosen by ddsmon
    assert "param 'threads_policy'" in auto.stderr, auto.stderr  # --threads was dropped
    write_checkpoints(ckpts, [3])
    fixed = _scan(ckpts, probe, uri, "--threads", "4")
    assert fixed.returncode == 0, fixed.stderr
    assert "param 'torch_threads'" in fixed.stderr and "is '3', now '4'" in fixed.stderr
    (run,) = runs_of(uri)
    assert run.data.params["torch_threads"] == "3"  # params never change
