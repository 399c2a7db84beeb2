"""transformers' Trainer as users run it: ``trainer.save_model()`` at the end writes the
final model into ``output_dir`` itself (``config.json`` + ``model.safetensors`` beside
the ``checkpoint-N/`` folders). ddsmon reads ``output_dir`` as a folder of checkpoints,
so the final model is a lone weights file there; without ``--model`` it was a failure
("no model factory to load these weights into"), counted toward the setting faults that
stop a watcher, though the config.json it was saved with lies beside it. Now its model
is built from that config.json, as a folder's is, and it is read as what it is: the
weights of the last step again (an alias).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))

from hf_trainer_helpers import metric_steps, run_ddsmon, run_script, save_gpt2_probe, trainer_script
from models import gpt2_probe, tiny_gpt2

TRAIN = trainer_script("""from models import tiny_gpt2
from transformers import Trainer, TrainingArguments

args = TrainingArguments(
    output_dir=sys.argv[1], max_steps=10, save_steps=5, logging_steps=5, eval_strategy="steps",
    eval_steps=5, per_device_train_batch_size=8, report_to=[], use_cpu=True,
    learning_rate=1e-2, disable_tqdm=True, save_only_model=True)
trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(64, 0),
                  eval_dataset=Tokens(16, 1))
trainer.train()
trainer.save_model()
""")


def scan(directory: Path, cwd: Path, *extra: object) -> str:
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    probe = save_gpt2_probe(cwd / "probe.pt")
    done = run_ddsmon(
        "scan", directory, "--probe", probe, "--loss", "ce", "--tracking-uri", uri, "--no-plots",
        *extra, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return " ".join((done.stdout + done.stderr).split())


def test_a_final_model_saved_into_the_folder_of_checkpoints_is_read_from_its_config(
    tmp_path: Path,
) -> None:
    """What the Trainer's output_dir holds, written by save_pretrained: checkpoint-5/ with
    its trainer_state.json, then the final model beside it; scanned without a model."""
    from ddsmon import Config, Reader
    from ddsmon.daemon import Daemon

    out = tmp_path / "out"
    model = tiny_gpt2()
    model.save_pretrained(out / "checkpoint-5")
    (out / "checkpoint-5" / "trainer_state.json").write_text(
        json.dumps({"global_step": 5, "log_history": []})
    )
    model.save_pretrained(out)
    config = Config.for_directory(out, fisher="none", state_dir=tmp_path / "state")
    reader = Reader.from_parts(config.read, probe=gpt2_probe(), loss="ce")
    summary = Daemon(config, sinks=[], reader=reader).scan()
    assert [f.reason for f in summary.failures] == []
    assert summary.read == 1
    assert summary.aliases == [(out / "model.safetensors", 5)]


def test_report_reads_the_final_model_from_the_config_beside_it(tmp_path: Path) -> None:
    """``ddsmon report OUTPUT_DIR/model.safetensors`` with no --model. Before: "no model
    factory: give --model MODULE:FACTORY" (exit 2), though scan builds that file's
    model from the config.json beside it. Now report reads it as scan does: the
    readings of ``GPT2LMHeadModel`` with those weights. A weights file with no
    config.json beside it still needs --model."""
    out = tmp_path / "out"
    model = tiny_gpt2(seed=4)
    model.save_pretrained(out / "checkpoint-5")
    model.save_pretrained(out)
    probe = save_gpt2_probe(tmp_path / "probe.pt")
    done = run_ddsmon(
        "report", out / "model.safetensors", "--probe", probe, "--loss", "ce", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    readings = json.loads(done.stdout)
    assert readings["checkpoint"] == str(out / "model.safetensors")
    assert "transformer.h.0.mlp.c_fc" in readings["layers"], sorted(readings["layers"])
    (out / "config.json").unlink()
    alone = run_ddsmon(
        "report", out / "model.safetensors", "--probe", probe, "--loss", "ce", cwd=tmp_path
    )
    assert alone.returncode == 2 and "no model factory" in alone.stderr, alone.stderr


@pytest.mark.slow
def test_a_trainer_run_ending_in_save_model_is_scanned_without_a_failure(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    run_script(TRAIN, tmp_path, out)
    assert (out / "model.safetensors").exists() and (out / "checkpoint-10").is_dir()
    assert not (out / "checkpoint-10" / "optimizer.pt").exists()  # save_only_model
    said = scan(out, tmp_path)
    assert "out/model.safetensors holds the same weights as step 10 (checkpoint-10)" in said
    assert "2 read, 1 skipped, 0 failed" in said
    assert metric_steps(f"sqlite:///{tmp_path / 'mlflow.db'}", "train/eval_loss") == [5, 10]
