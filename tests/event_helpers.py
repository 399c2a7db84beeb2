"""Helpers of the event-detector tests: a layer's readings made up for a run, without a
model or a probe."""

from __future__ import annotations

from ddsmon.signature import LayerSignature


def layer_reading(lam: float, vol: float) -> dict:
    """A layer's reading (``LayerSignature.to_dict()``, a 64 x 64 layer read on 16 probe
    rows): lambda_ratio ``lam`` (lambda_min = ``lam``, lambda_max = 1), log_volume and
    logdet ``vol`` (natural log), X and G of rank 10 with 6 dead directions each, and
    sigma from 0.3 to 3."""
    return LayerSignature(
        "fc", 64, 64, 16,
        sigma_min=0.3, sigma_max=3.0, x_rank=10, x_dead=6,
        lambda_min=lam, lambda_max=1.0, g_rank=10, g_dead=6,
        logdet=vol, log_volume=vol,
    ).to_dict()  # fmt: skip
