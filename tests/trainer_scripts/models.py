"""Models for the trainer tests, importable as ``--model tests/trainer_scripts/models.py:NAME``.

* ``one_output_mlp(seed=0)``: ``Sequential(Linear(8, 16), ReLU, Linear(16, 16), ReLU,
  Linear(16, 1))``: its last bias, ``4.bias``, is a one-element tensor.
* ``one_output_probe()``: ``(inputs (32, 8) float32, targets (32, 1) float32)``, for ``mse``.
* ``EmaLit``: a Lightning-shaped module (plain ``nn.Module``) holding the model as
  ``.model``, an EMA copy as ``.ema_model`` and a loss with a buffer as ``.criterion``.
* ``classifier(seed=0)``: ``Sequential(Linear(8, 32), ReLU, Linear(32, 32), ReLU,
  Linear(32, 4))``, the inner model of the Lightning test; ``classifier_data(n, seed)``
  its inputs ``(n, 8)`` and labels ``(n,)`` (a learnable rule); ``classifier_probe()``.
* ``tiny_gpt2_config()`` / ``tiny_gpt2()``: a 2-layer GPT-2 (width 32, vocabulary 101,
  16 positions) built from its config (needs transformers; no weights downloaded).
* ``gpt2_probe(n=16, t=8)``: token ids ``(n, t)`` and next-token targets ``(n, t)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 101
POSITIONS = 16


def one_output_mlp(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
        )


def one_output_probe() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(32, 8, generator=generator)
    return inputs, inputs[:, :1].clone() * 0.5


class EmaLit(nn.Module):
    """``model.*``, ``ema_model.*`` (a copy, weights moved off the model's) and
    ``criterion.*``: what a LightningModule with an EMA copy saves."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = one_output_mlp(seed)
        self.ema_model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p in self.ema_model.parameters():
                p.mul_(0.5)
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(3))


def classifier(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )


def classifier_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=generator)
    labels = (inputs[:, 0] > 0).long() * 2 + (inputs[:, 1] > 0).long()
    return inputs, labels


def classifier_probe() -> tuple[torch.Tensor, torch.Tensor]:
    return classifier_data(32, seed=99)


def tiny_gpt2_config():  # -> transformers.GPT2Config
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(tiny_gpt2_config())


def token_data(n: int, t: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``t + 1`` tokens from a learnable rule (next = 3 * prev + 1 mod V)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, VOCAB, (n, 1), generator=generator)
    seq = [first]
    for _ in range(t):
        seq.append((seq[-1] * 3 + 1) % VOCAB)
    return torch.cat(seq, dim=1)


def gpt2_probe(n: int = 16, t: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, t)`` and their next tokens ``(n, t)``, for ``--loss ce``."""
    seq = token_data(n, t, seed=99)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
