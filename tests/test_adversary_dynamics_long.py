"""A long run: the local history the plots read holds a bounded sample of the run in
memory (the event detector's own state is bounded by its windows, see
``test_events_time.py``), and its file on disk is kept within the same bound.

Measured on 2000 checkpoints of a 3-layer MLP through ``ddsmon scan``: the whole history
in memory was 12.5 MB (2.1 KB per layer and checkpoint), growing without end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ddsmon.sinks.history import KEEP_NEWEST, HistoryEntry, LocalHistory
from ddsmon.state import StateDir

N = 700


def _entry(step: int) -> HistoryEntry:
    return HistoryEntry(
        step=step,
        layers={"fc": {"lambda_ratio": 1e-3 * (1 + step % 7), "finite": True}},
        train={"loss": 1.0 / (1 + step)},
    )


def test_the_history_in_memory_is_bounded_and_evenly_spread(tmp_path: Path) -> None:
    kept = 100
    history = LocalHistory(StateDir(tmp_path / "st"), kept=kept)
    for step in range(0, 3 * N, 3):
        history.append(_entry(step))
    steps = [s for s, _ in history.layers()["fc"]]
    assert len(steps) <= 2 * kept, len(steps)
    assert steps[0] == 0 and steps[-1] == 3 * (N - 1)
    # the newest are whole, the older a sample of the run with no gap wider than three
    # of its spans (a thinning of what an earlier one kept)
    assert steps[-KEEP_NEWEST:] == list(range(3 * (N - KEEP_NEWEST), 3 * N, 3))
    older = steps[: -KEEP_NEWEST + 1]
    widest = max(b - a for a, b in itertools.pairwise(older))
    assert widest <= 3 * (3 * N) / kept, widest
    assert [s for s, _ in history.train()["loss"]] == steps
    # the file is kept within the same bound (rewritten past 4 * kept lines), and a
    # restart reads back what the memory held
    lines = (tmp_path / "st" / "history.jsonl").read_text().splitlines()
    on_disk = [json.loads(line)["step"] for line in lines]
    assert len(on_disk) <= 4 * kept, len(on_disk)
    assert on_disk[0] == 0 and on_disk[-1] == 3 * (N - 1) and on_disk == sorted(on_disk)
    assert set(steps) <= set(on_disk)
    again = LocalHistory(StateDir(tmp_path / "st"), kept=kept)
    back = [s for s, _ in again.layers()["fc"]]
    assert len(back) <= 2 * kept and back[0] == 0 and back[-1] == 3 * (N - 1)
    assert set(back) <= set(on_disk) and back[-KEEP_NEWEST:] == steps[-KEEP_NEWEST:]
    assert [s for s, _ in again.train()["loss"]] == back
