"""The allowed values of ddsmon's settings, in one torch-free place.

The engine validates against these, the config parser checks file values against
them, and the CLI turns them into ``click.Choice`` lists without importing torch.
"""

from __future__ import annotations

__all__ = (
    "BUILTIN_LOSSES",
    "DEFAULT_FISHER",
    "DEFAULT_FORWARD_DTYPE",
    "DEFAULT_LOSS",
    "DEVICE_AUTO",
    "FISHER_FAMILIES",
    "FORWARD_DTYPES",
)

#: Which Fisher-Gram families a reading computes: activation side (X, G), parameter
#: side (K), both, or none: then only X's spectrum is read, from forward passes alone
#: (no loss, no autograd graph, no backward pass; G and K readings are None).
FISHER_FAMILIES: tuple[str, ...] = ("both", "activation", "parameter", "none")
#: dtypes of the probe pass, by name (the spectra are always float64).
FORWARD_DTYPES: tuple[str, ...] = ("float64", "float32")
#: Per-sample losses built in; anything else is ``MODULE:FUNCTION``.
BUILTIN_LOSSES: tuple[str, ...] = ("ce", "mse")
#: The device setting that picks CUDA when torch sees it, else the CPU.
DEVICE_AUTO = "auto"

#: The defaults the engine's keyword arguments and the settings table share.
DEFAULT_FISHER = "both"
DEFAULT_FORWARD_DTYPE = "float64"
DEFAULT_LOSS = "ce"
