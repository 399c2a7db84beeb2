"""The CUDA path: every reading on a GPU against the independent per-sample loop.

Skipped where torch sees no CUDA device (CI has none); run on a lent GPU machine by
``benchmarks/device_check.sh`` (BENCHMARKS.md section 5). On CUDA the engine keeps the
probe, the captures, the Grams and every decomposition on the device (cuSOLVER's float64
``eigvalsh``/``svd``/``geqrf``), so these are not the CPU tests again: the same readings
must come out of other kernels, another reduction order and another LAPACK.

References: ``tests/reference.py`` (one float64 forward and backward per sample on the
CPU, explicit J, G = J^T J / n, K = J J^T / n); the recipe's closed form of
``tests/test_engine_recipe.py`` (eigenvalues down to 1e-12 of lambda_max, DDS paper
Figure 7). Tolerance: 1e-10 of the largest value, as on the CPU: both sides are float64
from the same weights, so the true differences are rounding.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import assert_close_report, per_sample_capture, readings
from test_engine_per_sample import CASES, _compare_activation_side, _compare_param_side
from test_engine_recipe import EXACT, D, _setup, linear_loss

from ddsmon import compute_signatures
from ddsmon.errors import ProbeError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-10


def _assert_same_readings(got, want, rel: float = TOL) -> None:
    """Two readings of the same weights (``Signatures``): the same layers and ranks, and
    each X, G and K spectrum within ``rel`` of its largest value (None where want's is)."""
    assert list(got.layers) == list(want.layers)
    for name, w in want.layers.items():
        g = got.layers[name]
        assert (g.x_rank, g.g_rank, g.param_rank) == (w.x_rank, w.g_rank, w.param_rank), name
        for attr in ("x_spectrum", "g_spectrum", "param_spectrum"):
            a, b = getattr(g, attr), getattr(w, attr)
            if b is None:
                assert a is None, f"{name} {attr}"
                continue
            assert_close_report(a, b, atol=rel * float(b[0]), what=f"{name} {attr}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fisher", ["both", "activation", "parameter"])
def test_cuda_readings_equal_the_per_sample_loop(case: str, fisher: str) -> None:
    """MLP with LayerNorm, a token model, GPT-2's Conv1D with padding: X, G, K spectra
    and every scalar reading computed on the GPU equal the CPU loop's to 1e-10."""
    model, x, y, loss = CASES[case]()
    sig = compute_signatures(model, x, y, loss=loss, device="cuda", fisher=fisher)
    assert sig.device.startswith("cuda")
    on_cpu = compute_signatures(model, x, y, loss=loss, device="cpu", fisher=fisher)
    assert list(sig.layers) == list(on_cpu.layers)  # the same default selection
    refs = per_sample_capture(model, x, y, loss, list(sig.layers))
    for layer, got in sig.layers.items():
        ref = readings(refs[layer])
        if fisher != "parameter":
            _compare_activation_side(layer, got, ref)
        if fisher != "activation":
            _compare_param_side(layer, got, ref)
        else:
            assert got.param_spectrum is None, layer


def test_cuda_float64_without_ridge_recovers_1e12_eigenvalues() -> None:
    """cuSOLVER's float64 eigensolver resolves lambda_min = 1e-12 lambda_max to 1%."""
    model, x, y, _ = _setup()
    g = compute_signatures(model, x, y, loss=linear_loss, layers=["0"], device="cuda").layers["0"]
    assert g.g_rank == D and g.g_dead == 0
    assert g.lambda_min == pytest.approx(EXACT[-1], rel=0.01, abs=0)
    assert_close_report(g.g_spectrum, EXACT, rtol=0.01, what="cuda g_spectrum")
    assert g.logdet == pytest.approx(float(np.sum(np.log(EXACT))), abs=0.01)


def test_cuda_streamed_pass_equals_one_pass_on_the_cpu() -> None:
    """Micro-batches of 3 samples on the GPU (R factors folded on the device) give the
    single-pass CPU readings: the streamed TSQR and the accumulated Grams on cuSOLVER."""
    model, x, y, loss = CASES["tokens"]()
    whole = compute_signatures(model, x, y, loss=loss, device="cpu")
    streamed = compute_signatures(model, x, y, loss=loss, device="cuda", probe_batch=3)
    _assert_same_readings(streamed, whole)


def test_cuda_forward_only_reading_equals_the_cpu_one() -> None:
    model, x, *_ = CASES["mlp"]()
    cpu = compute_signatures(model, x, None, device="cpu", fisher="none")
    gpu = compute_signatures(model, x, None, device="cuda", fisher="none")
    for name, c in cpu.layers.items():
        g = gpu.layers[name]
        assert g.lambda_max is None and g.g_rank is None and g.x_rank == c.x_rank, name
        assert_close_report(g.x_spectrum, c.x_spectrum, atol=TOL * c.x_spectrum[0], what=name)
        assert g.x_entropy == pytest.approx(c.x_entropy, abs=1e-12), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_already_on_the_gpu_is_left_as_it_was(dtype: torch.dtype) -> None:
    """A model on the GPU (float64, or float32 read on a float64 copy): its weights,
    dtype, device, train flag and requires_grad come back unchanged, checked right after
    the GPU reading, and the reading equals the one of the same weights on the CPU."""
    model, x, y, loss = CASES["mlp"]()
    on_cpu = copy.deepcopy(model).to(dtype)
    model = model.to("cuda", dtype).train()
    model.fc1.weight.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    gpu = compute_signatures(model, x, y, loss=loss, device="cuda")
    assert model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, v in model.state_dict().items():
        assert v.device.type == "cuda" and v.dtype == dtype, k
        assert torch.equal(v, before[k]), k
    _assert_same_readings(gpu, compute_signatures(on_cpu, x, y, loss=loss, device="cpu"))


def test_auto_picks_the_gpu_and_an_absent_index_is_named() -> None:
    model, x, y, loss = CASES["mlp"]()
    assert compute_signatures(model, x, y, loss=loss, device="auto").device.startswith("cuda")
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ProbeError, match=absent):
        compute_signatures(model, x, y, loss=loss, device=absent)


def test_gpt2_tiny_on_the_gpu_equals_the_cpu() -> None:
    """A 2-block GPT-2 from its config (LayerNorm, Conv1D, tied head; loss "lm"): every
    default layer's reading on the GPU equals the CPU's, ranks included."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16, use_cache=False
    )
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 97, (6, 12))
    cpu = compute_signatures(model, {"input_ids": ids}, ids, loss="lm", device="cpu")
    gpu = compute_signatures(model, {"input_ids": ids}, ids, loss="lm", device="cuda")
    assert len(cpu.layers) > 10
    _assert_same_readings(gpu, cpu, rel=1e-9)


def test_report_on_the_gpu_from_the_command_line(tmp_path: Path) -> None:
    """``ddsmon report --device cuda`` in a subprocess: the JSON says the device and its
    readings equal ``--device cpu``'s (float64 both)."""
    from fixtures_models import mlp, mlp_probe

    ckpt, probe = tmp_path / "step_000010.pt", tmp_path / "probe.pt"
    torch.save({"model": mlp().state_dict(), "step": 10}, ckpt)
    x, y = mlp_probe()
    torch.save({"inputs": x, "targets": y}, probe)
    factory = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"

    def report(device: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "ddsmon.cli", "report", str(ckpt), "--model", factory,
             "--probe", str(probe), "--device", device, "--json", "--spectra"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    gpu, cpu = report("cuda"), report("cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu", (
        gpu["device"],
        cpu["device"],
    )
    for name, c in cpu["layers"].items():
        g = gpu["layers"][name]
        assert (g["x_rank"], g["g_rank"]) == (c["x_rank"], c["g_rank"]), name
        b = np.asarray(c["g_spectrum"], dtype=float)
        assert_close_report(g["g_spectrum"], b, atol=TOL * b[0], what=f"{name} g_spectrum")
