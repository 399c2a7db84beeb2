"""``ddsmon watch`` against things done to the directory it watches: deleted and made
again, or moved away and replaced, while the daemon runs. Real processes, the real
watchdog observer (inotify, and the polling one), the MLflow store read back."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from fault_helpers import cli_args, finish, only_run_steps, spawn, wait_for, write_checkpoints


@pytest.mark.parametrize("how", ["deleted", "moved away"])
@pytest.mark.parametrize("observer", [[], ["--poll", "0.5"]], ids=["inotify", "poll"])
def test_a_directory_replaced_while_watched_is_watched_again(
    tmp_path: Path, probe: Path, how: str, observer: list[str]
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--state-dir", str(tmp_path / "state"),
                    "--quiet", "0.5", *observer)  # fmt: skip
    proc = spawn(args)
    try:
        wait_for(lambda: only_run_steps(uri) == [1], 120, "step 1")
        if how == "deleted":
            shutil.rmtree(ckpts)
        else:
            ckpts.rename(tmp_path / "ckpts.old")
        time.sleep(2.5)  # the daemon sees it gone
        write_checkpoints(ckpts, [2])  # made again: the new directory's first checkpoint
        write_checkpoints(ckpts, [3])  # and one written once it is watched again
        wait_for(lambda: only_run_steps(uri) == [1, 2, 3], 60, "steps 2 and 3 in the new directory")
        proc.send_signal(signal.SIGTERM)
        rc, err = finish(proc)
    finally:
        proc.kill()
    assert rc == 0, err
    assert "waiting for it to be created again" in err, err
    assert "is there again" in err, err
    assert only_run_steps(uri) == [1, 2, 3]
