"""The engine's setting values come from ddsmon.options: the fisher families and the
probe-pass dtypes by name (``forward_dtype``), with a ConfigError naming a bad one."""

from __future__ import annotations

import pytest
import torch

from ddsmon import engine, options
from ddsmon.engine import FISHER_FAMILIES, forward_dtype
from ddsmon.errors import ConfigError


def test_fisher_families_are_the_options_ones() -> None:
    assert FISHER_FAMILIES is options.FISHER_FAMILIES
    assert engine.FISHER_FAMILIES == ("both", "activation", "parameter", "none")


@pytest.mark.parametrize(
    ("name", "dtype"), [("float64", torch.float64), ("float32", torch.float32)]
)
def test_forward_dtype_maps_the_option_names(name: str, dtype: torch.dtype) -> None:
    assert forward_dtype(name) is dtype


def test_every_forward_dtype_option_maps() -> None:
    assert [forward_dtype(name) for name in options.FORWARD_DTYPES] == [
        torch.float64,
        torch.float32,
    ]


@pytest.mark.parametrize("bad", ["float16", "fp64", "", "torch.float64"])
def test_bad_forward_dtype_names_the_value_and_the_choices(bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"float64 or float32, got {bad!r}"):
        forward_dtype(bad)
