"""The streamed probe pass (ddsmon.streaming) and the forward-only reading (fisher="none").

Streaming reads the probe in micro-batches of samples and keeps per layer running R
factors of X and Delta (TSQR) and, for K, the rows of A and Delta within a budget. Its
readings must equal the per-sample loop (tests/reference.py) to the same 1e-10 bound as
the one-pass reading, and the one-pass reading itself to 1e-10 of each spectrum's
scale. Here RowFactor folds as soon as it holds more than d rows (FOLD_BYTES = 1), so
the tiny layers of these models go through many folds.

The forward-only reading runs no loss and no backward pass; its activation-side
readings are those of the full reading.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_close_report, per_sample_capture, readings
from test_engine_per_sample import CASES, _compare_activation_side, _compare_param_side
from torch import nn

from ddsmon import compute_signatures, streaming
from ddsmon.errors import ProbeError
from ddsmon.options import FISHER_FAMILIES
from ddsmon.streaming import RowFactor, StreamedProbe, micro_batch_sizes

TOL = 1e-10


@pytest.fixture(autouse=True)
def _fold_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "FOLD_BYTES", 1)


class Spy:
    """The StreamedProbe and RowFactor objects a reading used."""

    def __init__(self) -> None:
        self.probes: list[StreamedProbe] = []
        self.factors: list[RowFactor] = []

    @property
    def folds(self) -> int:
        return sum(f.folds for f in self.factors)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    seen = Spy()
    run, init = StreamedProbe.run, RowFactor.__init__

    def spied_run(self: StreamedProbe, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self not in seen.probes:
            seen.probes.append(self)
        return run(self, *args, **kwargs)

    def spied_init(self: RowFactor, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        seen.factors.append(self)

    monkeypatch.setattr(StreamedProbe, "run", spied_run)
    monkeypatch.setattr(RowFactor, "__init__", spied_init)
    return seen


def _assert_same_readings(got, want, what: str) -> None:
    """Every reading of one layer equal to 1e-10 of its spectrum's scale; ranks exactly."""
    assert (got.n, got.N, got.d, got.finite) == (want.n, want.N, want.d, want.finite), what
    for family, scale_name, fields in (
        ("x", "sigma_max", ("sigma_min", "sigma_max", "floor_x")),
        ("g", "lambda_max", ("lambda_min", "lambda_max", "floor_g", "u_dead_gain")),
        ("param", "param_lambda_max", ("param_lambda_min", "param_lambda_max", "param_floor")),
    ):
        spectrum = f"{family}_spectrum"
        a, b = getattr(got, spectrum), getattr(want, spectrum)
        if b is None or b.size == 0:
            assert a is None or a.size == 0, (what, spectrum)
            continue
        scale = getattr(want, scale_name)
        assert_close_report(a, b, atol=TOL * scale, what=f"{what} {spectrum}")
        for field in fields:
            u, v = getattr(got, field), getattr(want, field)
            assert (u is None) == (v is None), (what, field)
            if v is not None:
                assert u == pytest.approx(v, abs=TOL * scale, rel=0), (what, field)
    for field in ("x_rank", "x_dead", "g_rank", "g_dead", "param_rank", "param_count"):
        assert getattr(got, field) == getattr(want, field), (what, field)
    for floor in ("floor_x", "floor_g", "param_floor"):  # the floors' N, d, dim: the same
        v = getattr(want, floor)
        assert getattr(got, floor) == (None if v is None else pytest.approx(v, rel=1e-9, abs=0))
    for logdet, rank, spectrum in (
        ("logdet", "g_rank", "g_spectrum"),
        ("param_logdet", "param_rank", "param_spectrum"),
    ):
        v = getattr(want, logdet)
        if v is None:
            assert getattr(got, logdet) is None, (what, logdet)
            continue
        values = getattr(want, spectrum)
        tol = float(np.sum(TOL * values[0] / values[: getattr(want, rank)]))
        assert getattr(got, logdet) == pytest.approx(v, abs=tol, rel=0), (what, logdet)


# ---- streamed == one pass == the per-sample loop ----------------------------------------


@pytest.mark.parametrize("probe_batch", [1, 3])
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_streamed_readings_equal_the_loop_and_the_one_pass(
    case_name: str, probe_batch: int, spy: Spy
) -> None:
    """Micro-batches of 1 (after a first of 2) or 3 samples, R factors folded many
    times, and each structured layer's K in a pass of its own (factor_budget=1)."""
    model, x, y, loss = CASES[case_name]()
    n = y.shape[0]
    one = compute_signatures(model, x, y, loss=loss, device="cpu", probe_batch=n)
    assert spy.probes[-1].micro_batches == 1 and spy.folds == 0
    got = compute_signatures(
        model, x, y, loss=loss, device="cpu", probe_batch=probe_batch, factor_budget=1
    )
    probe = spy.probes[-1]
    assert probe.passes > 1  # the K of structured layers in passes of their own
    assert probe.micro_batches == probe.passes * len(micro_batch_sizes(n, probe_batch))
    assert spy.folds > 0
    assert list(got.layers) == list(one.layers)
    refs = per_sample_capture(model, x, y, loss, list(got.layers))
    for layer, g in got.layers.items():
        ref = readings(refs[layer])
        _compare_activation_side(layer, g, ref)
        _compare_param_side(layer, g, ref)
        _assert_same_readings(g, one.layers[layer], f"{case_name} {layer}")


def test_a_whole_probe_that_fits_the_budget_is_one_pass(spy: Spy) -> None:
    """The default budget holds these probes: one pass, after a one-sample measurement."""
    model, x, y, loss = CASES["tokens"]()
    compute_signatures(model, x, y, loss=loss, device="cpu")
    probe = spy.probes[-1]
    assert probe.batch == y.shape[0] and probe.micro_batches == 1 and probe.passes == 1
    assert probe.sample_bytes is not None and probe.sample_bytes > 0


class Counted(nn.Module):
    """Linear -> Tanh -> Linear, recording the batch size of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 16)
        self.act = nn.Tanh()
        self.head = nn.Linear(16, 3)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.head(self.act(self.fc(x)))


@pytest.mark.parametrize("n", [12, 40])
def test_micro_batches_follow_the_memory_budget_whatever_the_probe_size(n: int, spy: Spy) -> None:
    """A budget of 3 measured samples: no forward pass ever sees more than 3 samples (the
    graph a pass holds does not grow with the probe), and the readings are unchanged."""
    torch.manual_seed(0)
    model = Counted().double()  # the engine reads this model itself, not a copy
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    one = compute_signatures(model, x, y, device="cpu", probe_batch=n)
    sample = compute_signatures(model, x[:2], y[:2], device="cpu")
    sample_bytes = spy.probes[-1].sample_bytes
    assert sample_bytes is not None and sample_bytes > 0
    model.sizes.clear()
    got = compute_signatures(model, x, y, device="cpu", memory_budget=3 * sample_bytes)
    assert model.sizes[0] == 1  # the one-sample measurement
    assert max(model.sizes[1:]) == 3 and sum(model.sizes[1:]) == n, model.sizes
    assert spy.probes[-1].batch == 3
    for layer in one.layers:
        _assert_same_readings(got.layers[layer], one.layers[layer], layer)
    assert list(sample.layers) == list(one.layers)


@pytest.mark.parametrize(
    ("n", "batch", "sizes"),
    [(10, 3, [3, 3, 3, 1]), (10, 1, [2] + [1] * 8), (10, 10, [10]), (10, 99, [10]), (1, 1, [1]),
     (5, 4, [4, 1]), (3, 2, [2, 1])],
)  # fmt: skip
def test_micro_batch_sizes(n: int, batch: int, sizes: list[int]) -> None:
    assert micro_batch_sizes(n, batch) == sizes


class Broadcast(nn.Module):
    """Token and position embeddings; the position module's output is (1, T, d), as
    transformers' GPT-2 computes it from position_ids of shape (1, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1])[None]
        return self.head(torch.tanh(self.tok(ids) + self.pos(where)))


def test_an_output_that_does_not_follow_the_batch_is_not_read_in_micro_batches() -> None:
    """With micro-batches of one sample, the (1, T, d) position output looks per-sample;
    the first micro-batch has two samples, so the selection is the one-pass one."""
    torch.manual_seed(1)
    model = Broadcast()
    ids, y = torch.randint(0, 11, (6, 4)), torch.randint(0, 5, (6, 4))
    one = compute_signatures(model, ids, y, device="cpu", probe_batch=6)
    got = compute_signatures(model, ids, y, device="cpu", probe_batch=1)
    assert list(one.layers) == list(got.layers) == ["tok", "head"]
    for layer in one.layers:
        _assert_same_readings(got.layers[layer], one.layers[layer], layer)


# ---- the running factor -----------------------------------------------------------------


def test_row_factor_has_the_singular_values_and_the_small_gains_of_its_rows() -> None:
    """Z (300 x 20) with singular values 1 .. 1e-9, added 7 rows at a time: M (at most
    d + fold_rows + 7 rows) has Z's singular values to rounding, and ||M u||^2 keeps
    ||Z u||^2 = 1e-18 ||Z||^2 to 1e-6; a sum of the blocks' Grams Z_k^T Z_k would
    give u^T Z^T Z u only to about eps ||Z||^2, a hundred times that value."""
    gen = torch.Generator().manual_seed(0)
    n_rows, d = 300, 20
    q, _ = torch.linalg.qr(torch.randn(n_rows, d, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -9, d, dtype=torch.float64)
    z = q @ torch.diag(s) @ v.T
    factor = RowFactor(d, fold_rows=d)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for block in z.split(7):
        factor.add(block)
        gram += block.T @ block
    m = factor.matrix()
    assert factor.folds > 10 and factor.rows == n_rows and m.shape[0] <= 2 * d + 7
    assert_close_report(
        torch.linalg.svdvals(m).numpy(), s.numpy(), atol=1e-14, what="singular values"
    )
    u = v[:, -1]  # ||Z u|| = 1e-9
    exact = float(s[-1] ** 2)
    assert float((m @ u).pow(2).sum()) == pytest.approx(exact, rel=1e-6, abs=0)
    assert abs(float(u @ gram @ u) - exact) > 1e-3 * exact  # why the factor, not the Gram


@pytest.mark.parametrize("blocks", [[2, 2, 2, 2, 1], [5, 10]], ids=["9-rows", "5-then-10"])
def test_row_factor_folds_nothing_before_it_holds_d_rows(blocks: list[int]) -> None:
    """Up to d = 12 rows, or a block that carries it past fold_rows from fewer than d:
    M is the rows themselves (the one-pass readings of a small layer)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(sum(blocks), 12, dtype=torch.float64, generator=gen)
    factor = RowFactor(12, fold_rows=12)
    for block in z.split(blocks):
        factor.add(block)
    assert factor.folds == 0 and torch.equal(factor.matrix(), z)


# ---- special cases of the pass, streamed ---------------------------------------------------


def _mlp(inplace: bool) -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3)
    )


def test_an_output_overwritten_in_place_is_read_before_the_overwrite_when_streamed() -> None:
    """Linear "2" (not the first read, so not re-rooted) is overwritten by ReLU(inplace)."""
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    layers = ["0", "2", "4"]
    got = compute_signatures(_mlp(True), x, y, layers=layers, device="cpu", probe_batch=3)
    want = compute_signatures(_mlp(False), x, y, layers=layers, device="cpu", probe_batch=20)
    for layer in layers:
        _assert_same_readings(got.layers[layer], want.layers[layer], layer)


class SideBranch(nn.Module):
    """fc1 -> fc2; `bad` reads fc1's output and feeds nothing. Its weights are 1e306:
    finite for an ordinary input row, inf for one a thousand times larger."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bad = nn.Linear(6, 5)
        self.fc2 = nn.Linear(6, 3)
        self.double()
        with torch.no_grad():
            self.bad.weight.fill_(1e306)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.bad(h)
        return self.fc2(h)


def test_a_layer_nonfinite_in_its_last_micro_batch_only_is_reported() -> None:
    torch.manual_seed(1)
    model = SideBranch()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    x[11] *= 1e3  # the last micro-batch alone overflows `bad`
    got = compute_signatures(model, x, y, device="cpu", probe_batch=5, factor_budget=1)
    want = compute_signatures(model, x, y, device="cpu", probe_batch=12)
    assert got.layers["bad"].finite is False
    assert got.layers["bad"].nonfinite == want.layers["bad"].nonfinite == "activations not finite"
    for layer in ("fc1", "fc2"):
        _assert_same_readings(got.layers[layer], want.layers[layer], layer)


class PairLeaf(nn.Module):
    """A leaf with its own weight whose output is a tuple (h, |h|)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4) / 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x @ self.weight.T
        return h, h.norm(dim=-1)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairLeaf()
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, norm = self.pair(x)
        return self.head(torch.tanh(z) * (1.0 + 0.3 * norm[:, None]))


@pytest.mark.parametrize("probe_batch", [None, 4])
def test_a_tuple_output_first_in_the_model_keeps_the_gradient_through_its_siblings(
    probe_batch: int | None,
) -> None:
    """``pair`` is read first on a plain input: with the parameters frozen its output
    needs no grad, and re-rooting h would cut the path through |h|. The pass runs again
    with pair's parameters left trainable, so Delta is the loop's."""
    torch.manual_seed(3)
    model = PairNet()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    got = compute_signatures(model, x, y, layers=["pair"], device="cpu", probe_batch=probe_batch)
    ref = readings(per_sample_capture(model, x, y, "ce", ["pair"])["pair"])
    _compare_activation_side("pair", got.layers["pair"], ref)
    _compare_param_side("pair", got.layers["pair"], ref)


class WatchGrad(nn.Module):
    """A Linear that records whether its weight requires grad at each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.weight_grad: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight_grad.append(self.fc.weight.requires_grad)
        return self.head(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("fisher", ["activation", "both"])
def test_no_graph_is_built_for_weight_gradients(fisher: str) -> None:
    """During the probe pass every parameter has requires_grad off (so the forward pass
    saves nothing for weight gradients); afterwards they are as they were."""
    torch.manual_seed(0)
    model = WatchGrad().double()  # read in place
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    sig = compute_signatures(model, x, y, device="cpu", fisher=fisher, probe_batch=4)
    assert model.weight_grad and not any(model.weight_grad)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert sig.layers["fc"].lambda_max is not None and sig.layers["fc"].lambda_max > 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "4"])
def test_bad_probe_batch_and_budgets_are_named(bad: object) -> None:
    model, x, y, _ = CASES["mlp"]()
    for name in ("probe_batch", "memory_budget", "factor_budget"):
        with pytest.raises(ProbeError, match=rf"{name} must be a positive integer"):
            compute_signatures(model, x, y, device="cpu", **{name: bad})  # type: ignore[arg-type]


def test_a_loss_error_in_a_micro_batch_says_so() -> None:
    model, x, y, _ = CASES["mlp"]()
    with pytest.raises(ProbeError, match=r"got \(4, 1\) \(in a micro-batch of 4 of the probe's 40"):
        compute_signatures(
            model, x, y, loss=lambda out, t: out.sum(-1, keepdim=True), device="cpu", probe_batch=4
        )


# ---- a GPT-2-shaped model (torch only) ------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    """GPT-2's shape at a small size: learned positions, pre-LN blocks, tied head."""

    def __init__(self, vocab: int = 37, d: int = 16, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(8, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize("fisher", ["activation", "both", "none"])
def test_gpt_shaped_model_streamed_equals_one_pass(fisher: str) -> None:
    """Block outputs (N = 7 x 6 = 42 rows > d = 16: folded R factors) and every Linear
    with its K, micro-batches of 2 samples."""
    torch.manual_seed(5)
    model = TinyGPT()
    ids = torch.randint(0, 37, (7, 7))
    x, y = ids[:, :-1], ids[:, 1:]
    layers = r"^(wte|blocks\.\d+(\.(qkv|proj|fc|out))?)$"
    one = compute_signatures(model, x, y, "ce", layers, "cpu", fisher=fisher, probe_batch=7)
    got = compute_signatures(
        model, x, y, "ce", layers, "cpu", fisher=fisher, probe_batch=2, factor_budget=20_000
    )
    assert list(got.layers) == list(one.layers) and len(one.layers) == 11
    for layer in one.layers:
        _assert_same_readings(got.layers[layer], one.layers[layer], layer)


def test_transformers_gpt2_streamed_equals_one_pass() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    config = transformers.GPT2Config(
        vocab_size=41, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 41, (5, 7))
    x, y = ids[:, :-1], ids[:, 1:]
    layers = r"^transformer\.(wte|h\.\d+(\.(attn\.c_attn|mlp\.c_fc))?)$"
    one = compute_signatures(model, x, y, "ce", layers, "cpu", probe_batch=5)
    got = compute_signatures(model, x, y, "ce", layers, "cpu", probe_batch=2)
    assert list(got.layers) == list(one.layers) and len(one.layers) == 7
    for layer in one.layers:
        _assert_same_readings(got.layers[layer], one.layers[layer], layer)


# ---- the forward-only reading -----------------------------------------------------------


class NoBackward(nn.Module):
    """CASES' token model shape with witnesses: a full backward hook on the first layer,
    and a record of grad mode and of requires_grad of every output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.act = nn.Tanh()
        self.head = nn.Linear(16, 7)
        self.backward_calls = 0
        self.grad_modes: list[bool] = []
        self.fc.register_full_backward_hook(self._on_backward)

    def _on_backward(self, *_args: object) -> None:
        self.backward_calls += 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled())
        return self.head(self.act(self.fc(self.ln(self.emb(ids)))))


def _raising_loss(_out: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the loss was called")


@pytest.mark.parametrize("probe_batch", [None, 12, 5])
def test_forward_only_reading_equals_the_activation_side_and_runs_no_backward(
    probe_batch: int | None,
) -> None:
    torch.manual_seed(7)
    model = NoBackward().double()  # read in place, so its witnesses are the ones we see
    ids, y = torch.randint(0, 11, (12, 5)), torch.randint(0, 7, (12, 5))
    full = compute_signatures(model, ids, y, fisher="activation", device="cpu", probe_batch=12)
    assert model.backward_calls > 0  # the witness works: a full reading runs backward
    model.backward_calls = 0
    model.grad_modes.clear()
    got = compute_signatures(
        model, ids, None, loss=_raising_loss, fisher="none", device="cpu", probe_batch=probe_batch
    )
    assert model.backward_calls == 0
    assert model.grad_modes and not any(model.grad_modes)
    assert got.fisher == "none" and list(got.layers) == list(full.layers)
    for name, g in got.layers.items():
        want = full.layers[name]
        if probe_batch in (None, 12):  # the same forward pass: the same numbers
            assert np.array_equal(g.x_spectrum, want.x_spectrum), name
            assert (g.sigma_min, g.sigma_max, g.floor_x) == (
                want.sigma_min,
                want.sigma_max,
                want.floor_x,
            ), name
        else:
            assert_close_report(g.x_spectrum, want.x_spectrum, atol=TOL * want.sigma_max, what=name)
        assert (g.x_rank, g.x_dead, g.N, g.d, g.finite) == (
            want.x_rank,
            want.x_dead,
            want.N,
            want.d,
            want.finite,
        ), name
        assert g.lambda_min is None and g.g_rank is None and g.u_dead_gain is None, name
        assert g.g_spectrum.size == 0 and g.param_spectrum is None, name
        assert g.param_lambda_min is None and g.logdet is None, name
        assert g.lambda_ratio is None, name
        assert want.sigma_ratio is not None
        assert g.sigma_ratio == pytest.approx(want.sigma_ratio, rel=1e-9, abs=0), name


def test_forward_only_stops_after_the_last_named_layer() -> None:
    """Micro-batches after the first end their forward pass at the last named layer:
    the head runs once (first micro-batch), not once per micro-batch."""
    torch.manual_seed(8)
    model = NoBackward().double()
    calls: list[int] = []
    model.head.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 11, (10, 5))
    got = compute_signatures(model, ids, None, layers=["ln", "fc"], fisher="none", device="cpu",
                             probe_batch=2)  # fmt: skip
    assert len(model.grad_modes) == 5 and len(calls) == 1
    want = compute_signatures(model, ids, None, layers=["ln", "fc"], fisher="none", device="cpu")
    for name in ("ln", "fc"):
        _assert_same_readings(got.layers[name], want.layers[name], name)


def test_none_is_a_fisher_family() -> None:
    assert "none" in FISHER_FAMILIES


def test_the_measured_reading_frees_its_model_copy_without_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-sample measurement's saved-tensor hook keeps detached aliases: keeping the
    tensors themselves ties a saved output to its own grad_fn through C++, a cycle the
    garbage collector cannot break, and every reading leaked its float64 model copy
    (1 GB a reading for GPT-2 small)."""
    import copy
    import gc
    import weakref

    copies: list[weakref.ref[nn.Module]] = []
    deepcopy = copy.deepcopy

    def spied(obj, *args):  # type: ignore[no-untyped-def]
        made = deepcopy(obj, *args)
        if isinstance(made, nn.Module):
            copies.append(weakref.ref(made))
        return made

    monkeypatch.setattr(copy, "deepcopy", spied)
    model, x, y, loss = CASES["tokens"]()
    gc.disable()
    try:
        for fisher in ("activation", "none"):
            compute_signatures(model, x, y, loss=loss, device="cpu", fisher=fisher)
            assert copies and copies[-1]() is None, f"{fisher}: the model copy is still alive"
    finally:
        gc.enable()


def test_the_heap_is_trimmed_after_each_micro_batch_of_a_streamed_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Free pages go back to the system after every micro-batch of a streamed pass (the
    graph freed between the rows the layers keep: see release_freed_memory), never in a
    whole-probe pass; on glibc the call is real and succeeds."""
    calls: list[int] = []
    real = streaming.release_freed_memory

    def counted() -> bool:
        calls.append(1)
        return real()

    monkeypatch.setattr(streaming, "release_freed_memory", counted)
    model, x, y, loss = CASES["tokens"]()
    n = y.shape[0]
    compute_signatures(model, x, y, loss=loss, device="cpu", probe_batch=n)
    assert calls == []
    compute_signatures(model, x, y, loss=loss, device="cpu", probe_batch=2)
    assert len(calls) == len(micro_batch_sizes(n, 2))
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert real() is True


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.sampled_from([1.7e308, -1.7e308, float("inf"), float("-inf"), float("nan")]),
        ),
        min_size=0,
        max_size=12,
    ),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]),
)
def test_all_finite_agrees_with_the_entrywise_check(
    values: list[float], dtype: torch.dtype
) -> None:
    """The sum-first check says what ``torch.isfinite(t).all()`` says, overflowing sums
    of finite entries (1.7e308 twice, float32's and float16's small ranges) included."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(-1, 1)
    assert streaming.all_finite(t) == bool(torch.isfinite(t).all())


def test_all_finite_when_finite_entries_overflow_the_sum() -> None:
    big = torch.full((4, 3), 1e308, dtype=torch.float64)
    assert not torch.isfinite(big.sum())
    assert streaming.all_finite(big)
    big[2, 1] = float("nan")
    assert not streaming.all_finite(big)
