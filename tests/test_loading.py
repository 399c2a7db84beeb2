"""ddsmon.loading: factories, probes and checkpoints, with real files in tmp_path."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import pickle
import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixtures_models import LitWrapper, TiedMLP, mlp, mlp_probe, tied_mlp
from safetensors.torch import save_file
from torch import nn

from ddsmon.errors import CheckpointError, ConfigError, KeysMismatch
from ddsmon.loading import (
    VANISHED,
    LoadedCheckpoint,
    load_checkpoint,
    load_probe,
    resolve_callable,
    resolve_factory,
)

FIXTURES = Path(__file__).with_name("fixtures_models.py")


@dataclass
class Ref:
    """Stands in for ddsmon.checkpoints.CheckpointRef (duck-typed: path and kind)."""

    path: Path
    kind: str


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def wider() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def deeper() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 4))


def dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=folder)


class Touch:
    """Unpickling this creates ``marker``: the stand-in for code a hostile file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class System:
    """``os.system("touch marker")``: the pickle imports ``posix.system``, a blocked module."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# --------------------------------------------------------------------------- factories


def test_dotted_factory_builds_a_fresh_module_each_call() -> None:
    factory = resolve_factory("fixtures_models:mlp")
    a, b = factory(), factory()
    assert isinstance(a, nn.Sequential) and a is not b
    assert [type(m) for m in a] == [nn.Linear, nn.ReLU, nn.Linear]
    assert "fixtures_models:mlp" in repr(factory)


def test_file_factory_and_dotted_attribute(tmp_path: Path) -> None:
    (tmp_path / "helper_mod_ab12.py").write_text("WIDTH = 5\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "from helper_mod_ab12 import WIDTH\n"
        "class Builder:\n"
        "    @staticmethod\n"
        "    def build():\n"
        "        return nn.Linear(3, WIDTH)\n"
    )
    model = resolve_factory(f"{tmp_path / 'net.py'}:Builder.build")()
    assert isinstance(model, nn.Linear) and model.out_features == 5
    assert isinstance(resolve_factory(f"{FIXTURES}:mlp")(), nn.Sequential)


def test_module_instance_is_copied_per_call(tmp_path: Path) -> None:
    (tmp_path / "inst.py").write_text("from torch import nn\nmodel = nn.Linear(2, 2)\n")
    factory = resolve_factory(f"{tmp_path / 'inst.py'}:model")
    a, b = factory(), factory()
    assert a is not b and same_weights(a, b)


def test_module_in_working_directory_imports_without_python_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd_models_q7.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Tanh()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_models_q7", raising=False)
    assert isinstance(resolve_factory("cwd_models_q7:make")(), nn.Tanh)
    sys.modules.pop("cwd_models_q7", None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "no_such_pkg_zz.sub:f",
            r"cannot import module 'no_such_pkg_zz.sub' \(ModuleNotFoundError: ",
        ),
        ("fixtures_models:make_model", r"module 'fixtures_models' has no attribute 'make_model'"),
        ("fixtures_models", r"is not MODULE:NAME"),
        ("fixtures_models:", r"is not MODULE:NAME"),
        ("not a module:f", r"is not a dotted module name"),
        ("missing/dir/x.py:f", r"factory file 'missing/dir/x.py' does not exist"),
        ("fixtures_models:__all__", r"'fixtures_models:__all__' is not callable \(it is tuple\)"),
    ],
)
def test_factory_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_factory(spec)


def test_file_factory_errors_name_file_and_attribute(tmp_path: Path) -> None:
    good = tmp_path / "x.py"
    good.write_text("VALUE = 3\n")
    with pytest.raises(ConfigError, match=r"'.*x\.py' has no attribute 'make_model'"):
        resolve_factory(f"{good}:make_model")
    bad = tmp_path / "broken_syntax.py"
    bad.write_text("def f(:\n")
    with pytest.raises(ConfigError, match=r"cannot load '.*broken_syntax\.py' \(SyntaxError"):
        resolve_factory(f"{bad}:f")
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(ConfigError, match=r"RuntimeError: import-time failure"):
        resolve_factory(f"{raising}:f")


def test_factory_call_errors() -> None:
    with pytest.raises(
        ConfigError,
        match=r"factory 'fixtures_models:not_a_module' returned int, expected torch.nn.Module",
    ):
        resolve_factory("fixtures_models:not_a_module")()
    with pytest.raises(ConfigError, match=r"raised ValueError: the factory is broken on purpose"):
        resolve_factory("fixtures_models:broken_factory")()


def test_resolve_callable_returns_the_callable_itself(tmp_path: Path) -> None:
    src = tmp_path / "losses_x.py"
    src.write_text("def per_sample(out, y):\n    return (out - y) ** 2\n")
    fn = resolve_callable(f"{src}:per_sample", "loss")
    assert fn(3, 1) == 4
    with pytest.raises(ConfigError, match=r"'.*losses_x\.py' has no attribute 'missing'"):
        resolve_callable(f"{src}:missing", "loss")
    with pytest.raises(ConfigError, match=r"^loss 'fixtures_models:__all__' is not callable"):
        resolve_callable("fixtures_models:__all__", "loss")


# --------------------------------------------------------------------------- probes


def test_probe_file_round_trip(tmp_path: Path) -> None:
    inputs, targets = mlp_probe()
    torch.save({"inputs": inputs, "targets": targets, "note": "kept"}, tmp_path / "probe.pt")
    got_x, got_y = load_probe(str(tmp_path / "probe.pt"))
    assert torch.equal(got_x, inputs) and torch.equal(got_y, targets)
    assert got_x.dtype == torch.float32 and got_y.dtype == torch.long and got_x.shape == (32, 8)


def test_probe_safetensors_and_function(tmp_path: Path) -> None:
    inputs, targets = mlp_probe()
    save_file({"inputs": inputs, "targets": targets}, tmp_path / "probe.safetensors")
    got_x, got_y = load_probe(str(tmp_path / "probe.safetensors"))
    assert torch.equal(got_x, inputs) and torch.equal(got_y, targets)
    got_x, got_y = load_probe("fixtures_models:mlp_probe")
    assert torch.equal(got_x, inputs) and torch.equal(got_y, targets)
    got_x, _ = load_probe(f"{FIXTURES}:mlp_probe")
    assert torch.equal(got_x, inputs)


def test_probe_with_keyword_inputs(tmp_path: Path) -> None:
    ids = torch.randint(0, 10, (4, 6))
    probe = {"inputs": {"input_ids": ids, "attention_mask": torch.ones(4, 6)}, "targets": ids}
    torch.save(probe, tmp_path / "kw.pt")
    inputs, targets = load_probe(str(tmp_path / "kw.pt"))
    assert set(inputs) == {"input_ids", "attention_mask"} and torch.equal(targets, ids)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"inputs": torch.zeros(3, 2)}, r"lacks the key 'targets' \(it holds 'inputs'\)"),
        ({"x": 1}, r"lacks the keys 'inputs' and 'targets' \(it holds 'x'\)"),
        (torch.zeros(3), r"holds a Tensor; expected a dict with 'inputs' and 'targets'"),
        ({"inputs": "text", "targets": torch.zeros(3)}, r"inputs holds no tensor \(it is a str\)"),
        ({"inputs": torch.zeros(3, 2), "targets": [1, 2, 3]}, r"targets holds no tensor"),
        (
            {"inputs": torch.zeros(32, 8), "targets": torch.zeros(31, dtype=torch.long)},
            r"batch sizes disagree: inputs has 32, targets has 31 rows",
        ),
        ({"inputs": torch.zeros(0, 8), "targets": torch.zeros(0)}, r"the probe is empty"),
        ({"inputs": torch.tensor(1.0), "targets": torch.zeros(3)}, r"no tensor with a batch axis"),
        ({"inputs": {1: torch.zeros(2)}, "targets": torch.zeros(2)}, r"non-string key 1"),
    ],
)
def test_probe_file_content_errors(tmp_path: Path, content: object, message: str) -> None:
    torch.save(content, tmp_path / "probe.pt")
    with pytest.raises(ConfigError, match=r"probe file '.*probe\.pt'.*" + message):
        load_probe(str(tmp_path / "probe.pt"))


def test_probe_function_errors(tmp_path: Path) -> None:
    src = tmp_path / "probes.py"
    src.write_text(
        "import torch\n"
        "def boom():\n    raise KeyError('no data')\n"
        "def odd():\n    return {'inputs': torch.zeros(2, 2), 'targets': {'y': object()}}\n"
        "def pair():\n    return torch.zeros(5, 2), torch.zeros(5)\n"
    )
    with pytest.raises(ConfigError, match=r"probe function '.*probes\.py:boom' raised KeyError"):
        load_probe(f"{src}:boom")
    with pytest.raises(ConfigError, match=r"targets\['y'\] is a object; expected tensors"):
        load_probe(f"{src}:odd")
    x, y = load_probe(f"{src}:pair")
    assert x.shape == (5, 2) and y.shape == (5,)
    with pytest.raises(ConfigError, match=r"has no attribute 'missing'"):
        load_probe(f"{src}:missing")


def test_probe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"probe file '.*nope\.pt' does not exist"):
        load_probe(str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_probe(str(tmp_path))
    inputs, targets = mlp_probe()
    torch.save({"inputs": inputs, "targets": targets}, tmp_path / "p.pt")
    data = (tmp_path / "p.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"'.*cut\.pt': truncated or corrupt torch zip archive"):
        load_probe(str(tmp_path / "cut.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty file \(0 bytes\)"):
        load_probe(str(tmp_path / "empty.pt"))


def test_hostile_probe_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "probe-owned"
    inputs, targets = mlp_probe()
    torch.save({"inputs": inputs, "targets": targets, "x": Touch(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"refused to unpickle.*--trust-checkpoints"):
        load_probe(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    load_probe(str(tmp_path / "evil.pt"), trust=True)  # the file really is hostile:
    assert marker.exists()


# --------------------------------------------------------------------------- torch files


def test_bare_state_dict_loads_on_cpu_in_eval_mode(tmp_path: Path) -> None:
    src = mlp(seed=1)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    loaded = load_checkpoint(Ref(tmp_path / "bare.pt", "torch"), mlp)
    assert isinstance(loaded, LoadedCheckpoint)
    assert same_weights(loaded.model, src) and not same_weights(loaded.model, mlp())
    assert loaded.step is None and loaded.meta == {}
    assert not loaded.model.training
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "module"])
def test_state_dict_under_usual_keys_with_step_and_meta(tmp_path: Path, key: str) -> None:
    src = mlp(seed=2)
    optim = torch.optim.Adam(src.parameters())
    src(torch.zeros(2, 8)).sum().backward()
    optim.step()
    content = {
        key: src.state_dict(),
        "optimizer": optim.state_dict(),
        "step": 120,
        "val_acc": 0.75,
        "train_loss": torch.tensor(0.25),
        "flag": True,
        "name": "run-1",
    }
    torch.save(content, tmp_path / "c.pth")
    loaded = load_checkpoint(Ref(tmp_path / "c.pth", "torch"), mlp)
    assert same_weights(loaded.model, src)
    assert loaded.step == 120
    assert loaded.meta == {"val_acc": 0.75, "train_loss": 0.25}


@pytest.mark.parametrize(
    ("content", "step"),
    [
        ({"iteration": torch.tensor(42)}, 42),
        ({"global_step": 7.0}, 7),
        ({"step": -1, "global_step": 9}, 9),
        ({"step": 2.5}, None),
        ({"step": True}, None),
        ({"step": torch.tensor([1, 2])}, None),
        ({"step": "31"}, 31),
        ({"global_steps": 800, "global_samples": 6400}, 800),  # DeepSpeed's model states
    ],
)
def test_step_from_content(tmp_path: Path, content: dict, step: int | None) -> None:
    torch.save({"model": mlp().state_dict(), **content}, tmp_path / "s.pt")
    assert load_checkpoint(Ref(tmp_path / "s.pt", "torch"), mlp).step == step


def test_lightning_checkpoint(tmp_path: Path) -> None:
    lit = LitWrapper(seed=3)
    ckpt = {
        "epoch": 4,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": lit.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.001},
    }
    torch.save(ckpt, tmp_path / "epoch=4-step=1200.ckpt")
    loaded = load_checkpoint(Ref(tmp_path / "epoch=4-step=1200.ckpt", "lightning"), mlp)
    assert same_weights(loaded.model, lit.model)
    assert loaded.step == 1200 and loaded.meta == {"epoch": 4.0}
    # The wrapper itself as the model: keys already match, no prefix is stripped.
    whole = load_checkpoint(Ref(tmp_path / "epoch=4-step=1200.ckpt", "lightning"), LitWrapper)
    assert same_weights(whole.model, lit)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model.module."])
def test_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    src = mlp(seed=4)
    torch.save({f"{prefix}{k}": v for k, v in src.state_dict().items()}, tmp_path / "p.pt")
    assert same_weights(load_checkpoint(Ref(tmp_path / "p.pt", "torch"), mlp).model, src)


def test_compiled_modules_on_either_side(tmp_path: Path) -> None:
    src = mlp(seed=5)
    compiled = torch.compile(src)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    torch.save({"model": compiled.state_dict()}, tmp_path / "compiled.pt")
    assert same_weights(load_checkpoint(Ref(tmp_path / "compiled.pt", "torch"), mlp).model, src)
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    loaded = load_checkpoint(Ref(tmp_path / "plain.pt", "torch"), lambda: torch.compile(mlp()))
    assert same_weights(loaded.model._orig_mod, src)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    torch.save({"state_dict": mlp().state_dict()}, tmp_path / "small.pt")
    with pytest.raises(
        CheckpointError,
        match=r"small\.pt: state dict under \['state_dict'\] does not match the model: "
        r"missing 2 keys \('4\.weight', '4\.bias'\)$",
    ):
        load_checkpoint(Ref(tmp_path / "small.pt", "torch"), deeper)
    torch.save(deeper().state_dict(), tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"unexpected 2 keys \('4\.weight', '4\.bias'\)"):
        load_checkpoint(Ref(tmp_path / "big.pt", "torch"), mlp)
    torch.save({"enc.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError,
        match=r"no key of the model in the checkpoint: the model expects 4 keys "
        r"\('0\.weight', '0\.bias', '2\.weight', '2\.bias'\); the state dict at the top level "
        r"has 1 key \('enc\.weight'\)",
    ):
        load_checkpoint(Ref(tmp_path / "other.pt", "torch"), mlp)


def test_long_key_lists_are_cut_with_counts(tmp_path: Path) -> None:
    def many() -> nn.Module:
        return nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])

    torch.save({"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}, tmp_path / "few.pt")
    with pytest.raises(
        CheckpointError,
        match=r"missing 18 keys \('1\.weight', '1\.bias', '2\.weight', '2\.bias', '3\.weight', \.\.\.\)",
    ):
        load_checkpoint(Ref(tmp_path / "few.pt", "torch"), many)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    torch.save({"model": mlp().state_dict()}, tmp_path / "narrow.pt")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch at 3 keys: '0\.weight': checkpoint \[16, 8\] vs model \[32, 8\], "
        r"'0\.bias': checkpoint \[16\] vs model \[32\], '2\.weight': checkpoint \[4, 16\] vs model \[4, 32\]",
    ):
        load_checkpoint(Ref(tmp_path / "narrow.pt", "torch"), wider)


def test_tied_weights_may_be_omitted(tmp_path: Path) -> None:
    src = tied_mlp(seed=6)
    state = {k: v for k, v in src.state_dict().items() if k != "head.weight"}
    torch.save(state, tmp_path / "tied.pt")
    loaded = load_checkpoint(Ref(tmp_path / "tied.pt", "torch"), tied_mlp).model
    assert isinstance(loaded, TiedMLP)
    assert torch.equal(loaded.head.weight, src.encoder.weight)
    assert loaded.head.weight is loaded.encoder.weight
    state.pop("mid.bias")
    torch.save(state, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match=r"missing 1 key \('mid\.bias'\)"):
        load_checkpoint(Ref(tmp_path / "untied.pt", "torch"), tied_mlp)


def test_ambiguous_matches_are_refused(tmp_path: Path) -> None:
    torch.save(
        {"student": mlp(1).state_dict(), "teacher": mlp(2).state_dict()}, tmp_path / "two.pt"
    )
    with pytest.raises(
        CheckpointError,
        match=r"several places \(under \['student'\], under \['teacher'\]\); cannot tell which",
    ):
        load_checkpoint(Ref(tmp_path / "two.pt", "torch"), mlp)
    # A known container key settles it.
    torch.save({"model": mlp(1).state_dict(), "ema": mlp(2).state_dict()}, tmp_path / "ema.pt")
    assert same_weights(load_checkpoint(Ref(tmp_path / "ema.pt", "torch"), mlp).model, mlp(1))
    stack = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    torch.save(stack.state_dict(), tmp_path / "stack.pt")
    with pytest.raises(CheckpointError, match=r"several prefixes \('0\.', '2\.'\)"):
        load_checkpoint(Ref(tmp_path / "stack.pt", "torch"), lambda: nn.Linear(4, 4))


def test_no_state_dict_found(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "o.pt")
    with pytest.raises(
        CheckpointError, match=r"o\.pt: no state dict found: the checkpoint holds no tensors"
    ):
        load_checkpoint(Ref(tmp_path / "o.pt", "torch"), mlp)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(
        CheckpointError, match=r"no state dict found: the checkpoint holds no tensors"
    ):
        load_checkpoint(Ref(tmp_path / "list.pt", "torch"), mlp)


def test_no_state_dict_found_says_what_was_found_instead(tmp_path: Path) -> None:
    """Before, each of these was "no state dict found: the checkpoint holds no tensors",
    though each holds tensors: an optimizer's state_dict(), a bare tensor, a
    ``(state_dict, step)`` tuple, a list of state dicts under a key, a state dict under
    an integer key. Now the error, naming the file, says what the checkpoint is or where
    its tensors lie, and that lists and tuples are not searched."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    cases = {
        "optim.pt": (opt.state_dict(), r"the checkpoint is an optimizer's state \(state, "
                     r"param_groups\), not a model's state dict$"),
        "tensor.pt": (torch.zeros(100, 8), r"the checkpoint is a bare tensor \(shape "
                      r"\[100, 8\]\), not a state dict of named tensors$"),
        "tuple.pt": ((model.state_dict(), 10), r"the checkpoint is a tuple of 2 items "
                     r"\(lists and tuples are not searched\)$"),
        "list.pt": ({"models": [model.state_dict()], "step": 10}, r"its tensors are in a list "
                    r"of 1 item under \['models'\] \(lists and tuples are not searched\)$"),
        "int.pt": ({0: model.state_dict()}, r"its tensors are in a dict under keys that are "
                   r"not strings \(0\)$"),
        "nested.pt": ({"epoch": 1, "optimizer": opt.state_dict()}, r"its tensors are in an "
                      r"optimizer's state \(state, param_groups\) under \['optimizer'\]"),
    }  # fmt: skip
    for name, (obj, said) in cases.items():
        torch.save(obj, tmp_path / name)
        for factory in (mlp, None):  # with no --model, it is not a state dict either
            with pytest.raises(CheckpointError) as caught:
                load_checkpoint(Ref(tmp_path / name, "torch"), factory)
            assert caught.value.path == tmp_path / name
            assert re.search(r"^no state dict found\b.*" + said, caught.value.reason), (
                name,
                caught.value.reason,
            )


class _EncoderDecoder(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.decoder = nn.Linear(width, 4)


def test_state_dicts_of_a_models_parts_are_loaded_together(tmp_path: Path) -> None:
    """``{"encoder": enc.state_dict(), "decoder": dec.state_dict(), "step": 10}`` for a
    model whose keys are ``encoder.*`` and ``decoder.*``. Before: "no key of the model
    in the checkpoint", though every key is there under its submodule's name. Now the
    parts are loaded as one state dict, each key under its part's name, and the source
    says so. Only exactly: a part that is not the model's is a mismatch naming the
    joined parts, and a model matching the parts and another state dict as well loads
    neither."""
    torch.manual_seed(0)
    src = _EncoderDecoder()
    parts = {"encoder": src.encoder.state_dict(), "decoder": src.decoder.state_dict()}
    torch.save({**parts, "step": 10}, tmp_path / "parts.pt")
    loaded = load_checkpoint(Ref(tmp_path / "parts.pt", "torch"), _EncoderDecoder)
    assert same_weights(loaded.model, src)
    assert loaded.step == 10
    assert loaded.source == "under ['encoder'] and ['decoder'] together, each key under its name"
    # one part of another width: a mismatch, reported for the parts together
    with pytest.raises(KeysMismatch, match=r"under \['encoder'\] and \['decoder'\] together"):
        load_checkpoint(Ref(tmp_path / "parts.pt", "torch"), lambda: _EncoderDecoder(32))
    # the parts and a whole state dict under names that are not container keys: ambiguous
    torch.save({"parts": parts, "whole": src.state_dict()}, tmp_path / "both.pt")
    with pytest.raises(CheckpointError, match=r"several places.*cannot tell which to load"):
        load_checkpoint(Ref(tmp_path / "both.pt", "torch"), _EncoderDecoder)
    # a prefix is never stripped from the joined keys: a model holding them one level
    # down is not matched by them
    wrapped = nn.ModuleDict({"net": _EncoderDecoder()})
    with pytest.raises(KeysMismatch):
        load_checkpoint(Ref(tmp_path / "parts.pt", "torch"), lambda: wrapped)


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    src = mlp(seed=7)
    torch.save(src, tmp_path / "whole.pt")
    with pytest.raises(
        CheckpointError,
        match=r"whole\.pt: refused to unpickle with weights_only=True: the file holds a pickle "
        r"that would import torch\.nn\.modules\.activation\.ReLU, "
        r"torch\.nn\.modules\.container\.Sequential, torch\.nn\.modules\.linear\.Linear "
        r"\(more than tensors and plain containers\), which was not run; pass "
        r"--trust-checkpoints to load it anyway, only for files you trust",
    ):
        load_checkpoint(Ref(tmp_path / "whole.pt", "torch"), mlp)
    alone = load_checkpoint(Ref(tmp_path / "whole.pt", "torch"), None, trust=True)
    assert same_weights(alone.model, src) and not alone.model.training
    into = load_checkpoint(Ref(tmp_path / "whole.pt", "torch"), mlp, trust=True)
    assert same_weights(into.model, src) and into.model is not alone.model


def test_lightning_hparams_objects_need_trust(tmp_path: Path) -> None:
    src = mlp(seed=11)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
        "global_step": 3,
        "hyper_parameters": {"args": argparse.Namespace(lr=0.1)},
    }
    torch.save(ckpt, tmp_path / "hp.ckpt")
    with pytest.raises(
        CheckpointError, match=r"a pickle that would import argparse\.Namespace \(more than"
    ):
        load_checkpoint(Ref(tmp_path / "hp.ckpt", "lightning"), mlp)
    loaded = load_checkpoint(Ref(tmp_path / "hp.ckpt", "lightning"), mlp, trust=True)
    assert same_weights(loaded.model, src) and loaded.step == 3


@pytest.mark.parametrize("payload", [Touch, Exec])
def test_hostile_pickle_does_not_run(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "owned"
    torch.save({"state_dict": mlp().state_dict(), "extra": payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*--trust-checkpoints"):
        load_checkpoint(Ref(tmp_path / "evil.pt", "torch"), mlp)
    assert not marker.exists()
    # The test would notice a loader that unpickled it: trusting the file runs the payload.
    load_checkpoint(Ref(tmp_path / "evil.pt", "torch"), mlp, trust=True)
    assert marker.exists()


REFUSED_GLOBAL = (
    "refused to unpickle with weights_only=True: the file holds a pickle that would import "
    "{names} (more than tensors and plain containers), which was not run; pass "
    "--trust-checkpoints to load it anyway, only for files you trust "
    "(unpickling can run arbitrary code)"
)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_blocked_global_is_named_and_not_called_corrupt(tmp_path: Path, zip_format: bool) -> None:
    """torch refuses posix.system as a blocked module; the refusal names it, whole."""
    marker = tmp_path / "system-owned"
    evil = tmp_path / "system.pt"
    payload = {"state_dict": mlp().state_dict(), "x": System(marker)}
    torch.save(payload, evil, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(Ref(evil, "lightning"), mlp)
    assert str(info.value) == f"{evil}: " + REFUSED_GLOBAL.format(names="posix.system")
    assert "corrupt" not in str(info.value) and not marker.exists()
    # The same words for a probe file and for a Hugging Face folder's pytorch_model.bin.
    inputs, targets = mlp_probe()
    torch.save({"inputs": inputs, "targets": targets, "x": System(marker)}, tmp_path / "p.pt")
    with pytest.raises(ConfigError) as probe_info:
        load_probe(str(tmp_path / "p.pt"))
    assert str(probe_info.value) == (
        f"probe file {str(tmp_path / 'p.pt')!r}: " + REFUSED_GLOBAL.format(names="posix.system")
    )
    folder = hf_folder(tmp_path, mlp(), "pytorch_model.bin")
    torch.save({**mlp().state_dict(), "x": System(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as hf_info:
        load_checkpoint(Ref(folder, "hf"), mlp)
    assert str(hf_info.value) == (
        f"{folder}: pytorch_model.bin: " + REFUSED_GLOBAL.format(names="posix.system")
    )
    assert not marker.exists()
    # The test would notice a loader that unpickled it: trusting the file runs the payload.
    load_checkpoint(Ref(evil, "lightning"), mlp, trust=True)
    assert marker.exists()


def test_refusal_names_builtins_as_such(tmp_path: Path) -> None:
    """torch writes builtins.exec as "exec"; the refusal says builtins.exec."""
    torch.save({"state_dict": mlp().state_dict(), "x": Exec(tmp_path / "m")}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(Ref(tmp_path / "e.pt", "torch"), mlp)
    assert info.value.reason == REFUSED_GLOBAL.format(names="builtins.exec")


def test_broken_torch_files(tmp_path: Path) -> None:
    torch.save({"model": mlp().state_dict()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"half\.pt: truncated or corrupt torch zip archive \(Pytorch"
    ):
        load_checkpoint(Ref(tmp_path / "half.pt", "torch"), mlp)
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"zero\.pt: empty file \(0 bytes\)$"):
        load_checkpoint(Ref(tmp_path / "zero.pt", "torch"), mlp)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable torch file"):
        load_checkpoint(Ref(tmp_path / "junk.pt", "torch"), mlp)


def test_vanished_checkpoints_say_so(tmp_path: Path) -> None:
    for kind in ("torch", "lightning", "safetensors", "hf", "dcp"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(Ref(tmp_path / f"gone-{kind}", kind), mlp)
        assert info.value.reason == VANISHED
        assert info.value.path == tmp_path / f"gone-{kind}"


def test_missing_factory_and_unknown_kind(tmp_path: Path) -> None:
    torch.save(mlp().state_dict(), tmp_path / "sd.pt")
    # the file is named once, by whoever reports the error (the daemon: "cannot read
    # PATH: ..."); before, the reason named it again
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(Ref(tmp_path / "sd.pt", "torch"), None)
    assert str(caught.value) == (
        "no model factory to load this state dict into; pass --model MODULE:FACTORY"
    )
    save_file({"w": torch.zeros(2)}, tmp_path / "sd.safetensors")
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(Ref(tmp_path / "sd.safetensors", "safetensors"), None)
    assert "sd.safetensors" not in str(caught.value) and "no model factory" in str(caught.value)
    with pytest.raises(CheckpointError, match=r"unknown checkpoint kind 'onnx'"):
        load_checkpoint(Ref(tmp_path / "sd.pt", "onnx"), mlp)
    with pytest.raises(ConfigError, match=r"raised ValueError: the factory is broken"):
        load_checkpoint(
            Ref(tmp_path / "sd.pt", "torch"), resolve_factory("fixtures_models:broken_factory")
        )
    with pytest.raises(ConfigError, match=r"returned str, expected torch.nn.Module"):
        load_checkpoint(Ref(tmp_path / "sd.pt", "torch"), lambda: "model")  # type: ignore[arg-type,return-value]


# --------------------------------------------------------------------------- safetensors


def test_safetensors_with_prefix_and_metadata(tmp_path: Path) -> None:
    src = mlp(seed=8)
    tensors = {f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}
    save_file(
        tensors, tmp_path / "w.safetensors", metadata={"step": "300", "val_acc": "0.5", "x": "y"}
    )
    loaded = load_checkpoint(Ref(tmp_path / "w.safetensors", "safetensors"), mlp)
    assert same_weights(loaded.model, src)
    assert loaded.step == 300 and loaded.meta == {"val_acc": 0.5}


def test_broken_safetensors(tmp_path: Path) -> None:
    save_file(dict(mlp().state_dict()), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "cut.safetensors": (
            data[:-10],
            r"safetensors tensor '2\.weight' ends at byte \d+ of the data but the file "
            r"holds \d+ \(truncated\)",
        ),
        "head.safetensors": (data[:20], r"safetensors header claims \d+ bytes but the file has 12"),
        "tiny.safetensors": (data[:5], r"safetensors file too short \(5 bytes\)"),
        "zero.safetensors": (b"", r"empty file \(0 bytes\)"),
        "json.safetensors": (
            data[:8] + b"{" * header_len + data[8 + header_len :],
            r"safetensors header is not JSON \(JSONDecodeError",
        ),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}: " + message):
            load_checkpoint(Ref(tmp_path / name, "safetensors"), mlp)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    raw = len(header).to_bytes(8, "little") + header + bytes(8)
    (tmp_path / "size.safetensors").write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"'w': F32 \[4\] needs 16 bytes, the header gives 8"):
        load_checkpoint(Ref(tmp_path / "size.safetensors", "safetensors"), mlp)


# --------------------------------------------------------------------------- Hugging Face


def hf_folder(root: Path, src: nn.Module, weights: str = "model.safetensors") -> Path:
    folder = root / "checkpoint-500"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    state = {
        "global_step": 500,
        "epoch": 2.0,
        "best_metric": None,
        "log_history": [
            {"loss": 1.5, "learning_rate": 0.001, "step": 250},
            {"loss": 1.0, "step": 500},
            {"eval_accuracy": 0.7, "step": 500},
        ],
    }
    (folder / "trainer_state.json").write_text(json.dumps(state))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if weights == "model.safetensors":
        save_file(sd, folder / weights)
    elif weights == "pytorch_model.bin":
        torch.save(sd, folder / weights)
    else:  # sharded, with an index: "sharded" (safetensors) or "sharded-bin"
        keys = list(sd)
        ext = "bin" if weights == "sharded-bin" else "safetensors"
        stem = "pytorch_model" if ext == "bin" else "model"
        shards = {
            f"{stem}-00001-of-00002.{ext}": keys[:2],
            f"{stem}-00002-of-00002.{ext}": keys[2:],
        }
        for shard, names in shards.items():
            part = {k: sd[k] for k in names}
            if ext == "safetensors":
                save_file(part, folder / shard)
            else:
                torch.save(part, folder / shard)
        weight_map = {k: shard for shard, names in shards.items() for k in names}
        (folder / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return folder


@pytest.mark.parametrize(
    "weights", ["model.safetensors", "pytorch_model.bin", "sharded", "sharded-bin"]
)
def test_hf_folder_with_factory(tmp_path: Path, weights: str) -> None:
    src = mlp(seed=9)
    folder = hf_folder(tmp_path, src, weights)
    loaded = load_checkpoint(Ref(folder, "hf"), mlp)
    assert same_weights(loaded.model, src)
    assert loaded.step == 500
    # the checkpoint's own scalars: learning_rate was logged at step 250, not at 500
    assert loaded.meta == {"loss": 1.0, "eval_accuracy": 0.7, "epoch": 2.0}
    assert loaded.trainer_log == [
        (250, {"loss": 1.5, "learning_rate": 0.001}),
        (500, {"loss": 1.0, "eval_accuracy": 0.7}),
    ]


def test_hf_folder_problems(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, mlp(), "sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"shard 'model-00002-of-00002.safetensors' named by model.safetensors.index.json is missing",
    ):
        load_checkpoint(Ref(folder, "hf"), mlp)
    for f in folder.glob("model*"):
        f.unlink()
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-500: no weights file in the folder \(looked for model\.safetensors",
    ):
        load_checkpoint(Ref(folder, "hf"), mlp)
    (folder / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is not JSON"):
        load_checkpoint(Ref(folder, "hf"), mlp)


def test_hf_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "hf-owned"
    folder = hf_folder(tmp_path, mlp(), "pytorch_model.bin")
    torch.save({**mlp().state_dict(), "x": Touch(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: refused to unpickle.*--trust-checkpoints"
    ):
        load_checkpoint(Ref(folder, "hf"), mlp)
    assert not marker.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is not None, reason="transformers installed"
)
def test_hf_without_factory_needs_transformers(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, mlp())
    with pytest.raises(
        ConfigError,
        match=r"checkpoint-500 is a Hugging Face checkpoint and no --model was given: .*needs "
        r"transformers; pip install 'ddsmon\[hf\]', or pass --model MODULE:FACTORY",
    ):
        load_checkpoint(Ref(folder, "hf"), None)


# --------------------------------------------------------------------------- torch.distributed.checkpoint


def test_dcp_folder_loads_into_factory_model(tmp_path: Path) -> None:
    src = mlp(seed=10)
    optim = torch.optim.SGD(src.parameters(), lr=0.1)
    state = {
        "model": src.state_dict(),
        "optim": optim.state_dict(),
        "step": 70,
        "val_acc": 0.5,
        "loss": torch.tensor(0.125),
    }
    dcp_save(state, tmp_path / "dcp")
    loaded = load_checkpoint(Ref(tmp_path / "dcp", "dcp"), mlp)
    assert same_weights(loaded.model, src) and not same_weights(loaded.model, mlp())
    assert loaded.step == 70 and loaded.meta == {"val_acc": 0.5, "loss": 0.125}
    dcp_save(dict(src.state_dict()), tmp_path / "bare")
    assert same_weights(load_checkpoint(Ref(tmp_path / "bare", "dcp"), mlp).model, src)


def test_dcp_errors(tmp_path: Path) -> None:
    dcp_save({"model": mlp().state_dict()}, tmp_path / "dcp")
    with pytest.raises(
        CheckpointError,
        match=r"in the DCP folder \(prefix 'model\.' stripped\) does not match the model: missing 2 keys",
    ):
        load_checkpoint(Ref(tmp_path / "dcp", "dcp"), deeper)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch at 3 keys: '0\.weight': checkpoint \[16, 8\] vs model \[32, 8\]",
    ):
        load_checkpoint(Ref(tmp_path / "dcp", "dcp"), wider)
    with pytest.raises(ConfigError, match=r"needs a model factory"):
        load_checkpoint(Ref(tmp_path / "dcp", "dcp"), None)
    (tmp_path / "dcp" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"dcp: unreadable \.metadata"):
        load_checkpoint(Ref(tmp_path / "dcp", "dcp"), mlp)


def test_hostile_dcp_metadata_does_not_run(tmp_path: Path) -> None:
    dcp_save({"model": mlp().state_dict()}, tmp_path / "dcp")
    marker = tmp_path / "dcp-owned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    with pytest.raises(
        CheckpointError,
        match=r"dcp: refused to unpickle \.metadata: it holds a pickle that would import "
        r"pathlib\.Path\.touch, which is not DCP metadata and was not run; pass "
        r"--trust-checkpoints to load it anyway, only for files you trust",
    ):
        load_checkpoint(Ref(tmp_path / "dcp", "dcp"), mlp)
    assert not marker.exists()
    # Trusted, the payload runs (so the test above would catch a loader that ran it).
    with pytest.raises(CheckpointError, match=r"unreadable \.metadata"):
        load_checkpoint(Ref(tmp_path / "dcp", "dcp"), mlp, trust=True)
    assert marker.exists()


def test_models_built_from_config_json_build_no_key_value_cache() -> None:
    """use_cache is turned off on the config and on every sub-config (a composite
    model's decoder keeps its own in text_config)."""
    transformers = pytest.importorskip("transformers")
    from ddsmon.loading.huggingface import _no_cache

    plain = transformers.GPT2Config()
    composite = transformers.LlavaConfig()
    assert plain.use_cache and composite.text_config.use_cache
    _no_cache(plain)
    _no_cache(composite)
    assert plain.use_cache is False and composite.text_config.use_cache is False
