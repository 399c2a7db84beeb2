"""examples/deep_linear/run.py end to end: log det+ counts dead directions, lambda_min cannot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "deep_linear" / "run.py"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("deep_linear")
    out, res = tmp / "fig" / "figure4.png", tmp / "res.json"
    proc = run_script("--quick", "--out", str(out), "--json", str(res), cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(res.read_text()), proc.stdout, out


def test_logdet_slope_ratio_counts_dead_directions(quick_run: tuple[dict, str, Path]) -> None:
    results, _, _ = quick_run
    rows = {row["r"]: row for row in results["rows"]}
    assert sorted(rows) == [1, 2, 3, 4]
    for r, row in rows.items():
        assert abs(row["ratio"] - r) < 0.1, row
        # the daemon's per-step estimate reads the same count
        assert abs(row["r_hat_median"] - r) < 0.1, row
        # the absolute slope is the predicted 2(L-1) r (natural logs, L = 4)
        assert row["logdet_slope"] == pytest.approx(6 * r, rel=0.02)
        # no eigenvalue crossed the trust floor along the path
        assert row["g_rank"] == [20]


def test_lambda_min_is_rank_blind(quick_run: tuple[dict, str, Path]) -> None:
    results, _, _ = quick_run
    for row in results["rows"]:
        assert abs(row["lambda_min_ratio"] - 1.0) < 0.1, row
        assert row["lambda_min_slope"] == pytest.approx(6.0, rel=0.02)


def test_table_and_figure(quick_run: tuple[dict, str, Path]) -> None:
    results, stdout, figure = quick_run
    assert "ratio to r=1" in stdout and "paper" in stdout
    # the paper's published ratios stand beside ours
    assert [row["paper_ratio"] for row in results["rows"]] == [1.0, 2.0, 3.1, 4.0]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert results["figure"] == str(figure)


def test_bad_argument_is_named(tmp_path: Path) -> None:
    proc = run_script("--quick", "--max-r", "0", "--out", str(tmp_path / "f.png"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "--max-r must be in 1..19" in proc.stderr
    assert not (tmp_path / "f.png").exists()


def _example() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("deep_linear_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("r", [1, 2, 4])
def test_the_event_detector_counts_r_dying_directions_on_the_bridge(r: int) -> None:
    """Each point of the path t -> 0 read as a checkpoint (every 100 steps) and fed to the
    detector, as the daemon feeds it: the live count is r, and the layer is 'dying'."""
    import numpy as np
    import torch

    from ddsmon.events import EventDetector

    run = _example()
    torch.set_num_threads(1)
    ts = np.logspace(-0.5, -2.0, 12)
    det = EventDetector()
    counts, events = [], []
    path = run.path_signatures(  # type: ignore[attr-defined]
        r, 0, ts, depth=4, width=20, n=128, noise=0.1, device="cpu"
    )
    for i, sig in enumerate(path):
        events += det.update(i * 100, {"h1": sig.to_dict()})
        counts.append(det.last_derived["h1"]["dying_directions"])
    assert counts[0] is None  # nothing to compare the first checkpoint with
    assert all(c == pytest.approx(r, abs=0.1) for c in counts[1:]), counts
    dying = [e for e in events if e.kind == "dying"]
    assert len(dying) == 1, [e.message for e in events]
    assert dying[0].dying_directions == pytest.approx(r, abs=0.1)
    assert f"about {r} direction" in dying[0].message
