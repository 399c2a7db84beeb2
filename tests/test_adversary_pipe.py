"""``ddsmon scan DIR | head``: the reader of stdout goes away after a few lines. The
terminal is a view of the readings; the scan goes on recording every checkpoint into
MLflow and exits 0 (it stopped silently with status 1 after the second checkpoint)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fault_helpers import REPO, cli_args, only_run_steps, write_checkpoints


def test_scan_piped_into_head_records_every_checkpoint(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    steps = list(range(1, 13))
    write_checkpoints(ckpts, steps)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        cli_args("scan", ckpts, probe, uri), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(2):  # head -2
        proc.stdout.readline()
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode()
        proc.wait(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "12 read" in err, err
    assert only_run_steps(uri) == steps
