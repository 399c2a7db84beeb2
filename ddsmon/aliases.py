"""Checkpoints without a training step: aliases of a numbered checkpoint, or unplaceable.

Trainers write ``best.pt``, ``last.ckpt``, ``latest.pt`` or ``final.pt`` beside the
numbered checkpoints; usually they hold the same weights as one of them. ddsmon logs
readings against training steps, so such a file is placed by what it holds:

* its own step (``step``/``global_step``/``iteration`` in the content) when it has one;
* else, when its weights equal those of a checkpoint already read, it is an *alias* of
  that step: said at the default log level, counted, and not logged again;
* else it cannot be placed on the step axis: said at the default log level, counted,
  and not logged (an arrival-order step would collide with real steps).

Equality of weights is judged by :func:`weights_digest`, a hash of every parameter and
buffer's name, shape, dtype and a fixed sample of its values (at most 4096 evenly spaced
elements per tensor): two checkpoints of one run differ in (nearly) every value of every
trained tensor, so the sample tells them apart, at a cost of microseconds per tensor
rather than a pass over all the weights.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ("MAX_STEP", "weights_digest")

#: The largest step MLflow stores (its steps are signed 64-bit integers).
MAX_STEP = 2**63 - 1

_SAMPLE = 4096


def weights_digest(model: nn.Module) -> str:
    """A hex digest of ``model``'s state dict: names, shapes, dtypes, sampled values."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLE)
        sample = flat[::stride][:_SAMPLE].contiguous().cpu()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()
