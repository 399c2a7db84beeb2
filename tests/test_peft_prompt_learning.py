"""PEFT adapters ddsmon does not read, said as such.

peft's prompt learning (prompt tuning's ``prompt_embeddings``, prefix tuning) trains
virtual tokens fed to the model, not weights of its layers. Before, such an adapter
failed with "adapter_model.safetensors: 1 keys the model has no place for
(prompt_embeddings)": vague, and ungrammatical. Now the one line names the file and says
this adapter type is not supported and why; an adapter with one key the model lacks says
"1 key". Real peft adapters on a tiny GPT-2 saved with save_pretrained, the real CLI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))

from hf_trainer_helpers import ENV  # noqa: E402
from models import gpt2_probe, tiny_gpt2  # noqa: E402


def _report(folder: Path, probe: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "report", str(folder), "--probe", str(probe),
         "--loss", "ce", "--threads", "1"],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def _base_and_probe(tmp_path: Path) -> tuple[Path, Path]:
    base, probe = tmp_path / "base", tmp_path / "probe.pt"
    tiny_gpt2().save_pretrained(base)
    inputs, targets = gpt2_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    return base, probe


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_a_prompt_learning_adapter_is_said_not_supported(tmp_path: Path, kind: str) -> None:
    from transformers import GPT2LMHeadModel

    base, probe = _base_and_probe(tmp_path)
    config = (
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        if kind == "PROMPT_TUNING"
        else peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    adapter = tmp_path / "adapter"
    peft.get_peft_model(GPT2LMHeadModel.from_pretrained(base), config).save_pretrained(adapter)
    done = _report(adapter, probe, tmp_path)
    assert done.returncode != 0, done.stdout
    said = [line for line in done.stderr.splitlines() if "not supported" in line]
    assert len(said) == 1, done.stderr
    assert f"{adapter}: adapter_model.safetensors: a {kind} adapter" in said[0], said
    assert "prompt learning" in said[0] and "virtual tokens" in said[0], said
    assert "no place for" not in done.stderr, done.stderr


def test_an_adapter_key_the_model_lacks_is_one_key(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    base, probe = _base_and_probe(tmp_path)
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(GPT2LMHeadModel.from_pretrained(base), config).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, weights)
    done = _report(adapter, probe, tmp_path)
    assert done.returncode != 0, done.stdout
    assert "adapter_model.safetensors: 1 key the model has no place for" in done.stderr, done.stderr
