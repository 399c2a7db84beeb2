"""PEFT / LoRA fine-tunes, as a user runs them: a tiny GPT-2 saved with save_pretrained as
the base, fine-tuned by transformers' Trainer with a LoRA adapter from peft, whose
``checkpoint-N/`` folders hold ``adapter_model.safetensors`` + ``adapter_config.json``
and no model weights; and ``PeftModel.save_pretrained`` folders of any name.

Before, every such checkpoint failed ("no weights file"), with or without ``--model``.
Now the adapter is put into its model with peft's own API: without ``--model``, the
base model ``adapter_config.json`` names (a local folder); with ``--model``, the
PeftModel (or the base model) the factory builds. The oracle is peft's own loading,
``PeftModel.from_pretrained(base, checkpoint)``, read in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_scripts"))

from hf_trainer_helpers import (
    ENV,
    metric_steps,
    run_ddsmon,
    run_script,
    save_gpt2_probe,
    trainer_script,
)
from models import gpt2_probe, tiny_gpt2

TRAIN = trainer_script("""from models import tiny_gpt2
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments
from peft import LoraConfig, get_peft_model

base_dir, out = sys.argv[1], sys.argv[2]
tiny_gpt2().save_pretrained(base_dir)
model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), LoraConfig(
    r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True))
args = TrainingArguments(
    output_dir=out, max_steps=10, save_steps=5, logging_steps=5, eval_strategy="steps",
    eval_steps=5, per_device_train_batch_size=8, report_to=[], use_cpu=True,
    learning_rate=1e-2, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(16, 1))
trainer.train()
trainer.save_model()  # the final adapter, into output_dir beside checkpoint-N/
""")

FACTORIES = """
from transformers import GPT2LMHeadModel
from peft import LoraConfig, get_peft_model

BASE = {base!r}


def base():
    return GPT2LMHeadModel.from_pretrained(BASE)


def lora(r=4):
    return get_peft_model(base(), LoraConfig(
        r=r, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))


def lora_r8():
    return lora(8)
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real LoRA fine-tune: base/ (save_pretrained), run/checkpoint-{5,10}/, probe.pt,
    factories.py (``base``: the base from its folder; ``lora``: the PeftModel)."""
    root = tmp_path_factory.mktemp("lora")
    base, run = root / "base", root / "run"
    run_script(TRAIN, root, base, run)
    probe = save_gpt2_probe(root / "probe.pt")
    factories = root / "factories.py"
    factories.write_text(FACTORIES.format(base=str(base)))
    return {"root": root, "base": base, "run": run, "probe": probe, "factories": factories}


def report(lora_run: dict[str, Path], *extra: object) -> dict:
    ckpt = lora_run["run"] / "checkpoint-10"
    done = run_ddsmon(
        "report", ckpt, "--probe", lora_run["probe"], "--loss", "ce", "--json", *extra,
        cwd=lora_run["root"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def peft_oracle(lora_run: dict[str, Path]) -> dict[str, dict]:
    """checkpoint-10 loaded by peft itself, read by compute_signatures."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from ddsmon import compute_signatures

    base = GPT2LMHeadModel.from_pretrained(str(lora_run["base"]))
    model = PeftModel.from_pretrained(base, str(lora_run["run"] / "checkpoint-10")).eval()
    inputs, targets = gpt2_probe()
    sig = compute_signatures(model, inputs, targets, loss="ce", device="cpu")
    return {name: layer.to_dict() for name, layer in sig.layers.items()}


READINGS = ("sigma_min", "sigma_max", "lambda_min", "lambda_max", "logdet", "param_lambda_min")


def assert_same_readings(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        for key in READINGS:
            expected = want[name][key]  # None where a layer has no such reading (act)
            if expected is None:
                assert got[name][key] is None, (name, key)
            else:
                assert got[name][key] == pytest.approx(expected, rel=1e-9), (name, key)


@pytest.mark.slow
def test_lora_trainer_checkpoints_are_read_without_a_model_as_peft_loads_them(
    lora_run: dict[str, Path],
) -> None:
    ckpt = lora_run["run"] / "checkpoint-10"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert not (ckpt / "model.safetensors").exists()
    got = report(lora_run)
    assert got["step"] == 10 and got["meta"]["eval_loss"] > 0
    layers = got["layers"]
    # the adapter's own modules are told apart from the layer they adapt
    adapted = "base_model.model.transformer.h.0.attn.c_attn"
    for part in ("base_layer", "lora_A.default", "lora_B.default"):
        assert f"{adapted}.{part}" in layers
    assert layers[f"{adapted}.lora_A.default"]["d"] == 4  # r
    assert_same_readings(layers, peft_oracle(lora_run))


@pytest.mark.slow
def test_lora_trainer_run_is_scanned_into_mlflow_at_its_steps(
    lora_run: dict[str, Path], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_ddsmon(
        "-v", "scan", lora_run["run"], "--probe", lora_run["probe"], "--loss", "ce",
        "--tracking-uri", uri, "--no-plots", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join((done.stdout + done.stderr).split())
    # the final save_model's adapter in run/ itself: the weights of step 10 again
    assert "run/adapter_model.safetensors holds the same weights as step 10" in said
    assert "2 read, 1 skipped, 0 failed, 0 events, 1 aliases" in said
    assert "LORA adapter (r=4" in done.stderr  # which weights were read, once, at INFO (-v)
    key = "dds/lambda_ratio/base_model.model.transformer.h.1.attn.c_attn.lora_B.default"
    assert metric_steps(uri, key) == [5, 10]
    assert metric_steps(uri, "train/eval_loss") == [5, 10]


@pytest.mark.slow
def test_a_peft_model_factory_and_a_base_model_factory_read_what_peft_loads(
    lora_run: dict[str, Path],
) -> None:
    want = peft_oracle(lora_run)
    for factory in ("lora", "base"):
        got = report(lora_run, "--model", f"{lora_run['factories']}:{factory}")
        assert_same_readings(got["layers"], want)


@pytest.mark.slow
def test_an_adapter_of_another_rank_than_the_factorys_names_the_key_and_shapes(
    lora_run: dict[str, Path],
) -> None:
    done = run_ddsmon(
        "report", lora_run["run"] / "checkpoint-10", "--probe", lora_run["probe"],
        "--loss", "ce", "--model", f"{lora_run['factories']}:lora_r8", cwd=lora_run["root"],
    )  # fmt: skip
    assert done.returncode == 1
    err = done.stderr
    assert "checkpoint-10" in err and "adapter_model.safetensors does not fit" in err
    assert "lora_A.default.weight" in err and "torch.Size([4, 32])" in err


def save_adapter(folder: Path, base_name: str | None) -> None:
    """What ``PeftModel.save_pretrained(folder)`` writes for the tiny GPT-2, naming
    ``base_name`` as its base (peft writes the model's name_or_path there)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2()
    if base_name is not None:
        model.name_or_path = base_name
        model.config._name_or_path = base_name
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    # save_embedding_layers=False: "auto" looks the base up on the Hub (no network here)
    get_peft_model(model, config).save_pretrained(str(folder), save_embedding_layers=False)


def test_a_save_pretrained_adapter_folder_is_one_checkpoint_waiting_for_its_config(
    tmp_path: Path,
) -> None:
    from ddsmon.checkpoints import check_complete, checkpoint_for, discover

    save_adapter(tmp_path / "step_5", "base")
    assert sorted(p.name for p in (tmp_path / "step_5").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    (ref,) = discover(tmp_path)
    assert (ref.path.name, ref.kind, ref.name_step) == ("step_5", "hf", 5)
    assert check_complete(ref) is None
    config = ref.path / "adapter_config.json"
    config.write_text(config.read_text()[:20])  # peft writes it after the weights
    assert "adapter_config.json is not valid JSON" in str(check_complete(ref))
    text = config.read_text()
    config.unlink()  # the weights alone: not a checkpoint of their own, nothing yet
    assert discover(tmp_path) == []
    weights = ref.path / "adapter_model.safetensors"
    assert checkpoint_for(weights, tmp_path) is None
    config.write_text(text)
    assert checkpoint_for(config, tmp_path) == ref


def test_a_final_adapter_saved_into_the_watched_folder_is_found_by_its_config(
    tmp_path: Path,
) -> None:
    """A Trainer's final save_model writes the adapter into output_dir itself, beside
    its checkpoint-N/ folders: the weights, then adapter_config.json."""
    from ddsmon.checkpoints import checkpoint_for, discover

    save_adapter(tmp_path / "out", "base")
    (tmp_path / "out" / "checkpoint-5").mkdir()
    weights, config = (
        tmp_path / "out" / n for n in ("adapter_model.safetensors", "adapter_config.json")
    )
    text = config.read_text()
    config.unlink()
    assert checkpoint_for(weights, tmp_path / "out") is None  # peft is still writing
    config.write_text(text)
    want = checkpoint_for(config, tmp_path / "out")
    assert want is not None and (want.path, want.kind) == (weights, "safetensors")
    assert want in discover(tmp_path / "out")


def test_an_adapter_whose_base_is_a_hub_id_says_what_to_pass(tmp_path: Path) -> None:
    save_adapter(tmp_path / "ckpts" / "step_5", "openai-community/gpt2")
    save_gpt2_probe(tmp_path / "probe.pt")
    done = run_ddsmon(
        "report", tmp_path / "ckpts" / "step_5", "--probe", tmp_path / "probe.pt", "--loss", "ce",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    err = " ".join(done.stderr.split())
    assert "step_5" in err and "'openai-community/gpt2', is not a local folder" in err
    assert "pass --model MODULE:FACTORY returning the base model" in err


def test_an_adapter_read_without_peft_installed_says_to_install_it(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    save_adapter(tmp_path / "ckpts" / "step_5", str(tmp_path / "base"))
    save_gpt2_probe(tmp_path / "probe.pt")
    no_peft = "import sys, runpy; sys.modules['peft'] = None; runpy.run_module('ddsmon.cli', run_name='__main__')"
    done = subprocess.run(
        [sys.executable, "-c", no_peft, "report", str(tmp_path / "ckpts" / "step_5"),
         "--probe", str(tmp_path / "probe.pt"), "--loss", "ce", "--threads", "1"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode != 0
    err = " ".join(done.stderr.split())
    assert "step_5 is a PEFT adapter checkpoint (adapter_model.safetensors" in err
    assert "pip install peft" in err and "Traceback" not in err


LLAMA = trainer_script("""torch.manual_seed(0)
from models import VOCAB
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from peft import LoraConfig, get_peft_model

base_dir, out = sys.argv[1], sys.argv[2]
LlamaForCausalLM(LlamaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
)).save_pretrained(base_dir)
model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(
    task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
    modules_to_save=["lm_head"]))
args = TrainingArguments(
    output_dir=out, max_steps=5, save_steps=5, per_device_train_batch_size=8, report_to=[],
    use_cpu=True, learning_rate=1e-2, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=Tokens(64, 0)).train()
""")


@pytest.mark.slow
def test_a_llama_lora_with_a_task_type_and_modules_to_save_is_read_as_peft_loads_it(
    tmp_path: Path,
) -> None:
    """task_type CAUSAL_LM (peft's PeftModelForCausalLM) and a head trained whole
    (modules_to_save: its copy is the one that runs)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from ddsmon import compute_signatures

    base, run = tmp_path / "base", tmp_path / "run"
    run_script(LLAMA, tmp_path, base, run)
    probe = save_gpt2_probe(tmp_path / "probe.pt")
    done = run_ddsmon(
        "report", run / "checkpoint-5", "--probe", probe, "--loss", "ce", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    layers = json.loads(done.stdout)["layers"]
    assert "base_model.model.lm_head.modules_to_save.default" in layers
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(str(base)), str(run / "checkpoint-5")
    )
    inputs, targets = gpt2_probe()
    sig = compute_signatures(model.eval(), inputs, targets, loss="ce", device="cpu")
    assert_same_readings(layers, {name: layer.to_dict() for name, layer in sig.layers.items()})
