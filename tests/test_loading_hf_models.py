"""Which model a Hugging Face checkpoint is read into: real transformers models built
from tiny configs, saved with ``save_pretrained`` to real files, read by
``load_checkpoint`` (and the CLI) as scan, watch and report read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddsmon.checkpoints import classify
from ddsmon.errors import CheckpointError
from ddsmon.loading import load_checkpoint

transformers = pytest.importorskip("transformers")


def _tiny_bert_config():  # -> transformers.BertConfig
    return transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip


class MyBertClassifier(transformers.BertForSequenceClassification):
    """A user's subclass (a custom head or loss would go here): transformers has no
    class of this name, and ``save_pretrained`` writes it into config.json."""


def test_an_architecture_transformers_does_not_have_is_refused_by_name(tmp_path: Path) -> None:
    """Before: ``architectures: ["MyBertClassifier"]`` was built as the headless
    ``AutoModel`` (a BertModel), the checkpoint's ``bert.`` prefix stripped and its
    trained ``classifier.`` dropped: another model read with no error. Now a one-line
    CheckpointError names config.json and the architecture and says to pass --model, for
    a Trainer's folder and for the final model beside its config.json alike."""
    torch.manual_seed(0)
    model = MyBertClassifier(_tiny_bert_config())
    model.save_pretrained(tmp_path / "out" / "checkpoint-2")
    model.save_pretrained(tmp_path / "out")  # trainer.save_model(): beside checkpoint-2/
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "MyBertClassifier"
    ]
    for path in (tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "model.safetensors"):
        ref = classify(path, tmp_path / "out")
        assert ref is not None, path
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(ref, None)
        reason = caught.value.reason
        assert "config.json names the architecture 'MyBertClassifier'" in reason, reason
        assert "pass --model MODULE:FACTORY" in reason and "\n" not in reason, reason
    # with --model, the user's class is read, its head included
    ref = classify(tmp_path / "out" / "checkpoint-2", tmp_path / "out")
    assert ref is not None
    loaded = load_checkpoint(ref, lambda: MyBertClassifier(_tiny_bert_config()))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_a_config_without_architectures_is_still_built_as_automodel(tmp_path: Path) -> None:
    """No ``architectures`` in config.json: the model is ``AutoModel``'s, as before."""
    torch.manual_seed(1)
    model = transformers.BertModel(_tiny_bert_config())
    folder = tmp_path / "checkpoint-2"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    ref = classify(folder, tmp_path)
    assert ref is not None
    loaded = load_checkpoint(ref, None)
    assert type(loaded.model) is transformers.BertModel
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
