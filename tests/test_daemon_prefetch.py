"""The daemon loads checkpoint k+1 while it reads checkpoint k (issue 5: overlap).

In-process ``Daemon.scan`` over a real directory. The model factory runs in the loader
thread and counts its calls; the per-sample loss runs in the reading thread and, while
reading checkpoint k, waits (up to a timeout) for the factory call of checkpoint k+1.
With the overlap that call comes while k is still being read; without it
(``prefetch = false``) the wait always times out and only k's own load has happened.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import write_run

from ddsmon.config import Config
from ddsmon.daemon import Daemon

HELPER = textwrap.dedent(
    """
    import threading
    import torch
    from fixtures_models import mlp

    loads = []          # thread name of each factory call, in order
    seen = []           # factory calls made when each reading's loss ran
    total = 0           # checkpoints in the directory
    WAIT = 0.0
    _cond = threading.Condition()

    def make_model():
        with _cond:
            loads.append(threading.current_thread().name)
            _cond.notify_all()
        return mlp()

    def loss(outputs, targets):
        k = len(seen)
        with _cond:
            if k + 1 < total:
                _cond.wait_for(lambda: len(loads) >= k + 2, timeout=WAIT)
            seen.append(len(loads))
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
    """
)


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "prefetch_helper.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sys.modules.pop("prefetch_helper", None)
    import prefetch_helper

    yield prefetch_helper
    sys.modules.pop("prefetch_helper", None)


def _scan(tmp_path: Path, probe: Path, helper, *, prefetch: bool, wait: float) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30])
    helper.total, helper.WAIT = 4, wait
    config = Config(
        directory=ckpts,
        model="prefetch_helper:make_model",
        probe=str(probe),
        loss="prefetch_helper:loss",
        device="cpu",
        fisher="activation",
        prefetch=prefetch,
    )
    summary = Daemon(config, sinks=[]).scan()
    assert summary.read == 4, summary
    assert len(helper.seen) == 4, "one loss call per checkpoint (one probe pass each)"


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
