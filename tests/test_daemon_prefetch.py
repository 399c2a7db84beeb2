"""The daemon loads checkpoint k+1 while it reads checkpoint k (issue 5: overlap).

In-process ``Daemon.scan`` over a real directory, the daemon built from resolved parts
(a factory and a loss callable, no module written to disk). The model factory runs in
the loader thread and counts its calls; the per-sample loss runs in the reading thread and, while
reading checkpoint k, waits (up to a timeout) for the factory call of checkpoint k+1.
With the overlap that call comes while k is still being read; without it
(``prefetch = false``) the wait always times out and only k's own load has happened.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fixtures_models import mlp, mlp_probe
from test_cli import write_run

from ddsmon.config import Config
from ddsmon.daemon import Daemon
from ddsmon.reader import Reader


class Overlap:
    """The factory (loader thread) and the per-sample loss (reading thread), in step.

    loads: thread name of each factory call, in order; seen: factory calls made when
    each reading's loss ran; total: checkpoints in the directory; wait: how long a
    reading waits for the next checkpoint's factory call.
    """

    def __init__(self, total: int, wait: float) -> None:
        self.loads: list[str] = []
        self.seen: list[int] = []
        self.total, self.wait = total, wait
        self._cond = threading.Condition()

    def make_model(self) -> torch.nn.Module:
        with self._cond:
            self.loads.append(threading.current_thread().name)
            self._cond.notify_all()
        return mlp()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(targets) == 1:  # the streamed pass sizing its micro-batches on one sample
            return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
        k = len(self.seen)
        with self._cond:
            if k + 1 < self.total:
                self._cond.wait_for(lambda: len(self.loads) >= k + 2, timeout=self.wait)
            self.seen.append(len(self.loads))
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


@pytest.fixture
def helper() -> Overlap:
    return Overlap(total=4, wait=0.0)


def _scan(tmp_path: Path, probe: Path, helper: Overlap, *, prefetch: bool, wait: float) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30])
    helper.wait = wait
    config = Config.for_directory(
        ckpts, probe=str(probe), device="cpu", fisher="activation", prefetch=prefetch
    )
    reader = Reader.from_parts(
        config.read, factory=helper.make_model, probe=mlp_probe(), loss=helper.loss
    )
    summary = Daemon(config, sinks=[], reader=reader).scan()
    assert summary.read == 4, summary
    assert len(helper.seen) == 4, "one whole-probe loss call per checkpoint (one probe pass each)"


def test_next_checkpoint_loads_while_the_current_one_is_read(
    tmp_path: Path, probe: Path, helper
) -> None:
    _scan(tmp_path, probe, helper, prefetch=True, wait=10.0)
    # while reading checkpoint k (k < 3) the factory had already run for k + 1
    assert helper.seen == [2, 3, 4, 4]
    assert all(name.startswith("ddsmon-load") for name in helper.loads)


def test_without_prefetch_each_load_waits_for_the_reading_before_it(
    tmp_path: Path, probe: Path, helper
) -> None:
    _scan(tmp_path, probe, helper, prefetch=False, wait=0.3)
    assert helper.seen == [1, 2, 3, 4]
