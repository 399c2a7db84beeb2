"""A model with GPT-2's dotted layer names, for tests of how wide tables are laid out.

``gpt_like()``: ``transformer.h.<i>.attn.c_attn``, ``.attn.c_proj``, ``.mlp.c_fc``,
``.mlp.c_proj`` for 12 blocks (names up to 28 characters), then ``lm_head``: 49 Linear
layers of width 8 to 16 on 8 inputs, 4 classes out, so the fixture MLP's probe
(:func:`fixtures_models.mlp_probe`) reads it. Weights fixed by ``seed``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ("LAYER_NAMES", "gpt_like")

_BLOCKS = 12

#: Every Linear layer's name, in module order.
LAYER_NAMES: tuple[str, ...] = (
    *(
        f"transformer.h.{i}.{part}"
        for i in range(_BLOCKS)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ),
    "lm_head",
)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(width, width), "c_proj": nn.Linear(width, width)})  # fmt: skip
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 2 * width), "c_proj": nn.Linear(2 * width, width)})  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn["c_proj"](torch.tanh(self.attn["c_attn"](x)))
        return x + self.mlp["c_proj"](torch.relu(self.mlp["c_fc"](x)))


class GPTLike(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({"h": nn.ModuleList(_Block(width) for _ in range(_BLOCKS))})  # fmt: skip
        self.lm_head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer["h"]:
            x = block(x)
        return self.lm_head(x)


def gpt_like(seed: int = 0) -> GPTLike:
    """The model, initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPTLike()
