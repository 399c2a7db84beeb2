"""Review of the row layouts and the per-sample K path: a named block's channel-first
output, and the vmap warning switch leaving other threads' warnings filters alone."""

from __future__ import annotations

import copy
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import assert_close_report
from torch import nn
from torch.func import functional_call, grad, vmap

from ddsmon import compute_signatures
from ddsmon.param_gram import param_grams_functional

TOL = 1e-10


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def test_a_named_block_of_a_conv_net_reads_its_channels_as_features() -> None:
    """A block (conv -> bn -> relu) named in ``layers`` hands on its relu's channel-
    first output; before, only a block keeping its input's shape inherited the layout,
    so a block changing channels or stride (ResNet's ``layer2.0``) was read with the
    image's width as d (block 0: d = 12, block 1: d = 6), its relu with d = C."""
    torch.manual_seed(3)
    model = nn.Sequential(
        _Block(3, 8, 1), _Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)
    ).eval()
    x = torch.randn(6, 3, 12, 12)
    y = torch.randint(0, 4, (6,))
    sig = compute_signatures(
        model, x, y, loss="ce", layers=["0", "1", "1.relu"], fisher="activation", device="cpu"
    )
    got = {k: (v.N, v.d) for k, v in sig.layers.items()}
    assert got == {"0": (6 * 144, 8), "1": (6 * 36, 16), "1.relu": (6 * 36, 16)}
    with torch.no_grad():
        h0 = copy.deepcopy(model[0]).double()(x.double())
    rows = h0.movedim(1, -1).reshape(-1, 8).numpy()  # (sample, position) rows x C
    sv = np.linalg.svd(rows, compute_uv=False)
    b0 = sig.layers["0"]
    assert_close_report(b0.x_spectrum[: len(sv)], sv, atol=TOL * sv[0], what="block 0 X")
    # block 1's output is its relu's: the same X and Delta, so the same spectra
    b1, relu = sig.layers["1"], sig.layers["1.relu"]
    top_x = relu.x_spectrum[0]
    assert_close_report(b1.x_spectrum, relu.x_spectrum, atol=TOL * top_x, what="block 1 X")
    top_g = relu.g_spectrum[0]
    assert_close_report(b1.g_spectrum, relu.g_spectrum, atol=TOL * top_g, what="block 1 G")


def test_k_leaves_the_warnings_filters_of_other_threads_alone() -> None:
    """The reading runs in a worker thread ("ddsmon-read") while the loader thread (DCP's
    ``catch_warnings``) or the main thread may be inside a ``catch_warnings`` block of
    its own. K's vmapped pass silenced vmap's fallback warnings with
    ``warnings.catch_warnings``, which saves and restores the process-wide filter
    list: leaving it while this thread is inside its own block put back the list from
    before that block (this thread's filter dropped), and this block's exit then put
    back the vmapped pass's ignore filter for good."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    entered = threading.Event()
    release = threading.Event()

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        entered.set()
        release.wait(30)
        return ((out - t) ** 2).sum(-1)

    def plain(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out - t) ** 2).sum(-1)

    param_grams_functional(model, {"0": model[0]}, x, y, plain, 5)  # imports done (sympy's filter)
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["k"] = param_grams_functional(model, {"0": model[0]}, x, y, loss, 5)
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    before = list(warnings.filters)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        assert entered.wait(30), "the vmapped pass did not start"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # this thread's own
            mine = list(warnings.filters)
            release.set()
            worker.join(30)
            assert not worker.is_alive()
            assert warnings.filters == mine, "the worker's exit dropped this block's filter"
    finally:
        release.set()
        worker.join(30)
    assert "error" not in box, box.get("error")
    assert set(box["k"]) == {"0"}  # type: ignore[arg-type]
    assert warnings.filters == before, "a filter of the vmapped pass leaked"


def test_vmap_fallback_warnings_are_on_again_after_k() -> None:
    """The switch that silences vmap's fallback warnings inside K's pass is turned back
    on after it: a vmap of the caller's own, over an operator without a batching rule,
    warns again (here raised, under a caller's ``simplefilter("error")``)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    grams = param_grams_functional(
        model, {"2": model[2]}, x, y, lambda o, t: ((o - t) ** 2).sum(-1), 4
    )
    assert set(grams) == {"2"}
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).eval().double()
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def f(p: dict[str, torch.Tensor], s: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, p, (s[None],)).sum()

    seqs = torch.randn(3, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="performance drop"):
            vmap(grad(f), in_dims=(None, 0))(params, seqs)


def test_a_folder_whose_keys_need_transformers_weight_conversion_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """transformers 5 fuses Mixtral's experts on load (``WeightConverter``), and its
    ``save_pretrained`` writes them unfused (``experts.0.w1.weight``): ddsmon does not
    convert tensors, so such a folder read without --model is a CheckpointError naming
    the keys and the model, not a load of wrong or missing weights."""
    transformers = pytest.importorskip("transformers")
    from ddsmon.checkpoints import classify
    from ddsmon.errors import CheckpointError
    from ddsmon.loading import load_checkpoint

    torch.manual_seed(1)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
        num_experts_per_tok=1, max_position_embeddings=32,
    )  # fmt: skip
    folder = tmp_path / "ckpts" / "step_1"
    transformers.MixtralForCausalLM(config).save_pretrained(folder)
    ref = classify(folder)
    assert ref is not None
    with pytest.raises(CheckpointError, match=r"need transformers' weight conversion") as got:
        load_checkpoint(ref, None)
    assert "experts.0.w1.weight" in str(got.value)
    assert "MixtralForCausalLM" in str(got.value)


def test_padding_between_channel_first_layers_reads_its_channels_as_features() -> None:
    """A padding module (``ReflectionPad2d`` between a ReLU and a Conv, as in a
    pix2pix / CycleGAN residual block; ``ZeroPad2d``) keeps its input's channel-first
    layout though not its shape; before, it was read with the padded *width* as d
    (here 11 and 13 where its neighbours read d = 6). X and G held to the per-sample
    loop at 1e-10."""
    from test_adversary_testbeds import _channel_first_loop

    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.InstanceNorm2d(6), nn.ReLU(), nn.ReflectionPad2d(1),
        nn.Conv2d(6, 6, 3), nn.ReLU(), nn.ZeroPad2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()  # fmt: skip
    x = torch.randn(4, 3, 8, 9)
    y = torch.randint(0, 3, (4,))
    sig = compute_signatures(model, x, y, loss="ce", fisher="activation", device="cpu")
    assert (sig.layers["3"].N, sig.layers["3"].d) == (4 * 10 * 11, 6)
    assert (sig.layers["6"].N, sig.layers["6"].d) == (4 * 12 * 13, 6)
    loop = _channel_first_loop(model, x, y, ["3", "6"])
    for name, (xm, dm) in loop.items():
        got = sig.layers[name]
        assert (got.N, got.d) == xm.shape, name
        sv = np.linalg.svd(xm, compute_uv=False)
        assert_close_report(got.x_spectrum[: len(sv)], sv, atol=TOL * sv[0], what=f"{name} X")
        g = np.sort(np.linalg.eigvalsh(dm.T @ dm / 4))[::-1]
        assert_close_report(got.g_spectrum[: len(g)], g, atol=TOL * g[0], what=f"{name} G")
