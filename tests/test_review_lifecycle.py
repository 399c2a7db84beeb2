"""Review of the lifecycle fixes: a hangup said twice, standard streams put back."""

from __future__ import annotations

import os
import signal
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
