"""Tiny importable models and probes for tests (also usable as ``--model``/``--probe`` specs).

Stable interface, other test files import it:

* ``mlp(seed=0)``: ``nn.Sequential(Linear(8, 16), ReLU(), Linear(16, 4))``, its
  initial weights fixed by ``seed`` (the global RNG is left as it was).
* ``mlp_probe()``: ``(inputs float32 (32, 8), targets long (32,))``, the same every call.
* ``tied_mlp()``: an MLP whose last layer shares its weight with the first (tied keys).
* ``LitWrapper``: a Lightning-shaped module holding the MLP as ``.model`` beside a
  loss with a buffer (its state dict keys are ``model.*`` and ``criterion.*``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = (
    "LitWrapper",
    "StrictMLP",
    "TiedMLP",
    "broken_factory",
    "exiting_factory",
    "exiting_loss",
    "mlp",
    "mlp_probe",
    "not_a_module",
    "raising_loss",
    "slow_loss",
    "strict_mlp",
    "tied_mlp",
)


def mlp(seed: int = 0) -> nn.Sequential:
    """Linear(8, 16) -> ReLU -> Linear(16, 4), initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def mlp_probe() -> tuple[torch.Tensor, torch.Tensor]:
    """32 samples: inputs float32 (32, 8) ~ N(0, 1), targets long (32,) in 0..3."""
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(32, 8, generator=generator, dtype=torch.float32)
    targets = torch.randint(0, 4, (32,), generator=generator, dtype=torch.long)
    return inputs, targets


class TiedMLP(nn.Module):
    """Embedding-style tying: ``head.weight`` is ``encoder.weight`` transposed in use."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8, bias=False)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.encoder(x))))


def tied_mlp(seed: int = 0) -> TiedMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TiedMLP()


class LitWrapper(nn.Module):
    """What a LightningModule's state dict looks like: ``model.*`` plus its own parts."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = mlp(seed)
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(4))


def broken_factory() -> nn.Module:
    raise ValueError("the factory is broken on purpose")


def not_a_module() -> int:
    return 3


class StrictMLP(nn.Sequential):
    """The fixture MLP whose forward raises on NaN weights, as real models' checks do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, p in self.named_parameters():
            if torch.isnan(p).any():
                raise ValueError(f"NaN in weight {name}")
        return super().forward(x)


def strict_mlp(seed: int = 0) -> StrictMLP:
    """``mlp(seed)``'s layers and weights in a :class:`StrictMLP`."""
    return StrictMLP(*mlp(seed))


def raising_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A per-sample loss that always raises (a user's bug)."""
    raise RuntimeError("the loss is broken on purpose")


def slow_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy after about a minute of eigensolves (long C calls, as a big layer's
    are); writes the file named by ``DDSMON_TEST_MARKER`` when it starts."""
    import os
    import time

    marker = os.environ.get("DDSMON_TEST_MARKER")
    if marker:
        open(marker, "w").close()
    a = torch.randn(1500, 1500, dtype=torch.float64)
    a = a @ a.T
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        torch.linalg.eigvalsh(a)
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def exiting_factory() -> nn.Module:
    """A model factory that calls sys.exit (user code must not end the daemon)."""
    raise SystemExit(0)


def exiting_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A per-sample loss that calls sys.exit."""
    raise SystemExit(0)
