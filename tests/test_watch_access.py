"""``watch`` through what a shared cluster does to a directory while it is watched
(found by an adversarial run, each failing before its fix):

* the directory made unreadable for a while (``chmod 000``), checkpoints landing
  meanwhile: each inotify event was a traceback (``Path.is_symlink`` raising EACCES) and
  those checkpoints were never read while the daemon ran; now one line names the
  directory, and once it can be read again what landed meanwhile is read;
* a checkpoint renamed into place unreadable, then ``chmod``-ed readable (an rsync that
  sets modes last): a chmod leaves size and mtime alone, and the watcher ignored
  watchdog's attribute events, so it was never read again; now it is;
* a checkpoint still being written when ``watch`` starts: the start-up listing judged
  it at once and reported it failed ("incomplete"); now the watcher waits for it as for
  any file being written;
* the watched directory replaced by a symbolic link to a new one: "watching it", then
  nothing read; now the link's target is watched under the directory's name.

As root the daemon runs without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), so
file modes apply to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_helpers import (
    REPO,
    as_unprivileged,
    cli_args,
    finish,
    only_run_steps,
    wait_for,
    write_checkpoints,
)


def _watch(ckpts: Path, probe: Path, uri: str, state: Path, *, privileged: bool = True,
           quiet: str = "0.2") -> subprocess.Popen:  # fmt: skip
    args = cli_args("watch", ckpts, probe, uri, "--quiet", quiet, "--state-dir", str(state))
    return subprocess.Popen(
        [*([] if privileged else as_unprivileged()), *args], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, timeout=120)
    assert rc in (0, 130, 143), err[-3000:]
    assert "Traceback" not in err, err[-4000:]
    return err


def _steps(uri: str) -> list[int]:
    try:
        return only_run_steps(uri)
    except Exception:  # no run yet
        return []


def test_a_directory_unreadable_for_a_while_is_read_once_it_can_be(
    tmp_path: Path, probe: Path
) -> None:
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_checkpoints(ckpts, [1])
    proc = _watch(ckpts, probe, uri, tmp_path / "state", privileged=False)
    try:
        wait_for(lambda: _steps(uri) == [1], 120, "step 1")
        ckpts.chmod(0)
        try:
            write_checkpoints(ckpts, [2, 3])  # as this (privileged) test process
            time.sleep(2.0)
            assert _steps(uri) == [1]
        finally:
            ckpts.chmod(0o755)
        wait_for(lambda: _steps(uri) == [1, 2, 3], 120, "steps 2 and 3 once readable")
        write_checkpoints(ckpts, [4])
        wait_for(lambda: _steps(uri) == [1, 2, 3, 4], 120, "step 4")
    finally:
        err = _stop(proc)
    assert err.count("cannot be read (Permission denied)") == 1, err[-3000:]
    assert "can be read again" in err, err[-3000:]
    assert "is not after the last step" not in err, err[-3000:]


def test_a_checkpoint_made_readable_by_chmod_is_read(tmp_path: Path, probe: Path) -> None:
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_checkpoints(ckpts, [1])
    proc = _watch(ckpts, probe, uri, tmp_path / "state", privileged=False)
    try:
        wait_for(lambda: _steps(uri) == [1], 120, "step 1")
        staged = tmp_path / "staged"
        write_checkpoints(staged, [2])
        temp = ckpts / ".step_000002.pt.tmp"  # a temporary name: never a checkpoint
        os.replace(staged / "step_000002.pt", temp)
        temp.chmod(0)
        os.replace(temp, ckpts / "step_000002.pt")  # renamed into place, unreadable
        time.sleep(2.0)  # refused as unreadable meanwhile
        (ckpts / "step_000002.pt").chmod(0o644)
        wait_for(lambda: _steps(uri) == [1, 2], 120, "step 2 once readable")
    finally:
        _stop(proc)


def test_a_checkpoint_being_written_when_watch_starts_is_waited_for(
    tmp_path: Path, probe: Path
) -> None:
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path / 'mlflow.db'}"
    staged = tmp_path / "staged"
    write_checkpoints(staged, [1])
    data = (staged / "step_000001.pt").read_bytes()
    ckpts.mkdir()
    with open(ckpts / "step_000001.pt", "wb") as out:  # held open, as a slow copy
        out.write(data[: len(data) // 2])
        out.flush()
        proc = _watch(ckpts, probe, uri, tmp_path / "state", quiet="0.5")
        time.sleep(8.0)  # past the daemon's start and several quiet periods
        out.write(data[len(data) // 2 :])
    try:
        wait_for(lambda: _steps(uri) == [1], 120, "step 1 once written")
    finally:
        err = _stop(proc)
    assert "cannot read" not in err and "incomplete" not in err, err[-3000:]


def test_the_directory_replaced_by_a_link_to_another_is_watched_through_it(
    tmp_path: Path, probe: Path
) -> None:
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_checkpoints(ckpts, [1])
    proc = _watch(ckpts, probe, uri, tmp_path / "state")
    try:
        wait_for(lambda: _steps(uri) == [1], 120, "step 1")
        ckpts.rename(tmp_path / "ckpts.old")
        (tmp_path / "ckpts.new").mkdir()
        ckpts.symlink_to(tmp_path / "ckpts.new")
        time.sleep(2.0)  # the watcher sees the new directory
        write_checkpoints(ckpts, [2])
        wait_for(lambda: _steps(uri) == [1, 2], 120, "step 2 through the link")
    finally:
        _stop(proc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
