"""Plots: rendered to real PNG files from real engine readings and checked as images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddsmon import compute_signatures
from ddsmon.events import Event
from ddsmon.plots import plot_spectra, plot_trajectories
from ddsmon.signature import LayerSignature, Signatures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def signatures() -> Signatures:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
    )
    with torch.no_grad():
        model[2].weight[:, :3] = 0.0  # a rank-deficient layer: a cliff in its spectra
    inputs, targets = torch.randn(24, 6), torch.randint(0, 3, (24,))
    return compute_signatures(model, inputs, targets, loss="ce")


def _history(sig: Signatures, steps=range(0, 100, 10)):
    """A synthetic trajectory: lambda_ratio falling by 3 decades after step 50."""
    out = {}
    for name, layer in sig.layers.items():
        base = layer.to_dict()
        pts = []
        for step in steps:
            d = dict(base)
            if step > 50 and d["lambda_ratio"] is not None:
                d["lambda_ratio"] = d["lambda_ratio"] * 1e-3
            if step == 30:
                d["sigma_ratio"] = None  # an unresolved reading: a gap, not a crash
            pts.append((step, d))
        out[name] = pts
    return out


def test_spectra_png_from_engine_readings(tmp_path, signatures):
    path = plot_spectra(signatures, tmp_path / "spectra.png")
    img = _image(path)
    h, w, _ = img.shape
    assert w > 600 and h > 300
    assert img.std() > 10  # not a blank canvas
    assert path.stat().st_size > 20_000


def test_spectra_handles_nonfinite_and_nonpositive_values(tmp_path):
    layers = {
        "bad": LayerSignature(name="bad", n=4, N=4, d=3, finite=False, nonfinite="activations"),
        "zeros": LayerSignature(
            name="zeros",
            n=4,
            N=4,
            d=3,
            x_spectrum=np.array([2.0, 0.0, -1e-20]),
            g_spectrum=np.array([np.nan, 0.0, 0.0]),
            floor_x=1e-14,
            x_rank=1,
        ),
        "": LayerSignature(name="", n=4, N=4, d=2),
    }
    sig = Signatures(
        layers=layers, n=4, device="cpu", forward_dtype="float64", fisher="both", loss="ce"
    )
    img = _image(plot_spectra(sig, tmp_path / "s.png"))
    assert img.std() > 5


def test_trajectories_png_marks_events(tmp_path, signatures):
    history = _history(signatures)
    events = [
        Event(60, "2", "collapse", "lambda_ratio", -3.0, -6.0, 3.0, "lambda_ratio fell 3 decades"),
        Event(70, "0,2", "transition", "lambda_ratio,log_volume", None, None, 2.0, "transition"),
        {"step": 40, "layer": "0", "kind": "rank_change", "magnitude": 1.0},
    ]
    train = {"val_acc": [(s, min(1.0, s / 80)) for s in range(0, 100, 10)]}
    with_events = _image(plot_trajectories(history, tmp_path / "t.png", events=events, train=train))
    without = _image(plot_trajectories(history, tmp_path / "t0.png", train=train))
    assert with_events.shape == without.shape
    assert with_events.std() > 10
    # The event lines change the picture: red pixels of the transition line appear.
    red = (with_events[..., 0] > 180) & (with_events[..., 1] < 80) & (with_events[..., 2] < 80)
    red0 = (without[..., 0] > 180) & (without[..., 1] < 80) & (without[..., 2] < 80)
    assert red.sum() > red0.sum() + 200


def test_trajectories_empty_and_many_layers(tmp_path):
    assert _image(plot_trajectories({}, tmp_path / "empty.png")).std() > 1
    many = {
        f"layer{i}": [(s, {"lambda_ratio": 10.0 ** (-i - s / 50), "g_rank": i}) for s in range(5)]
        for i in range(30)
    }
    img = _image(plot_trajectories(many, tmp_path / "many.png"))
    assert img.std() > 5
