"""A reading that hangs in user code (a ``--loss`` waiting on a lock or a network
call): before, the daemon said nothing, for ever, and a first SIGTERM waited on it in
silence. Now a reading past ``SLOW_READING`` seconds (or ten times the usual reading) is
said once, naming the checkpoint and the loss; a stop asked meanwhile says that it waits
for that reading and how to stop at once; a second signal stops it (exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fault_helpers import FACTORY, REPO, finish, wait_for, write_checkpoints

LOSS = """
import os, time
import torch.nn.functional as F

def loss(outputs, targets):
    if os.path.exists({flag!r}):
        time.sleep(120)
    return F.cross_entropy(outputs, targets, reduction="none")
"""

#: The real CLI, with the slow-reading bar lowered to 2 s.
RUN = (
    "import sys, ddsmon.daemon; ddsmon.daemon.SLOW_READING = 2.0; "
    "from ddsmon.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_a_hanging_loss_is_said_and_a_second_signal_stops_it(tmp_path: Path, probe: Path) -> None:
    flag = tmp_path / "hang"
    (tmp_path / "user_loss.py").write_text(LOSS.format(flag=str(flag)))
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_checkpoints(ckpts, [1])
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN, "watch", str(ckpts), "--model", FACTORY, "--probe",
             str(probe), "--loss", f"{tmp_path / 'user_loss.py'}:loss", "--tracking-uri", uri,
             "--no-plots", "--quiet", "0.2", "--state-dir", str(tmp_path / "state")],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    try:
        wait_for(lambda: "step_000001.pt" in _done(tmp_path), 120, "step 1 read")
        flag.write_text("")
        write_checkpoints(ckpts, [2])
        wait_for(lambda: "the reading of" in err_path.read_text(), 60, "the slow-reading line")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "waiting for the reading of" in err_path.read_text(), 30, "the stop line")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc, _ = finish(proc, timeout=60)
        assert time.monotonic() - started < 20
    finally:
        proc.kill()
    text = err_path.read_text()
    assert rc == 130, text[-3000:]
    slow = [line for line in text.splitlines() if "the reading of" in line and "has run" in line]
    assert len(slow) == 1 and "step_000002.pt" in slow[0] and "user_loss.py:loss" in slow[0], text
    assert text.count("waiting for the reading of") == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


FACTORY_CODE = """
import os, sys, time
sys.path.insert(0, {tests!r})
from fixtures_models import mlp

def factory():
    if os.path.exists({flag!r}):
        time.sleep(120)
    return mlp()
"""


def test_a_hanging_load_is_said_and_a_signal_stops_it(tmp_path: Path, probe: Path) -> None:
    """The model factory hangs on the second checkpoint (before, nothing was said while
    the daemon waited on the load): said once, naming the checkpoint and the factory; one
    SIGTERM stops the daemon at once (exit 0), the checkpoint not marked read."""
    flag = tmp_path / "hang"
    factory = tmp_path / "user_model.py"
    factory.write_text(FACTORY_CODE.format(tests=str(REPO / "tests"), flag=str(flag)))
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_checkpoints(ckpts, [1])
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN, "watch", str(ckpts), "--model", f"{factory}:factory",
             "--probe", str(probe), "--tracking-uri", uri, "--no-plots", "--quiet", "0.2",
             "--state-dir", str(tmp_path / "state")],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    try:
        wait_for(lambda: "step_000001.pt" in _done(tmp_path), 120, "step 1 read")
        flag.write_text("")
        write_checkpoints(ckpts, [2])
        wait_for(lambda: "still loading" in err_path.read_text(), 60, "the slow-load line")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc, _ = finish(proc, timeout=60)
        assert time.monotonic() - started < 20
    finally:
        proc.kill()
    text = err_path.read_text()
    assert rc == 0, text[-3000:]
    slow = [line for line in text.splitlines() if "still loading" in line]
    assert len(slow) == 1, text[-3000:]
    assert "step_000002.pt" in slow[0] and "user_model.py:factory" in slow[0], slow
    assert "Traceback" not in text, text[-3000:]
    assert "step_000002.pt" not in _done(tmp_path)


def _done(tmp_path: Path) -> str:
    """The checkpoints the state directory marks read (its state file, as text)."""
    state = tmp_path / "state" / "state.json"
    return state.read_text() if state.exists() else ""
