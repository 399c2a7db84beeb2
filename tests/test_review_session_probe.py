"""A --layers regex that matches only modules that never run as layers (a ModuleDict
such as peft's ``lora_A``): before, it said the regex 'matches no module' though the
listing under it showed the names it matched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddsmon.errors import ProbeError
from ddsmon.probe import select_layers


class Adapted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_A["default"](x).sum(-1, keepdim=True)


def test_a_regex_matching_only_containers_says_so() -> None:
    model = Adapted()
    with pytest.raises(ProbeError, match=r"matches only modules that never run.*lora_A;"):
        select_layers(model, "lora_A$")
    with pytest.raises(ProbeError, match="matches no module"):
        select_layers(model, "nothing")
    assert select_layers(model, "lora_A") == ["lora_A.default"]
