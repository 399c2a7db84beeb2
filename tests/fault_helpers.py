"""Helpers of the fault tests that run real ``ddsmon`` processes against a real store:
checkpoints of the fixture MLP, the CLI as a subprocess, the run read back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC
from ddsmon.sinks.mlflow_writer import open_client

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"


def as_unprivileged() -> list[str]:
    """The command prefix that runs a process without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH when this one is root (setpriv), so that file modes apply to it;
    [] when not root. Skips the test as root without setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes do not apply")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def write_checkpoints(directory: Path, steps: list[int], *, seed: int = 0) -> None:
    """Checkpoints of the fixture MLP at ``steps``, written atomically (temp + rename)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    directory.mkdir(parents=True, exist_ok=True)
    model = mlp(seed=seed)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        tmp = directory / f".step_{step:06d}.pt.tmp"
        torch.save({"model": state, "step": step, "val_acc": step / 1000}, tmp)
        os.replace(tmp, directory / f"step_{step:06d}.pt")


def cli_args(mode: str, directory: Path, probe: Path, uri: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ddsmon.cli", mode, str(directory),
        "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri, "--no-plots",
        *extra,
    ]  # fmt: skip


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A ddsmon process; its stderr is kept (read with ``communicate``)."""
    return subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for ``proc`` (killed past ``timeout``): its exit status and stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"ddsmon did not finish in {timeout}s:\n{err[-3000:]}") from None
    return proc.returncode, err


@contextmanager
def watching(
    directory: Path, probe: Path, uri: str, *, stderr_to: Path, cwd: Path
) -> Iterator[subprocess.Popen]:
    """``ddsmon watch directory --quiet 0.2`` into ``uri`` (:func:`cli_args`), run from
    ``cwd`` with the repository on PYTHONPATH, its stdout dropped and its stderr written
    to ``stderr_to``; killed when the block ends (a no-op once it has exited)."""
    args = cli_args("watch", directory, probe, uri, "--quiet", "0.2")
    with open(stderr_to, "w") as err:
        proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        yield proc
    finally:
        proc.kill()


#: Holds the SQLite database ``argv[1]`` locked (``BEGIN EXCLUSIVE``) from its line
#: "locked" until a line on its stdin, then commits and exits 0.
_SQLITE_LOCKER = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
    "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.readline(); "
    "c.execute('COMMIT')"
)


class SqliteLock:
    """Another process holding the SQLite database ``db`` locked, as ``mlflow ui``
    migrating it or a ``sqlite3`` shell in a transaction does: locked once the object
    exists (the process said "locked"), until :meth:`release`; as a context manager the
    process is killed when the block ends (a no-op once released)."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SQLITE_LOCKER, str(db)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            assert self.proc.stdout.readline().strip() == "locked"
        except BaseException:
            self.proc.kill()
            raise

    def release(self) -> None:
        """Commit and let the process exit (asserting that it exits 0 within 60 s)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=60) == 0

    def __enter__(self) -> SqliteLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def runs_of(uri: str, experiment: str = "ddsmon") -> list:
    """The active runs of ``experiment`` (none when it does not exist yet). The store is
    opened as ddsmon opens it (:func:`~ddsmon.sinks.mlflow_writer.open_client`: a SQLite
    store under its init lock): a poll that opened a fresh store while a daemon created
    its schema raced MLflow's migration and failed the test (alembic: "expected to match
    one row")."""
    client = open_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id]))


def logged_steps(uri: str, run_id: str, key: str = CHECKPOINT_METRIC) -> list[int]:
    """Every row's step of ``key`` in the run, sorted, duplicates kept."""
    return sorted(m.step for m in open_client(uri).get_metric_history(run_id, key))


def only_run_steps(uri: str, key: str = CHECKPOINT_METRIC) -> list[int]:
    """The steps of the experiment's single run ([] before it has one)."""
    runs = runs_of(uri)
    if not runs:
        return []
    assert len(runs) == 1, f"expected one run, got {[r.info.run_id for r in runs]}"
    return logged_steps(uri, runs[0].info.run_id, key)
