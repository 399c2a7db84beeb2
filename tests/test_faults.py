"""Faults injected for real: kill -9 mid-scan, a burst of checkpoints, a deleted file.

Issue 6's guarantees: every completed checkpoint is read exactly once across crashes
(checked in MLflow's metric history), a burst drains in step order with flat memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_cli import FACTORY, REPO, _steps, _wait, ddsmon, run_of, write_run

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC, reading_metric_key


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ddsmon.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_mid_scan_then_restart_reads_each_step_exactly_once(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    steps = list(range(0, 400, 10))
    write_run(ckpts, steps)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri, "--no-plots"]
    proc = _spawn("scan", str(ckpts), *common)
    try:
        _wait(lambda: len(_steps(uri)) >= 5, 180, "the first readings")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _steps(uri)
    assert 5 <= len(before) < len(steps), "the kill should land mid-scan"
    result = ddsmon("scan", str(ckpts), *common)  # the claim died with the killed process
    assert result.returncode == 0, result.stderr
    client, run = run_of(uri)
    for key in (
        CHECKPOINT_METRIC,
        reading_metric_key("0", "lambda_min"),
        reading_metric_key("2", "g_rank"),
    ):
        logged = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(logged) == steps, f"{key}: {sorted(logged)}"


def test_checkpoint_deleted_before_it_is_read_is_skipped(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _spawn("watch", str(ckpts), "--model", FACTORY, "--probe", str(probe),
                  "--tracking-uri", uri, "--quiet", "1.0", "--no-plots")  # fmt: skip
    try:
        _wait(lambda: _steps(uri) == [0, 10], 120, "the first readings")
        write_run(tmp_path / "more", [20, 30])
        # written slowly in place, then deleted before the quiet period ends
        data = (tmp_path / "more" / "step_000020.pt").read_bytes()
        with open(ckpts / "step_000020.pt", "wb") as fh:
            fh.write(data[:100])
        (ckpts / "step_000020.pt").unlink()
        os.replace(tmp_path / "more" / "step_000030.pt", ckpts / "step_000030.pt")
        _wait(lambda: _steps(uri) == [0, 10, 30], 120, "the checkpoint after the deleted one")
        assert proc.poll() is None, "the daemon must keep running"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_burst_of_500_checkpoints_all_read_in_step_order_memory_flat(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    staging = tmp_path / "staging"
    steps = list(range(1, 501))
    write_run(staging, steps, scale=0.999)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _spawn("watch", str(ckpts), "--model", FACTORY, "--probe", str(probe),
                  "--tracking-uri", uri, "--quiet", "0.5", "--no-plots")  # fmt: skip
    rss: list[int] = []
    try:
        time.sleep(5)  # let it start (imports, MLflow store)
        for step in reversed(steps):  # arrival order opposite to step order
            os.replace(staging / f"step_{step:06d}.pt", ckpts / f"step_{step:06d}.pt")
        done = ckpts / ".ddsmon" / "done.jsonl"

        def count() -> int:
            if proc.poll() is None:
                rss.append(psutil.Process(proc.pid).memory_info().rss)
            return len(done.read_text().splitlines()) if done.exists() else 0

        _wait(lambda: count() >= 500, 900, "all 500 checkpoints")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    order = [json.loads(line)["step"] for line in done.read_text().splitlines()]
    assert sorted(order) == steps
    # the first few were taken while files were still arriving; after that, step order
    tail = order[20:]
    assert tail == sorted(tail), "the queue drains in step order"
    assert _steps(uri) == steps
    quarter = len(rss) // 4
    early, late = max(rss[quarter : 2 * quarter]), max(rss[-quarter:])
    assert late - early < 150 * 2**20, f"RSS grew from {early >> 20} to {late >> 20} MiB"
