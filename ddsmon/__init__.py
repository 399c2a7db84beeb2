"""ddsmon: Dead-Direction Signatures of every checkpoint, per layer, from one probe pass.

The package face is lazy: ``import ddsmon`` (and so ``ddsmon --help``) does not import
torch; ``ddsmon.compute_signatures`` and the reading types are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = (
    "FUNCTIONAL",
    "Config",
    "LayerSignature",
    "Reader",
    "Signatures",
    "StructuredGram",
    "__version__",
    "compute_signatures",
    "dying_directions",
    "register_param_gram",
)

#: Public name -> the module that defines it.
_LAZY = {
    "compute_signatures": "ddsmon.engine",
    "LayerSignature": "ddsmon.signature",
    "Signatures": "ddsmon.signature",
    "dying_directions": "ddsmon.signature",
    "Reader": "ddsmon.reader",
    "Config": "ddsmon.config",
    "register_param_gram": "ddsmon.param_gram",
    "StructuredGram": "ddsmon.param_gram",
    "FUNCTIONAL": "ddsmon.param_gram",
}

if TYPE_CHECKING:
    from ddsmon.config import Config
    from ddsmon.engine import compute_signatures
    from ddsmon.param_gram import FUNCTIONAL, StructuredGram, register_param_gram
    from ddsmon.reader import Reader
    from ddsmon.signature import LayerSignature, Signatures, dying_directions


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddsmon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
