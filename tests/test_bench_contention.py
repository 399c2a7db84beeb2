"""benchmarks/bench_contention.py end to end at tiny sizes: real trainer subprocesses, an
in-process worker and a ``ddsmon scan``, the table written into its own block. Timings
are not checked; the thread counts the readings ran on are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_contention_tiny(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written text stays\n")
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "bench_contention.py"),
            "--levels", "0,1", "--setups", "PASSIVE", "--cli-setups", "as shipped,--threads 1",
            "--repeats", "2", "--scan-checkpoints", "2", "--p", "7", "--embed", "4",
            "--width", "8", "--probe", "16", "--trainer-width", "64", "--settle", "0.5",
            "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "hand-written text stays" in text and text.count("<!-- BEGIN bench_contention -->") == 1
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| in-process") or line.startswith("| scan")
    ]
    # per level: policy, 1 and 2 threads in-process; the two scans
    assert len(rows) == 2 * 5, text
    assert {r[3].split()[0] for r in rows} == {"0", "1"}  # the trainers column, per level
    k_used = {(r[0], r[2], r[3].split()[0]): r[5] for r in rows}
    assert k_used[("in-process", "1", "0")] == "1" and k_used[("in-process", "2", "1")] == "2"
    assert k_used[("scan", "1", "1")] == "1"
    assert k_used[("scan", "policy", "0")] != "?"  # the daemon logged the policy's count
