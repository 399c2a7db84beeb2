"""A PEFT adapter saved under a name of its own: ``PeftModel.save_pretrained`` (which a
Trainer's checkpoint calls) writes an adapter not named ``default`` into
``<folder>/<name>/``, so ``get_peft_model(base, config, adapter_name="mine")`` fine-tuned
by a Trainer leaves ``checkpoint-N/mine/adapter_model.safetensors`` and nothing at the
top. Before, every such checkpoint failed "incomplete: no weights file". Now the one
adapter is read from its subfolder as PeftModel.from_pretrained reads that folder;
several adapters are a failure naming them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import gpt2_probe, tiny_gpt2  # noqa: E402
from test_adversary_trainers_peft import assert_same_readings  # noqa: E402

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def _lora(r: int) -> object:
    return peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
        init_lora_weights=False,  # not the identity: the adapter's weights matter
    )  # fmt: skip


def _saved(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """base/ (save_pretrained) and run/checkpoint-7/, a PeftModel's save_pretrained of
    adapters ``names``; the probe in probe.pt."""
    from transformers import GPT2LMHeadModel

    os.chdir(tmp_path)  # adapter_config.json names the base as the relative 'base'
    tiny_gpt2().save_pretrained("base")
    torch.manual_seed(3)
    model = peft.get_peft_model(GPT2LMHeadModel.from_pretrained("base"), _lora(4), names[0])
    for other in names[1:]:
        model.add_adapter(other, _lora(2))
    ckpt = tmp_path / "run" / "checkpoint-7"
    model.save_pretrained(str(ckpt))
    inputs, targets = gpt2_probe()
    torch.save({"inputs": inputs, "targets": targets}, tmp_path / "probe.pt")
    return ckpt


def _report(tmp_path: Path, ckpt: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ddsmon.cli", "report", str(ckpt), "--probe",
           str(tmp_path / "probe.pt"), "--loss", "ce", "--json", "--threads", "1"]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_an_adapter_saved_under_its_own_name_is_read_as_peft_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from transformers import GPT2LMHeadModel

    from ddsmon import compute_signatures

    monkeypatch.chdir(tmp_path)
    ckpt = _saved(tmp_path, ("mine",))
    assert (ckpt / "mine" / "adapter_model.safetensors").exists()
    assert not (ckpt / "adapter_model.safetensors").exists()
    done = _report(tmp_path, ckpt)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["step"] == 7
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.default" in got["layers"]
    base = GPT2LMHeadModel.from_pretrained(str(tmp_path / "base"))
    oracle = peft.PeftModel.from_pretrained(base, str(ckpt / "mine")).eval()
    inputs, targets = gpt2_probe()
    sig = compute_signatures(oracle, inputs, targets, loss="ce", device="cpu")
    assert_same_readings(got["layers"], {n: v.to_dict() for n, v in sig.layers.items()})


def test_several_adapters_in_subfolders_are_a_failure_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = _saved(tmp_path, ("first", "second"))
    done = _report(tmp_path, ckpt)
    assert done.returncode != 0
    said = " ".join(done.stderr.split())
    assert "holds 2 PEFT adapters" in said and "first/, second/" in said, said[-2000:]
    assert "Traceback" not in said
