"""Review of the lifecycle fixes: a hangup said twice, standard streams put back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from ddsmon.daemon import run_until_signalled


class _Daemon:
    """Stands in for :class:`ddsmon.daemon.Daemon`: ``watch`` sends the signals given to
    this process, as the reading of a checkpoint would be interrupted, and says whether
    it was asked to stop."""

    def __init__(self, signals: list[int]) -> None:
        self.signals = signals
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def watch(self) -> Any:
        for sig in self.signals:
            os.kill(os.getpid(), sig)
        return ("finished", self.stopped)

    scan = watch


@pytest.fixture
def sighup_default() -> Any:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_hangup_said_twice_still_stops_in_order(sighup_default: None) -> None:
    """An ssh session that drops hangs up twice: the kernel signals the terminal's
    foreground job, and the shell, hung up itself, sends SIGHUP again to each of its jobs.
    The second SIGHUP was counted as a second interrupt and abandoned the checkpoint
    being read (KeyboardInterrupt); a hangup is not a user asking twice."""
    daemon = _Daemon([signal.SIGHUP, signal.SIGHUP])
    try:
        summary = run_until_signalled(daemon, "watch")  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pytest.fail("the second SIGHUP abandoned the checkpoint being read")
    assert summary == ("finished", True)


def test_sigterm_after_a_hangup_still_abandons(sighup_default: None) -> None:
    """A SIGTERM after the hangup is asked by someone: it abandons, as a second
    SIGINT/SIGTERM always did."""
    daemon = _Daemon([signal.SIGHUP, signal.SIGTERM])
    with pytest.raises(KeyboardInterrupt):
        run_until_signalled(daemon, "watch")  # type: ignore[arg-type]
    assert daemon.stopped


@pytest.mark.parametrize("closed", ["0", "1", "2", "012"])
def test_a_closed_standard_stream_put_back_is_passed_on_to_children(closed: str) -> None:
    """The ``/dev/null`` put on a closed standard descriptor came from ``os.open``, which
    makes it close-on-exec: every child the daemon starts with the streams inherited (a
    compiler or worker a model factory or torch.compile starts, git) had it closed again,
    and its first file opened took the descriptor, the hazard the fix was for."""
    code = (
        "import os, subprocess, sys\n"
        "from ddsmon.cli import _fill_closed_standard_streams\n"
        "_fill_closed_standard_streams()\n"
        "child = 'import os\\nfor fd in (0, 1, 2): os.fstat(fd)'\n"
        "rc = subprocess.run([sys.executable, '-c', child]).returncode\n"
        "open(os.environ['OUT_FILE'], 'w').write(str(rc))\n"
    )
    redirs = " ".join(f"{fd}>&-" if fd != "0" else "<&-" for fd in closed)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rc")
        subprocess.run(
            ["bash", "-c", f'exec "$@" {redirs}', "x", sys.executable, "-c", code],
            env={**os.environ, "OUT_FILE": out},
            timeout=60,
            check=True,
        )
        with open(out) as f:
            assert f.read() == "0", f"a child saw a standard stream closed ({closed} closed)"
