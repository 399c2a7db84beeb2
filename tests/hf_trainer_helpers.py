"""Helpers of the tests that train with transformers' Trainer (and peft) in a
subprocess and read its output with ``ddsmon`` in another: the training script's common
part, the runs of both, the probe, the store read back.

Importing it puts ``tests/trainer_scripts`` on ``sys.path`` (its ``models`` module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TRAINER_SCRIPTS = Path(__file__).resolve().parent / "trainer_scripts"
if str(TRAINER_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(TRAINER_SCRIPTS))

from models import gpt2_probe  # noqa: E402

#: The environment of both processes: transformers quiet, the Hub never asked.
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}

_PRELUDE = """
import sys, torch
sys.path.insert(0, {scripts!r})
torch.set_num_threads(1)
from models import token_data


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.seq = token_data(n, 7, seed)

    def __len__(self):
        return len(self.seq)

    def __getitem__(self, i):
        return {{"input_ids": self.seq[i], "labels": self.seq[i]}}

"""


def trainer_script(body: str) -> str:
    """The text of a training script: torch on one thread, ``tests/trainer_scripts``
    importable (``from models import ...``) and ``Tokens(n, seed)`` defined (a Dataset of
    ``n`` sequences of 8 tokens, ``token_data(n, 7, seed)``, each its own ``input_ids``
    and ``labels``), then ``body``."""
    return _PRELUDE.format(scripts=str(TRAINER_SCRIPTS)) + body


def run_script(text: str, cwd: Path, *args: object) -> None:
    """Write ``text`` to ``cwd / "train.py"`` and run it with ``args`` in ``cwd`` (this
    interpreter, :data:`ENV`, 240 s at most), asserting that it exits 0."""
    script = cwd / "train.py"
    script.write_text(text)
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def run_ddsmon(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m ddsmon.cli ARGS --threads 1`` in ``cwd`` with :data:`ENV` (240 s at
    most); its output captured as text."""
    cmd = [sys.executable, "-m", "ddsmon.cli", *map(str, args), "--threads", "1"]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)


def save_gpt2_probe(path: Path) -> Path:
    """``gpt2_probe()`` saved as ``{"inputs", "targets"}`` to ``path`` (``--probe``);
    returns ``path``."""
    inputs, targets = gpt2_probe()
    torch.save({"inputs": inputs, "targets": targets}, path)
    return path


def metric_steps(uri: str, key: str) -> list[int]:
    """The steps of metric ``key``, in the order MLflow returns its history, of the one
    run in the store ``uri`` (in any experiment; asserting there is exactly one)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]
