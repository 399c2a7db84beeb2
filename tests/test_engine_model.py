"""The engine and the user's model: nothing modified, dtypes, layer selection, tuple
outputs, the floor formulas, the fisher families (issue 2, "Also").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import per_sample_capture, readings
from torch import nn

from ddsmon import compute_signatures
from ddsmon.errors import ProbeError

F64 = float(np.finfo(np.float64).eps)
F32 = float(np.finfo(np.float32).eps)


class BNNet(nn.Module):
    """Linear -> BatchNorm (running stats a train-mode forward would change) -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.bn(self.fc1(x)))))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict, flags: dict, dtype: torch.dtype) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), f"{k} changed"  # bit-identical, buffers included
    for name, m in model.named_modules():
        assert m.training == flags[name], f"training flag of {name!r} not restored"
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
        assert not m._backward_hooks, f"backward hook left on {name!r}"
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad was written"
        assert p.dtype == dtype and p.requires_grad, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-model", "fp64-model"])
@pytest.mark.parametrize("forward_dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_model_is_not_modified(dtype: torch.dtype, forward_dtype: torch.dtype) -> None:
    """Train-mode model with one submodule in eval: weights, BatchNorm running stats,
    dtypes, .grad, hooks and every module's training flag are as they were. (A float64
    model read in float64 is the path where the engine may use the model itself.)
    """
    torch.manual_seed(0)
    model = BNNet().to(dtype).train()
    model.drop.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    before = _state(model)
    x, y = torch.randn(16, 5, dtype=dtype), torch.randint(0, 3, (16,))
    sig = compute_signatures(model, x, y, loss="ce", device="cpu", forward_dtype=forward_dtype)
    _assert_untouched(model, before, flags, dtype)
    assert sig.forward_dtype == str(forward_dtype).removeprefix("torch.")
    assert x.dtype == dtype  # the probe is not converted in place either


def test_model_is_restored_after_an_error_mid_pass() -> None:
    """A bad loss raises after the forward pass: flags and hooks are still restored."""
    torch.manual_seed(0)
    model = BNNet().double().train()
    flags = {name: m.training for name, m in model.named_modules()}
    before = _state(model)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    with pytest.raises(ProbeError, match="shape"):
        compute_signatures(model, x, y, loss=lambda out, t: out.sum(), device="cpu")
    _assert_untouched(model, before, flags, torch.float64)


def test_eval_mode_probe_matches_the_eval_mode_reference() -> None:
    """BatchNorm and Dropout read in eval mode: the readings equal the eval-mode loop."""
    torch.manual_seed(1)
    model = BNNet().train()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    sig = compute_signatures(model, x, y, loss="ce", layers=["fc1", "bn"], device="cpu")
    refs = per_sample_capture(model, x, y, "ce", ["fc1", "bn"])
    for name in ("fc1", "bn"):
        ref = readings(refs[name])
        got = sig.layers[name]
        assert got.lambda_max == pytest.approx(ref["lambda_max"], rel=1e-10, abs=0), name
        assert got.lambda_min == pytest.approx(ref["lambda_min"], rel=1e-8, abs=0), name
        assert got.sigma_min == pytest.approx(ref["sigma_min"], rel=1e-8, abs=0), name
    assert model.training  # and the model is back in train mode


class Tokens(nn.Module):
    """(ids, features) -> Embedding(ids) + Linear(features) -> Linear head, over (n, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(3, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids) + self.proj(feats)))


@pytest.mark.parametrize("forward_dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_integer_inputs_stay_integer_and_floats_follow_the_reading_dtype(
    forward_dtype: torch.dtype,
) -> None:
    seen: list[tuple[torch.dtype, ...]] = []
    targets_seen: list[torch.dtype] = []
    model = Tokens()
    # deepcopy keeps this function (and the list it closes over) as it is
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.dtype for a in args)))

    def mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        targets_seen.append(t.dtype)
        return (out - t).pow(2).reshape(out.shape[0], -1).mean(1)

    ids = torch.randint(0, 10, (6, 4))
    feats = torch.randn(6, 4, 3)
    y = torch.randn(6, 4, 4)
    sig = compute_signatures(
        model, (ids, feats), y, loss=mse, device="cpu", forward_dtype=forward_dtype
    )
    assert seen and all(s == (torch.int64, forward_dtype) for s in seen), seen
    assert targets_seen and all(t == forward_dtype for t in targets_seen), targets_seen
    assert ids.dtype == torch.int64 and feats.dtype == torch.float32
    assert sig.layers["emb"].N == 24 and sig.layers["emb"].d == 6


class ArgMax(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.argmax(dim=-1, keepdim=True).expand(-1, 4)  # integer, last dim 4


class Selection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        self.pick = ArgMax()
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.body(x))
        self.pick(h)
        return self.head(h)


def test_default_selection_is_leaves_with_floating_outputs_of_width_two_or_more() -> None:
    """Containers, an integer-output leaf and a width-1 head are not selected."""
    torch.manual_seed(2)
    model = Selection()
    x, y = torch.randn(12, 4), torch.randn(12, 1)
    sig = compute_signatures(model, x, y, loss="mse", device="cpu")
    assert list(sig.layers) == ["body.0", "body.1", "block.0", "block.1"]


class PairLeaf(nn.Module):
    """A leaf with its own parameter whose output is a tuple (h, |h|)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x @ self.weight.T
        return h, h.norm(dim=-1)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.pair = PairLeaf(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, norm = self.pair(self.fc(x))
        return self.head(torch.tanh(z) * (1.0 + 0.1 * norm[:, None]))


def test_tuple_output_contributes_its_first_tensor() -> None:
    """X, G and K (torch.func path, custom module) of the tuple's first tensor."""
    torch.manual_seed(3)
    model = PairNet()
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    got = compute_signatures(model, x, y, loss="ce", device="cpu").layers["pair"]
    ref = readings(per_sample_capture(model, x, y, "ce", ["pair"])["pair"])
    assert (got.N, got.d) == (30, 5)
    lam, kam = ref["lambda_max"], ref["param_lambda_max"]
    np.testing.assert_allclose(
        got.x_spectrum, ref["x_spectrum"], rtol=0, atol=1e-10 * ref["sigma_max"]
    )
    np.testing.assert_allclose(got.g_spectrum, ref["g_spectrum"], rtol=0, atol=1e-10 * lam)
    assert got.u_dead_gain == pytest.approx(ref["u_dead_gain"], abs=1e-10 * lam)
    assert got.param_count == 30
    assert got.param_spectrum is not None
    np.testing.assert_allclose(got.param_spectrum, ref["param_spectrum"], rtol=0, atol=1e-10 * kam)


class SeqNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 12)
        self.fc = nn.Linear(12, 9)
        self.ln = nn.LayerNorm(9)
        self.head = nn.Linear(9, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(torch.relu(self.fc(self.emb(ids)))))


@pytest.mark.parametrize(
    ("forward_dtype", "eps"), [(torch.float64, F64), (torch.float32, F32)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("n", [3, 16], ids=["N<d", "N>d"])
def test_floors_and_readings_follow_their_formulas(
    forward_dtype: torch.dtype, eps: float, n: int
) -> None:
    """floor_x = max(N, d) eps sigma_max, floor_g = min(N, d) eps lambda_max,
    param_floor = n eps param_lambda_max; ranks count the spectra above the floors;
    lambda_min/sigma_min are the smallest values above them; logdet, log_volume, dead.
    Sequence axis T = 3, so N = 3n rows: n = 3 gives N = 9 < d = 12 for the embedding.
    """
    torch.manual_seed(4)
    model = SeqNet()
    ids, y = torch.randint(0, 7, (n, 3)), torch.randint(0, 5, (n, 3))
    sig = compute_signatures(model, ids, y, loss="ce", device="cpu", forward_dtype=forward_dtype)
    assert sig.n == n and sig.device == "cpu" and sig.fisher == "both"
    assert list(sig.layers) == ["emb", "fc", "ln", "head"]
    for name, s in sig.layers.items():
        N, d = s.N, s.d
        assert (s.n, N) == (n, 3 * n), name
        assert s.floor_x == pytest.approx(max(N, d) * eps * s.sigma_max, rel=1e-12, abs=0), name
        assert s.floor_g == pytest.approx(min(N, d) * eps * s.lambda_max, rel=1e-12, abs=0), name
        assert s.sigma_max == pytest.approx(float(s.x_spectrum[0]), rel=1e-15, abs=0), name
        assert s.lambda_max == pytest.approx(float(s.g_spectrum[0]), rel=1e-15, abs=0), name
        assert len(s.g_spectrum) == min(N, d), name
        assert np.all(np.diff(s.g_spectrum) <= 0) and np.all(np.diff(s.x_spectrum) <= 0), name
        xs, gs = s.x_spectrum[s.x_spectrum > s.floor_x], s.g_spectrum[s.g_spectrum > s.floor_g]
        assert s.x_rank == xs.size and s.x_dead == d - s.x_rank, name
        assert s.g_rank == gs.size and s.g_dead == d - s.g_rank, name
        assert s.sigma_min == float(xs[-1]) and s.lambda_min == float(gs[-1]), name
        assert s.logdet == pytest.approx(float(np.sum(np.log(gs))), rel=1e-12, abs=0), name
        assert s.log_volume == pytest.approx(
            s.logdet - s.g_rank * math.log(s.lambda_max), rel=1e-12, abs=1e-12
        ), name
        assert s.param_spectrum is not None and len(s.param_spectrum) == n, name
        ps = s.param_spectrum[s.param_spectrum > s.param_floor]
        assert s.param_floor == pytest.approx(n * eps * s.param_lambda_max, rel=1e-12, abs=0), name
        assert s.param_rank == ps.size and s.param_lambda_min == float(ps[-1]), name
        assert s.param_logdet == pytest.approx(float(np.sum(np.log(ps))), rel=1e-12, abs=0), name
        d_out = {"emb": 12, "fc": 9, "ln": 9, "head": 5}[name]
        assert d == d_out
        assert s.to_dict()["lambda_ratio"] == pytest.approx(
            s.lambda_min / s.lambda_max, rel=1e-15, abs=0
        )


def test_fisher_families_select_what_is_read() -> None:
    torch.manual_seed(5)
    model = SeqNet()
    ids, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 5, (6, 3))
    act = compute_signatures(model, ids, y, fisher="activation", device="cpu").layers["fc"]
    par = compute_signatures(model, ids, y, fisher="parameter", device="cpu").layers["fc"]
    both = compute_signatures(model, ids, y, fisher="both", device="cpu").layers["fc"]
    assert act.lambda_min is not None and act.param_lambda_min is None
    assert act.param_spectrum is None
    assert par.param_lambda_min is not None and par.lambda_min is None and par.sigma_min is None
    assert act.lambda_min == both.lambda_min and par.param_lambda_min == both.param_lambda_min
    with pytest.raises(ProbeError, match="fisher"):
        compute_signatures(model, ids, y, fisher="hessian", device="cpu")


class DeadEnd(nn.Module):
    """fc1 -> fc2 is the model; `aux` reads fc1's output, finite, and feeds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.aux = nn.Linear(6, 5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.aux(h)
        return self.fc2(h)


def test_a_layer_the_loss_never_reaches_has_no_fisher_reading() -> None:
    """G = 0 and K = 0 exactly: no eigenvalue is resolved, so every Fisher-side reading
    built from resolved eigenvalues is None (signature.py: "a reading whose matrix has no
    resolved value is None"; a logdet of 0.0 would read as a jump in volume), while the
    activation side still reads. (Engine commit 678c5aa returned 0.0 here; f2ae3af fixed it.)
    """
    torch.manual_seed(6)
    model = DeadEnd()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    aux = compute_signatures(model, x, y, loss="ce", device="cpu").layers["aux"]
    assert aux.finite
    assert aux.sigma_min is not None and aux.x_rank == 5
    assert aux.g_rank == 0 and aux.g_dead == 5
    assert aux.lambda_min is None
    assert aux.logdet is None, f"logdet {aux.logdet!r} reported with no resolved eigenvalue"
    assert aux.log_volume is None, f"log_volume {aux.log_volume!r} with no resolved eigenvalue"
    assert aux.param_rank == 0 and aux.param_lambda_min is None
    assert aux.param_logdet is None and aux.param_log_volume is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reading_equals_the_cpu_reading() -> None:
    """device="cuda": the same readings as on the CPU (float64 both), model left on CPU."""
    torch.manual_seed(7)
    model = SeqNet()
    ids, y = torch.randint(0, 7, (8, 3)), torch.randint(0, 5, (8, 3))
    cpu = compute_signatures(model, ids, y, loss="ce", device="cpu")
    gpu = compute_signatures(model, ids, y, loss="ce", device="cuda")
    assert gpu.device.startswith("cuda") and cpu.device == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, c in cpu.layers.items():
        g = gpu.layers[name]
        assert (g.x_rank, g.g_rank, g.param_rank) == (c.x_rank, c.g_rank, c.param_rank), name
        for attr in ("x_spectrum", "g_spectrum", "param_spectrum"):
            a, b = getattr(g, attr), getattr(c, attr)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * float(b[0]), err_msg=name)
