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
    "DEFAULT_MAX_WIDTH",
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
BUILTIN_LOSSES: tuple[str, ...] = ("ce", "lm", "mse")
#: The device setting that picks CUDA when torch sees it, else the CPU.
DEVICE_AUTO = "auto"

#: The defaults the engine's keyword arguments and the settings table share.
DEFAULT_FISHER = "both"
DEFAULT_FORWARD_DTYPE = "float64"
DEFAULT_LOSS = "ce"
#: The widest layer output (features d) the default layer selection reads: wider than
#: the hidden and MLP widths of models up to 70B parameters (Llama-3-70B's 28672),
#: narrower than the vocabulary heads of language models (BERT's 30522, Llama's 32000,
#: GPT-2's 50257, Llama-3's 128256). Decomposing a layer of N probe rows and width d
#: costs about 2 N^2 d when d > N (GPT-2's head on a 32 x 128 probe: 1.7 TFLOP, 272 s
#: and 8.8 GiB on 2 busy cores), and its readings are bounded by N and by its input width.
DEFAULT_MAX_WIDTH = 30000
