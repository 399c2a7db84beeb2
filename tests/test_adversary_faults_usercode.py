"""User code that misbehaves, given to the real command: a ``--loss`` whose values
cannot be differentiated or are not numbers the readings can use, a ``--model`` factory
that builds on the ``meta`` device, a factory that starts a thread that raises. Each is
one line naming the callable and what was expected; the daemon goes on (a failure is
that checkpoint's, never the daemon's end) and records nothing it did not measure."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from fault_helpers import REPO, cli_args, only_run_steps, write_checkpoints
from fixtures_models import mlp, mlp_probe

from ddsmon import compute_signatures
from ddsmon.errors import ProbeError

USER_CODE = textwrap.dedent(
    """
    import sys
    import threading

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, {tests!r})
    from fixtures_models import mlp


    def on_meta():
        with torch.device("meta"):
            return mlp()


    def starts_a_failing_thread():
        def work():
            raise RuntimeError("the prefetcher of the user's data failed")

        threading.Thread(target=work, name="user-prefetch").start()
        return mlp()


    def detached_loss(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none").detach()


    def grad_off_loss(outputs, targets):
        values = F.cross_entropy(outputs, targets, reduction="none")
        torch.set_grad_enabled(False)  # left behind, as a helper's cleanup might
        return values
    """
)


def _user_module(tmp_path: Path) -> Path:
    path = tmp_path / "user_code.py"
    path.write_text(USER_CODE.format(tests=str(REPO / "tests")))
    return path


def _scan(tmp_path: Path, probe: Path, *extra: str, model: str | None = None):
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("scan", ckpts, probe, uri, *extra)
    if model is not None:
        args[args.index("--model") + 1] = model
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    return proc, uri


def _failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "cannot read" in line]


def test_a_detached_loss_fails_each_checkpoint_and_records_no_readings(
    tmp_path: Path, probe: Path
) -> None:
    """A ``--loss`` returning ``.detach()``-ed values was read as if measured: every
    gradient zero, the run holding readings of nothing. Now each checkpoint fails with
    the loss named and what it must return; none is recorded."""
    user = _user_module(tmp_path)
    proc, uri = _scan(tmp_path, probe, "--loss", f"{user}:detached_loss")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _failure_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr[-3000:]
    assert (
        "loss 'detached_loss' returned losses that do not depend on the model's outputs"
        in (lines[0])
    )
    assert "scan: 0 read, 0 skipped, 2 failed" in proc.stderr
    assert only_run_steps(uri) == []


def _reading(loss):
    inputs, targets = mlp_probe()
    return compute_signatures(mlp(), inputs, targets, loss=loss, device="cpu")


@pytest.mark.parametrize(
    ("loss", "said"),
    [
        (lambda out, y: y, "must return floating-point per-sample losses, got torch.int64"),
        (
            lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none").detach(),
            "returned losses that do not depend on the model's outputs",
        ),
        (
            lambda out, y: torch.log(out.softmax(-1)[:, 0] * 0) + out.sum(-1),
            "returned non-finite losses for 32 of 32 samples (sample 0: -inf) where the "
            "model's outputs are finite",
        ),
    ],
    ids=["integer", "detached", "infinite"],
)
def test_a_loss_returning_values_the_readings_cannot_use_is_named(loss, said: str) -> None:
    with pytest.raises(ProbeError, match="loss '<lambda>'") as raised:
        _reading(loss)
    assert said in str(raised.value)


def test_non_finite_outputs_stay_the_checkpoints_state() -> None:
    """NaN weights make NaN outputs and so a NaN loss: that is the checkpoint's state,
    recorded as not finite, not blamed on the loss."""
    inputs, targets = mlp_probe()
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    sig = compute_signatures(model, inputs, targets, loss="ce", device="cpu")
    assert not sig.layers["2"].finite


def test_a_factory_building_on_the_meta_device_is_each_checkpoints_failure(
    tmp_path: Path, probe: Path
) -> None:
    """A factory that builds under ``torch.device("meta")`` (to save memory, as for a
    big model) ended the scan with a traceback ("Cannot copy out of meta tensor"), after
    torch's warning per tensor that loading into it was a no-op. Now each checkpoint
    fails with one line naming the factory, the tensors and what to do."""
    user = _user_module(tmp_path)
    proc, uri = _scan(tmp_path, probe, model=f"{user}:on_meta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "is a no-op" not in proc.stderr, proc.stderr
    lines = _failure_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr[-3000:]
    assert f"model factory '{user}:on_meta' built a model with 4 tensors on the meta" in lines[0]
    assert "build it on the CPU" in lines[0]
    assert only_run_steps(uri) == []


def test_a_thread_the_factory_started_raising_is_one_line(tmp_path: Path, probe: Path) -> None:
    """A factory whose library starts a thread that raises: Python printed the thread's
    whole traceback between the readings. Now one line names the thread, the exception
    and where it was raised; every checkpoint is read."""
    user = _user_module(tmp_path)
    proc, uri = _scan(tmp_path, probe, model=f"{user}:starts_a_failing_thread")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "user-prefetch" in line]
    assert said, proc.stderr[-3000:]
    assert "raised RuntimeError: the prefetcher of the user's data failed at " in said[0]
    assert f"{user}:" in said[0] and "in work" in said[0]
    assert only_run_steps(uri) == [1, 2]


def test_a_loss_that_turns_gradients_off_does_not_empty_the_readings(
    tmp_path: Path, probe: Path
) -> None:
    """A loss that leaves ``torch.set_grad_enabled(False)`` behind: the backward pass
    gave no gradients and every checkpoint was recorded without its G-side readings
    (no lambda_min), nothing said. Now the mode is put back after the loss, said once,
    and every checkpoint has them."""
    user = _user_module(tmp_path)
    proc, uri = _scan(tmp_path, probe, "--loss", f"{user}:grad_off_loss")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "set_grad_enabled(False)" in line]
    assert len(said) == 1 and "loss 'grad_off_loss'" in said[0], proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("lambda_min[" in line for line in steps), proc.stdout
    assert only_run_steps(uri) == [1, 2]
