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


def test_a_subfolder_listed_but_not_searchable_is_named_and_the_rest_is_read(
    tmp_path: Path, probe: Path
) -> None:
    """``r--`` (0o444): listing works, every entry's lstat fails with EACCES. The scan
    ended on that PermissionError with a traceback; now the folder is named once and the
    checkpoints beside it are read."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    write_checkpoints(ckpts / "theirs", [3])
    (ckpts / "theirs").chmod(0o444)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        out = _scan(ckpts, probe, uri, tmp_path / "state")
    finally:
        (ckpts / "theirs").chmod(0o755)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    said = f"cannot read the entries of {ckpts / 'theirs'}"
    assert out.stderr.count(said) == 1, out.stderr
    assert "not searched" in out.stderr, out.stderr
    assert only_run_steps(uri) == [1, 2]


def test_a_checkpoint_directory_listed_but_not_searchable_is_a_clear_error(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    ckpts.chmod(0o444)
    try:
        out = _scan(ckpts, probe, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "state")
    finally:
        ckpts.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"{ckpts}: permission denied looking for ddsmon.toml in it" in out.stderr
    assert "not searched" in out.stderr, out.stderr


def test_watch_beside_a_subfolder_that_cannot_be_searched_reads_the_rest_live(
    tmp_path: Path, probe: Path
) -> None:
    import signal
    import time

    from fault_helpers import cli_args

    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    write_checkpoints(ckpts / "theirs", [3])
    (ckpts / "theirs").chmod(0o444)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2", "--state-dir",
                    str(tmp_path / "state"))  # fmt: skip
    err_path, out_path = tmp_path / "watch.err", tmp_path / "watch.out"
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen([*as_unprivileged(), *args], cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip

    def wait_for_step(step: int) -> None:  # the plain view's line per checkpoint read
        deadline = time.monotonic() + 120
        while f"step {step} " not in out_path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, f"step {step} not read:\n{err_path.read_text()}"
            time.sleep(0.2)

    try:
        wait_for_step(1)
        write_checkpoints(ckpts, [2])
        wait_for_step(2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        (ckpts / "theirs").chmod(0o755)
    text = err_path.read_text()
    assert "Traceback" not in text, text
    assert f"cannot read the entries of {ckpts / 'theirs'}" in text, text
    assert only_run_steps(uri) == [1, 2], text
