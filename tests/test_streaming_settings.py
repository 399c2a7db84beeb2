"""The streaming settings (probe_batch, memory_budget, factor_budget) from the command
line to the engine: a real ``ddsmon report`` subprocess reads in micro-batches of the
size asked for (a per-sample loss callable writes down the batches it is called on)
and gives the readings of the one-pass reading, to 1e-10 relative; the run's params
record them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddsmon.config import ReadSettings
from ddsmon.reader import Reader

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"
TOL = 1e-10

#: A per-sample cross-entropy that appends the batch size of each call to $BATCH_LOG.
LOGGING_LOSS = """
import os
import torch.nn.functional as F


def ce(outputs, targets):
    with open(os.environ["BATCH_LOG"], "a") as fh:
        fh.write(f"{outputs.shape[0]}\\n")
    return F.cross_entropy(outputs, targets, reduction="none")
"""


def _checkpoint(tmp_path: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    path = tmp_path / "step_000003.pt"
    torch.save({"model": mlp().state_dict(), "step": 3}, path)
    return path


def _assert_same(got: Any, want: Any, where: str) -> None:
    """Floats to 1e-10 relative (spectra: of the spectrum's largest value); the rest equal."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            if key != "seconds":
                _assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list) and want and isinstance(want[0], float):
        a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        assert a.shape == b.shape, where
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL * float(np.max(np.abs(b))), err_msg=where)
    elif isinstance(want, float) and math.isfinite(want):
        assert got == pytest.approx(want, rel=TOL, abs=0 if want else TOL), where
    else:
        assert got == want, where


def test_report_in_micro_batches_gives_the_one_pass_readings(tmp_path: Path, probe: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    loss_file = tmp_path / "logged_loss.py"
    loss_file.write_text(LOGGING_LOSS)
    runs = {
        "one pass": [],
        "probe_batch 4": ["--probe-batch", "4"],
        "budgets 1KiB": ["--memory-budget", "1KiB", "--factor-budget", "1KiB"],
    }
    procs = {}
    for name, flags in runs.items():  # at once: three processes, no shared state
        log = tmp_path / f"batches-{name.replace(' ', '_')}.txt"
        cmd = [
            sys.executable, "-m", "ddsmon.cli", "-v", "report", str(ckpt), "--model", FACTORY,
            "--probe", str(probe), "--loss", f"{loss_file}:ce", "--json", "--spectra", *flags,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "BATCH_LOG": str(log)}
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), log)  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    batches: dict[str, list[int]] = {}
    logs: dict[str, str] = {}
    for name, (proc, log) in procs.items():
        stdout, logs[name] = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: {logs[name][-3000:]}"
        out[name] = json.loads(stdout)
        batches[name] = [int(line) for line in log.read_text().split()]
    n = out["one pass"]["n"]
    assert n == 32 and max(batches["one pass"]) == n  # the whole probe in one call
    # the probe pass in micro-batches of 4 (a one-sample call may size them first)
    assert set(batches["probe_batch 4"]) <= {1, 4} and batches["probe_batch 4"].count(4) >= n // 4
    assert max(batches["budgets 1KiB"]) < n  # 1 KiB holds no graph of 32 samples
    assert "exceed factor_budget=1024 bytes" in logs["budgets 1KiB"]  # K in further passes
    assert "factor_budget" not in logs["probe_batch 4"]
    for name in ("probe_batch 4", "budgets 1KiB"):
        _assert_same(out[name], out["one pass"], name)


def test_the_settings_reach_the_run_params(probe: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp, mlp_probe

    settings = ReadSettings(probe_batch=4, memory_budget=512 << 20, factor_budget=3 * 10**9)
    params = Reader.from_parts(settings, factory=mlp, probe=mlp_probe()).params()
    assert params["probe_batch"] == "4"
    assert params["memory_budget"] == str(512 << 20)
    assert params["factor_budget"] == "3000000000"
    defaults = Reader.from_parts(ReadSettings(), factory=mlp, probe=mlp_probe()).params()
    assert defaults["probe_batch"] == "auto (from memory_budget)"
    assert defaults["memory_budget"] == f"{1 << 30} (default)"
    assert defaults["factor_budget"] == f"{4 << 30} (default)"
