"""Testbeds a new user brings: recurrent, attention, convolutional and reparametrised
models, read the way they would be (``compute_signatures``, the real CLI on real
checkpoints, a real MLflow store), each reading held to the per-sample loop of
``tests/reference.py`` at 1e-10."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import assert_close_report, per_sample_capture, readings
from torch import nn
from torch.nn.utils import parametrizations

from ddsmon import compute_signatures
from ddsmon.errors import ProbeError
from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

TOL = 1e-10
REPO = Path(__file__).resolve().parents[1]

#: The user's model file: the factories the CLI tests name as ``models_user.py:NAME``.
USER_MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.gru = nn.GRU(5, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            h, _ = self.lstm(self.emb(x))
            h, _ = self.gru(h)
            return self.head(h[:, -1])


    def recurrent():
        return Recurrent()
    """
)


def _scan(tmp_path: Path, factory: str, make, inputs, targets, *flags: str, verbose: bool = False):
    """Save two checkpoints of ``make()`` (seeded), run ``ddsmon scan`` on them in a
    subprocess against a fresh SQLite store; (process, the run's metrics by key)."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "models_user.py").write_text(USER_MODELS)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (1, 2):
        torch.manual_seed(step)
        torch.save({"state_dict": make().state_dict(), "step": step}, ckpts / f"s{step}.pt")
    probe = tmp_path / "probe.pt"
    torch.save({"inputs": inputs, "targets": targets}, probe)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", *(["-v"] if verbose else []), "scan", str(ckpts), "--model",
         f"{tmp_path / 'models_user.py'}:{factory}", "--probe", str(probe), "--loss", "ce",
         "--tracking-uri", uri, "--no-plots", "--threads", "1", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 read" in proc.stderr and "0 failed" in proc.stderr, proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, CHECKPOINT_METRIC))
    assert steps == [1, 2]
    return proc, run.data.metrics


class Recurrent(nn.Module):
    """A two-layer bidirectional LSTM or GRU (batch first) and a Linear head on the last
    position: the modules torch.func.vmap cannot batch (in-place state writes)."""

    def __init__(self, kind: str = "lstm") -> None:
        super().__init__()
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def _k_against_reference(model: nn.Module, x, y, layer: str) -> None:
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    got = sig.layers[layer]
    ref = readings(per_sample_capture(model, x, y, "ce", [layer])[layer])
    assert got.param_count == ref["param_count"]
    k_ref = ref["param_spectrum"]
    assert got.param_rank == ref["param_rank"]
    assert_close_report(
        got.param_spectrum[: len(k_ref)],
        k_ref,
        atol=TOL * k_ref[0],
        what=f"{layer} K spectrum",
    )
    assert got.param_lambda_min == pytest.approx(ref["param_lambda_min"], abs=TOL * k_ref[0])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_layer_k_is_read_and_matches_the_per_sample_loop(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: "parameter-side Gram via torch.func failed for ['rnn']: output with shape
    [1, 4] doesn't match the broadcast shape [6, 1, 4]", a warning on every checkpoint,
    and the LSTM's / GRU's K readings missing. Now K is built one sample at a time
    where vmap cannot batch the model, and equals the loop's J J^T / n."""
    torch.manual_seed(3)
    model = Recurrent(kind).eval()
    x = torch.randn(6, 5, 3)
    y = torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="ddsmon"):
        _k_against_reference(model, x, y, "rnn")
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


@pytest.mark.slow  # 9 s on 2 cores (a CLI subprocess); the K itself is checked above
def test_recurrent_checkpoints_scan_with_k_and_no_warning(tmp_path: Path) -> None:
    """The CLI on an Embedding -> LSTM -> GRU -> Linear model's checkpoints: every
    layer's K in the MLflow run, no warning, and the slower per-sample path said once
    (at -v), not per checkpoint."""
    import importlib.util

    (tmp_path / "models_user.py").write_text(USER_MODELS)
    spec = importlib.util.spec_from_file_location("models_user", tmp_path / "models_user.py")
    assert spec is not None and spec.loader is not None
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    ids = torch.randint(0, 7, (8, 4))
    proc, metrics = _scan(
        tmp_path, "recurrent", user.recurrent, ids, torch.randint(0, 3, (8,)), verbose=True
    )
    assert "WARNING ddsmon.engine" not in proc.stderr, proc.stderr
    assert "WARNING ddsmon.param_gram" not in proc.stderr, proc.stderr
    for layer in ("emb", "lstm", "gru", "head"):
        assert f"dds_detail/param_lambda_min/{layer}" in metrics, sorted(metrics)
    assert proc.stderr.count("computed one sample at a time") == 1, proc.stderr


def test_transformer_encoder_k_under_warnings_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    """``nn.TransformerEncoder`` in eval mode: vmap's "There is a performance drop
    because we have not yet implemented the batching rule" UserWarnings on its fused
    attention kernels were raised as errors under pytest's ``filterwarnings = error``
    inside the vmapped pass, and the layers' K lost. Now they are silenced inside
    ddsmon's call (and only there), and K equals the per-sample loop's."""
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(4, 2, 8, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(12, 3)).eval()  # fmt: skip
    x = torch.randn(5, 3, 4)
    y = torch.randint(0, 3, (5,))
    with warnings.catch_warnings(), caplog.at_level("DEBUG", logger="ddsmon"):
        warnings.simplefilter("error")
        mine = warnings.filters[0]
        _k_against_reference(model, x, y, "0.layers.0.norm1")
        # the caller's "error" is still in force and no filter of ddsmon's is left (an
        # import on the way may add its own: sympy's); pytest.warns, used here before,
        # resets the filters to "always" inside its block: that check could not fail
        assert mine in warnings.filters
        assert not [f for f in warnings.filters if f[1] and "performance drop" in f[1].pattern]
    assert "one sample at a time" not in caplog.text  # vmapped, not the slower fallback
    assert "failed" not in caplog.text


class Reparametrised(nn.Module):
    """``weight_norm`` and ``spectral_norm`` Linears (state-dict keys
    ``parametrizations.weight.original0``) around a self-attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = parametrizations.weight_norm(nn.Linear(3, 4))
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = parametrizations.spectral_norm(nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h, _ = self.attn(h, h, h)
        return self.out(h.mean(dim=1))


def test_reparametrised_and_attention_layers_are_read_by_default() -> None:
    """Before: the default selection (leaf modules) silently left out every
    ``weight_norm`` / ``spectral_norm`` layer (their parametrizations are children)
    and ``nn.MultiheadAttention`` (its ``out_proj`` never runs as a module), reading
    only ``head``-like plain leaves. Now they are read, and K is of the parameters
    that are trained (``original0``, ``original1``, ``out_proj``'s included), equal to
    the per-sample loop's."""
    torch.manual_seed(7)
    model = Reparametrised().eval()
    x = torch.randn(6, 5, 3)
    y = torch.randint(0, 3, (6,))
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert list(sig.layers) == ["inp", "attn", "out"]
    refs = per_sample_capture(model, x, y, "ce", list(sig.layers))
    for layer, got in sig.layers.items():
        ref = readings(refs[layer])
        assert (got.N, got.d) == (ref["N"], ref["d"]), layer
        g_ref = ref["g_spectrum"]
        k = min(ref["N"], ref["d"])
        assert_close_report(got.g_spectrum[:k], g_ref[:k], atol=TOL * g_ref[0], what=layer)
        assert got.param_count == ref["param_count"], layer
        k_ref = ref["param_spectrum"]
        assert_close_report(
            got.param_spectrum[: len(k_ref)], k_ref, atol=TOL * k_ref[0], what=f"{layer} K"
        )


def _channel_first_loop(model: nn.Module, x, y, layers: list[str]) -> dict[str, tuple]:
    """X and Delta of channel-first layers, the long way: per sample, one forward and
    one backward, each output (1, C, *spatial) written as its positions x C matrix."""
    import copy

    ref = copy.deepcopy(model).double().eval()
    mods = dict(ref.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [
        mods[name].register_forward_hook(
            lambda _m, _a, out, name=name: store.__setitem__(name, out)
        )
        for name in layers
    ]
    xs: dict[str, list] = {name: [] for name in layers}
    ds: dict[str, list] = {name: [] for name in layers}
    try:
        for i in range(x.shape[0]):
            out = ref(x[i : i + 1].double())
            loss = -torch.log_softmax(out, dim=-1)[0, y[i]]
            for name in layers:
                h = store[name]
                (g,) = torch.autograd.grad(loss, [h], retain_graph=True)
                c = h.shape[1]
                xs[name].append(h[0].detach().reshape(c, -1).T.numpy())
                ds[name].append(g[0].reshape(c, -1).T.numpy())
    finally:
        for hnd in handles:
            hnd.remove()
    return {name: (np.concatenate(xs[name]), np.concatenate(ds[name])) for name in layers}


def test_convolutional_layers_read_channels_as_features() -> None:
    """Before: a conv layer's output (n, C, H, W) was read with its last axis, the
    image's *width*, as the features (d = W, N = n*C*H): ``x_dead`` counted dead image
    columns, and ``AdaptiveAvgPool2d(1)`` (width 1) was left out. Now the channels are
    the features of Conv / BatchNorm / pooling outputs and of the activations fed
    them (d = C, N = n*H*W, rows sample-major), held to a per-sample loop."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )  # fmt: skip
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 2, 6, 7)
    y = torch.randint(0, 3, (5,))
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert list(sig.layers) == ["0", "1", "2", "3", "4", "5", "6", "7"]
    want = {"0": (5 * 42, 4), "1": (5 * 42, 4), "2": (5 * 42, 4), "3": (5 * 9, 4),
            "4": (5, 5), "5": (5, 5), "6": (5, 5), "7": (5, 3)}  # fmt: skip
    assert {k: (v.N, v.d) for k, v in sig.layers.items()} == want
    loop = _channel_first_loop(model, x, y, ["0", "1", "2", "3", "4", "5"])
    for name, (xm, dm) in loop.items():
        got = sig.layers[name]
        assert (got.N, got.d) == xm.shape, name
        sv = np.linalg.svd(xm, compute_uv=False)
        assert_close_report(got.x_spectrum[: len(sv)], sv, atol=TOL * sv[0], what=f"{name} X")
        g = np.sort(np.linalg.eigvalsh(dm.T @ dm / 5))[::-1]
        assert_close_report(got.g_spectrum[: len(g)], g, atol=TOL * g[0], what=f"{name} G")
    ref = readings(per_sample_capture(model, x, y, "ce", ["4"])["4"])  # K: layout-free
    k_ref = ref["param_spectrum"]
    got = sig.layers["4"]
    assert_close_report(got.param_spectrum[: len(k_ref)], k_ref, atol=TOL * k_ref[0], what="K")


class SequenceFirst(nn.Module):
    """A ``batch_first=False`` GRU (output (T, n, d)) beside a sequence-first
    ``nn.TransformerEncoderLayer``, whose Linears have no ``batch_first`` of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, bidirectional=True)
        layer = nn.TransformerEncoderLayer(8, 2, 8, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x.transpose(0, 1))
        return self.head(self.enc(h)[-1])


def test_sequence_first_layers_are_read_or_said(caplog: pytest.LogCaptureFixture) -> None:
    """Before: every layer of a sequence-first model but the head was silently left
    out of the default selection (its output's first axis is T, not n). Now a module
    with ``batch_first=False`` is read with its samples on axis 1 (rows sample-major,
    equal to the per-sample loop), and the layers whose layout cannot be known are
    named in one warning, said once however many checkpoints are read."""
    torch.manual_seed(13)
    model = SequenceFirst().eval()
    x = torch.randn(6, 5, 3)
    y = torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="ddsmon"):
        sig = compute_signatures(model, x, y, loss="ce", device="cpu")
        compute_signatures(model, x, y, loss="ce", device="cpu")
    assert list(sig.layers) == ["rnn", "enc.layers.0.self_attn", "head"]
    said = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "enc.layers.0.linear1 [5, 6, 8]" in said[0], said
    refs = per_sample_capture(model, x, y, "ce", ["rnn", "enc.layers.0.self_attn"])
    for layer in ("rnn", "enc.layers.0.self_attn"):
        got, ref = sig.layers[layer], readings(refs[layer])
        assert (got.N, got.d) == (ref["N"], ref["d"]) == (30, 8), layer
        x_ref, g_ref = ref["x_spectrum"], ref["g_spectrum"]
        assert_close_report(got.x_spectrum, x_ref, atol=TOL * x_ref[0], what=f"{layer} X")
        assert_close_report(got.g_spectrum[:8], g_ref[:8], atol=TOL * g_ref[0], what=layer)
        k_ref = ref["param_spectrum"]
        assert_close_report(
            got.param_spectrum[: len(k_ref)], k_ref, atol=TOL * k_ref[0], what=f"{layer} K"
        )


class SequenceFirstDecoder(nn.Module):
    """Old-style sequence-first code fed a batch-first probe: the ids transposed into a
    ``batch_first=False`` LSTM inside a named block, then a ReLU, a LayerNorm and the
    Linear decoder applied to the whole (T, n, d) output (PyTorch's word-language-model
    shape), pooled over time by a function."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.block = nn.ModuleDict({"lstm": nn.LSTM(4, 5)})
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(5)
        self.decoder = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.block["lstm"](self.emb(ids).transpose(0, 1))
        return self.decoder(self.norm(self.act(h))).mean(dim=0)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class _Blocky(nn.Module):
    """A named block handing on its sequence-first LSTM's (T, n, d) output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.block, self.head = nn.Embedding(7, 4), _Block(), nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(ids).transpose(0, 1))[-1])


def test_sequence_first_layout_is_followed_downstream(caplog: pytest.LogCaptureFixture) -> None:
    """Before: only the module that says ``batch_first=False`` was read with its samples
    on axis 1; the ReLU, LayerNorm and Linear decoder fed its (T, n, d) output were
    named as not read ("a sequence-first layout?"), and a named block around the LSTM
    (``--layers block``) failed the pass. Now the layout is followed, as channel-first
    is: a module fed a sequence-first tensor that keeps its leading (T, n) axes is read
    with the samples on axis 1, and so is a block handing on its LSTM's output. Every
    reading equals the per-sample loop's, K of the Linear (built from its inputs, which
    must be taken sample-major too) included."""
    torch.manual_seed(17)
    model = SequenceFirstDecoder().eval()
    ids = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="ddsmon"):
        sig = compute_signatures(model, ids, y, loss="ce", device="cpu")
    assert list(sig.layers) == ["emb", "block.lstm", "act", "norm", "decoder"], caplog.text
    assert "not read" not in caplog.text, caplog.text
    refs = per_sample_capture(model, ids, y, "ce", list(sig.layers))
    for layer, ref in refs.items():
        got, want = sig.layers[layer], readings(ref)
        assert (got.N, got.d) == (want["N"], want["d"]), layer
        x_ref, g_ref = want["x_spectrum"], want["g_spectrum"]
        assert_close_report(got.x_spectrum, x_ref, atol=TOL * x_ref[0], what=f"{layer} X")
        assert_close_report(
            got.g_spectrum[: len(g_ref)], g_ref, atol=TOL * g_ref[0], what=f"{layer} G"
        )
        if "param_spectrum" in want:
            k_ref = want["param_spectrum"]
            assert_close_report(
                got.param_spectrum[: len(k_ref)], k_ref, atol=TOL * k_ref[0], what=f"{layer} K"
            )

    blocky = _Blocky()
    sig = compute_signatures(blocky.eval(), ids, y, loss="ce", device="cpu", layers=["block"])
    ref = readings(per_sample_capture(blocky, ids, y, "ce", ["block"])["block"])
    got = sig.layers["block"]
    assert (got.N, got.d) == (30, 5)
    assert_close_report(got.x_spectrum, ref["x_spectrum"], atol=TOL * ref["x_spectrum"][0])


def test_shared_outputs_are_left_out_without_a_word(caplog: pytest.LogCaptureFixture) -> None:
    """A module whose output has no axis of the probe's n (a position embedding
    called on ``arange(T)[None]``, shared by every sample) is left out quietly: it is
    no layer of per-sample outputs, and no layout would make it one."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(9, 4)
            self.pos = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            where = torch.arange(ids.shape[1])[None]
            return self.head((self.tok(ids) + self.pos(where)).mean(dim=1))

    ids = torch.randint(0, 9, (6, 5))
    with caplog.at_level("WARNING", logger="ddsmon"):
        sig = compute_signatures(Positions().eval(), ids, torch.randint(0, 3, (6,)), device="cpu")
    assert list(sig.layers) == ["tok", "head"]
    assert "not read" not in caplog.text, caplog.text


def _tiny_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_labels=3,
    )  # fmt: skip
    return transformers, transformers.ViTForImageClassification(config)


def test_vit_folder_loads_with_transformers_renamed_keys(tmp_path: Path) -> None:
    """A tiny ViT ``save_pretrained`` folder, read with no --model. Before: every
    checkpoint failed, "missing 16 keys ('vit.layers.0.attention.q_proj.weight', ...);
    unexpected 16 keys ('vit.encoder.layer.0.attention.attention.key.bias', ...)":
    transformers 5 renamed ViT's modules and ``save_pretrained`` writes the old keys.
    Now the keys are renamed as ``from_pretrained`` renames them: the weights equal
    ``from_pretrained``'s."""
    from ddsmon.checkpoints import classify
    from ddsmon.loading import load_checkpoint

    transformers, model = _tiny_vit()
    for step in (1, 2):
        torch.manual_seed(step)
        transformers.ViTForImageClassification(model.config).save_pretrained(
            tmp_path / "ckpts" / f"step_{step}"
        )
    folder = tmp_path / "ckpts" / "step_2"
    ref = classify(folder)
    assert ref is not None
    loaded = load_checkpoint(ref, None)
    theirs = transformers.ViTForImageClassification.from_pretrained(folder).state_dict()
    ours = loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert "keys renamed by transformers' conversion mapping" in loaded.source


def test_vit_renamed_keys_wherever_a_state_dict_meets_a_transformers_model(
    tmp_path: Path,
) -> None:
    """The renaming of the test above, wherever ViT's old keys are matched to a
    ``PreTrainedModel``. Before, only a folder read with no --model was renamed; these
    failed with "missing 16 keys ('vit.layers.0.attention.q_proj.weight', ...);
    unexpected 16 keys ('vit.encoder.layer.0.attention.attention.key.bias', ...)": the
    Trainer's final ``save_model()`` (``model.safetensors`` beside its config.json in
    output_dir), a ``checkpoint-N/`` folder read with --model, that file with --model,
    and a torch file of the old keys with --model. Each now equals
    ``from_pretrained``'s weights. A module that is not a transformers model is matched
    as before (no renaming: its mismatch is reported)."""
    from safetensors.torch import load_file

    from ddsmon.checkpoints import classify
    from ddsmon.errors import KeysMismatch
    from ddsmon.loading import load_checkpoint

    transformers, model = _tiny_vit()
    out = tmp_path / "out"
    torch.manual_seed(3)
    trained = transformers.ViTForImageClassification(model.config)
    trained.save_pretrained(out / "checkpoint-2")
    trained.save_pretrained(out)  # trainer.save_model(): beside checkpoint-2/
    torch.save(load_file(out / "model.safetensors"), tmp_path / "old_keys.pt")
    theirs = transformers.ViTForImageClassification.from_pretrained(out).state_dict()

    def factory() -> nn.Module:
        return transformers.ViTForImageClassification(model.config)

    cases = [
        (out / "model.safetensors", None),
        (out / "checkpoint-2", factory),
        (out / "model.safetensors", factory),
        (tmp_path / "old_keys.pt", factory),
    ]
    for path, made in cases:
        ref = classify(path, path.parent)
        assert ref is not None, path
        loaded = load_checkpoint(ref, made)
        ours = loaded.model.state_dict()
        assert ours.keys() == theirs.keys(), path
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), (path, key)
        assert "keys renamed by transformers' conversion mapping" in loaded.source, path
    # a plain module taking the new names is no transformers model: nothing renamed
    plain = nn.ModuleDict({"vit": factory().vit})
    ref = classify(tmp_path / "old_keys.pt", tmp_path)
    assert ref is not None
    with pytest.raises(KeysMismatch, match=r"vit\.layers\.0\.attention\.q_proj"):
        load_checkpoint(ref, lambda: plain)


@pytest.mark.slow
def test_vit_folders_scan_without_a_model(tmp_path: Path) -> None:
    """The CLI on two ViT ``save_pretrained`` folders (no --model): both steps read,
    with the renamed layers' readings in the MLflow run."""
    from mlflow.tracking import MlflowClient

    transformers, model = _tiny_vit()
    for step in (1, 2):
        torch.manual_seed(step)
        transformers.ViTForImageClassification(model.config).save_pretrained(
            tmp_path / "ckpts" / f"step_{step}"
        )
    probe = tmp_path / "probe.pt"
    torch.save({"inputs": {"pixel_values": torch.randn(4, 3, 8, 8)},
                "targets": torch.randint(0, 3, (4,))}, probe)  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(tmp_path / "ckpts"), "--probe",
         str(probe), "--loss", "ce", "--tracking-uri", uri, "--no-plots", "--threads", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 read" in proc.stderr and "0 failed" in proc.stderr, proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    assert "dds_detail/param_lambda_min/vit.layers.0.attention.q_proj" in run.data.metrics
    assert "dds_detail/x_rank/vit.embeddings.patch_embeddings.projection" in run.data.metrics


def test_encoder_decoder_probe_without_decoder_inputs_says_what_is_missing() -> None:
    """A T5 probe of ``input_ids`` alone: before, each checkpoint failed with T5's
    "You must specify exactly one of input_ids or inputs_embeds" (the *decoder*'s
    input, not said). Now the ProbeError names the model and what the probe needs;
    with ``labels`` beside ``input_ids`` the encoder and decoder layers are read."""
    from ddsmon.errors import ProbeError

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(17)
    config = transformers.T5Config(vocab_size=11, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 11, (4, 5))
    labels = torch.randint(0, 11, (4, 3))
    with pytest.raises(ProbeError, match=r"T5ForConditionalGeneration is an encoder-decoder.*"
                       r"decoder_input_ids.*You must specify exactly one"):  # fmt: skip
        compute_signatures(model, ids, labels, loss="ce", device="cpu")
    sig = compute_signatures(
        model, {"input_ids": ids, "labels": labels}, labels, loss="ce", device="cpu"
    )
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in sig.layers
    assert "decoder.block.0.layer.2.DenseReluDense.wi" in sig.layers
    assert sig.layers["lm_head"].N == 4 * 3


def test_a_compiled_model_is_read_eagerly_under_its_own_names() -> None:
    """A factory returning ``torch.compile(model)``: before, the probe pass went
    through dynamo with hooks (30 s for a 3-layer MLP on two cores) and the layers
    were named ``_orig_mod.0``, ``_orig_mod.2``, unlike the checkpoint's keys. Now the
    module inside is read, eagerly: the same readings as the eager model's."""
    import time

    torch.manual_seed(19)
    eager = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x = torch.randn(8, 4)
    y = torch.randint(0, 3, (8,))
    started = time.perf_counter()
    got = compute_signatures(torch.compile(eager), x, y, loss="ce", device="cpu")
    assert time.perf_counter() - started < 10
    want = compute_signatures(eager, x, y, loss="ce", device="cpu")
    assert list(got.layers) == list(want.layers) == ["0", "1", "2"]
    for name, layer in want.layers.items():
        assert got.layers[name].lambda_min == layer.lambda_min, name
        assert got.layers[name].param_lambda_min == layer.param_lambda_min, name


def test_a_layers_regex_skips_modules_that_never_run_as_layers() -> None:
    """``--layers 'attn|inp'`` on the reparametrised attention model: before, the regex
    also matched ``attn.out_proj`` (never called as a module) and
    ``inp.parametrizations.weight...`` (whose outputs are weights), and the pass failed
    ("did not run" / "output cannot be read"). Now it reads the layers themselves."""
    torch.manual_seed(23)
    model = Reparametrised().eval()
    x = torch.randn(4, 5, 3)
    y = torch.randint(0, 3, (4,))
    sig = compute_signatures(model, x, y, loss="ce", layers="attn|inp", device="cpu")
    assert list(sig.layers) == ["inp", "attn"]
    want = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert sig.layers["attn"].lambda_min == want.layers["attn"].lambda_min


def test_a_layers_regex_skips_containers_without_a_forward() -> None:
    """A regex matching a ``ModuleDict`` and its members (peft's LoRA layers hold
    ``lora_A.default`` inside the ModuleDict ``lora_A``: ``--layers lora_`` matches both):
    before, the container was selected too, and every checkpoint failed "layer(s)
    ['fc.lora_A'] did not run in the model's forward pass". Now its members are read;
    named in a list, the container still fails, by name."""

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(3, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 4, bias=False)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.lora_B["default"](self.lora_A["default"](x))

    torch.manual_seed(29)
    model = Adapted().eval()
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    sig = compute_signatures(model, x, y, loss="ce", layers="lora_", device="cpu")
    assert list(sig.layers) == ["lora_A.default", "lora_B.default"]
    with pytest.raises(ProbeError, match=r"\['lora_A'\] did not run"):
        compute_signatures(model, x, y, loss="ce", layers=["lora_A"], device="cpu")


def test_a_packed_sequence_layer_is_said_not_read(caplog: pytest.LogCaptureFixture) -> None:
    """An LSTM fed a packed batch (``pack_padded_sequence``): its output is a
    PackedSequence, time-major across samples, with no per-sample rows. Before, it was
    left out without a word; now it is named, with what to do, once."""

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
            _, (h, _) = self.rnn(packed)
            return self.head(h[-1])

    torch.manual_seed(29)
    x = torch.randn(5, 4, 3)
    with caplog.at_level("WARNING", logger="ddsmon"):
        sig = compute_signatures(Packed().eval(), x, torch.randint(0, 2, (5,)), device="cpu")
    assert list(sig.layers) == ["head"]
    assert "not read: rnn (a PackedSequence)" in caplog.text, caplog.text
    assert "pad_packed_sequence" in caplog.text


def test_a_cell_stepped_over_time_is_said_not_read(caplog: pytest.LogCaptureFixture) -> None:
    """An ``nn.LSTMCell`` called once per position: it has no one output per sample,
    and the default selection leaves it out, as before; now it is named, once, with
    what to do (name the module around the loop), while the layers that run once are
    read."""

    class Stepped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.LSTMCell(3, 4)
            self.act = nn.Tanh()  # no parameters: run twice, left out without a word
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = x.new_zeros(x.shape[0], 4)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (self.act(h), c))
            return self.head(h)

    torch.manual_seed(31)
    x = torch.randn(5, 3, 3)
    with caplog.at_level("WARNING", logger="ddsmon"):
        sig = compute_signatures(Stepped().eval(), x, torch.randint(0, 2, (5,)), device="cpu")
    assert list(sig.layers) == ["head"]
    said = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(said) == 1 and "cell (runs more than once)" in said[0], caplog.text
    assert "act" not in said[0].split("(")[0]
