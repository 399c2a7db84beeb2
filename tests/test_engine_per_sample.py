"""Per-sample gradients, G and K against an independent per-sample loop (issue 2, tests 3-5).

The reference (tests/reference.py) runs one forward and one backward per sample on a
float64 copy of the model and builds G (d x d) and K (n x n) from the explicit matrices.
The engine does one batched pass, builds G on the smaller side, K from structure for
Linear/Embedding and by ``torch.func`` for everything else (LayerNorm, a custom module).

Tolerance: 1e-10 of the largest value (eigenvalue, singular value, matrix entry), the
issue's bound. Both sides run in float64 from the same weights, so the true differences
are rounding, ~1e-15 relative.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from reference import assert_close_report, per_sample_capture, readings
from torch import nn

from ddsmon import compute_signatures
from ddsmon.losses import per_sample_loss_fn
from ddsmon.param_gram import (
    DENSE_PAIR_DISCOUNT,
    DENSE_TOKEN_ROWS,
    GRAM_METHODS,
    _padded_token_rows,
    _token_rows,
    cheaper_gram_method,
    is_structured,
    param_gram_structured,
    param_grams_functional,
)
from ddsmon.probe import LayerCapture, run_probe_pass

TOL = 1e-10


class MLP(nn.Module):
    """Linear+bias, LayerNorm (torch.func path), ReLU, Linear, Tanh, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.ln = nn.LayerNorm(12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 10)
        self.act2 = nn.Tanh()
        self.out = nn.Linear(10, 5)
        with torch.no_grad():  # a generic LayerNorm, not the identity affine map
            self.ln.weight.normal_(1.0, 0.3)
            self.ln.bias.normal_(0.0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.fc2(self.act(self.ln(self.fc1(x))))))


class TokenModel(nn.Module):
    """Embedding over (n, T) token ids -> LayerNorm -> Linear -> Tanh -> Linear (n, T, C)."""

    def __init__(self, vocab: int = 11, emb: int = 8, hidden: int = 16, classes: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.ln = nn.LayerNorm(emb)
        self.fc = nn.Linear(emb, hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            self.ln.weight.normal_(1.0, 0.3)
            self.ln.bias.normal_(0.0, 0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(self.ln(self.emb(ids)))))


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 uses it: ``x @ W + b``, W is nx x nf."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class PaddedConv1DModel(nn.Module):
    """Embedding with padding_idx 0 -> Conv1D (GPT-2 style) -> Tanh -> Linear without bias."""

    def __init__(self, vocab: int = 9, emb: int = 6, hidden: int = 10, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        self.proj = Conv1D(hidden, emb)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, classes, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.proj(self.emb(ids))))


def _mlp_case():
    torch.manual_seed(10)
    model = MLP()
    x = torch.randn(40, 6)
    y = torch.randint(0, 5, (40,))
    return model, x, y, "ce"


def _token_case():
    torch.manual_seed(11)
    model = TokenModel()
    ids = torch.randint(0, 11, (12, 5))
    y = torch.randint(0, 7, (12, 5))
    return model, ids, y, "ce"


def _padded_case():
    torch.manual_seed(12)
    model = PaddedConv1DModel()
    ids = torch.randint(0, 9, (10, 6))
    ids[:, -2:] = 0  # padded tails: these positions send the embedding weight nothing
    y = torch.randint(0, 5, (10, 6))
    return model, ids, y, "ce"


CASES = {"mlp": _mlp_case, "tokens": _token_case, "padded": _padded_case}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest):
    """(name, model, inputs, targets, loss, engine Signatures, reference captures)."""
    model, x, y, loss = CASES[request.param]()
    sig = compute_signatures(model, x, y, loss=loss, device="cpu")
    refs = per_sample_capture(model, x, y, loss, list(sig.layers))
    return request.param, model, x, y, loss, sig, refs


def test_default_selection_reads_every_leaf(case) -> None:
    name, *_, sig, _ = case
    expected = {"mlp": ["fc1", "ln", "act", "fc2", "act2", "out"],
                "tokens": ["emb", "ln", "fc", "act", "head"],
                "padded": ["emb", "proj", "act", "head"]}[name]  # fmt: skip
    assert list(sig.layers) == expected


def _compare_activation_side(layer: str, got, ref: dict) -> None:
    what = f"{layer}"
    N, d = ref["N"], ref["d"]
    assert (got.n, got.N, got.d) == (ref["n"], N, d), what
    assert got.finite and got.nonfinite is None, what
    x_ref = ref["x_spectrum"]
    assert_close_report(got.x_spectrum, x_ref, atol=TOL * x_ref[0], what=f"{what} x_spectrum")
    assert got.x_rank == ref["x_rank"] and got.x_dead == ref["x_dead"], what
    assert got.sigma_min == pytest.approx(ref["sigma_min"], abs=TOL * x_ref[0]), what
    assert got.sigma_max == pytest.approx(ref["sigma_max"], rel=TOL, abs=0), what

    g_ref = ref["g_spectrum"]
    lam = g_ref[0]
    k = min(N, d)
    assert len(got.g_spectrum) in (k, d), what
    assert_close_report(got.g_spectrum[:k], g_ref[:k], atol=TOL * lam, what=f"{what} g_spectrum")
    assert np.all(g_ref[k:] <= ref["floor_g"]), what  # beyond min(N, d): rounding only
    assert got.g_rank == ref["g_rank"] and got.g_dead == ref["g_dead"], what
    assert got.lambda_max == pytest.approx(lam, rel=TOL, abs=0), what
    assert got.lambda_min == pytest.approx(ref["lambda_min"], abs=TOL * lam), what
    # logdet: each log eigenvalue moves by ~|d lambda| / lambda
    pos = g_ref[: ref["g_rank"]]
    log_tol = float(np.sum(TOL * lam / pos))
    assert got.logdet == pytest.approx(ref["logdet"], abs=log_tol), what
    assert got.log_volume == pytest.approx(ref["log_volume"], abs=log_tol), what
    assert got.u_dead_gain == pytest.approx(ref["u_dead_gain"], abs=TOL * lam), what


def _compare_param_side(layer: str, got, ref: dict) -> None:
    what = f"{layer} param"
    if "param_spectrum" not in ref:
        assert got.param_spectrum is None and got.param_lambda_max is None, what
        return
    k_ref = ref["param_spectrum"]
    lam = k_ref[0]
    assert got.param_count == ref["param_count"], what
    assert got.param_spectrum is not None, f"{what}: no parameter-side reading"
    assert_close_report(got.param_spectrum, k_ref, atol=TOL * lam, what=f"{what} spectrum")
    assert got.param_rank == ref["param_rank"], what
    assert got.param_lambda_max == pytest.approx(lam, rel=TOL, abs=0), what
    assert got.param_lambda_min == pytest.approx(ref["param_lambda_min"], abs=TOL * lam), what
    pos = k_ref[: ref["param_rank"]]
    log_tol = float(np.sum(TOL * lam / pos))
    assert got.param_logdet == pytest.approx(ref["param_logdet"], abs=log_tol), what
    assert got.param_log_volume == pytest.approx(ref["param_log_volume"], abs=log_tol), what


def test_readings_equal_the_per_sample_loop(case) -> None:
    """Every layer: X, G and K spectra and all scalar readings equal the reference's."""
    *_, sig, refs = case
    for layer, got in sig.layers.items():
        ref = readings(refs[layer])
        _compare_activation_side(layer, got, ref)
        _compare_param_side(layer, got, ref)


def test_ce_head_gradient_has_its_structural_zero(case) -> None:
    """CE gradients w.r.t. logits sum to zero per row: G of the head has rank C - 1."""
    name, *_, sig, _ = case
    head = sig.layers["out" if name == "mlp" else "head"]
    assert head.g_rank == head.d - 1 and head.g_dead == 1


def _captures(case) -> dict:
    """The engine's probe pass (X, Delta, and A of structured layers) on a float64 copy."""
    _, model, x, y, loss, sig, _ = case
    xx = x.double() if x.is_floating_point() else x
    return run_probe_pass(
        _double_copy(model), xx, y, per_sample_loss_fn(loss), list(sig.layers),
        n=y.shape[0], keep_inputs=is_structured,
    ).captures  # fmt: skip


def test_probe_delta_equals_the_loop_row_by_row(case) -> None:
    """X and Delta themselves (not just their spectra) from ddsmon.probe.run_probe_pass."""
    *_, y, _, _, refs = case
    caps = _captures(case)
    for layer, cap in caps.items():
        ref = refs[layer]
        scale_x = np.abs(ref.X).max()
        scale_d = np.abs(ref.Delta).max()
        assert_close_report(cap.output.numpy(), ref.X, atol=TOL * scale_x, what=f"{layer} X")
        assert cap.grad is not None
        assert_close_report(cap.grad.numpy(), ref.Delta, atol=TOL * scale_d, what=f"{layer} Delta")
        if is_structured(cap.module):
            k = param_gram_structured(cap, y.shape[0]).numpy()
            k_ref = ref.J @ ref.J.T / ref.n
            assert_close_report(k, k_ref, atol=TOL * np.abs(k_ref).max(), what=f"{layer} K")


@pytest.mark.parametrize("method", ["row_gram", "per_sample"])
@pytest.mark.parametrize("chunk_bytes", [1 << 28, 200], ids=["one-block", "column-blocks"])
def test_both_structured_gram_methods_equal_the_loop(case, method: str, chunk_bytes: int) -> None:
    """K of Linear and Embedding by either method, in one block of J or in many."""
    *_, y, _, _, refs = case
    caps = _captures(case)
    checked = 0
    for layer, cap in caps.items():
        if not is_structured(cap.module):
            continue
        k = param_gram_structured(cap, y.shape[0], method=method, chunk_bytes=chunk_bytes)
        ref = refs[layer]
        k_ref = ref.J @ ref.J.T / ref.n
        what = f"{layer} K ({method}, chunk_bytes={chunk_bytes})"
        assert_close_report(k.numpy(), k_ref, atol=TOL * np.abs(k_ref).max(), what=what)
        checked += 1
    assert checked >= 3


def test_auto_gram_method_takes_the_per_sample_path_for_long_sequences() -> None:
    """Few samples, many positions: J (n x d_in d_out) is cheaper than the N x N Grams."""
    torch.manual_seed(3)
    n, t, d_in, d_out = 2, 64, 3, 4
    module = nn.Linear(d_in, d_out).double()
    a = torch.randn(n * t, d_in, dtype=torch.float64)
    delta = torch.randn(n * t, d_out, dtype=torch.float64)
    cap = LayerCapture("fc", module, a @ module.weight.T, grad=delta, inputs=a)
    j = torch.stack([
        torch.cat([(delta[i * t:(i + 1) * t].T @ a[i * t:(i + 1) * t]).reshape(-1),
                   delta[i * t:(i + 1) * t].sum(0)])
        for i in range(n)
    ])  # fmt: skip
    k_ref = (j @ j.T / n).numpy()
    assert cheaper_gram_method(n * t, n, d_in, d_out) == "per_sample"
    for method in GRAM_METHODS:
        k = param_gram_structured(cap, n, method=method).numpy()
        assert_close_report(k, k_ref, atol=TOL * np.abs(k_ref).max(), what=method)
    with pytest.raises(ValueError, match="method must be one of"):
        param_gram_structured(cap, n, method="fast")


@pytest.mark.parametrize(
    ("rows", "n", "d_in", "d_out", "pairs", "expected"),
    [
        (4096, 32, 768, 3072, None, "per_sample"),  # GPT-2 MLP, 32 x 128 tokens: ~5x fewer
        (4096, 32, 0, 768, 4200, "per_sample"),  # GPT-2 wte, random ids: few shared tokens
        (4096, 1024, 0, 32, 4096**2 // 3, "row_gram"),  # a third of row pairs in small blocks
        (4096, 1024, 0, 32, 4096**2 // 8, "per_sample"),  # 4 ids each in half the samples
        (256, 256, 128, 128, None, "row_gram"),  # one row per sample: J is never cheaper
        (256, 256, 0, 128, 256, "row_gram"),
        (128, 2, 3, 4, None, "per_sample"),
        (8192, 4096, 4096, 4096, None, "row_gram"),  # two positions a sample, wide layer
        (256, 32, 64, 64, None, "row_gram"),  # fewer multiply-adds per sample, but not 2.5x fewer
    ],
)
def test_cheaper_gram_method_counts_the_multiply_adds(
    rows: int, n: int, d_in: int, d_out: int, pairs: int | None, expected: str
) -> None:
    assert cheaper_gram_method(rows, n, d_in, d_out, pairs=pairs) == expected


def test_token_rows_group_the_probe_by_sample_and_token() -> None:
    """Two samples of three positions; ids 5 and 2 are shared, 7 and 9 are not."""
    tokens = _token_rows(torch.tensor([5, 5, 2, 2, 7, 9]), n=2, vocab=10)
    # rows of S: (sample 0, id 2), (0, 5), (1, 2), (1, 7), (1, 9)
    assert tokens.index.tolist() == [1, 1, 0, 2, 3, 4]
    assert tokens.owner.tolist() == [0, 0, 1, 1, 1]
    assert tokens.counts.tolist() == [2, 1, 1, 1]  # ids 2, 5, 7, 9
    assert tokens.pairs == 4 + 1 + 1 + 1
    assert tokens.block_pairs == 4 + 1 + 1 + 1  # blocks of 2, 1, 1, 1 rows


def test_token_blocks_round_counts_up_to_powers_of_two() -> None:
    counts = torch.tensor([1, 2, 3, 4, 5, 8, 9, 17, 31, 32, 100])
    want = [1 << (c - 1).bit_length() for c in counts.tolist()]  # the next power of two
    assert _padded_token_rows(counts).tolist() == want == [1, 2, 4, 4, 8, 8, 16, 32, 32, 32, 128]
    # 3 samples hold id 4 (a block of 4 rows), 40 hold id 0 (dense: its exact 40 x 40)
    ids = torch.tensor([[0, 4]] * 3 + [[0, 1]] * 37).flatten()
    tokens = _token_rows(ids, n=40, vocab=5)
    assert tokens.counts.tolist() == [40, 37, 3]  # ids 0, 1, 4
    assert DENSE_TOKEN_ROWS <= 37
    assert tokens.pairs == 40**2 + 37**2 + 3**2
    assert tokens.block_pairs == (40**2 + 37**2) // DENSE_PAIR_DISCOUNT + 4**2


@pytest.mark.parametrize("chunk_bytes", [1 << 28, 1], ids=["one-batch", "batch-per-token"])
@pytest.mark.parametrize("vocab", [3, 50, 10_000], ids=["dense-tokens", "mixed", "sparse"])
def test_embedding_per_sample_gram_equals_the_explicit_gradients(
    vocab: int, chunk_bytes: int
) -> None:
    """K from the rows of S against J built explicitly (n x vocab*d): frequent tokens take
    the dense product (a token in >= DENSE_TOKEN_ROWS samples), rare ones the batched
    blocks, padded to powers of two (several block sizes, most counts not powers of two);
    padding positions contribute nothing."""
    gen = torch.Generator().manual_seed(vocab)
    n, t, d = 40, 7, 3
    module = nn.Embedding(vocab, d, padding_idx=1).double()
    ids = torch.randint(0, vocab, (n * t,), generator=gen)
    ids[::5] = 1
    delta = torch.randn(n * t, d, dtype=torch.float64, generator=gen)
    cap = LayerCapture("emb", module, delta, grad=delta, inputs=ids)
    kept = torch.where((ids == 1)[:, None], 0.0, delta)
    j = torch.zeros(n, vocab, d, dtype=torch.float64)
    j.index_put_((torch.arange(n * t) // t, ids), kept, accumulate=True)
    j = j.reshape(n, -1)
    k_ref = (j @ j.T / n).numpy()
    # samples holding each id: the padding id is in all of them (a dense token whose rows
    # are zero); other ids reach DENSE_TOKEN_ROWS samples only in the 3-token vocabulary
    present = torch.zeros(n, vocab, dtype=torch.bool)
    present[torch.arange(n * t) // t, ids] = True
    samples = present.sum(dim=0)
    assert samples[1] == n and samples[1] >= DENSE_TOKEN_ROWS
    samples[1] = 0
    assert bool((samples >= DENSE_TOKEN_ROWS).any()) == (vocab == 3)
    tokens = _token_rows(ids, n, vocab)
    assert tokens.counts.max() == n
    small = tokens.counts[tokens.counts < DENSE_TOKEN_ROWS]
    blocks = _padded_token_rows(small)
    # block sizes 1, 2, 4, 8 (mixed; 28 tokens padded), 1, 2 (sparse), none (all dense)
    assert len(set(blocks.tolist())) == {3: 0, 50: 4, 10_000: 2}[vocab], blocks.unique()
    assert bool((blocks != small).any()) == (vocab == 50)  # padded slots are read
    for method in ("row_gram", "per_sample"):
        k = param_gram_structured(cap, n, method=method, chunk_bytes=chunk_bytes).numpy()
        what = f"vocab {vocab}, {method}"
        assert_close_report(k, k_ref, atol=1e-12 * np.abs(k_ref).max(), what=what)


def test_structured_paths_handle_one_sample_no_bias_and_zero_gradients() -> None:
    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(3, 4, bias=False).double()
    a = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    delta = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    cap = LayerCapture("fc", linear, a @ linear.weight.T, grad=delta, inputs=a)
    j = (delta.T @ a).reshape(1, -1)  # n = 1, T = 6
    for method in GRAM_METHODS:
        k = param_gram_structured(cap, 1, method=method)
        assert k.shape == (1, 1)
        assert float(k) == pytest.approx(float(j @ j.T), rel=1e-12), method
    emb = nn.Embedding(5, 2).double()
    zero = torch.zeros(8, 2, dtype=torch.float64)
    cap = LayerCapture("emb", emb, zero, grad=zero, inputs=torch.tensor([0, 1, 1, 4] * 2))
    for method in GRAM_METHODS:
        assert not param_gram_structured(cap, 2, method=method).any(), method


def test_embeddings_that_rescale_gradients_or_weights_are_not_structured() -> None:
    assert is_structured(nn.Embedding(5, 2, padding_idx=0))
    assert not is_structured(nn.Embedding(5, 2, max_norm=1.0))
    assert not is_structured(nn.Embedding(5, 2, scale_grad_by_freq=True))
    assert is_structured(Conv1D(4, 3)) and is_structured(nn.Linear(3, 4))
    assert not is_structured(nn.Conv1d(3, 4, 1))


def test_functional_gram_equals_the_loop(case) -> None:
    """K via torch.func (vmap of grad) equals J J^T / n of the loop, entrywise: for
    LayerNorm, and for modules the engine reads from structure (the two must agree)."""
    name, model, x, y, loss, _, refs = case
    work = _double_copy(model)
    xx = x.double() if x.is_floating_point() else x
    layers = {"mlp": ["ln", "fc2"], "tokens": ["ln", "emb"], "padded": ["emb", "proj"]}[name]
    modules = {layer: work.get_submodule(layer) for layer in layers}
    grams = param_grams_functional(work, modules, xx, y, per_sample_loss_fn(loss), y.shape[0])
    for layer in layers:
        ref = refs[layer]
        k_ref = ref.J @ ref.J.T / ref.n
        atol = TOL * np.abs(k_ref).max()
        assert_close_report(grams[layer].numpy(), k_ref, atol=atol, what=f"{layer} K")


def _double_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


# ---- N < d and N > d: one positive spectrum (issue 2, test 4) ----------------------------


def _wide_case(n: int):
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 3))
    x = torch.randn(n, 5)
    y = torch.randn(n, 3)
    return model, x, y


def test_small_side_and_large_side_give_one_positive_spectrum() -> None:
    """n = 8 < d = 24 (engine decomposes 8 x 8) vs the same probe repeated 4 times
    (n = 32 > d, 24 x 24): G = Delta^T Delta / n is the same matrix, so the positive
    spectra, ranks and logdets agree, and both equal eigvalsh of the reference d x d G.
    """
    model, x, y = _wide_case(8)
    small = compute_signatures(model, x, y, loss="mse", layers=["0", "1"], device="cpu")
    big = compute_signatures(
        model, x.repeat(4, 1), y.repeat(4, 1), loss="mse", layers=["0", "1"], device="cpu"
    )
    refs = per_sample_capture(model, x, y, "mse", ["0", "1"])
    for layer in ("0", "1"):
        s, b = small.layers[layer], big.layers[layer]
        assert (s.N, s.d, b.N, b.d) == (8, 24, 32, 24)
        ref = readings(refs[layer])
        g_ref = ref["g_spectrum"]
        lam = g_ref[0]
        # Delta of "0" has 8 independent rows; that of "1" (= 2/3 W^T e) lies in a 3-space
        rank = {"0": 8, "1": 3}[layer]
        assert s.g_rank == b.g_rank == ref["g_rank"] == rank, (layer, s.g_rank, b.g_rank)
        assert len(s.g_spectrum) == 8  # the small side, never the d x d matrix
        assert_close_report(s.g_spectrum, g_ref[:8], atol=TOL * lam, what=f"{layer} N<d")
        assert_close_report(b.g_spectrum[:8], g_ref[:8], atol=TOL * lam, what=f"{layer} N>d")
        assert np.all(s.g_spectrum[rank:] <= s.floor_g), f"{layer}: rounding zeros above floor"
        assert np.all(b.g_spectrum[rank:] <= b.floor_g), f"{layer}: rounding zeros above floor"
        assert s.lambda_min == pytest.approx(b.lambda_min, rel=1e-9, abs=0)
        assert s.logdet == pytest.approx(b.logdet, abs=1e-8)
        assert s.u_dead_gain == pytest.approx(b.u_dead_gain, rel=1e-8, abs=0)
        # X repeated 4 times: singular values x 2, same rank (an affine map of 5 inputs: 6)
        assert s.x_rank == b.x_rank == ref["x_rank"] == {"0": 6, "1": 8}[layer]
        r = s.x_rank
        assert_close_report(b.x_spectrum[:r], 2.0 * s.x_spectrum[:r], rtol=1e-10, what="X x 2")


# ---- structural zeros (issue 2, test 5) ---------------------------------------------------


def test_one_hot_inputs_give_the_smallest_positive_singular_value() -> None:
    """5 categories through Linear(5, 16): X has rank 5 < d = 16. sigma_min is the 5th
    singular value (numpy), never the ~1e-16 rounding zeros, and x_rank = 5.
    """
    torch.manual_seed(30)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    cats = torch.arange(60) % 5
    x = torch.nn.functional.one_hot(cats, 5).float()
    y = torch.randint(0, 3, (60,))
    sig = compute_signatures(model, x, y, loss="ce", layers=["0", "1"], device="cpu")
    refs = per_sample_capture(model, x, y, "ce", ["0", "1"])
    for layer in ("0", "1"):
        got = sig.layers[layer]
        X = refs[layer].X
        sv = np.linalg.svd(X, compute_uv=False)
        assert np.linalg.matrix_rank(X) == 5
        assert sv[-1] < 1e-12 * sv[0]  # the structural zeros numpy sees
        assert got.x_rank == 5 and got.x_dead == 11, (layer, got.x_rank)
        assert got.sigma_min == pytest.approx(sv[4], rel=1e-10, abs=0), (
            layer,
            got.sigma_min,
            sv[4],
        )
        assert got.sigma_min > 1e-3 * sv[0]
        ref = readings(refs[layer])
        assert got.u_dead_gain == pytest.approx(ref["u_dead_gain"], abs=TOL * ref["lambda_max"])
        assert math.isfinite(got.logdet)
