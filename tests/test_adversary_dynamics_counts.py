"""The dead-direction count ``dying_directions`` as a user reads it (the terminal's
``dying`` column, MLflow's ``dds/dying_directions/<layer>``, the events' "about N
directions dying"): a count, never negative, never more than the layer's rank; and a
run of three checkpoints, which decides nothing.

The runs are the modular-addition example trained by its own ``train``."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from modular_addition_helpers import example_module
from rich.console import Console

from ddsmon import compute_signatures
from ddsmon.config import Config
from ddsmon.daemon import Daemon
from ddsmon.events import EventDetector
from ddsmon.reader import Reader
from ddsmon.sinks.terminal import TerminalSink


def _train(run: Path, steps: int, every: int, weight_decay: float) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        example_module("train").train(
            run / "ckpts",
            steps=steps,
            every=every,
            weight_decay=weight_decay,
            probe_out=run / "probe.pt",
        )
    finally:
        torch.set_num_threads(threads)


def test_the_count_is_a_count_in_a_real_run(tmp_path: Path) -> None:
    # the weight-decay-free control memorises: its log det+(G) rises while lambda_min
    # falls, which made the estimate negative (down to -269) at nearly every checkpoint
    _train(tmp_path, 300, 25, 0.0)
    factory = example_module("model").make_model
    probe = torch.load(tmp_path / "probe.pt", weights_only=True)
    det = EventDetector()
    counts: list[tuple[int, str, float, int]] = []
    for path in sorted((tmp_path / "ckpts").glob("step_*.pt")):
        ck = torch.load(path, weights_only=True)
        model = factory()
        model.load_state_dict(ck["model"])
        sig = compute_signatures(model, probe["inputs"], probe["targets"], loss="ce", device="cpu")
        layers = {k: s.to_dict() for k, s in sig.layers.items()}
        det.update(int(ck["step"]), layers)
        for name, derived in det.last_derived.items():
            value = derived["dying_directions"]
            if value is not None:
                counts.append((int(ck["step"]), name, value, int(layers[name]["g_rank"])))
    assert counts, "no count at all"
    bad = [c for c in counts if not (0.0 <= c[2] <= c[3] and math.isfinite(c[2]))]
    assert bad == [], bad


def test_three_checkpoints_decide_nothing_and_show_no_negative_count(tmp_path: Path) -> None:
    # the grokking run's first 50 steps: memorisation moves every reading, and the live
    # view's "dying" column showed -308 for the hidden layer at step 50
    _train(tmp_path, 50, 25, 1.0)
    probe = torch.load(tmp_path / "probe.pt", weights_only=True)
    config = Config.for_directory(tmp_path / "ckpts", state_dir=tmp_path / "state")
    reader = Reader.from_parts(
        config.read,
        factory=example_module("model").make_model,
        probe=(probe["inputs"], probe["targets"]),
        loss="ce",
    )
    out = io.StringIO()
    sink = TerminalSink(
        Console(file=out, width=160, color_system=None, force_terminal=True), live=False
    )
    summary = Daemon(config, sinks=[sink], reader=reader).scan()
    assert summary.read == 3 and summary.failed == 0
    assert [e for e in summary.events if e.kind != "rank_change"] == []
    from ddsmon.sinks.terminal import render_dashboard

    view = io.StringIO()
    Console(file=view, width=160, color_system=None).print(render_dashboard(sink.snapshot()))
    table = view.getvalue()
    header = next(ln for ln in table.splitlines() if "dying" in ln and "layer" in ln)
    at = header.index("dying")
    rows = [ln for ln in table.splitlines() if ln.split()[:1] in (["hidden"], ["unembed"])]
    assert rows, table
    for line in rows:
        cell = line[at - 2 : at + 6].strip()
        assert not cell.startswith("-"), (cell, table)
