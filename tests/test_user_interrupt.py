"""A KeyboardInterrupt raised by the user's code (the loss) is that
checkpoint's failure, naming the loss or the factory and where it was raised, as any other
exception of theirs is; before, it was taken for the user pressing Ctrl-C ("interrupted",
exit 130, naming neither). A real ``ddsmon scan`` subprocess, real user files."""

from __future__ import annotations

from pathlib import Path

from fault_helpers import FACTORY, write_checkpoints
from test_cli import ddsmon

_USER = """
def loss(outputs, targets):
    raise KeyboardInterrupt
"""


def _scan(ckpts: Path, probe: Path, tmp_path: Path, *extra: str):
    return ddsmon("scan", str(ckpts), "--probe", str(probe), "--no-plots",
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "--fisher", "activation", *extra)  # fmt: skip


def test_a_loss_raising_keyboard_interrupt_fails_its_checkpoints(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [0, 10])
    user = tmp_path / "usercode.py"
    user.write_text(_USER)
    done = _scan(ckpts, probe, tmp_path, "--model", FACTORY, "--loss", f"{user}:loss")
    assert "interrupted" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert "2 failed" in done.stderr, done.stderr
    line = next(x for x in done.stderr.splitlines() if "step_000010.pt" in x and "cannot" in x)
    assert "KeyboardInterrupt raised during the reading" in line, line
    assert f"--loss {user}:loss" in line and f"{user}:3 in loss" in line, line
