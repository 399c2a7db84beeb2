"""Helpers of the tests that train the modular-addition example
(``examples/modular_addition``) and read its runs: the example's modules, and
``ddsmon scan`` of a run as a user types it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "modular_addition"


def example_module(name: str) -> ModuleType:
    """The example's ``<name>.py`` (``train``, ``model``) loaded as a fresh module, the
    example's folder on ``sys.path`` for its own imports."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location(f"modadd_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scan_with_events(
    run: Path, out: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    """``ddsmon scan`` (the venv's console script) of ``run / "ckpts"``: the example's
    ``make_model``, the probe ``run / "probe.pt"``, ``--loss ce``, no plots, one thread,
    into the SQLite store ``out / "mlflow.db"``, its events to ``out / "events.jsonl"``
    (``--events-json``) and its state in ``out / "state"``. The environment is this
    process's with ``OMP_NUM_THREADS=1`` and ``env``. Returns the finished process, the
    store's URI and the events file."""
    uri = f"sqlite:///{out / 'mlflow.db'}"
    events_json = out / "events.jsonl"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ddsmon"), "scan", str(run / "ckpts"),
            "--model", f"{EXAMPLE / 'model.py'}:make_model", "--probe", str(run / "probe.pt"),
            "--loss", "ce", "--tracking-uri", uri, "--events-json", str(events_json),
            "--no-plots", "--threads", "1", "--state-dir", str(out / "state"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env),
        timeout=300,
    )  # fmt: skip
    return proc, uri, events_json
