"""Hugging Face weights variants: ``save_pretrained(..., variant="ema")`` writes
``model.ema.safetensors`` (sharded: ``model.ema-00001-of-0000N.safetensors`` and
``model.safetensors.index.ema.json``; older transformers ``pytorch_model.ema.bin``).
Folders of them are read with no --model by a real ``ddsmon scan``, at their steps, and
read back from the MLflow store; the plain weights win over a variant beside them, and
several variants with no plain weights is a clear refusal naming them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ddsmon.checkpoints import check_complete, classify, discover, hf_weights
from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "trainer_scripts"))

pytest.importorskip("transformers")


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_the_names_transformers_writes_for_a_variant(tmp_path: Path) -> None:
    from models import tiny_gpt2

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "single", variant="ema")
    model.save_pretrained(tmp_path / "sharded", variant="ema", max_shard_size="20KB")
    assert "model.ema.safetensors" in _names(tmp_path / "single")
    assert "model.safetensors.index.ema.json" in _names(tmp_path / "sharded")
    assert hf_weights(_names(tmp_path / "single")).name == "model.ema.safetensors"
    chosen = hf_weights(_names(tmp_path / "sharded"))
    assert (chosen.name, chosen.variant) == ("model.safetensors.index.ema.json", "ema")
    for folder in ("single", "sharded"):
        ref = classify(tmp_path / folder, tmp_path)
        assert ref is not None and ref.kind == "hf", folder
        assert check_complete(ref) is None, folder
    # the shards are part of their folder, never checkpoints of their own
    assert [r.path.name for r in discover(tmp_path)] == ["sharded", "single"]
    # older transformers' torch names, by transformers' own _add_variant
    from transformers.modeling_utils import _add_variant

    names = [_add_variant(n, "fp16") for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")]
    assert names == ["pytorch_model.fp16.bin", "pytorch_model.bin.index.fp16.json"]
    assert hf_weights(["config.json", names[0]]).variant == "fp16"
    assert (
        hf_weights(["config.json", names[1], "pytorch_model.fp16-00001-of-00002.bin"]).name
        == names[1]
    )


def test_several_variants_and_no_plain_weights_are_refused_by_name(tmp_path: Path) -> None:
    from models import tiny_gpt2

    model = tiny_gpt2()
    folder = tmp_path / "step_3"
    model.save_pretrained(folder, variant="ema")
    model.save_pretrained(folder, variant="fp16")
    ref = classify(folder, tmp_path)
    assert ref is not None and ref.kind == "hf"
    reason = check_complete(ref)
    assert reason is not None and "ema, fp16" in reason, reason


def test_plain_shards_still_being_written_beside_a_variant_are_waited_for(tmp_path: Path) -> None:
    """A variant saved, then the plain weights being saved sharded beside it (shards
    written, their index not yet): the plain weights win once complete, so the folder is
    not complete yet (it was read from the variant), and is read from them once the
    index is there."""
    from models import tiny_gpt2

    model = tiny_gpt2()
    folder = tmp_path / "step_4"
    model.save_pretrained(folder, variant="ema")
    model.save_pretrained(tmp_path / "plain", max_shard_size="20KB")
    shards = sorted(n for n in _names(tmp_path / "plain") if n.endswith(".safetensors"))
    assert len(shards) > 1
    for name in shards:
        os.replace(tmp_path / "plain" / name, folder / name)
    ref = classify(folder, tmp_path)
    assert ref is not None and ref.kind == "hf"
    assert check_complete(ref) == "weight shards without their index yet (still being written)"
    os.replace(
        tmp_path / "plain" / "model.safetensors.index.json", folder / "model.safetensors.index.json"
    )
    assert check_complete(ref) is None
    chosen = hf_weights(_names(folder))
    assert (chosen.name, chosen.variant) == ("model.safetensors.index.json", None)
    assert chosen.beside == ("model.ema.safetensors",)


def test_variant_folders_are_scanned_without_a_model_at_their_steps(tmp_path: Path) -> None:
    from models import gpt2_probe, tiny_gpt2

    out = tmp_path / "out"
    model = tiny_gpt2()
    model.save_pretrained(out / "step_4", variant="ema")
    model.save_pretrained(out / "step_8", variant="ema", max_shard_size="20KB")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(out / "step_12")  # the plain weights...
    tiny_gpt2().save_pretrained(out / "step_12", variant="ema")  # ...and an EMA beside them
    probe = tmp_path / "probe.pt"
    inputs, targets = gpt2_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "-v", "scan", str(out), "--probe", str(probe),
         "--loss", "ce", "--tracking-uri", uri, "--no-plots", "--threads", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 read" in proc.stderr and "0 failed" in proc.stderr, proc.stderr
    assert "weights variant 'ema'" in proc.stderr, proc.stderr  # the source: INFO (-v)
    assert "not read beside it: model.ema.safetensors" in proc.stderr, proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, CHECKPOINT_METRIC))
    assert steps == [4, 8, 12]
