"""benchmarks/bench_events.py --quick runs end to end as a user runs it, and its scorecard
says what the example's seed 0 does: a generalising transition in the grokking run at
both cadences, nothing in the short control or the converged run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_events.py"


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 10 and cells[1] == "0":
            rows[cells[0]] = cells
    return rows


def test_quick_scorecard(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written text stays\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--write", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "hand-written text stays" in text
    assert text.count("<!-- BEGIN bench_events -->") == 1
    assert "--quick" in text  # the exact command is in the table's header
    rows = _rows(text)
    assert set(rows) == {"grok@25", "grok@50", "control", "steady"}, rows
    # columns: run, seed, ckpts, val window, DDS transitions, DDS lead, entropy, lead,
    # false, first dying
    assert "(gen)" in rows["grok@25"][4] and "(gen)" in rows["grok@50"][4], rows
    assert rows["control"][4] == "none" and rows["steady"][4] == "none", rows
    assert rows["steady"][8] == "0 / 0" and rows["steady"][9] == "none", rows
    assert "| DDS |" in text and "| entropy |" in text
    assert seconds < 90, f"--quick took {seconds:.0f} s"


def test_event_tasks_write_checkpoints_ddsmon_reads(tmp_path: Path) -> None:
    """Each task of benchmarks/event_tasks.py, a few steps long: checkpoints at its cadence
    with the trainer's scalars, a probe, and a model ddsmon reads with its per-sample
    losses (the output layer carries loss_spread)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from event_tasks import TASKS

    from ddsmon import compute_signatures

    for name, task in TASKS.items():
        run = tmp_path / name
        task.train(run / "ckpts", 20, 10, 0)
        paths = sorted((run / "ckpts").glob("step_*.pt"))
        assert [p.name for p in paths] == [f"step_{s:06d}.pt" for s in (0, 10, 20)], name
        ck = torch.load(paths[-1], weights_only=True)
        assert {"train_acc", "val_acc", "loss", "val_loss", "lr"} <= set(ck), name
        assert 0.0 <= ck["val_acc"] <= 1.0 and ck["step"] == 20, name
        probe = torch.load(run / "probe.pt", weights_only=True)
        model = task.make_model()
        model.load_state_dict(ck["model"])
        sig = compute_signatures(model, probe["inputs"], probe["targets"], loss="ce", device="cpu")
        assert sig.output_layer is not None and sig.sample_losses is not None, name
        assert sig.layers[sig.output_layer].loss_spread is not None, name


def test_cadence_pairs_compare_where_transitions_completed_too() -> None:
    """A pair whose transitions were reported 600 steps apart (the coarse reading's
    confirmation is a whole 500-step checkpoint) but completed 300 apart: not the same
    within one cadence by the reported step, the same by where they completed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_events as B

    from ddsmon.events import Event

    def score(step: int, completed: int) -> B.Score:
        msg = f"transition: ... @ {completed - 200}, ... @ {completed}"
        tr = Event(step, "a,b", "transition", "x", None, None, 2.0, msg, completed_step=completed)
        return B.Score(transitions=[tr])

    cross = {t: None for t in B.THRESHOLDS}
    fine = B.Row("slow", 0, 100, 101, True, cross, {"DDS": score(7900, 7700)}, paired=True)
    coarse = B.Row("slow", 0, 500, 21, True, cross, {"DDS": score(8500, 8000)}, paired=True)
    (pair,) = B.cadence_pairs([fine, coarse])
    assert not pair.within("DDS", 1) and pair.completed_within("DDS")
    assert pair.onsets_within("DDS")  # the onsets: 7500 and 7800
    # a transition that says nothing of where it completed is compared at its step
    bare = B.Score(transitions=[Event(8500, "a", "transition", "x", None, None, 2.0, "m")])
    assert bare.completed() == [8500]


def test_cadence_pairs_where_both_decide_leave_out_the_coarse_warm_up() -> None:
    """The fine reading leaves its warm-up at 1000, the coarse one at 3500: a fine
    transition begun at 1900 (before the coarse one could decide anything) is not
    compared; the one begun at 3600 is, against the coarse one begun at 3500. Before
    either is past its warm-up nothing is comparable, and a pair whose shared
    transitions differ in number is not the same."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_events as B

    from ddsmon.events import Event

    def tr(step: int, onset: int, completed: int) -> Event:
        msg = f"transition: a x -1 @ {onset}, b y -1 @ {completed}"
        return Event(step, "a,b", "transition", "x", None, None, 2.0, msg, completed_step=completed)

    cross = {t: None for t in B.THRESHOLDS}
    fine_score = B.Score(
        transitions=[tr(2400, 1900, 2300), tr(3700, 3600, 3600)], decides_from=1000
    )
    coarse_score = B.Score(transitions=[tr(4000, 3500, 3500)], decides_from=3500)
    fine = B.Row("slow", 8, 100, 101, True, cross, {"DDS": fine_score}, paired=True)
    coarse = B.Row("slow", 8, 500, 21, True, cross, {"DDS": coarse_score}, paired=True)
    (pair,) = B.cadence_pairs([fine, coarse])
    assert not pair.completed_within("DDS")  # two transitions against one
    assert pair.both_decide_from("DDS") == 3500
    assert pair.shared("DDS") == ([(3700, 3600)], [(4000, 3500)])
    assert pair.shared_within("DDS", 0) and pair.shared_within("DDS", 1)
    late = B.Score(transitions=[tr(4600, 3500, 4100)], decides_from=3500)
    coarse = B.Row("slow", 8, 500, 21, True, cross, {"DDS": late}, paired=True)
    (pair,) = B.cadence_pairs([fine, coarse])
    assert not pair.shared_within("DDS", 0) and pair.shared_within("DDS", 1)  # 900 vs 500
    blind = B.Row("slow", 8, 500, 21, True, cross, {"DDS": B.Score()}, paired=True)
    (pair,) = B.cadence_pairs([fine, blind])
    assert pair.both_decide_from("DDS") is None and pair.shared("DDS") == ([], [])
    assert not pair.shared_within("DDS", 1)  # nothing compared is no agreement
    extra = B.Score(transitions=[tr(4000, 3500, 3500), tr(6000, 5800, 5900)], decides_from=3500)
    coarse = B.Row("slow", 8, 500, 21, True, cross, {"DDS": extra}, paired=True)
    (pair,) = B.cadence_pairs([fine, coarse])
    assert not pair.shared_within("DDS", 1)


def test_detect_records_where_the_warm_up_ended() -> None:
    """``detect`` notes the first step past the warm-up: none in the first checkpoints
    (``min_reference`` of them at least), and later at the coarser reading."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_events as B

    from ddsmon.events import EventConfig

    layer = {"lambda_ratio": 1e-3, "sigma_ratio": 1e-2, "log_volume": -10.0}
    rows = [(s, {}, {"fc": dict(layer)}) for s in range(0, 5001, 100)]
    fine = B.detect(rows, EventConfig(), None).decides_from
    coarse = B.detect(rows, EventConfig(), 500).decides_from
    assert fine is not None and coarse is not None
    assert fine >= 6 * 100 and coarse >= 6 * 500 and coarse > fine


def test_window_moves_tabulates_what_moved_against_its_threshold() -> None:
    """A quiet sigma_ratio that falls 0.1 decades across the window: listed, with its
    plateau, its fall at each crossing, that fall in plateau sigmas and the threshold DDS
    applies to it (2 decades with the old fixed rule, 40 of its sigmas by default); a
    reading that does not move is left out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_events as B

    from ddsmon.events import EventConfig

    rows = []
    for i in range(41):
        step = 100 * i
        wobble = 0.001 * (-1) ** i  # a robust sigma of 0.0015 decades
        fall = 0.0 if step < 2000 else 0.01 * (step - 2000) / 100  # 0.1 decades per 1000 steps
        layer = {"sigma_ratio": 10 ** (-0.5 + wobble - fall), "lambda_ratio": 1e-3}
        rows.append((step, {"val_acc": 0.5}, {"fc": layer}))
    cross = {0.10: 2000, 0.50: 2500, 0.95: 3000}
    configs = {name: make({"ratio_mad_k": 0}) for name, make in B.DETECTORS.items()}
    scores = {name: B.Score() for name in configs}
    row = B.Row("parity", 0, 100, len(rows), True, cross, scores)
    lines = B.window_moves(row, rows, configs)
    assert lines[0].startswith("| parity seed 0 (val 10% / 50% / 95%: 2000 / 2500 / 3000)")
    body = lines[2:]
    assert len(body) == 1, lines  # lambda_ratio never moved
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells[0] == "fc sigma_ratio"
    assert cells[1] == "-0.500 ± 0.0015"
    # the median of the 5 checkpoints around each crossing, less the plateau
    assert cells[2] == "0.001 / 0.051 / 0.099"
    assert cells[3] == "34"  # 0.051 decades / 0.0015
    assert cells[4] == "2.000" and cells[5] == "none"
    quiet = {**configs, "DDS": EventConfig()}
    (line,) = B.window_moves(row, rows, quiet)[2:]
    assert line.split("|")[5].strip() == "0.059"  # 40 * 1.4826 * (MAD 0.001): under 2 decades
    assert (
        B.window_moves(
            B.Row("parity", 0, 100, 41, True, {t: None for t in B.THRESHOLDS}, scores),
            rows,
            configs,
        )
        == []
    )


def test_command_line_can_be_pasted() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import shlex

    import bench_events as B

    argv = ["--seeds", "9,10,11", "--tune-seeds", "", "--events", '{"ratio_mad_k": 0}']
    line = B.command_line(argv)
    assert line == (
        "python benchmarks/bench_events.py --seeds 9,10,11 --tune-seeds '' "
        """--events '{"ratio_mad_k": 0}'"""
    )
    assert shlex.split(line)[2:] == argv


def test_the_slow_run_is_read_at_the_cadences_asked_for() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_events as B

    (slow,) = [s for s in B.specs(False, (100, 200)) if s.kind == "slow"]
    assert slow.read_every == (100, 200) and slow.every == B.SLOW_EVERY
    (default,) = [s for s in B.specs(False) if s.kind == "slow"]
    assert default.read_every == (100, 500)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--slow-every", "100,250"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode == 2 and "--slow-every: two multiples of 100" in proc.stderr
