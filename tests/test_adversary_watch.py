"""``ddsmon watch`` against things done to the directory it watches: deleted and made
again, or moved away and replaced, while the daemon runs. Real processes, the real
watchdog observer (inotify, and the polling one), the MLflow store read back."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_helpers import (
    REPO,
    cli_args,
    finish,
    only_run_steps,
    spawn,
    wait_for,
    write_checkpoints,
)


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


_HELD_LOAD = """
import os, sys, threading, time
sys.path.insert(0, {tests!r})
from fixtures_models import mlp

_loads = []


def model():
    if threading.current_thread().name.startswith("ddsmon-load"):
        _loads.append(1)
        if len(_loads) == 1:  # the first checkpoint's load waits for the test's go
            with open({mark!r}, "w") as f:
                f.write("loading")
            deadline = time.monotonic() + 60
            while not os.path.exists({go!r}) and time.monotonic() < deadline:
                time.sleep(0.05)
    return mlp()
"""


@pytest.mark.parametrize("then", ["rewritten", "deleted"])
def test_a_checkpoint_changed_while_it_loads_loses_no_version(
    tmp_path: Path, probe: Path, then: str
) -> None:
    """``latest.pt`` saved again (or rotated away) while ddsmon loads it: the version
    loaded is logged, and a new version is read on its own, not taken for read (the
    done mark is the loaded version's, not the file's fingerprint at the time)."""

    sys_path = str(REPO / "tests")

    sys.path.insert(0, sys_path)
    from fixtures_models import mlp

    ckpts, mark, go = tmp_path / "ckpts", tmp_path / "mark", tmp_path / "go"
    ckpts.mkdir()
    torch.save({"model": mlp(1).state_dict(), "step": 1}, ckpts / "latest.pt")
    models = tmp_path / "held.py"
    models.write_text(_HELD_LOAD.format(tests=sys_path, mark=str(mark), go=str(go)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.5")
    args[args.index("--model") + 1] = f"{models}:model"
    proc = spawn(args)
    try:
        wait_for(mark.exists, 120, "the first load to start")
        if then == "rewritten":
            tmp = ckpts / ".latest.pt.tmp"
            torch.save({"model": mlp(2).state_dict(), "step": 2}, tmp)
            os.replace(tmp, ckpts / "latest.pt")
            time.sleep(2)  # the watcher hands the new version over meanwhile
        else:
            (ckpts / "latest.pt").unlink()
        go.touch()
        expected = [1, 2] if then == "rewritten" else [1]
        wait_for(lambda: only_run_steps(uri) == expected, 60, f"steps {expected}")
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        rc, err = finish(proc)
    finally:
        proc.kill()
    assert rc == 0, err
    assert only_run_steps(uri) == expected
    assert "deleted before it could be read" not in err, err
