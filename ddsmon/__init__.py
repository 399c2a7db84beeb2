"""ddsmon: Dead-Direction Signatures of every checkpoint, per layer, from one probe pass."""

from ddsmon.engine import compute_signatures
from ddsmon.signature import LayerSignature, Signatures, dying_directions

__version__ = "0.1.0"

__all__ = ("LayerSignature", "Signatures", "__version__", "compute_signatures", "dying_directions")
