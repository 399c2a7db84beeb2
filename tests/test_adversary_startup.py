"""Ctrl-C in the first moments of ``ddsmon watch`` (while the CLI still imports click
and its settings): exit 130 and one line, never a traceback; as ``python -m ddsmon.cli``
and as the installed ``ddsmon`` script. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"
SCRIPT = Path(sys.executable).parent / "ddsmon"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _startup_seconds() -> float:
    """How long this machine takes to start Python and import the ddsmon package, the
    point from which the command catches SIGINT (the interpreter's own start-up, its
    site imports, comes before and is not ddsmon's): the median of three."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ddsmon"], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def _interrupt_after(command: list[str], delay: float, tmp_path: Path) -> tuple[int, str]:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir(exist_ok=True)
    args = [*command, "watch", str(ckpts), "--model", FACTORY, "--probe", "unused.pt",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-plots"]  # fmt: skip
    # a child of a background job or nohup inherits SIGINT ignored, and the CLI keeps it
    # so by design: this test's child gets the default disposition, as from a terminal
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=_default_sigint)  # fmt: skip
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.fixture(scope="module")
def startup() -> float:
    return _startup_seconds()


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2, 0.35])
@pytest.mark.parametrize("how", ["module", "script"])
def test_ctrl_c_just_after_start_exits_130_without_a_traceback(
    tmp_path: Path, delay: float, how: str, startup: float
) -> None:
    """SIGINT ``delay`` seconds after the package is imported (this machine's start-up
    measured first, so a loaded CI machine does not move the signal into the
    interpreter's own start-up)."""
    if how == "script" and not SCRIPT.exists():
        pytest.skip("the ddsmon script is not installed beside this python")
    command = [sys.executable, "-m", "ddsmon.cli"] if how == "module" else [str(SCRIPT)]
    rc, err = _interrupt_after(command, startup + delay, tmp_path)
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err, err


def test_importing_the_cli_module_leaves_sigint_alone() -> None:
    """Only the command takes SIGINT over while it imports: a program (or a test) that
    imports ddsmon.cli keeps Python's KeyboardInterrupt."""
    code = "import signal, ddsmon.cli; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
                         preexec_fn=_default_sigint)  # fmt: skip
    assert out.stdout.strip() == "True", out.stderr
