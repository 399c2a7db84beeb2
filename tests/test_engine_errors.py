"""Bad input gets a clear ProbeError naming the problem (issue 2, test 6).

Non-finite activations are not bad input: they come back as that layer's reading with
``finite=False`` while the other layers are still read.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from reference import per_sample_capture, readings
from torch import nn

from ddsmon import compute_signatures
from ddsmon.errors import DDSError, ProbeError


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.randn(10, 4), torch.randint(0, 3, (10,))


def test_probe_error_is_a_dds_error() -> None:
    assert issubclass(ProbeError, DDSError)


def test_unknown_layer_name_is_named() -> None:
    model, x, y = _mlp()
    with pytest.raises(ProbeError, match=r"unknown layer.*'fc9'"):
        compute_signatures(model, x, y, layers=["0", "fc9"], device="cpu")


def test_regex_matching_nothing_is_named() -> None:
    model, x, y = _mlp()
    with pytest.raises(ProbeError, match=re.escape("'^encoder'") + ".*match"):
        compute_signatures(model, x, y, layers="^encoder", device="cpu")


def test_regex_selects_matching_modules() -> None:
    model, x, y = _mlp()
    sig = compute_signatures(model, x, y, layers=r"^[02]$", device="cpu")
    assert list(sig.layers) == ["0", "2"]


def test_batch_sizes_that_disagree_are_named() -> None:
    model, x, _ = _mlp()
    y = torch.randint(0, 3, (7,))
    with pytest.raises(ProbeError, match=r"batch sizes disagree.*\b10\b.*\b7\b"):
        compute_signatures(model, x, y, device="cpu")


def test_tuple_inputs_with_disagreeing_batch_sizes_are_named() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a + b)

    y = torch.randint(0, 3, (10,))
    with pytest.raises(ProbeError, match=r"batch sizes disagree.*\b10\b.*\b9\b"):
        compute_signatures(Two(), (torch.randn(10, 4), torch.randn(9, 4)), y, device="cpu")


def test_a_model_that_is_not_a_module_is_named() -> None:
    """Before: ``AttributeError: 'function' object has no attribute 'named_modules'``."""
    _, x, y = _mlp()
    with pytest.raises(ProbeError, match=r"model must be a torch.nn.Module, got function"):
        compute_signatures(lambda t: t, x, y, device="cpu")  # type: ignore[arg-type]


def test_inputs_that_are_not_tensors_are_named() -> None:
    """Before: "the probe has no input tensor with a batch axis", whatever was given
    (a numpy array, a dict of arrays): now it says what the inputs were."""
    model, x, y = _mlp()
    with pytest.raises(ProbeError, match=r"inputs: ndarray\).*torch.as_tensor"):
        compute_signatures(model, x.numpy(), y, device="cpu")
    with pytest.raises(ProbeError, match=r"inputs: \{'x': ndarray\}"):
        compute_signatures(model, {"x": x.numpy()}, y, device="cpu")


@pytest.mark.parametrize(
    ("bad_loss", "got"),
    [
        (lambda out, y: torch.nn.functional.cross_entropy(out, y), r"\(\)"),
        (lambda out, y: out.sum(-1, keepdim=True), r"\(10, 1\)"),
        (lambda out, y: out[:5, 0], r"\(5,\)"),
    ],
    ids=["scalar", "n-by-1", "too-short"],
)
def test_loss_of_the_wrong_shape_is_named(bad_loss, got: str) -> None:
    model, x, y = _mlp()
    with pytest.raises(ProbeError, match=r"shape \(10,\).*got " + got):
        compute_signatures(model, x, y, loss=bad_loss, device="cpu")


def test_ce_targets_of_the_wrong_shape_are_named() -> None:
    model, x, _ = _mlp()
    with pytest.raises(ProbeError, match=r"ce.*\(10, 3\).*\(10, 2\)"):
        compute_signatures(model, x, torch.zeros(10, 2, dtype=torch.long), device="cpu")


def test_unknown_loss_name_is_named() -> None:
    model, x, y = _mlp()
    with pytest.raises(ProbeError, match=r"unknown loss 'hinge'"):
        compute_signatures(model, x, y, loss="hinge", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_asked_for_without_cuda_is_a_clear_error() -> None:
    model, x, y = _mlp()
    with pytest.raises(ProbeError, match=r"(?i)'cuda'.*no CUDA"):
        compute_signatures(model, x, y, device="cuda")


def test_a_cuda_index_beyond_the_devices_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda:1`` on a one-GPU machine: a ProbeError naming it and the devices there are
    (torch sees one GPU here by patching; the check runs before anything touches it)."""
    from ddsmon.engine import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ProbeError, match=r"'cuda:1'.*sees 1 CUDA device\(s\): cuda:0 to cuda:0"):
        resolve_device("cuda:1")


class SideBranch(nn.Module):
    """fc1 -> fc2 is the model; `bad` reads fc1's output into inf but feeds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bad = nn.Linear(6, 5)
        self.fc2 = nn.Linear(6, 3)
        with torch.no_grad():
            self.bad.weight.fill_(float("inf"))  # every output is +-inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.bad(h)  # a diagnostic head whose output the loss never sees
        return self.fc2(h)


def test_nonfinite_layer_is_reported_not_raised_and_others_still_read() -> None:
    torch.manual_seed(1)
    model = SideBranch().double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert list(sig.layers) == ["fc1", "bad", "fc2"]
    bad = sig.layers["bad"]
    assert bad.finite is False
    assert bad.nonfinite and "activation" in bad.nonfinite
    assert bad.lambda_min is None and bad.sigma_min is None and bad.logdet is None
    assert bad.param_lambda_min is None
    refs = per_sample_capture(model, x, y, "ce", ["fc1", "fc2"])
    for name in ("fc1", "fc2"):
        got, ref = sig.layers[name], readings(refs[name])
        assert got.finite and got.nonfinite is None
        assert got.lambda_min == pytest.approx(ref["lambda_min"], rel=1e-8, abs=0), name
        assert got.sigma_min == pytest.approx(ref["sigma_min"], rel=1e-8, abs=0), name
        assert got.param_lambda_max == pytest.approx(ref["param_lambda_max"], rel=1e-8, abs=0), name


def test_nonfinite_loss_marks_gradients_of_every_layer_without_raising() -> None:
    """A NaN loss poisons every Delta: every layer reads finite=False (gradients)."""
    model, x, y = _mlp()
    x = x.clone()
    x[3, 0] = float("nan")
    sig = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert set(sig.layers) == {"0", "1", "2"}
    for name, layer in sig.layers.items():
        assert layer.finite is False, name
        assert layer.nonfinite and "gradient" in layer.nonfinite, (name, layer.nonfinite)
        assert layer.g_rank is None and layer.lambda_min is None
    assert np.isnan(x[3, 0])  # the probe itself is not altered


def _token_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 6), nn.Linear(6, 4))
    return model, torch.randint(0, 9, (6, 5)), torch.randint(0, 4, (6, 5))


def test_probe_rows_above_the_cap_are_refused_with_layer_and_count() -> None:
    """6 sequences x 5 positions = N 30 rows per layer: a cap of 29 names the first layer."""
    model, ids, y = _token_model()
    expected = "layer '0' has N=30 rows (6 samples x 5 positions), above max_probe_rows=29"
    with pytest.raises(ProbeError, match=re.escape(expected)):
        compute_signatures(model, ids, y, device="cpu", max_probe_rows=29)
    sig = compute_signatures(model, ids, y, device="cpu", max_probe_rows=30)
    assert [layer.N for layer in sig.layers.values()] == [30, 30]
