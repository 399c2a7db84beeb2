"""A checkpoint whose writer stalls mid-write for longer than ``--quiet`` (a save or a
copy onto a slow shared filesystem) is still being written: under native events its
writer has not closed it, so it is waited for, not reported as an incomplete
checkpoint. Before, it was a FAILED line and a ``ddsmon.failure.<file>`` tag in the run,
left there after the file was read. Real inotify, a real ``ddsmon watch``, the store
read back."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fault_helpers import REPO, cli_args, finish, only_run_steps, runs_of, spawn, wait_for
from mlflow.tracking import MlflowClient

from ddsmon.checkpoints import CheckpointRef
from ddsmon.watcher import CheckpointWatcher

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux-only")


def _checkpoint_bytes(step: int) -> bytes:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    buf = io.BytesIO()
    torch.save({"model": mlp(0).state_dict(), "step": step}, buf)
    return buf.getvalue()


def _stalled_write(path: Path, data: bytes, stall: float) -> None:
    """Half the file, a stall of ``stall`` seconds with the file open, then the rest."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(stall)
        f.write(data[len(data) // 2 :])


def test_a_write_stalled_past_quiet_is_waited_for_not_rejected(tmp_path: Path) -> None:
    ready: list[CheckpointRef] = []
    rejected: list[tuple[Path, str]] = []
    lock = threading.Lock()

    def on_ready(ref: CheckpointRef) -> None:
        with lock:
            ready.append(ref)

    def on_rejected(path: Path, reason: str) -> None:
        with lock:
            rejected.append((path, reason))

    path = tmp_path / "step_10.pt"
    with CheckpointWatcher(tmp_path, on_ready, quiet=0.2, on_rejected=on_rejected):
        _stalled_write(path, _checkpoint_bytes(10), stall=1.5)  # 7 quiet periods
        wait_for(lambda: bool(ready), 15, "the checkpoint")
        time.sleep(0.6)  # a late rejection would come within this
    assert [r.path for r in ready] == [path]
    assert rejected == []


def test_an_incomplete_file_closed_by_its_writer_is_still_rejected(tmp_path: Path) -> None:
    rejected: list[tuple[Path, str]] = []
    path = tmp_path / "step_11.pt"
    with CheckpointWatcher(
        tmp_path, lambda ref: None, quiet=0.2, on_rejected=lambda p, r: rejected.append((p, r))
    ):
        data = _checkpoint_bytes(11)
        path.write_bytes(data[: len(data) // 2])  # written, closed, never finished
        wait_for(lambda: bool(rejected), 15, "the rejection")
    assert rejected[0][0] == path and "zip" in rejected[0][1]


def test_watch_records_no_failure_for_a_stalled_save(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = spawn(cli_args("watch", ckpts, probe, uri, "--quiet", "0.5"))
    try:
        wait_for(lambda: bool(runs_of(uri)), 120, "the run")
        first = ckpts / ".step_5.pt.tmp"
        first.write_bytes(_checkpoint_bytes(5))
        os.replace(first, ckpts / "step_5.pt")  # read once the watcher is up
        wait_for(lambda: only_run_steps(uri) == [5], 120, "step 5")
        _stalled_write(ckpts / "step_10.pt", _checkpoint_bytes(10), stall=2.5)
        wait_for(lambda: only_run_steps(uri) == [5, 10], 120, "step 10")
    finally:
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    assert code == 0, err[-2000:]
    assert "incomplete" not in err and "FAILED" not in err, err[-2000:]
    (run,) = runs_of(uri)
    tags = MlflowClient(uri).get_run(run.info.run_id).data.tags
    assert not [k for k in tags if k.startswith("ddsmon.failure.")], tags
    assert only_run_steps(uri) == [5, 10]
