"""Review of the lifecycle fixes: a hangup said twice, standard streams put back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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
        deadline = time.monotonic() + 10  # signals are handled on a thread of their own
        while not self.stopped and time.monotonic() < deadline:
            time.sleep(0.01)
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
    # and a late one, while the command says its summary and exits, is ignored: the
    # default action would end it with status -SIGHUP
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


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


@pytest.mark.slow
def test_a_new_store_does_not_run_the_hooks_again_for_events_already_told(
    tmp_path: Path, probe: Path
) -> None:
    """The user moves to the team's server (or deletes ``mlflow.db``): every checkpoint is
    read again into the new run, with a fresh event history. Its events are the
    training's, not the run's: the ``--on-event`` hook had paged for them and
    ``--events-json`` had them; both got them all a second time (a page per old event
    for a changed ``--tracking-uri``). Now the new run gets them, the hooks and the
    events file do not."""
    import torch
    from fault_helpers import REPO, cli_args, only_run_steps, write_checkpoints

    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    bad = torch.load(ckpts / "step_000002.pt")
    next(iter(bad["model"].values())).fill_(float("nan"))  # a nonfinite event at step 3
    bad["step"] = 3
    torch.save(bad, ckpts / "step_000003.pt")
    hook_log, events = tmp_path / "hook.log", tmp_path / "events.jsonl"
    extra = ("--on-event", f"echo ran >> {hook_log}", "--events-json", str(events))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def scan(uri: str) -> str:
        proc = subprocess.run(cli_args("scan", ckpts, probe, uri, *extra), cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    scan(f"sqlite:///{tmp_path / 'first.db'}")
    hooks, told = hook_log.read_text(), events.read_text()
    assert hooks and told, "no event at step 3: the test would prove nothing"
    second = f"sqlite:///{tmp_path / 'second.db'}"  # another store: read again into it
    err = scan(second)
    assert "holds none of them" in err, err
    assert only_run_steps(second) == [1, 2, 3]
    assert hook_log.read_text() == hooks, "the hook ran again for events it had run for"
    assert events.read_text() == told, "--events-json got the same events again"
