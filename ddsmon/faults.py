"""Telling a checkpoint's fault from a setting's fault.

A reading can fail because of the checkpoint (NaN weights the model's forward rejects,
a truncated file) or because of a setting that fails on *every* checkpoint (a probe
whose shape the model rejects, targets out of range for the loss, a loss function that
raises). The first is that checkpoint's failure and the daemon goes on; the second
would fail each checkpoint forever, so it is said once and the daemon stops (exit 2).

:class:`RepeatedFault` decides: when the same error ends the reading of ``limit``
distinct checkpoints in a row and no checkpoint has been read successfully since the
daemon started, the fault is the setting's. "The same error" is compared by
:func:`fault_signature`: the message with its numbers blanked, since a kernel may name
the first offending value it met (``Target 99 is out of bounds`` on one checkpoint,
``Target 100`` on the next).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ("RepeatedFault", "fault_signature")

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def fault_signature(reason: str) -> str:
    """``reason`` with every number replaced by ``#``: what two failures share."""
    return _NUMBER.sub("#", reason)


@dataclass
class RepeatedFault:
    """Consecutive identical failures, reset by any successful reading.

    limit: identical failures in a row, before any success, that make a setting's fault.
    """

    limit: int = 3
    _signature: str | None = None
    _count: int = 0
    _succeeded: bool = False
    _paths: list[str] = field(default_factory=list)

    def success(self) -> None:
        self._succeeded = True
        self._signature, self._count, self._paths = None, 0, []

    def failure(self, signature: str, path: str) -> bool:
        """Record one failure; True when it makes the fault a setting's (stop now)."""
        signature = fault_signature(signature)
        if signature != self._signature:
            self._signature, self._count, self._paths = signature, 0, []
        self._count += 1
        self._paths.append(path)
        return not self._succeeded and self._count >= self.limit

    @property
    def paths(self) -> list[str]:
        """The checkpoints that failed identically, in order."""
        return list(self._paths)
