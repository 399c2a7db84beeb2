"""examples/reduced_rank_regression/run.py: the Aoyagi-Watanabe anchor, end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddsmon.rlct import rrr_rlct

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "reduced_rank_regression" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("rrr_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("rrr")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(tmp / "res.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp / "res.json").read_text()), proc.stdout


def test_grid_and_closed_form(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    rows = results["rows"]
    assert [(row["H"], row["r"]) for row in rows] == [
        (h, r) for h in range(2, 6) for r in range(1, h + 1)
    ]
    for row in rows:
        assert (row["lambda"], row["multiplicity"]) == rrr_rlct(10, 5, row["H"], row["r"])
    # the closed-form fit is a minimum: its gradient is at rounding level
    assert results["summary"]["grad_norm_max"] < 1e-10


def test_bottleneck_collapses_boundary_stays_flat(quick_run: tuple[dict, str]) -> None:
    summary = quick_run[0]["summary"]
    # every cell with a dead direction sits >= 10x below every cell without one
    # (measured: 78x worst case, 113x median ratio at n = 1000)
    assert summary["collapse_worst"]["min"] >= 10.0
    assert summary["collapse_median"]["min"] >= 30.0
    # ... while the output layer moves by well under 1% (measured 0.17%)
    assert summary["boundary_drift"]["max"] < 0.01
    # and the bottleneck itself is anything but flat
    assert summary["bottleneck_drift"]["min"] > 1.0


def test_rank_correlations_reported(quick_run: tuple[dict, str]) -> None:
    results, stdout = quick_run
    rho = results["summary"]["rho"]
    # the naive capacity proxy clears the cross-cell bar, as the paper says it does
    assert rho["capacity_H_times_r"]["median"] > 0.95
    for key in ("lambda_min_h1", "logdet_h1", "sigma_min_x_h2_with_zeros"):
        assert -1.0 <= rho[key]["median"] <= 1.0
        assert key in results["paper"]["rho"]
    assert "Spearman rho" in stdout and "paper (14 cells) -0.978" in stdout


def test_llc_skipped_without_devinterp(quick_run: tuple[dict, str]) -> None:
    results, stdout = quick_run
    if importlib.util.find_spec("devinterp") is not None:
        pytest.skip("devinterp is installed: the LLC column runs instead")
    assert results["llc"] == "skipped"
    assert "pip install 'ddsmon[llc]'" in stdout


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    mod = load_script()
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, size=14).astype(float)  # plenty of ties
        b = rng.normal(size=14)
        assert mod.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(mod.spearman(np.ones(5), np.arange(5.0)))


def test_fit_is_balanced_rank_h_minimum() -> None:
    mod = load_script()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 10, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(10, 5, generator=gen, dtype=torch.float64)
    y = y + 0.1 * torch.randn(500, 5, generator=gen, dtype=torch.float64)
    for hidden in (1, 3, 5):
        a, b = mod.fit_rrr(x, y, hidden)
        assert torch.allclose(a @ a.T, b.T @ b, atol=1e-12)
        assert int(torch.linalg.matrix_rank(b @ a)) == hidden
        assert mod.grad_norm(mod.two_layer(a, b), x, y) < 1e-10
        # Eckart-Young on the fitted values: the residual is that of OLS plus the
        # discarded singular values of the fitted values
        w_ols = torch.linalg.lstsq(x, y).solution
        sv = torch.linalg.svdvals(x @ w_ols)
        expected = ((y - x @ w_ols) ** 2).sum() + (sv[hidden:] ** 2).sum()
        assert float(((y - x @ (b @ a).T) ** 2).sum()) == pytest.approx(float(expected), rel=1e-10)
