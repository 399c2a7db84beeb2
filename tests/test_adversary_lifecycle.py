"""A training cluster's ways of running ``ddsmon``, on the real command in a subprocess
beside a real store: launched with its standard streams closed (a job launcher, a
daemonizer, ``2>&-``), hung up on, pointed at another store."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from fault_helpers import (
    REPO,
    SqliteLock,
    cli_args,
    only_run_steps,
    wait_for,
    watching,
    write_checkpoints,
)


def _closed_streams(args: list[str], closed: str) -> list[str]:
    """``args`` run with the descriptors in ``closed`` ("012") closed, as ``cmd >&-``."""
    redirs = " ".join(f"{fd}>&-" if fd != "0" else "<&-" for fd in closed)
    return ["bash", "-c", f'exec "$@" {redirs}', "ddsmon", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_scan_with_stderr_or_every_stream_closed_still_records(tmp_path: Path, probe: Path) -> None:
    """``scan 2>&-`` (here with stdin and stdout closed too) exited 1 at once, nothing read and nothing said (Python's
    ``sys.stderr`` is None then, and the first log line raised); now /dev/null stands in
    for a closed stream and the scan records every checkpoint."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2, 3])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("scan", ckpts, probe, uri)
    proc = subprocess.run(_closed_streams(args, "012"), cwd=tmp_path, env=_env(), timeout=240)
    assert proc.returncode == 0
    assert only_run_steps(uri) == [1, 2, 3]


@pytest.mark.slow
def test_watch_with_every_stream_closed_reads_new_checkpoints_and_stops_on_sigterm(
    tmp_path: Path, probe: Path
) -> None:
    """A ``watch`` started by a launcher that closes stdin, stdout and stderr reads what
    lands and stops in order on SIGTERM (exit 0), everything recorded."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2")
    proc = subprocess.Popen(_closed_streams(args, "012"), cwd=tmp_path, env=_env())
    try:
        wait_for(lambda: only_run_steps(uri) == [1], 120, "step 1 recorded")
        write_checkpoints(ckpts, [1, 2])
        wait_for(lambda: only_run_steps(uri) == [1, 2], 120, "step 2 recorded")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    assert only_run_steps(uri) == [1, 2]


def test_a_new_store_gets_every_checkpoint_the_state_marks_as_read_elsewhere(
    tmp_path: Path, probe: Path
) -> None:
    """The read-set in ``DIR/.ddsmon`` was kept for one store; the user deleted
    ``mlflow.db`` to start over (or moved to the team's server, or another experiment):
    the next scan read nothing ("0 read, 3 skipped") and the new run stayed empty. Now
    a run holding none of the steps the state marks as read gets them all, and it is
    said why."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2, 3])
    first = f"sqlite:///{tmp_path / 'first.db'}"
    proc = subprocess.run(cli_args("scan", ckpts, probe, first), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert only_run_steps(first) == [1, 2, 3]
    (tmp_path / "first.db").unlink()  # start over: the store is gone, the state is not
    proc = subprocess.run(cli_args("scan", ckpts, probe, first), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # read back under another spelling of the path: MLflow keeps one engine per URI in
    # this process, still open on the deleted file
    assert only_run_steps(f"sqlite:///{tmp_path}/./first.db") == [1, 2, 3], proc.stderr
    assert "3 read" in proc.stderr, proc.stderr
    assert "holds none of them" in proc.stderr and str(ckpts / ".ddsmon") in proc.stderr


# A login session on a terminal: its own session and controlling terminal, and SIGHUP at
# its default (ddsmon keeps an ignored SIGHUP ignored, as nohup asks; a test runner
# started under nohup passed that on, and the hangup then rightly did not stop ddsmon)
_ON_A_TERMINAL = (
    "import fcntl, os, signal, sys, termios; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.slow
def test_watch_on_a_terminal_that_hangs_up_stops_in_order(tmp_path: Path, probe: Path) -> None:
    """``ddsmon watch`` in an ssh session that drops (its terminal hangs up: SIGHUP, and
    the terminal fails every write). Before, the hangup killed it where it stood (status
    -SIGHUP), the checkpoint being read lost and the MLflow run left RUNNING. Now it
    stops as on SIGTERM: exit 0, every reading kept, the run ended."""
    import pty
    import select
    import threading

    from fault_helpers import runs_of
    from mlflow.tracking import MlflowClient

    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [args[0], "-c", _ON_A_TERMINAL, *args], stdin=slave, stdout=slave, stderr=slave,
        cwd=tmp_path, env={**_env(), "COLUMNS": "120", "TERM": "xterm"},
    )  # fmt: skip
    os.close(slave)
    stop = threading.Event()

    def drain() -> None:  # the terminal's reader: the view must not block on a full pty
        while not stop.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for(lambda: only_run_steps(uri) == [1, 2], 120, "steps 1 and 2 recorded")
        stop.set()
        reader.join()
        os.close(master)  # the terminal goes away
        status = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert status == 0, f"exit status {status} after the hangup"
    assert only_run_steps(uri) == [1, 2]
    run = MlflowClient(uri).get_run(runs_of(uri)[0].info.run_id)
    assert run.info.status != "RUNNING"


def _scan_peak_rss(tmp_path: Path, name: str, ckpts: Path, probe: Path, hook: str) -> int:
    """``scan`` with ``--on-event hook``: its peak resident memory (KiB), after checking
    that the hook ran and every step was recorded."""
    uri = f"sqlite:///{tmp_path / f'{name}.db'}"
    marker = tmp_path / f"{name}.ran"
    args = cli_args("scan", ckpts, probe, uri, "--state-dir", str(tmp_path / name),
                    "--on-event", f"{hook}; touch {marker}")  # fmt: skip
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        proc.returncode = 0  # reaped by wait4
    assert os.waitstatus_to_exitcode(status) == 0
    assert marker.exists(), "the hook did not run"
    assert only_run_steps(uri) == [1, 2, 3]
    return usage.ru_maxrss


@pytest.mark.slow
def test_a_hook_that_prints_without_end_costs_the_daemon_no_memory(
    tmp_path: Path, probe: Path
) -> None:
    """An ``--on-event`` hook that prints hundreds of megabytes (a loop, ``yes``, a log
    it tails): the daemon held all of it until the hook ended (its peak memory grew by
    twice that, and a hook printing for its whole timeout could take the daemon down
    with it). Now each stream is read to its end and only its last bytes are kept."""
    import torch

    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    bad = torch.load(ckpts / "step_000002.pt")
    next(iter(bad["model"].values())).fill_(float("nan"))  # a nonfinite event at step 3
    bad["step"] = 3
    torch.save(bad, ckpts / "step_000003.pt")
    quiet = _scan_peak_rss(tmp_path, "quiet", ckpts, probe, "true")
    loud = _scan_peak_rss(tmp_path, "loud", ckpts, probe, "head -c 300000000 /dev/zero")
    assert loud - quiet < 100 * 1024, f"peak {quiet} KiB with a quiet hook, {loud} KiB loud"


@pytest.mark.slow
def test_a_sqlite_store_locked_by_another_process_is_said_in_one_line(
    tmp_path: Path, probe: Path
) -> None:
    """Another process holds ``mlflow.db`` locked (``mlflow ui`` migrating it, a
    ``sqlite3`` shell in a transaction) while a checkpoint lands. The reading was spooled
    and replayed, but each attempt printed MLflow's 60-line traceback with its SQL, and
    ddsmon's own line said "unreachable" and not why. Now: no traceback, one line that
    says ``database is locked``, and the step is in the run once the lock is gone."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    err_path = tmp_path / "watch.err"
    with watching(ckpts, probe, uri, stderr_to=err_path, cwd=tmp_path) as proc:
        wait_for(lambda: only_run_steps(uri) == [1], 120, "step 1 recorded")
        with SqliteLock(db) as lock:
            write_checkpoints(ckpts, [1, 2])
            wait_for(lambda: "spooled" in err_path.read_text(), 180, "step 2 spooled")
            lock.release()
        wait_for(lambda: only_run_steps(uri) == [1, 2], 120, "step 2 replayed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    text = err_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    spooled = [line for line in text.splitlines() if "spooled to" in line]
    assert spooled and "database is locked" in spooled[0], text[-3000:]
    assert only_run_steps(uri) == [1, 2]


@pytest.mark.slow
def test_a_tracking_server_not_up_yet_is_said_in_one_line_with_its_reason(
    tmp_path: Path, probe: Path
) -> None:
    """``watch`` on a GPU node starts before the real ``mlflow server`` it logs to is up
    (a job array starting at once), then the server comes up. The readings were spooled
    and replayed, but each attempt (the spool is tried again from 1 s, doubling to 30 s)
    added urllib3's "Retrying (Retry(total=0, ...)) after connection broken by
    NewConnectionError(...)" lines, and ddsmon's own line did not say why. Now: one line
    naming the refused connection, and every step in the run once the server answers."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    err_path = tmp_path / "watch.err"
    args = cli_args("watch", ckpts, probe, server.uri, "--quiet", "0.2")
    out_path = tmp_path / "watch.out"
    env = _env()
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)  # ddsmon's default, as users have it
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=err)
    try:
        wait_for(lambda: "step 2 " in out_path.read_text(), 120, "step 2 read")
        server.start()
        wait_for(lambda: only_run_steps(server.uri) == [1, 2], 120, "the spool replayed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        server.stop()
    text = err_path.read_text()
    assert "Retrying" not in text and "Traceback" not in text, text[-3000:]
    spooled = [line for line in text.splitlines() if "spooled to" in line]
    assert spooled and "Connection refused" in spooled[0], text[-3000:]


@pytest.mark.slow
def test_a_step_saved_again_by_a_resumed_run_is_said_as_such(tmp_path: Path, probe: Path) -> None:
    """A job stopped after saving step 3, resumed from step 1, saves ``step_000003.pt``
    again with other weights. It was said to be "another checkpoint with other weights
    (two checkpoints saved with one step?)"; now it is said to be the same file saved
    again, which version the run keeps, and nothing is logged twice."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2, 3])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = subprocess.run(cli_args("scan", ckpts, probe, uri), cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=240)  # fmt: skip
    assert first.returncode == 0, first.stderr
    write_checkpoints(ckpts, [2, 3], seed=1)  # the resumed run's steps 2 and 3
    again = subprocess.run(cli_args("scan", ckpts, probe, uri), cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=240)  # fmt: skip
    assert again.returncode == 0, again.stderr
    for name, step in (("step_000002.pt", 2), ("step_000003.pt", 3)):
        said = [line for line in again.stderr.splitlines() if "other weights" in line]
        said = [line for line in said if f"{name} " in line]
        assert said and f"saved again at step {step}" in said[0], again.stderr
    assert "two checkpoints saved with one step" not in again.stderr
    assert only_run_steps(uri) == [1, 2, 3]
