"""Files of torch's legacy (pre-1.6, non-zip) format, ``torch.save(...,
_use_new_zipfile_serialization=False)``: ``report`` read them, while ``scan`` and
``watch`` refused them as "incomplete: not a torch zip archive", since the completeness
check knew only the zip format. Now a legacy file is checked by its own layout (its
pickles, then its storages to the file's end), so a truncated one is incomplete,
naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent / "trainer_scripts"
sys.path.insert(0, str(SCRIPTS))

from models import classifier, classifier_probe  # noqa: E402


def _ddsmon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", *args], cwd=cwd, env={**os.environ},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_scan_reads_legacy_torch_files_as_report_does(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (10, 20):
        state = {"model": classifier(seed=step).state_dict(), "step": step}
        torch.save(state, ckpts / f"ckpt_{step}.pt", _use_new_zipfile_serialization=False)
    good = (ckpts / "ckpt_20.pt").read_bytes()
    (ckpts / "ckpt_30.pt").write_bytes(good[: len(good) // 2])  # legacy, truncated
    probe = tmp_path / "probe.pt"
    inputs, targets = classifier_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    model = f"{SCRIPTS / 'models.py'}:classifier"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _ddsmon("scan", str(ckpts), "--model", model, "--probe", str(probe), "--loss",
                   "ce", "--tracking-uri", uri, "--no-plots", "--threads", "1", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 read, 0 skipped, 1 failed" in done.stderr, done.stderr[-2000:]
    failed = [line for line in done.stderr.splitlines() if "cannot read" in line]
    assert len(failed) == 1, done.stderr[-3000:]
    assert "ckpt_30.pt: incomplete: torch legacy file " in failed[0], failed[0]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = {k for k in run.data.metrics if k.startswith("dds/lambda_ratio/")}
    assert logged, sorted(run.data.metrics)
    key = sorted(logged)[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
    assert sorted(history) == [10, 20]
    shown = _ddsmon("report", str(ckpts / "ckpt_20.pt"), "--model", model, "--probe",
                    str(probe), "--loss", "ce", "--json", cwd=tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
