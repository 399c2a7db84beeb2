"""The default layer selection leaves out outputs wider than ``max_width`` (a language
model's vocabulary head), names them once, and reads them when they are named.

Before: GPT-2's ``lm_head`` (d = 50257) was read by default; on a 32 x 128 probe it
alone took 272 s and 8.8 GiB on 2 busy cores, for readings bounded by the probe's rows
(4096) and its input width (768)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_close_report, per_sample_capture, readings
from torch import nn

from ddsmon import compute_signatures
from ddsmon.errors import ProbeError
from ddsmon.options import DEFAULT_MAX_WIDTH

TOL = 1e-10


def _model(head: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, head)).eval()
    return model, torch.randn(12, 4), torch.randint(0, head, (12,))


def test_a_head_wider_than_max_width_is_left_out_and_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, x, y = _model(40)
    with caplog.at_level("WARNING", logger="ddsmon"):
        capped = compute_signatures(model, x, y, device="cpu", max_width=32)
        compute_signatures(model, x, y, device="cpu", max_width=32)
    assert list(capped.layers) == ["0", "1"]
    said = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "2 (width 40)" in said[0] and "max_width = 32" in said[0], said
    assert "--layers" in said[0] and "--max-width" in said[0], said
    assert "first axis" not in said[0], said  # not the sequence-first reason
    # the layers read are read as without the cap; the loss (and its spread) is the model's
    whole = compute_signatures(model, x, y, device="cpu", max_width=None)
    assert list(whole.layers) == ["0", "1", "2"]
    for name in ("0", "1"):
        a, b = capped.layers[name], whole.layers[name]
        np.testing.assert_array_equal(a.x_spectrum, b.x_spectrum)
        np.testing.assert_array_equal(a.g_spectrum, b.g_spectrum)
        assert (a.x_rank, a.g_rank, a.lambda_min) == (b.x_rank, b.g_rank, b.lambda_min), name
    assert capped.output_layer == "1"
    assert capped.layers["1"].loss_spread == pytest.approx(whole.layers["2"].loss_spread)


def test_a_named_wide_layer_is_read_whatever_its_width() -> None:
    model, x, y = _model(40)
    sig = compute_signatures(model, x, y, device="cpu", layers=["2"], max_width=32)
    ref = readings(per_sample_capture(model, x, y, "ce", ["2"])["2"])
    got = sig.layers["2"]
    assert got.d == 40
    sv = ref["x_spectrum"]
    assert_close_report(got.x_spectrum, sv[: len(got.x_spectrum)], atol=TOL * sv[0])
    g = ref["g_spectrum"]
    assert_close_report(got.g_spectrum, g[: len(got.g_spectrum)], atol=TOL * g[0])


def test_the_cap_holds_in_micro_batches() -> None:
    model, x, y = _model(40)
    streamed = compute_signatures(model, x, y, device="cpu", max_width=32, probe_batch=5)
    whole = compute_signatures(model, x, y, device="cpu", max_width=32)
    assert list(streamed.layers) == list(whole.layers) == ["0", "1"]
    for name in ("0", "1"):
        np.testing.assert_allclose(
            streamed.layers[name].x_spectrum, whole.layers[name].x_spectrum, rtol=1e-10
        )


def test_the_default_cap_leaves_out_a_vocabulary_head_only() -> None:
    """A classifier over 1000 classes is read; a 30001-token head is not."""
    assert 28672 < DEFAULT_MAX_WIDTH < 30522  # Llama-3-70B's MLP width, BERT's vocabulary
    model, x, y = _model(1000)
    assert list(compute_signatures(model, x, y, device="cpu", fisher="activation").layers) == [
        "0", "1", "2",
    ]  # fmt: skip
    model, x, y = _model(DEFAULT_MAX_WIDTH + 1)
    sig = compute_signatures(model, x, y, device="cpu", fisher="activation")
    assert list(sig.layers) == ["0", "1"]


def test_max_width_must_be_positive() -> None:
    model, x, y = _model(4)
    with pytest.raises(ProbeError, match="max_width"):
        compute_signatures(model, x, y, device="cpu", max_width=0)


def test_the_cli_caps_the_default_selection_by_max_width(tmp_path) -> None:
    """``ddsmon scan --max-width 32``: the 40-wide head is named once and not logged;
    the run's params say the cap; a config file's ``max_width`` is checked as an int."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "m.py").write_text(
        "from torch import nn\n"
        "def make():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 40))\n"
    )
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    model, x, y = _model(40)
    for step in (1, 2):
        torch.save({"state_dict": model.state_dict(), "step": step}, ckpts / f"s{step}.pt")
    torch.save({"inputs": x, "targets": y}, tmp_path / "probe.pt")
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model", f"{tmp_path / 'm.py'}:make",
         "--probe", str(tmp_path / "probe.pt"), "--tracking-uri", uri, "--no-plots",
         "--threads", "1", "--max-width", "32"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 read" in proc.stderr, proc.stderr
    assert proc.stderr.count("not read: 2 (width 40)") == 1, proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    layers = {key.split("/")[-1] for key in run.data.metrics if key.startswith("dds/")}
    assert {"0", "1"} <= layers and "2" not in layers, sorted(run.data.metrics)
    assert run.data.params["layers"] == "default (leaf modules with outputs of width 2 to 32)"

    (tmp_path / "bad.toml").write_text('max_width = "wide"\n')
    bad = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--config", str(tmp_path / "bad.toml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "max_width" in bad.stderr and "bad.toml" in bad.stderr, bad.stderr
