"""A stop never waits for a load: ``ddsmon watch`` asked to stop (SIGINT) while the next
checkpoint is still loading (a torch.load of a large file can take minutes; here the
model factory of that load sleeps) exits at once with status 0, keeps what it recorded,
and the checkpoint it did not read is read by the next run. Real processes, a real
signal, the real MLflow store read back."""

from __future__ import annotations

import time
from pathlib import Path

from fault_helpers import (
    REPO,
    cli_args,
    finish,
    only_run_steps,
    spawn,
    wait_for,
    write_checkpoints,
)

_SLOW_LOAD = """
import os, sys, threading, time
sys.path.insert(0, {tests!r})
from fixtures_models import mlp

_loads = []


def model():
    if threading.current_thread().name.startswith("ddsmon-load"):
        _loads.append(1)
        if len(_loads) == 2 and os.environ.get("SLOW_SECOND_LOAD"):
            with open({mark!r}, "w") as f:
                f.write("loading")
            time.sleep(300)
    return mlp()
"""


def test_a_stop_while_the_next_checkpoint_loads_does_not_wait_for_it(
    tmp_path: Path, probe: Path
) -> None:
    ckpts, mark = tmp_path / "ckpts", tmp_path / "mark"
    write_checkpoints(ckpts, [1, 2])
    models = tmp_path / "slow_load.py"
    models.write_text(_SLOW_LOAD.format(tests=str(REPO / "tests"), mark=str(mark)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri)
    args[args.index("--model") + 1] = f"{models}:model"
    proc = spawn(args, env={"SLOW_SECOND_LOAD": "1"})
    try:
        wait_for(mark.exists, 120, "the second checkpoint's load to start")
        wait_for(lambda: only_run_steps(uri) == [1], 120, "step 1 to be recorded")
        sent = time.monotonic()
        proc.send_signal(2)  # SIGINT: finish the current checkpoint (none), then stop
        rc, err = finish(proc, timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert rc == 0, err
    assert took < 30, f"the stop took {took:.0f} s (waited for the load?)\n{err[-2000:]}"
    assert "Traceback" not in err, err
    assert only_run_steps(uri) == [1]
    # the checkpoint loaded and not read was not marked done: the next run reads it
    again_args = cli_args("scan", ckpts, probe, uri)
    again_args[again_args.index("--model") + 1] = f"{models}:model"
    rc, err = finish(spawn(again_args))
    assert rc == 0, err
    assert "1 read" in err, err
    assert only_run_steps(uri) == [1, 2]
