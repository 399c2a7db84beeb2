"""Folders and files the daemon may not read (a shared cluster: another user's run
folder in the tree): named and skipped, never a traceback. As root, the process runs
without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), so file modes apply to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fault_helpers import FACTORY, REPO, as_unprivileged, only_run_steps, write_checkpoints


def _scan(ckpts: Path, probe: Path, uri: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*as_unprivileged(), sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts),
         "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri, "--no-plots",
         "--state-dir", str(state)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_an_unreadable_subfolder_and_file_are_named_and_the_rest_is_read(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    write_checkpoints(ckpts / "theirs", [3])
    (ckpts / "theirs").chmod(0)
    (ckpts / "step_000002.pt").chmod(0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        out = _scan(ckpts, probe, uri, tmp_path / "state")
    finally:
        (ckpts / "theirs").chmod(0o755)
        (ckpts / "step_000002.pt").chmod(0o644)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"cannot list {ckpts / 'theirs'}" in out.stderr, out.stderr
    assert "step_000002.pt" in out.stderr and "permission denied" in out.stderr, out.stderr
    assert "1 read" in out.stderr and "1 failed" in out.stderr, out.stderr
    assert only_run_steps(uri) == [1]


def test_a_folder_that_cannot_be_listed_is_said_again_after_it_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Said once while it stays unlistable, and again if it fails again after it was
    listed (here ELOOP, a link to itself, which fails for root too) (review)."""
    import logging

    from ddsmon.checkpoints import _listdir

    loop = tmp_path / "run"
    loop.symlink_to(loop)
    with caplog.at_level(logging.WARNING, logger="ddsmon.checkpoints"):
        assert _listdir(loop) == [] and _listdir(loop) == []
        assert sum("cannot list" in r.getMessage() for r in caplog.records) == 1
        loop.unlink()
        loop.mkdir()
        assert _listdir(loop) == []  # listed: empty
        loop.rmdir()
        loop.symlink_to(loop)
        assert _listdir(loop) == []
        assert sum("cannot list" in r.getMessage() for r in caplog.records) == 2
