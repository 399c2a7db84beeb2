"""A state lock held by another process (a backup tool, a hung NFS lock, a stuck old
child holding ``DIR/.ddsmon/state.json.lock``): the daemon says once which lock it waits
for, and a SIGTERM still stops it promptly; before, it waited silently, SIGTERM
included, for as long as the lock was held. A real ``ddsmon watch``, a real ``flock``
holder in another process, a real signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fault_helpers import finish, wait_for, watching, write_checkpoints

_HOLDER = (
    "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    "print('locked', flush=True); time.sleep(120)"
)


def test_a_held_state_lock_is_said_and_a_signal_still_stops(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [0])
    log = tmp_path / "watch.log"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lock = ckpts / ".ddsmon" / "state.json.lock"
    with watching(ckpts, probe, uri, stderr_to=log, cwd=tmp_path) as proc:
        wait_for(lambda: (ckpts / ".ddsmon" / "done.jsonl").exists(), 120, "step 0 read")
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            write_checkpoints(ckpts, [10])
            wait_for(lambda: "is locked by" in log.read_text(), 60, "the held lock said")
            text = log.read_text()
            assert str(lock) in text and f"pid {holder.pid}" in text, text
            assert text.count("is locked by") == 1, text
            assert proc.poll() is None
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc, _ = finish(proc, timeout=30)
            took = time.monotonic() - started
        finally:
            holder.kill()
            holder.wait()
    err = log.read_text()
    assert took < 10, f"SIGTERM took {took:.1f} s with the lock held:\n{err}"
    assert rc == 4, err  # the state could not be written: stopped, nothing recorded lost
    assert "stopped waiting for it, as a stop was asked" in err, err
