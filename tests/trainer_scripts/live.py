"""A real ``ddsmon watch`` subprocess beside a real trainer subprocess, and what landed in MLflow.

* :class:`Watcher`: ``python -m ddsmon.cli watch ...`` with its stdout and stderr read
  line by line as they come (``lines()``, ``wait_for(text)``), stopped with SIGINT
  (``stop()``), frozen and thawed with SIGSTOP/SIGCONT (a reader busy elsewhere).
* :func:`wait_until`, :func:`metric_history`, :func:`only_run`: polling helpers;
  :func:`reading_key` and :data:`CHECKPOINT`: the metric names, from the sink itself.

The subprocesses import the ddsmon the tests import (``PYTHONPATH``) and run in a
scratch folder, never in the repository (``python -m`` puts the cwd first on sys.path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ddsmon
from ddsmon.sinks import mlflow_keys

#: the metric marking a checkpoint fully logged (1 at its step)
CHECKPOINT = mlflow_keys.CHECKPOINT_METRIC
PACKAGE_ROOT = Path(ddsmon.__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(PACKAGE_ROOT),
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, *, every: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Watcher:
    """``ddsmon watch ARGS`` in a subprocess started in ``cwd``."""

    def __init__(self, args: list[str], cwd: Path, options: tuple[str, ...] = ()) -> None:
        """``options``: ddsmon's own, before ``watch`` (``-v``)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddsmon.cli", *options, "watch", *map(str, args)],
            cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait_for(self, text: str, timeout: float) -> None:
        """Until a line holds ``text``; AssertionError (with the output) if the watcher
        exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines()):
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the readers drain the pipes
                raise AssertionError(
                    f"the watcher exited ({self.proc.returncode}) before saying {text!r}:\n"
                    + self.text()
                )
            time.sleep(0.1)
        raise AssertionError(f"the watcher did not say {text!r} within {timeout} s:\n{self.text()}")

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 120) -> int:
        """SIGINT (the first one finishes the current checkpoint), then its exit status."""
        if self.proc.poll() is None:
            self.thaw()
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=10)
        return self.proc.returncode


def _client(uri: str) -> Any:
    """A client of the store at ``uri``, opened as ddsmon opens it
    (:func:`ddsmon.sinks.mlflow_writer.open_client`: a SQLite store under the flock that
    serialises schema creation). A plain ``MlflowClient(uri)`` creates or migrates the
    schema unlocked, and racing the watcher's first open it can leave a
    ``_alembic_tmp_*`` table behind: the store is broken for good (neither side can
    open it again) and the watcher never logs a checkpoint."""
    from ddsmon.sinks.mlflow_writer import open_client

    return open_client(uri)


def only_run(uri: str, experiment: str = "ddsmon") -> Any:
    """The one run of ``experiment`` in the store at ``uri`` (None while there is none).

    Read while the watcher writes: a store being created or locked, and the warnings
    MLflow's database layer gives meanwhile, count as nothing there yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = _client(uri)
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    except Exception:
        return None
    assert len(runs) <= 1, f"expected one run, got {len(runs)}"
    return runs[0] if runs else None


def metric_history(uri: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every value logged for ``key`` in the only run, in step order."""
    run = only_run(uri)
    if run is None:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = _client(uri).get_metric_history(run.info.run_id, key)
    except Exception:
        return []
    return sorted((m.step, m.value) for m in history)


def steps_of(uri: str, key: str = CHECKPOINT) -> list[int]:
    return [step for step, _ in metric_history(uri, key)]


def reading_key(layer: str, name: str) -> str:
    """The metric key of reading ``name`` of ``layer``, as the MLflow sink names it."""
    named = getattr(mlflow_keys, "reading_metric_key", None)
    return named(layer, name) if named is not None else mlflow_keys.metric_key("dds", layer, name)


def run_script(script: str, *args: Any, cwd: Path) -> subprocess.Popen:
    """A trainer script of this folder in a subprocess (output to ``cwd/<script>.log``)."""
    log = open(cwd / f"{Path(script).stem}.log", "w")
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), *map(str, args)],
        cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
