"""The registry of parameter-side Gram strategies (ddsmon.param_gram): module type -> how
K = J J^T / n is built (structured from A and Delta, torch.func, or none).

A user-registered structured strategy is held to the per-sample loop of
tests/reference.py (one forward and backward per sample, J explicit), forcing the
functional strategy on nn.Linear to the structured path, and the MRO lookup and the
registration checks to what the docstrings say.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from reference import assert_close_report, per_sample_capture, readings
from torch import Tensor, nn

import ddsmon.engine as engine
from ddsmon import compute_signatures, param_gram
from ddsmon.errors import ProbeError
from ddsmon.losses import per_sample_loss_fn
from ddsmon.param_gram import (
    EMBEDDING_GRAM,
    FUNCTIONAL,
    LINEAR_GRAM,
    NORM_GRAM,
    TRANSPOSED_LINEAR_GRAM,
    StructuredGram,
    is_structured,
    lookup_param_gram,
    param_gram_strategy,
    param_gram_structured,
    register_param_gram,
    unregister_param_gram,
)
from ddsmon.probe import run_probe_pass

REL = 1e-12  # of the largest entry / eigenvalue: both sides are float64 from one weight set


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    """Every test leaves the registry as it found it."""
    by_type, by_name = dict(param_gram._BY_TYPE), dict(param_gram._BY_NAME)
    yield
    param_gram._BY_TYPE.clear()
    param_gram._BY_TYPE.update(by_type)
    param_gram._BY_NAME.clear()
    param_gram._BY_NAME.update(by_name)


# ---- user modules and their strategies, written out here (no ddsmon code) ---------------


class MyLinear(nn.Module):
    """``h = a W^T`` with W (d_out x d_in) a Parameter: not an nn.Linear subclass."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


class Scale(nn.Module):
    """``h = a * s + b`` elementwise (a diagonal linear map with a shift)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.3 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class Counted:
    """A gram function that counts its calls."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: Tensor, grad: Tensor, n: int) -> Tensor:
        self.calls += 1
        return self.fn(module, inputs, grad, n)


def my_linear_gram(module: nn.Module, a: Tensor, delta: Tensor, n: int) -> Tensor:
    """``K_ij = sum_{t,s} (a_it . a_js)(delta_it . delta_js) / n`` (row Grams, blocksum)."""
    rows = a.shape[0]
    t = rows // n
    both = (a @ a.T) * (delta @ delta.T)
    return both.reshape(n, t, n, t).sum(dim=(1, 3)) / n


def scale_gram(module: nn.Module, a: Tensor, delta: Tensor, n: int) -> Tensor:
    """``J_i = [sum_t a_it * delta_it, sum_t delta_it]`` (scale, then shift), K = J J^T / n."""
    t = a.shape[0] // n
    d_scale = (a * delta).reshape(n, t, -1).sum(dim=1)
    d_shift = delta.reshape(n, t, -1).sum(dim=1)
    j = torch.cat([d_scale, d_shift], dim=1)
    return j @ j.T / n


class SeqModel(nn.Module):
    """(n, T, 5) -> MyLinear(5, 7) -> Tanh -> Scale(7) -> Linear(7, 4): CE over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.mine = MyLinear(5, 7)
        self.act = nn.Tanh()
        self.scale = Scale(7)
        self.head = nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.scale(self.act(self.mine(x))))


def _seq_case() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(7)
    return SeqModel(), torch.randn(9, 3, 5), torch.randint(0, 4, (9, 3))


def _k_ref(cap) -> np.ndarray:
    return cap.J @ cap.J.T / cap.n


def test_user_structured_strategies_equal_the_per_sample_loop() -> None:
    """K of MyLinear and Scale from their registered strategies, entrywise and as read by
    the engine, equals J J^T / n of the loop; each strategy ran, once per reading."""
    mine, scale = Counted(my_linear_gram), Counted(scale_gram)
    assert register_param_gram(MyLinear, StructuredGram(mine)) is None
    register_param_gram(Scale, StructuredGram(scale, name="scale"))
    model, x, y = _seq_case()
    assert is_structured(model.mine) and is_structured(model.scale)

    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert (mine.calls, scale.calls) == (1, 1)
    refs = per_sample_capture(model, x, y, "ce", ["mine", "scale", "head"])
    for layer in ("mine", "scale", "head"):
        got, ref = sig.layers[layer], readings(refs[layer])
        k_ref = ref["param_spectrum"]
        assert got.param_count == ref["param_count"], layer
        assert got.param_spectrum is not None, layer
        assert_close_report(got.param_spectrum, k_ref, atol=REL * k_ref[0], what=layer)
        assert got.param_rank == ref["param_rank"], layer

    work = _double(model)
    caps = run_probe_pass(
        work, x.double(), y, per_sample_loss_fn("ce"), ["mine", "scale"],
        n=9, keep_inputs=is_structured,
    ).captures  # fmt: skip
    for layer, cap in caps.items():
        k = param_gram_structured(cap, 9).numpy()
        k_ref = _k_ref(refs[layer])
        assert_close_report(k, k_ref, atol=REL * np.abs(k_ref).max(), what=f"{layer} K")


def test_unregistered_user_module_goes_through_torch_func() -> None:
    """Without a registration MyLinear is read by torch.func: the same K, no strategy run."""
    mine = Counted(my_linear_gram)
    model, x, y = _seq_case()
    assert lookup_param_gram(MyLinear) is FUNCTIONAL and not is_structured(model.mine)
    plain = compute_signatures(model, x, y, loss="ce", device="cpu", layers=["mine"])
    register_param_gram(MyLinear, StructuredGram(mine))
    structured = compute_signatures(model, x, y, loss="ce", device="cpu", layers=["mine"])
    assert mine.calls == 1
    a, b = plain.layers["mine"].param_spectrum, structured.layers["mine"].param_spectrum
    assert a is not None and b is not None
    assert_close_report(a, b, atol=REL * b[0], what="functional vs structured")


def _mlp() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    return model, torch.randn(30, 6), torch.randint(0, 4, (30,))


def test_forcing_functional_on_linear_gives_the_structured_k(monkeypatch) -> None:
    """register_param_gram(nn.Linear, FUNCTIONAL): the engine hands the Linear layers to
    torch.func (and keeps no A for them), and K's spectrum is the structured path's."""
    model, x, y = _mlp()
    structured = compute_signatures(model, x, y, loss="ce", device="cpu")
    seen: list[str] = []
    real = engine.param_grams_functional

    def spy(work, modules, *args, **kwargs):
        seen.extend(modules)
        return real(work, modules, *args, **kwargs)

    monkeypatch.setattr(engine, "param_grams_functional", spy)
    assert register_param_gram(nn.Linear, FUNCTIONAL) is LINEAR_GRAM
    assert param_gram_strategy(model[0]) is FUNCTIONAL and not is_structured(model[0])
    forced = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert sorted(seen) == ["0", "2"]
    for layer in ("0", "2"):
        a, b = forced.layers[layer].param_spectrum, structured.layers[layer].param_spectrum
        assert a is not None and b is not None, layer
        assert_close_report(a, b, atol=REL * b[0], what=f"{layer} forced functional")
        assert forced.layers[layer].param_rank == structured.layers[layer].param_rank


def test_lookup_walks_the_mro() -> None:
    """A subclass of nn.Linear takes the Linear strategy; the nearest entry wins."""

    class Sub(nn.Linear):
        pass

    class SubSub(Sub):
        pass

    assert lookup_param_gram(Sub) is LINEAR_GRAM is lookup_param_gram(SubSub)
    assert param_gram_strategy(SubSub(3, 4)) is LINEAR_GRAM
    assert lookup_param_gram(nn.Embedding) is EMBEDDING_GRAM
    assert lookup_param_gram(nn.LayerNorm) is NORM_GRAM is lookup_param_gram(nn.RMSNorm)
    assert lookup_param_gram(nn.GroupNorm) is FUNCTIONAL
    mine = StructuredGram(my_linear_gram)
    register_param_gram(Sub, mine)
    assert lookup_param_gram(SubSub) is mine and lookup_param_gram(nn.Linear) is LINEAR_GRAM
    assert unregister_param_gram(Sub) is mine
    assert lookup_param_gram(SubSub) is LINEAR_GRAM
    assert unregister_param_gram(Sub) is None


def test_instances_decide_within_their_type() -> None:
    """No own parameters: no K. A structured type can decline an instance (Embedding with
    max_norm); a class named Conv1D is matched by name, and only with its layout."""

    class Conv1D(nn.Module):  # the name transformers' GPT-2 projection has
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 3)

    assert param_gram_strategy(nn.Tanh()) is None
    assert param_gram_strategy(Wrapper()) is None  # parameters, but none of its own
    assert param_gram_strategy(nn.Embedding(5, 2)) is EMBEDDING_GRAM
    assert param_gram_strategy(nn.Embedding(5, 2, max_norm=1.0)) is FUNCTIONAL
    assert param_gram_strategy(Conv1D(4, 3)) is TRANSPOSED_LINEAR_GRAM
    wrong = Conv1D(4, 3)
    wrong.nf = 3
    assert param_gram_strategy(wrong) is FUNCTIONAL


@pytest.mark.parametrize(
    ("module_type", "match"),
    [
        (nn.Linear(2, 3), "module_type must be an nn.Module subclass"),
        (int, "module_type must be an nn.Module subclass"),
        (None, "module_type must be an nn.Module subclass"),
        ("transformers.Conv1D", "bare class name"),
    ],
    ids=["instance", "not-a-module", "none", "dotted-name"],
)
def test_registering_a_non_type_is_a_clear_error(module_type, match: str) -> None:
    before = dict(param_gram._BY_TYPE), dict(param_gram._BY_NAME)
    with pytest.raises(TypeError, match=match):
        register_param_gram(module_type, LINEAR_GRAM)
    assert (dict(param_gram._BY_TYPE), dict(param_gram._BY_NAME)) == before


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        (my_linear_gram, "wrap a function as StructuredGram"),
        (StructuredGram, "pass an instance"),
        ("functional", "must be a StructuredGram or FUNCTIONAL"),
        (None, "must be a StructuredGram or FUNCTIONAL"),
    ],
    ids=["bare-function", "class", "string", "none"],
)
def test_registering_a_non_strategy_is_a_clear_error(strategy, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        register_param_gram(MyLinear, strategy)
    assert lookup_param_gram(MyLinear) is FUNCTIONAL


def test_a_strategy_needs_a_function() -> None:
    with pytest.raises(TypeError, match="needs a function gram"):
        StructuredGram(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="applies must be a function"):
        StructuredGram(my_linear_gram, applies=True)  # type: ignore[arg-type]


def test_a_failing_or_misshapen_user_strategy_names_the_layer() -> None:
    model, x, y = _seq_case()

    def broken(module, a, delta, n):
        raise RuntimeError("boom")

    register_param_gram(MyLinear, StructuredGram(broken, name="broken"))
    with pytest.raises(ProbeError, match=r"layer 'mine'.*broken failed: boom"):
        compute_signatures(model, x, y, loss="ce", device="cpu")
    register_param_gram(MyLinear, StructuredGram(lambda m, a, d, n: a @ a.T, name="rows"))
    with pytest.raises(ProbeError, match=r"layer 'mine'.*rows returned \(27, 27\).*9 x 9"):
        compute_signatures(model, x, y, loss="ce", device="cpu")


def _double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


class _Normed(nn.Module):
    """Embedding -> four norms over the last axis (LayerNorm with and without bias,
    RMSNorm with and without eps) -> Linear head, on (n, T) token ids: each norm's
    weights moved off their init so that J is generic."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.ln = nn.LayerNorm(6)
        self.ln_nobias = nn.LayerNorm(6, bias=False, eps=1e-3)
        self.rms = nn.RMSNorm(6)
        self.rms_eps = nn.RMSNorm(6, eps=0.1)
        self.head = nn.Linear(6, 5)
        with torch.no_grad():
            for norm in (self.ln, self.ln_nobias, self.rms, self.rms_eps):
                norm.weight.normal_()
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_()

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        return self.head(self.rms_eps(self.rms(self.ln_nobias(self.ln(h)))))


@pytest.mark.parametrize("method", ["auto", "per_sample"])
def test_norms_are_read_from_structure_and_equal_the_per_sample_loop(method: str) -> None:
    """K of LayerNorm and RMSNorm (NORM_GRAM, J formed from the recomputed xhat) equals
    J J^T / n of the one-sample-at-a-time loop, entrywise and through the engine; before,
    they went through torch.func, which held the whole model's per-sample graph."""
    torch.manual_seed(3)
    model = _Normed().double()
    x, y = torch.randint(0, 11, (8, 4)), torch.randint(0, 5, (8, 4))
    names = ["ln", "ln_nobias", "rms", "rms_eps"]
    for name in names:
        assert param_gram_strategy(getattr(model, name)) is NORM_GRAM
    refs = per_sample_capture(model, x, y, "ce", names)
    caps = run_probe_pass(
        _double(model), x, y, per_sample_loss_fn("ce"), names, n=8, keep_inputs=is_structured
    ).captures
    for name, cap in caps.items():
        k = param_gram_structured(cap, 8, method=method).numpy()
        k_ref = _k_ref(refs[name])
        assert_close_report(k, k_ref, atol=REL * np.abs(k_ref).max(), what=f"{name} K")
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    for name in names:
        got, ref = sig.layers[name], readings(refs[name])
        assert got.param_count == ref["param_count"], name
        assert got.param_rank == ref["param_rank"], name
        assert_close_report(
            got.param_spectrum, ref["param_spectrum"],
            atol=1e-10 * ref["param_spectrum"][0], what=name,
        )  # fmt: skip


def test_a_norm_over_more_than_the_last_axis_goes_through_torch_func() -> None:
    assert param_gram_strategy(nn.LayerNorm((3, 4))) is FUNCTIONAL
    assert param_gram_strategy(nn.LayerNorm(4, elementwise_affine=False)) is None
