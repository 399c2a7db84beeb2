"""The default layer selection of a GPT-2-shaped model through ``ddsmon report``: time and
peak RSS against the number of blocks and ``--factor-budget``.

A reading holds every layer's state through its pass (X's and Delta's R factors, the A
and Delta rows of K from structure: :class:`ddsmon.streaming.LayerStreams`); on GPT-2
small's 73 default leaf layers (``fisher="both"``) that is about 11 GB. ``--factor-budget``
bounds it: the layers beyond it are read in further passes. This benchmark builds
``GPT2LMHeadModel(GPT2Config(n_layer=k))`` (random weights, ``save_pretrained``) for each
``--blocks`` k, a probe of ``--seqs`` x ``--context`` random tokens, and runs

    ddsmon report <folder> --probe probe.pt --loss lm [--factor-budget B]

in a subprocess for each budget (``none``: the default), recording its wall seconds,
its user CPU seconds and its peak RSS (``ru_maxrss`` of the child, from ``os.wait4``),
and the number of probe passes (from ``-vv``'s log). Run it with ``PYTHONPATH`` at
another checkout to measure that release's ddsmon (the child imports ``ddsmon`` from
the same interpreter and path).

    python benchmarks/bench_default_layers.py --blocks 2,6 --budgets none,1GiB --write /tmp/d.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scaling import write_section  # noqa: E402


def build(folder: Path, blocks: int, seqs: int, context: int) -> None:
    """The model folder and ``probe.pt`` (tokens; ``--loss lm`` reads the targets as
    the inputs shifted, so the targets are the inputs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=blocks, use_cache=False))
    model.save_pretrained(folder / "model")
    tokens = torch.randint(0, model.config.vocab_size, (seqs, context))
    torch.save({"inputs": tokens, "targets": tokens}, folder / "probe.pt")


def run_report(folder: Path, budget: str | None, store: Path) -> dict[str, object]:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from ddsmon.cli import main; sys.exit(main())",
        "-vv",
        "report",
        str(folder / "model"),
        "--probe",
        str(folder / "probe.pt"),
        "--loss",
        "lm",
    ]
    if budget is not None:
        cmd += ["--factor-budget", budget]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    passes = re.search(r"probe read in (\d+) pass", out)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "cpu_s": usage.ru_utime,
        "peak_mib": usage.ru_maxrss / 1024,
        "passes": int(passes.group(1)) if passes else 0,
        "tail": out[-600:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,6", help="GPT-2 blocks (n_layer), comma-separated")
    ap.add_argument("--budgets", default="none,1GiB", help="--factor-budget values; none: default")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--label", default="this release", help="the ddsmon measured, for the table")
    ap.add_argument("--write", default=None, help="put the table into this markdown file")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for blocks in [int(b) for b in args.blocks.split(",")]:
            folder = Path(tmp) / f"gpt2-{blocks}"
            build(folder, blocks, args.seqs, args.context)
            for budget in args.budgets.split(","):
                given = None if budget == "none" else budget
                got = run_report(folder, given, Path(tmp) / f"{blocks}-{budget}.db")
                if got["rc"] != 0:
                    print(got["tail"], file=sys.stderr)
                rows.append((blocks, budget, got))
                print(blocks, budget, {k: v for k, v in got.items() if k != "tail"}, flush=True)
    load = os.getloadavg()[0]
    lines = [
        "Command: `python benchmarks/bench_default_layers.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`",
        "",
        f"- machine: `nproc` = {os.cpu_count()}, {platform.processor() or platform.machine()}; "
        f"1-minute load average {load:.1f} at the end; torch {torch.__version__}; {args.label}",
        f"- probe {args.seqs} x {args.context} tokens, `--loss lm`, `fisher=both`, the default "
        "layers (every leaf but `lm_head`), one `ddsmon report` subprocess per row",
        "",
        "| blocks | `--factor-budget` | rc | passes | wall s | CPU s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for blocks, budget, got in rows:
        lines.append(
            f"| {blocks} | {budget if budget != 'none' else 'default'} | {got['rc']} | "
            f"{got['passes']} | {got['wall_s']:.0f} | {got['cpu_s']:.0f} | "
            f"{got['peak_mib']:,.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "bench_default_layers", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
