"""benchmarks/bench_events.py --quick runs end to end as a user runs it, and its scorecard
says what the example's seed 0 does: a generalising transition in the grokking run at
both cadences, nothing in the short control or the converged run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_events.py"


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 10 and cells[1] == "0":
            rows[cells[0]] = cells
    return rows


def test_quick_scorecard(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written text stays\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--write", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "hand-written text stays" in text
    assert text.count("<!-- BEGIN bench_events -->") == 1
    assert "--quick" in text  # the exact command is in the table's header
    rows = _rows(text)
    assert set(rows) == {"grok@25", "grok@50", "control", "steady"}, rows
    # columns: run, seed, ckpts, val window, DDS transitions, DDS lead, entropy, lead,
    # false, first dying
    assert "(gen)" in rows["grok@25"][4] and "(gen)" in rows["grok@50"][4], rows
    assert rows["control"][4] == "none" and rows["steady"][4] == "none", rows
    assert rows["steady"][8] == "0 / 0" and rows["steady"][9] == "none", rows
    assert "| DDS |" in text and "| entropy |" in text
    assert seconds < 90, f"--quick took {seconds:.0f} s"
