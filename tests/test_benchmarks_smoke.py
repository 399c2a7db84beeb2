"""The benchmark scripts run end to end at tiny sizes and write their tables (so they don't rot).

Each script is run as a user runs it (``python benchmarks/<script>.py ... --write FILE``)
in a subprocess; the tests check that every configuration finished and the table
landed in its own block of the markdown file. Timings are not checked.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from bench_daemon import count_requests  # noqa: E402
from bench_scaling import float64_floor, write_section  # noqa: E402
from bench_transformers import MODELS, build, parse_configs  # noqa: E402

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC  # noqa: E402


def _run(script: str, tmp_path: Path, *args: str, timeout: float = 120) -> tuple[str, str]:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written text stays\n")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--write", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    text = out.read_text()
    assert "hand-written text stays" in text
    return proc.stdout, text


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_scaling_tiny(tmp_path: Path) -> None:
    _, md = _run(
        "bench_scaling.py", tmp_path,
        "--sweeps", "width,gpt2", "--widths", "16", "--base-rows", "24", "--fishers", "both",
        "--gpt2", "tiny", "--repeats", "1", "--budget", "60", "--gpt2-budget", "60",
    )  # fmt: skip
    assert md.count("<!-- BEGIN bench_scaling:width -->") == 1
    assert md.count("<!-- BEGIN bench_scaling:gpt2 -->") == 1
    rows = _table_rows(md, "width") + _table_rows(md, "gpt2")
    assert len(rows) == 4, md
    for cells in rows:
        assert "killed" not in cells[-1] and "failed" not in cells[-1], cells
        assert float(cells[2].split()[0]) > 0  # seconds per checkpoint
        assert cells[3].endswith("MiB")  # peak RSS
        assert cells[5] != "-", cells  # the breakdown ran (ddsmon's internal steps exist)


@pytest.mark.slow  # needs the hf extra, which the slow suite installs
def test_transformers_tiny(tmp_path: Path) -> None:
    """Both model families, a streamed reading and the floor beside it, the forward-only
    floor, and a model built in float64 (read in place), through the real script."""
    pytest.importorskip("transformers")
    _, md = _run(
        "bench_transformers.py", tmp_path,
        "--models", "gpt2-tiny,pythia-tiny", "--seqs", "4", "--context", "8",
        "--configs", "gpt2-tiny:activation,gpt2-tiny:floor-micro,"
        "pythia-tiny:none@float64,pythia-tiny:floor-forward",
        "--budget", "120", timeout=300,  # four children of ~5 s each; more on a busy machine
    )  # fmt: skip
    assert md.count("<!-- BEGIN bench_transformers -->") == 1
    rows = _table_rows(md, "GPT-2-tiny") + _table_rows(md, "Pythia-tiny")
    assert [(r[3].split(",")[0], r[4]) for r in rows] == [
        ("activation", "float32"),
        ("floor: float64 fwd+bwd", "float32"),
        ('`fisher="none"` (forward only)', "float64"),
        ("floor: float64 forward only", "float32"),
    ], md
    for cells in rows:
        assert cells[-1] == "", cells  # no note: not killed, not failed
        assert float(cells[5].split()[0]) > 0 and float(cells[6]) > 0, cells  # wall, CPU s
        assert cells[7].endswith("MiB") and cells[8].endswith("MiB"), cells  # peak, base
    # the activation row's micro-batch size (from ddsmon's log) sized the floor beside it
    size = rows[0][10].rsplit(" ", 1)[-1]
    assert rows[0][10].startswith("1 x ") and rows[1][3].endswith(f"micro-batches of {size}"), md


def test_parse_configs_scopes_entries_to_models() -> None:
    plan = parse_configs(
        "activation,gpt2:floor,pythia-1b:activation@float64", ["gpt2", "pythia-1b"]
    )
    assert plan == [
        ("gpt2", "activation", "float32"),
        ("gpt2", "floor", "float32"),
        ("pythia-1b", "activation", "float32"),
        ("pythia-1b", "activation", "float64"),
    ]
    with pytest.raises(SystemExit, match="cannot read 'actvation'"):
        parse_configs("actvation", ["gpt2"])
    with pytest.raises(SystemExit, match="unknown model 'gpt3'"):
        parse_configs("gpt3:floor", ["gpt2"])


@pytest.mark.slow  # needs the hf extra, which the slow suite installs
@pytest.mark.parametrize("name", ["gpt2-tiny", "pythia-tiny"])
def test_float64_floor_against_autograd_on_the_whole_model(name: str) -> None:
    """The floor's output gradients are d(sum_i loss_i)/d(block output), checked against
    torch.autograd on a float64 model whose block outputs are taken with retain_grad;
    in micro-batches its rows are the last batch's; in place it leaves the model's
    flags as they were; forward-only it stops at the last block (the head never runs)."""
    pytest.importorskip("transformers")
    spec = {"model": name, "dtype": "float64", "seqs": 3, "context": 6}
    model, x, y, layers, _ = build(spec)
    blocks = [m for n, m in model.named_modules() if re.search(layers, n)]
    outs: list[torch.Tensor] = []

    def keep(_m: nn.Module, _a: object, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        assert isinstance(t, torch.Tensor)
        t.retain_grad()
        outs.append(t)

    handles = [b.register_forward_hook(keep) for b in blocks]
    logits = model(x).logits
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    (loss / x.shape[1]).backward()
    for h in handles:
        h.remove()
    want = [o.grad for o in outs]
    model.zero_grad(set_to_none=True)
    model.train()

    got = float64_floor(model, x, y, layers, "cpu")
    assert len(got) == len(blocks) == 2
    for g, w in zip(got, want, strict=True):
        assert w is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    last = float64_floor(model, x, y, layers, "cpu", batch=2)  # batches of 2, 1
    for g, w in zip(last, want, strict=True):
        assert w is not None
        torch.testing.assert_close(g, w[2:], rtol=1e-10, atol=1e-14)
    assert model.training and all(p.requires_grad for p in model.parameters())

    head = model.get_output_embeddings()
    calls: list[int] = []
    hook = head.register_forward_hook(lambda *_: calls.append(1))
    shapes = float64_floor(model, x, y, layers, "cpu", forward_only=True)
    hook.remove()
    assert calls == [] and [s.shape for s in shapes] == [o.shape for o in outs]
    assert all(s.is_meta for s in shapes)
    assert MODELS[name].layers == layers


def test_llc_tiny(tmp_path: Path) -> None:
    _, md = _run(
        "bench_llc.py", tmp_path,
        "--steps", "5", "--widths", "16", "--width-steps", "3", "--chains", "1", "--draws", "3",
        "--repeats", "1",
    )  # fmt: skip
    assert "<!-- BEGIN bench_llc -->" in md
    lines = [
        line
        for line in md.splitlines()
        if line.startswith("| example") or line.startswith("| d_hidden")
    ]
    assert len(lines) == 3, md
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0  # ddsmon both / activation seconds
    if importlib.util.find_spec("devinterp") is not None:
        assert all("x**" in line for line in lines), md  # a ratio in every row
    else:
        assert "LLC not measured: devinterp cannot be imported" in md


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_daemon_tiny(tmp_path: Path) -> None:
    _, md = _run(
        "bench_daemon.py", tmp_path,
        "--latency-checkpoints", "1", "--scan-checkpoints", "2", "--no-server", "--no-baseline",
        "--no-plots", "--timeout", "90",
    )  # fmt: skip
    assert "<!-- BEGIN bench_daemon -->" in md
    assert "median of 1" in md, md
    assert "backfill `ddsmon scan` of 2 checkpoints" in md, md
    assert f"| steps of `{CHECKPOINT_METRIC}` found in the run afterwards | 2 |" in md, md


@pytest.mark.slow
def test_daemon_server_calls(tmp_path: Path) -> None:
    _, md = _run(
        "bench_daemon.py", tmp_path,
        "--latency-checkpoints", "0", "--scan-checkpoints", "0", "--call-sizes", "1,3",
        "--no-plots", "--timeout", "120",
    )  # fmt: skip
    assert "per checkpoint" in md and "not measured" not in md, md


def test_write_section_replaces_only_its_block(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    path.write_text("intro\n")
    write_section(path, "a", "first")
    write_section(path, "b", "other")
    write_section(path, "a", "second")
    text = path.read_text()
    assert text.startswith("intro\n")
    assert "first" not in text and text.count("second") == 1 and "other" in text
    assert text.index("BEGIN a") < text.index("BEGIN b")


def test_count_requests_reads_access_log_lines() -> None:
    log = (
        '2026/01/01 00:00:00 INFO: 127.0.0.1:5000 - "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200\n'
        '2026/01/01 00:00:01 INFO: 127.0.0.1:5000 - "GET /api/2.0/mlflow/runs/get?run_id=1 HTTP/1.1" 200\n'
        '2026/01/01 00:00:02 INFO: 127.0.0.1:5000 - "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200\n'
        "2026/01/01 00:00:03 INFO: Application startup complete.\n"
    )
    counts = count_requests(log)
    assert counts == {"POST /api/2.0/mlflow/runs/log-batch": 2, "GET /api/2.0/mlflow/runs/get": 1}


def test_count_requests_folds_run_ids_and_steps_into_one_endpoint() -> None:
    art = "/api/2.0/mlflow-artifacts/artifacts"
    log = "".join(
        f'INFO: 127.0.0.1:5000 - "PUT {art}/{exp}/{run}/artifacts/spectra/step_{step}.npz HTTP/1.1" 200\n'
        for exp, run, step in [(1, "a" * 32, 0), (1, "a" * 32, 25), (2, "0f" * 16, 7)]
    )
    assert count_requests(log) == {
        f"PUT {art}/{{experiment}}/{{run}}/artifacts/spectra/step_{{step}}.npz": 3
    }
