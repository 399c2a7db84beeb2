"""transformers' Trainer, live: a real ``ddsmon watch`` started before the Trainer made
its output folder, a tiny GPT-2 trained with ``logging_steps`` != ``save_steps`` and
``save_total_limit=2``, and what landed in a sqlite MLflow store, read with MlflowClient.

The trainer is paced against the watcher (``--hold STEP:FILE``): it waits after saving
checkpoint-5 until the watcher has read it (the watcher is up and warm), then saves
10, 15 and 20 in a burst (no pause between steps) and waits again; after that it runs at 0.3 s
a step. checkpoint-10 is rotated away (at the save of 20) before it can be read:

* ``live``: the watcher is watching all along; the folder is still settling (``--quiet
  2``, a burst takes a fraction of that) when it is deleted.
* ``frozen``: the watcher is stopped (SIGSTOP) for the burst, as a machine too busy to
  run it would be; it learns of checkpoint-10 only once the folder is gone.

Everything else races as in real life, and the assertions hold for either outcome of
each race.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))

from live import (
    Watcher,
    metric_history,
    only_run,
    reading_key,
    run_script,
    steps_of,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_STEPS, SAVE_STEPS, LOGGING_STEPS, EVAL_STEPS = 40, 5, 3, 10


def saved_steps(manifest: Path) -> list[int]:
    if not manifest.exists():
        return []
    return [json.loads(line)["step"] for line in manifest.read_text().splitlines() if line]


@pytest.mark.parametrize("pace", ["live", "frozen"])
def test_trainer_watched_live_from_before_its_output_folder_exists(
    tmp_path: Path, pace: str
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    from models import gpt2_probe, tiny_gpt2

    out, manifest = tmp_path / "out", tmp_path / "saved.jsonl"
    probe = tmp_path / "probe.pt"
    inputs, targets = gpt2_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 5. the watcher first, no --model (a Hugging Face folder builds its own), OUT absent
    watcher = Watcher([out, "--probe", probe, "--loss", "ce", "--tracking-uri", uri,
                       "--no-plots", "--quiet", "2", "--threads", "1"], cwd=tmp_path)  # fmt: skip
    trainer = None
    try:
        watcher.wait_for("waiting for", timeout=120)  # it waits rather than exiting 2
        first, second = tmp_path / "go-after-5", tmp_path / "go-after-20"
        trainer = run_script(
            "hf_train.py", out, manifest, "--max-steps", MAX_STEPS, "--save-steps", SAVE_STEPS,
            "--logging-steps", LOGGING_STEPS, "--eval-steps", EVAL_STEPS,
            "--save-total-limit", 2, "--slow-after", 20, "--step-seconds", 0.3,
            "--hold", f"5:{first}", "--hold", f"20:{second}", cwd=tmp_path,
        )  # fmt: skip
        wait_until(lambda: 5 in steps_of(uri), 300, "the watcher to read checkpoint-5")
        if pace == "frozen":
            watcher.freeze()  # busy elsewhere: checkpoints 10, 15, 20 come, 5 and 10 go
        try:
            first.touch()
            wait_until(lambda: 20 in saved_steps(manifest), 120, "the save at step 20")
            assert not (out / "checkpoint-10").exists()
        finally:
            watcher.thaw()
        second.touch()
        assert trainer.wait(timeout=300) == 0, (tmp_path / "hf_train.log").read_text()[-3000:]
        wait_until(lambda: MAX_STEPS in steps_of(uri), 300, "the watcher to read checkpoint-40")
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
        status = watcher.stop()
    output = watcher.text()
    assert status == 0, output

    saved = saved_steps(manifest)
    assert saved == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    run = only_run(uri)
    assert run is not None and run.info.status == "FINISHED"

    # each checkpoint read is logged once, at its own step, with every layer's readings
    read = steps_of(uri)
    assert len(read) == len(set(read)), f"a checkpoint logged twice: {read}"
    assert set(read) <= set(saved) and {5, MAX_STEPS} <= set(read), read
    assert 10 not in read  # rotated away while the watcher was frozen
    modules = [name for name, _ in tiny_gpt2().named_modules() if name]
    layers = [name for name in modules if reading_key(name, "finite") in run.data.metrics]
    assert len(layers) >= 10, sorted(run.data.metrics)
    for layer in layers:
        for reading in ("finite", "sigma_max", "lambda_ratio"):
            assert steps_of(uri, reading_key(layer, reading)) == read, (layer, reading)

    # no parameter of the model taken for a trainer scalar
    train_keys = sorted(k for k in run.data.metrics if k.startswith("train/"))
    assert not [k for k in train_keys if "weight" in k or "bias" in k], train_keys

    # What the trainer logged, from the last checkpoint's trainer_state.json (it repeats
    # the whole history): every entry at its own step, each once.
    history = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())
    expected: dict[str, list[tuple[int, float]]] = {}
    for entry in history["log_history"]:
        for key, value in entry.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                expected.setdefault(key, []).append((entry["step"], float(value)))
    assert [s for s, _ in expected["loss"]] == list(range(LOGGING_STEPS, MAX_STEPS, LOGGING_STEPS))
    assert [s for s, _ in expected["eval_loss"]] == [10, 20, 30, 40]
    for key in ("loss", "grad_norm", "learning_rate", "eval_loss"):
        logged = metric_history(uri, f"train/{key}")
        assert [s for s, _ in logged] == [s for s, _ in expected[key]], (key, logged)
        for (_, got), (_, want) in zip(logged, expected[key], strict=True):
            assert math.isclose(got, want, rel_tol=1e-6), (key, got, want)
    for key in train_keys:
        steps = steps_of(uri, key)
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"

    # Rotation: every checkpoint saved and not read is named, at the default log level
    # ("<folder> was deleted before it could be read (rotated away by the trainer?)"),
    # in "frozen" too, where the watcher hears of a checkpoint-N/ folder only once it is
    # gone.
    lines = watcher.lines()
    for step in sorted(set(saved) - set(read)):
        name = f"checkpoint-{step}"
        assert any(name in line and "before it could be read" in line for line in lines), (
            f"{name} was deleted unread and not named:\n{output}"
        )
