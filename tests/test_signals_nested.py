"""Signals arriving while the daemon handles one: never a deadlock, always the documented
exit (a first signal finishes the checkpoint, exit 0; a second abandons it, exit 130).

A second SIGTERM microseconds after the first (GNU ``timeout`` signals its child and its
process group) once deadlocked ``ddsmon watch``: the handler raised KeyboardInterrupt
inside the first handler's ``Daemon.stop()``, which held the daemon's condition lock, and
the main thread then waited on that lock for good (deaf to every signal but SIGKILL).
Real ``ddsmon watch`` processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import REPO, cli_args, write_checkpoints

from ddsmon.daemon import run_until_signalled


class _LockingDaemon:
    """Stands in for the daemon: its ``stop()`` holds a lock while a second real signal
    arrives (as ``Daemon.stop`` holds its condition while a group kill's second SIGTERM
    comes); ``watch`` sends the first signal and waits for the stop."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stop_completed = False
        self.hurried = False

    def stop(self) -> None:
        with self.lock:
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal, the lock held
            time.sleep(0.2)  # a handler that raises does so here, the lock held
            self.stop_completed = True

    def hurry(self) -> None:
        self.hurried = True

    def watch(self) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not (self.stop_completed and self.hurried) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "returned"

    scan = watch


def test_a_second_signal_during_the_first_ones_stop_never_raises_inside_it() -> None:
    daemon = _LockingDaemon()
    with pytest.raises(KeyboardInterrupt):  # the second signal: abandoned, exit 130
        run_until_signalled(daemon, "watch")  # type: ignore[arg-type]
    assert daemon.stop_completed, "a signal handler raised while stop() held its lock"
    assert daemon.hurried
    assert daemon.lock.acquire(timeout=1), "the lock was left held"
    daemon.lock.release()


def _watch(ckpts: Path, probe: Path, uri: str, log: Path) -> subprocess.Popen:
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2", "--fisher", "activation")
    with open(log, "w") as err:
        return subprocess.Popen([*args[:3], "-v", *args[3:]], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # fmt: skip


@pytest.mark.slow  # about 2 minutes on 2 cores: 20 daemons started
def test_two_signals_back_to_back_always_end_the_watch(tmp_path: Path, probe: Path) -> None:
    """20 rounds of a real ``ddsmon watch`` (idle, and reading) sent two SIGTERMs with
    no pause between them: twice to the process, or to it and to its process group as
    GNU ``timeout`` does. Every round ends within its deadline, with 0 (the two merged
    into one) or 130 (a second signal), and its state lock released."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [0, 10, 20])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statuses = []
    for round_ in range(20):
        log = tmp_path / f"watch{round_}.log"
        proc = _watch(ckpts, probe, uri, log)
        try:
            deadline = time.monotonic() + 120
            while "ddsmon " not in log.read_text() or ": watch " not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the watch never started"
                time.sleep(0.05)
            time.sleep(0.05 * (round_ % 5))  # idle, or between readings
            if round_ % 2:
                os.killpg(proc.pid, signal.SIGTERM)  # timeout: the group, then the child
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"round {round_}: still alive 30 s after two SIGTERMs (deadlocked?):\n"
                    + log.read_text()[-3000:]
                ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = log.read_text()
        assert rc in (0, 130), f"round {round_}: exit {rc}\n{err[-3000:]}"
        if rc == 130:
            assert "ddsmon: interrupted" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        statuses.append(rc)
    assert len(statuses) == 20
