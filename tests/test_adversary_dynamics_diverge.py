"""A run that diverges: its learning rate jumps, the loss goes to inf and then NaN, and
the weights are NaN from then on; the trainer is restarted from a sane checkpoint and
goes on. Read as a user reads it: ``ddsmon scan`` with ``--events-json`` and a real
MLflow store, its plain lines, and the live view of the same readings.

The trainer is the modular-addition example's model and data with plain SGD (a
learning rate of 1, then 1e6 from step 40: the loss is 1.5e10 a step later, NaN two
after that, and the weights NaN from step 44)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from modular_addition_helpers import example_module, scan_with_events
from rich.console import Console

from ddsmon.config import Config
from ddsmon.daemon import Daemon
from ddsmon.reader import Reader
from ddsmon.sinks import RunInfo
from ddsmon.sinks.terminal import TerminalSink, render_dashboard

BLOW_UP, RESTART = 40, 62


def _train(out: Path, model: torch.nn.Module, steps: range, lr_at: dict[int, float]) -> None:
    train = example_module("train")
    x, y, _, _ = train.make_split(53, 0.5, 0)
    opt = torch.optim.SGD(model.parameters(), lr=lr_at[min(lr_at)])
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = max((v for k, v in lr_at.items() if k <= step), default=1.0)
        loss = F.cross_entropy(model(x), y)
        if step % 2 == 0:
            torch.save(
                {"model": model.state_dict(), "step": step, "loss": loss.item()},
                out / f"step_{step:06d}.pt",
            )
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("diverged")
    (run / "ckpts").mkdir()
    torch.save(example_module("train").make_probe(53, 128), run / "probe.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = example_module("model").ModularAdditionMLP()
        _train(run / "ckpts", model, range(0, RESTART - 1), {0: 1.0, BLOW_UP: 1e6})
        # restarted from the sane checkpoint at step 38, numbered on from 62
        model.load_state_dict(torch.load(run / "ckpts" / "step_000038.pt")["model"])
        _train(run / "ckpts", model, range(RESTART, 81), {0: 1.0})
    finally:
        torch.set_num_threads(threads)
    return run


def _first_nan(run: Path) -> int:
    for path in sorted((run / "ckpts").glob("step_*.pt")):
        ck = torch.load(path, weights_only=True)
        if not all(torch.isfinite(t).all() for t in ck["model"].values()):
            return int(ck["step"])
    raise AssertionError("the run did not diverge")


@pytest.mark.slow  # about 17 s: a scan's start-up (MLflow's store) on the shared 2 cores
def test_a_divergence_is_said_once_and_the_history_survives_it(
    diverged: Path, tmp_path: Path
) -> None:
    nan_at = _first_nan(diverged)
    assert BLOW_UP < nan_at < RESTART
    proc, uri, events_json = scan_with_events(diverged, tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = sorted(int(p.stem[5:]) for p in (diverged / "ckpts").glob("step_*.pt"))
    assert f"read {len(steps)}, failed 0" in proc.stdout, proc.stdout
    # the plain line of a checkpoint whose every layer is non-finite says it diverged,
    # that of the restarted run's does not
    lines = {int(ln.split()[1]): ln for ln in proc.stdout.splitlines() if ln.startswith("step ")}
    assert "the run diverged" in lines[nan_at], lines[nan_at]
    assert "the run diverged" not in lines[RESTART] and "nonfinite" not in lines[RESTART]
    nan_steps = [s for s in steps if nan_at <= s < RESTART]
    summary = f"{len(nan_steps)} non-finite in every layer (steps {nan_at}-{nan_steps[-1]}: "
    assert summary + "the run diverged?)" in proc.stderr, proc.stderr
    # one nonfinite event per layer, where it turned non-finite, in words
    records = [json.loads(line) for line in events_json.read_text().splitlines()]
    nonfinite = [r for r in records if r["kind"] == "nonfinite"]
    assert {r["step"] for r in nonfinite} == {nan_at}
    assert {r["layer"] for r in nonfinite} == {"embed", "hidden", "act", "unembed"}
    for r in nonfinite:
        assert " not finite (NaN/inf)" in r["message"] and "held NaN" not in r["message"]
        assert "left out of the event history" in r["message"]
    # the loss blew up (1e34) at the checkpoint before the weights went NaN: its
    # readings collapsed there, and the NaN checkpoints after held them "unrevived" for
    # the confirmation, which made a transition of the divergence (the headline alert,
    # of a run breaking); collapses whose layer turns non-finite count toward none
    blown = {(r["layer"], r["reading"]) for r in records if r["kind"] == "collapse"}
    assert any(r["step"] == nan_at - 2 for r in records if r["kind"] == "collapse")
    assert [r for r in records if r["kind"] == "transition"] == [], records
    # the restarted run is compared with the sane readings before the divergence (its own
    # weights 24 steps earlier): the blown-up pairs recover, nothing else is said
    after = [r for r in records if r["step"] == RESTART]
    assert {r["kind"] for r in after} == {"revival"}
    assert {(r["layer"], r["reading"]) for r in after} <= blown
    from fault_helpers import logged_steps, runs_of

    (run,) = runs_of(uri)
    assert logged_steps(uri, run.info.run_id) == steps
    tags = [k for k in run.data.tags if k.startswith("dds.event.") and k.endswith(".nonfinite")]
    assert len(tags) == 4, tags


def test_the_live_view_says_the_run_diverged(diverged: Path) -> None:
    nan_at = _first_nan(diverged)
    train_model = example_module("model").make_model
    probe = torch.load(diverged / "probe.pt", weights_only=True)
    config = Config.for_directory(diverged / "ckpts", state_dir=diverged / "live-state")
    reader = Reader.from_parts(
        config.read, factory=train_model, probe=(probe["inputs"], probe["targets"]), loss="ce"
    )
    out = io.StringIO()
    console = Console(file=out, width=140, color_system=None, force_terminal=True)
    sink = TerminalSink(console, live=False)
    frames: dict[int, str] = {}

    class Frames:
        def start(self, info: RunInfo) -> None:
            pass

        def on_queue(self, pending: int) -> None:
            pass

        def on_reading(self, reading, events) -> None:  # type: ignore[no-untyped-def]
            view = io.StringIO()
            Console(file=view, width=140, color_system=None).print(
                render_dashboard(sink.snapshot())
            )
            frames[reading.step] = view.getvalue()

        def on_failure(self, failure) -> None:  # type: ignore[no-untyped-def]
            pass

        def close(self) -> None:
            pass

    summary = Daemon(config, sinks=[sink, Frames()], reader=reader).scan()
    # the blow-up's collapses, held by NaN checkpoints only, make no transition
    assert summary.flagged(["collapse"]) and not summary.flagged(["transition"])
    assert {e.step for e in summary.flagged(["nonfinite"])} == {nan_at}
    # the scan's summary line counts them (before, it said nothing of a diverged run)
    assert min(summary.nonfinite) == nan_at and max(summary.nonfinite) < RESTART
    at = frames[nan_at]
    assert "every layer non-finite: the run diverged" in at, at
    event_lines = [ln for ln in at.splitlines() if "NONFINITE" in ln]
    assert len(event_lines) == 4 and not any("magnitude" in ln for ln in event_lines), at
    assert "the run diverged" not in frames[nan_at - 2]
    assert "the run diverged" not in frames[RESTART]
