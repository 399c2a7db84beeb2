"""A small embedding MLP for modular addition ``(a + b) mod p`` (Nanda et al. style).

Architecture (every piece a named module, so ``ddsmon`` reads each one):

    embed    Embedding(p, d_embed)      tokens a, b -> two d_embed vectors, (n, 2, d_embed)
    hidden   Linear(2 d_embed, d_hidden) the concatenated pair -> hidden pre-activations
    act      ReLU
    unembed  Linear(d_hidden, p)         logits over the p residues

:func:`make_model` is the zero-argument factory ``ddsmon --model`` calls:
``ddsmon scan ckpts --model examples/modular_addition/model.py:make_model``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ("D_EMBED", "D_HIDDEN", "ModularAdditionMLP", "P", "make_model")

#: The modulus (a prime), the embedding width and the hidden width of the example.
P = 53
D_EMBED = 32
D_HIDDEN = 128


class ModularAdditionMLP(nn.Module):
    """Logits of ``(a + b) mod p`` from token ids ``x`` of shape (n, 2), int64."""

    def __init__(self, p: int = P, d_embed: int = D_EMBED, d_hidden: int = D_HIDDEN) -> None:
        super().__init__()
        self.p = p
        self.embed = nn.Embedding(p, d_embed)
        self.hidden = nn.Linear(2 * d_embed, d_hidden)
        self.act = nn.ReLU()
        self.unembed = nn.Linear(d_hidden, p)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embed(x)  # (n, 2, d_embed)
        return self.unembed(self.act(self.hidden(e.flatten(1))))


def make_model() -> nn.Module:
    """The example's model with its default sizes (weights come from the checkpoint)."""
    return ModularAdditionMLP()


if __name__ == "__main__":  # pragma: no cover - a quick shape check
    m = make_model()
    print(m, m(torch.tensor([[1, 2], [3, 4]])).shape)
