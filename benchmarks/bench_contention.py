"""Readings beside busy trainers: how the thread settings hold under contention.

A reading runs beside zero, one and two busy "trainer" processes (real subprocesses,
each a small training loop of matrix products on torch's default thread count, as a
trainer would run), on a modular-addition checkpoint (``examples/modular_addition``'s
model, embedding 128, hidden 256, the full reading ``fisher="both"`` of a probe of
512 pairs). Two readers:

* **in-process**: :meth:`ddsmon.reader.Reader.read` in a worker process (what the
  daemon and ``ddsmon report`` call), at the default thread policy and at fixed 1 and
  2 threads (``--threads``), in three process set-ups: OpenMP's default wait policy,
  ``OMP_WAIT_POLICY=PASSIVE``, and ``torch.set_num_interop_threads(1)``. The wait policy
  is read once, when torch loads OpenMP, so each set-up is its own process; within
  one the thread settings take turns, reading by reading.
* **CLI**: ``ddsmon scan`` as a subprocess over ``--scan-checkpoints`` checkpoints
  (the daemon's reading thread and its prefetch), each reading's
  ``ddsmon/read_seconds`` read back from its MLflow store: as shipped (the environment
  without ``OMP_WAIT_POLICY``), with ``OMP_WAIT_POLICY=PASSIVE``, and with
  ``--threads 1`` / ``--threads 2``.

Fair share
----------
A reading on ``k`` threads beside trainers running ``T`` busy threads in all on ``C``
cores is one of ``T + k`` runnable threads; shared equally, its threads get
``C / (T + k)`` of a core each (1 when ``T + k <= C``), so its fair time is::

    fair(k) = idle(k) * max(1, (T + k) / C)

with ``idle(k)`` the median of the same reader at fixed ``k`` threads (same set-up)
with no trainer. ``T`` counts the benchmark's trainers only (trainers x their torch
threads); other work on the machine is not in it: read the load averages beside the
table (a 1-minute load above ``C`` at level 0 means the machine was not idle). For
the default policy ``k`` is the count each reading ran on (the daemon logs it at
``-vv``), the ratio the median over readings of ``seconds / fair(k)``. "vs today's
idle" divides by the idle median of torch's default thread count with OpenMP's
default wait policy: what ddsmon did before the thread policy.

Run::

    python benchmarks/bench_contention.py                      # prints the table
    python benchmarks/bench_contention.py --out /tmp/section.md  # and writes it

About 5 minutes on 2 cores at the defaults; every size is a flag (``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "modular_addition"
SECTION = "bench_contention"

#: The in-process set-ups: name -> (environment changes, interop threads or None).
SETUPS: dict[str, tuple[dict[str, str | None], int | None]] = {
    "wait default": ({"OMP_WAIT_POLICY": None}, None),
    "PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "interop 1": ({"OMP_WAIT_POLICY": None}, 1),
}

#: The CLI set-ups: name -> (environment changes, extra flags).
CLI_SETUPS: dict[str, tuple[dict[str, str | None], list[str]]] = {
    "as shipped": ({"OMP_WAIT_POLICY": None}, []),
    "PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "--threads 1": ({"OMP_WAIT_POLICY": None}, ["--threads", "1"]),
    "--threads 2": ({"OMP_WAIT_POLICY": None}, ["--threads", "2"]),
}

_THREADS_LOG = re.compile(r"reading on (\d+) torch thread")


# ---------------------------------------------------------------- the subprocesses


def trainer_main(width: int) -> None:
    """A busy trainer: an MLP's forward, backward and SGD step on torch's default
    threads, until killed. Prints its thread count once, when the loop starts."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, width), torch.randn(256, width)
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    while True:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def worker_main(spec: dict[str, Any]) -> None:
    """Timed readings (one JSON line): ``spec['threads']`` settings taking turns."""
    import torch

    if spec["interop"] is not None:
        torch.set_num_interop_threads(spec["interop"])
    from ddsmon.checkpoints import classify
    from ddsmon.config import ReadSettings
    from ddsmon.reader import Reader

    readers: dict[str, Reader] = {}
    for label, threads in spec["threads"].items():
        settings = ReadSettings(model=spec["model"], probe=spec["probe"], threads=threads)
        readers[label] = Reader.from_settings(settings)
    ref = classify(Path(spec["checkpoint"]))
    assert ref is not None
    model = next(iter(readers.values())).load(ref).model
    out: dict[str, dict[str, list[float]]] = {k: {"seconds": [], "threads": []} for k in readers}
    labels = list(readers)
    readers[labels[0]].read(model)  # warm-up, untimed (the first reading allocates)
    for rep in range(spec["repeats"]):
        turn = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in turn:
            spent = sum(out[label]["seconds"])
            if len(out[label]["seconds"]) >= 3 and spent > spec["budget"]:
                continue  # enough of a slow setting: the median of what it has
            t0 = time.perf_counter()
            readers[label].read(model)
            out[label]["seconds"].append(time.perf_counter() - t0)
            out[label]["threads"].append(float(readers[label].last_threads or 0))
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- the parent


@dataclass
class Row:
    """One reader/set-up/thread setting at one trainer level."""

    reader: str
    setup: str
    threads: str
    trainers: int
    busy_threads: int
    load: float
    others: float
    seconds: list[float]
    used: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def progress(self) -> str:
        """One line for stderr while the benchmark runs (a run cut short keeps these)."""
        ks = "/".join(str(int(k)) for k in sorted(set(self.used))) or "?"
        times = " ".join(f"{t:.3f}" for t in self.seconds)
        return (
            f"# {self.reader} | {self.setup} | {self.threads} | {self.trainers} trainer(s) "
            f"| k {ks} | median {self.median:.3f} s | {times}"
        )


def _env(changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _write_inputs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The factory file, the probe and ``--scan-checkpoints`` checkpoints (distinct
    weights, so none is an alias of another)."""
    import torch

    sys.path.insert(0, str(EXAMPLE))
    from model import ModularAdditionMLP

    factory = work / "factory.py"
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(EXAMPLE)!r})\n"
        "from model import ModularAdditionMLP\n\n\n"
        "def make():\n"
        f"    return ModularAdditionMLP(p={args.p}, d_embed={args.embed}, d_hidden={args.width})\n"
    )
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, args.p, (args.probe, 2), generator=g)
    torch.save({"inputs": pairs, "targets": pairs.sum(1) % args.p}, work / "probe.pt")
    ckpts = work / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    model = ModularAdditionMLP(p=args.p, d_embed=args.embed, d_hidden=args.width)
    for i in range(max(1, args.scan_checkpoints)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.save(model.state_dict(), ckpts / f"step_{100 * i:06d}.pt")
    return {
        "model": f"{factory}:make",
        "probe": str(work / "probe.pt"),
        "checkpoint": str(ckpts / "step_000000.pt"),
        "ckpts": ckpts,
    }


def _start_trainers(
    count: int, width: int, settle: float
) -> tuple[list[subprocess.Popen[str]], int]:
    procs: list[subprocess.Popen[str]] = []
    threads = 0
    for _ in range(count):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--trainer", "--trainer-width", str(width)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env({}),
        )
        assert proc.stdout is not None
        threads += int(json.loads(proc.stdout.readline())["threads"])
        procs.append(proc)
    if procs:
        time.sleep(settle)
    return procs, threads


def _runnable_others(looks: int = 21, pause: float = 0.025) -> float:
    """Median over ``looks`` of the tasks runnable besides this process (the
    trainers' threads and any other work on the machine): B_now of ddsmon.threads."""
    from ddsmon.threads import measure_load

    values = []
    for _ in range(looks):
        values.append(measure_load().busy_now)
        time.sleep(pause)
    return statistics.median(values)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _in_process(
    inputs: dict[str, Any], setup: str, threads: dict[str, int | None], args: argparse.Namespace
) -> dict[str, Any]:
    env, interop = SETUPS[setup]
    spec = {
        "model": inputs["model"], "probe": inputs["probe"], "checkpoint": inputs["checkpoint"],
        "threads": threads, "repeats": args.repeats, "interop": interop, "budget": args.budget,
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=_env(env), timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"worker {setup} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _scan(
    inputs: dict[str, Any], work: Path, setup: str, tag: str
) -> tuple[list[float], list[float]]:
    """One ``ddsmon scan`` subprocess: each reading's seconds (from MLflow, by step) and
    the threads the daemon logged for it (empty for a fixed ``--threads``)."""
    env, flags = CLI_SETUPS[setup]
    uri = f"sqlite:///{work / f'mlflow-{tag}.db'}"
    cmd = [
        sys.executable, "-m", "ddsmon.cli", "-vv", "scan", str(inputs["ckpts"]),
        "--model", inputs["model"], "--probe", inputs["probe"], "--tracking-uri", uri,
        "--state-dir", str(work / f"state-{tag}"), "--no-plots", *flags,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"scan {setup} failed:\n{proc.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ddsmon")
    assert exp is not None
    run = client.search_runs([exp.experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "ddsmon/read_seconds")
    seconds = [m.value for m in sorted(history, key=lambda m: m.step)]
    used = [float(k) for k in _THREADS_LOG.findall(proc.stderr)]
    return seconds, used


def measure(args: argparse.Namespace, work: Path) -> tuple[list[Row], int]:
    """Every row, level by level (trainers started once per level)."""
    inputs = _write_inputs(work, args)
    import torch

    default = torch.get_num_threads()
    fixed = sorted({1, 2, default})
    threads: dict[str, int | None] = {"policy": None, **{str(k): k for k in fixed}}
    rows: list[Row] = []
    for level in args.levels:
        procs, busy = _start_trainers(level, args.trainer_width, args.settle)
        try:
            load = os.getloadavg()[0]
            others = _runnable_others()
            print(
                f"# {level} trainer(s), {busy} busy threads, load {load:.2f}, "
                f"{others:g} other runnable",
                file=sys.stderr,
            )
            for setup in args.setups:
                result = _in_process(inputs, setup, threads, args)
                for label, r in result.items():
                    rows.append(Row("in-process", setup, label, level, busy, load, others, r["seconds"], r["threads"]))  # fmt: skip
                    print(rows[-1].progress(), file=sys.stderr, flush=True)
            for setup in args.cli_setups:
                seconds, used = _scan(inputs, work, setup, f"{level}-{len(rows)}")
                label = "policy" if "--threads" not in setup else setup.split()[-1]
                if label != "policy":
                    used = [float(label)] * len(seconds)
                rows.append(Row("scan", setup, label, level, busy, load, others, seconds, used))
                print(rows[-1].progress(), file=sys.stderr, flush=True)
        finally:
            _stop(procs)
    return rows, default


def _idle(rows: list[Row], reader: str, setup: str, threads: str) -> float | None:
    for r in rows:
        if (r.reader, r.setup, r.threads, r.trainers) == (reader, setup, threads, 0):
            return r.median
    return None


def _fixed_setup(row: Row) -> str:
    """The set-up whose fixed-k rows give ``idle(k)`` for ``row``."""
    if row.reader == "in-process":
        return row.setup
    return "--threads {k}"


def fair_ratio(row: Row, rows: list[Row], cores: int) -> float | None:
    """median over readings of seconds / fair(k), fair(k) = idle(k) max(1, (T + k) / C)."""
    ratios = []
    for seconds, k in zip(row.seconds, row.used or [], strict=False):
        kk = int(k)
        setup = _fixed_setup(row).format(k=kk)
        idle = _idle(rows, row.reader, setup, str(kk))
        if idle is None:
            return None
        ratios.append(seconds / (idle * max(1.0, (row.busy_threads + kk) / cores)))
    return statistics.median(ratios) if ratios else None


def render(rows: list[Row], default: int, command: str, cores: int) -> str:
    from bench_scaling import machine_lines

    today = {
        "in-process": _idle(rows, "in-process", "wait default", str(default)),
        "scan": _idle(rows, "scan", f"--threads {default}", str(default)),
    }
    lines = [
        "### Readings beside busy trainers",
        "",
        f"`{command}`",
        "",
        *machine_lines(),
        f"- usable cores C = {cores}; torch's default {default} thread(s)",
        "- fair(k) = idle(k) x max(1, (T + k) / C): T the trainers' busy threads, k the "
        "reading's; 'today' = torch's default threads, OpenMP's default wait policy, idle",
        "- load / runnable: the 1-minute load average and the median count of other runnable "
        "tasks (trainers included) when the level started; runnable above T at 0 trainers "
        "means the machine was not idle, and the ratios to idle then understate contention",
        "",
        "| reader | set-up | threads | trainers (T) | load / runnable | k used | median s "
        "| vs idle | vs fair share | vs today's idle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        idle = _idle(rows, r.reader, r.setup, r.threads)
        fair = fair_ratio(r, rows, cores)
        ks = sorted({int(k) for k in r.used}) if r.used else []
        base = today[r.reader]
        lines.append(
            f"| {r.reader} | {r.setup} | {r.threads} | {r.trainers} ({r.busy_threads}) "
            f"| {r.load:.1f} / {r.others:g} | {'/'.join(map(str, ks)) or '?'} | {r.median:.3f} "
            f"| {'-' if idle is None else f'{r.median / idle:.2f}x'} "
            f"| {'-' if fair is None else f'{fair:.2f}x'} "
            f"| {'-' if base is None else f'{r.median / base:.2f}x'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="0,1,2", help="trainer counts, comma-separated")
    ap.add_argument("--setups", default=",".join(SETUPS), help="in-process set-ups ('' for none)")
    ap.add_argument("--cli-setups", default=",".join(CLI_SETUPS), help="ddsmon scan set-ups ('' for none)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5, help="timed readings per in-process setting")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per setting and level after which it stops (at least 3 readings)")  # fmt: skip
    ap.add_argument("--scan-checkpoints", type=int, default=4, help="checkpoints per ddsmon scan")
    ap.add_argument("--p", type=int, default=53, help="modulus of the modular-addition model")
    ap.add_argument("--embed", type=int, default=128, help="embedding width")
    ap.add_argument("--width", type=int, default=256, help="hidden width")
    ap.add_argument("--probe", type=int, default=512, help="probe pairs")
    ap.add_argument("--trainer-width", type=int, default=512, help="width of the trainers' MLP")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after the trainers start")
    ap.add_argument("--out", "--write", dest="out", default=None, help="write the table into this markdown file (its own block)")  # fmt: skip
    ap.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trainer:
        trainer_main(args.trainer_width)
        return 0
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return 0
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.setups = [s for s in args.setups.split(",") if s]
    args.cli_setups = [s for s in args.cli_setups.split(",") if s]
    for s in args.setups:
        if s not in SETUPS:
            ap.error(f"unknown set-up {s!r} (known: {', '.join(SETUPS)})")
    for s in args.cli_setups:
        if s not in CLI_SETUPS:
            ap.error(f"unknown CLI set-up {s!r} (known: {', '.join(CLI_SETUPS)})")
    command = shlex.join(["python", "benchmarks/bench_contention.py", *(argv if argv is not None else sys.argv[1:])])  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_scaling  # noqa: F401  (its START_LOAD: the load at the start)

    sys.path.insert(0, str(ROOT))
    from ddsmon.threads import usable_cores

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_contention-") as tmp:
        rows, default = measure(args, Path(tmp))
    text = render(rows, default, command, usable_cores())
    text += f"\n({time.perf_counter() - started:.0f} s in all)\n"
    print(text)
    if args.out:
        from bench_scaling import write_section

        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
