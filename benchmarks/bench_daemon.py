"""The daemon end to end: checkpoint-to-MLflow latency, backfill throughput, MLflow calls.

Everything real: the ``ddsmon`` command line in a subprocess, MLflow's SQLite store (or a
real ``mlflow server``), checkpoints written the way trainers write them (a temporary
dot-name, then ``os.replace``). The model is the modular-addition example
(``examples/modular_addition/model.py:make_model``, 16,853 parameters) with the
example's 256-pair probe; checkpoints are its initial weights plus a little noise per step.

1. Latency: ``ddsmon watch DIR`` runs; one checkpoint at a time is renamed into DIR and
   the clock runs from ``os.replace`` returning until the checkpoint's ``--metric``
   (default ``ddsmon/checkpoint``, the checkpoint marker) at its step is readable
   through ``MlflowClient`` (polled every ``--poll-ms``). Median over ``--latency-checkpoints``.
2. Throughput: ``ddsmon scan DIR`` over ``--scan-checkpoints`` checkpoints (a backfill),
   wall time of the whole command and checkpoints per minute; the same command on an
   empty directory gives the fixed start-up cost, reported beside it.
3. MLflow calls per checkpoint (unless ``--no-server``): the same backfill against a
   real ``mlflow server`` (uvicorn, SQLite backend), counting the requests in its
   access log for two backfill sizes; the difference divided by the difference in
   checkpoints is the per-checkpoint count, the rest the fixed count per run.

    python benchmarks/bench_daemon.py [--latency-checkpoints 10] [--scan-checkpoints 200]
        [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import machine_lines, write_section

from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "modular_addition"
MODEL_SPEC = f"{EXAMPLE / 'model.py'}:make_model"

__all__ = ("DaemonResult", "count_requests", "main", "measure_latency", "measure_scan")

SECTION = "bench_daemon"

#: uvicorn / gunicorn access-log line: ... "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200
_REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (/[^ ?"]*)[^"]* HTTP/[\d.]+"')


@dataclass
class DaemonResult:
    """What one benchmark run measured (None where a part did not run)."""

    latencies: list[float] = field(default_factory=list)
    latency_note: str = ""
    scan_seconds: float | None = None
    scan_empty_seconds: float | None = None
    scan_count: int = 0
    scan_logged: int | None = None
    scan_note: str = ""
    calls: dict[int, collections.Counter[str]] = field(default_factory=dict)
    calls_note: str = ""


def _ddsmon() -> list[str]:
    exe = shutil.which("ddsmon", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "ddsmon.cli"]


def _env() -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _write_probe(path: Path) -> None:
    sys.path.insert(0, str(EXAMPLE))
    from train import make_probe

    torch.save(make_probe(53, 256), path)


def _checkpoints(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` state dicts of the example model: its init plus 1e-3 noise per step."""
    sys.path.insert(0, str(EXAMPLE))
    from model import make_model

    torch.manual_seed(seed)
    base = make_model().state_dict()
    out = []
    for i in range(count):
        out.append(
            {"model": {k: v + 1e-3 * i * torch.randn_like(v) for k, v in base.items()}, "step": i}
        )
    return out


def _put(obj: dict[str, Any], directory: Path, step: int) -> None:
    """Write like a trainer: a dot-named temporary file, then rename into place."""
    tmp = directory / f".step_{step:06d}.pt.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, directory / f"step_{step:06d}.pt")


def _daemon_args(directory: Path, probe: Path, uri: str, run_name: str, plots: bool) -> list[str]:
    args = [str(directory), "--model", MODEL_SPEC, "--probe", str(probe), "--loss", "ce",
            "--device", "cpu", "--tracking-uri", uri, "--experiment", "bench", "--run-name", run_name]  # fmt: skip
    return args if plots else [*args, "--no-plots"]


def _find_run(client: Any, run_name: str) -> str | None:
    exp = client.get_experiment_by_name("bench")
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'"
    )
    return runs[0].info.run_id if runs else None


def measure_latency(
    work: Path,
    probe: Path,
    uri: str,
    count: int,
    metric: str,
    poll: float,
    plots: bool,
    timeout: float,
) -> tuple[list[float], str]:
    """Seconds from ``os.replace`` to ``metric`` at that step readable in MLflow, per checkpoint."""
    from mlflow.tracking import MlflowClient

    directory = work / "watch"
    directory.mkdir()
    ckpts = _checkpoints(count + 1)
    _put(ckpts[0], directory, 0)  # the run exists once the first checkpoint is read
    cmd = [*_ddsmon(), "watch", *_daemon_args(directory, probe, uri, "latency", plots)]
    log = open(work / "watch.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    client = MlflowClient(uri)
    latencies: list[float] = []
    note = ""
    try:
        deadline = time.monotonic() + timeout
        run_id = None
        while run_id is None or not _has_step(client, run_id, metric, 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"watch did not log step 0 of {metric!r}: {_tail(work / 'watch.log')}"
                )
            time.sleep(poll)
            run_id = run_id or _find_run(client, "latency")
        for step in range(1, count + 1):
            torch.save(ckpts[step], directory / f".step_{step:06d}.pt.tmp")
            os.replace(directory / f".step_{step:06d}.pt.tmp", directory / f"step_{step:06d}.pt")
            t0 = time.perf_counter()
            deadline = time.monotonic() + timeout
            while not _has_step(client, run_id, metric, step):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"step {step} never reached MLflow: {_tail(work / 'watch.log')}"
                    )
                time.sleep(poll)
            latencies.append(time.perf_counter() - t0)
    except RuntimeError as exc:
        note = str(exc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return latencies, note


def _has_step(client: Any, run_id: str, metric: str, step: int) -> bool:
    return any(m.step == step for m in client.get_metric_history(run_id, metric))


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def measure_scan(
    work: Path, probe: Path, uri: str, count: int, run_name: str, plots: bool, timeout: float
) -> tuple[float, str]:
    """Wall seconds of ``ddsmon scan`` over ``count`` checkpoints written beforehand."""
    directory = work / f"scan_{run_name}"
    directory.mkdir()
    for step, ckpt in enumerate(_checkpoints(count)):
        _put(ckpt, directory, step)
    cmd = [*_ddsmon(), "scan", *_daemon_args(directory, probe, uri, run_name, plots)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"ddsmon scan exited {proc.returncode}: {' | '.join(lines)}")
    return seconds, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def _logged_steps(uri: str, run_name: str, metric: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = _find_run(client, run_name)
    return 0 if run_id is None else len({m.step for m in client.get_metric_history(run_id, metric)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: What differs between runs and checkpoints in a request path, and its placeholder.
_PATH_PARTS = (
    (re.compile(r"/[0-9a-f]{32}(?=/|$)"), "/{run}"),
    (re.compile(r"(?<=/artifacts/)\d+(?=/)"), "{experiment}"),
    (re.compile(r"\d+(?=\.\w+$)"), "{step}"),
)


def endpoint(path: str) -> str:
    """``path`` with run ids, experiment ids and step numbers replaced by placeholders."""
    for pattern, placeholder in _PATH_PARTS:
        path = pattern.sub(placeholder, path)
    return path


def count_requests(log_text: str) -> collections.Counter[str]:
    """Requests per ``METHOD endpoint`` in an HTTP access log (see :func:`endpoint`)."""
    return collections.Counter(
        f"{m.group(1)} {endpoint(m.group(2))}" for m in _REQUEST.finditer(log_text)
    )


def measure_calls(
    work: Path, probe: Path, sizes: list[int], plots: bool, timeout: float
) -> dict[int, collections.Counter[str]]:
    """Requests a backfill of each size makes to a real ``mlflow server``."""
    port = _free_port()
    server_log = work / "server.log"
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [mlflow, "server", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
           "--artifacts-destination", str(work / "server-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = open(server_log, "w")
    server = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    counts: dict[int, collections.Counter[str]] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {_tail(server_log)}"
                    ) from None
                time.sleep(0.2)
        for size in sizes:
            before = len(server_log.read_text())
            measure_scan(work, probe, uri, size, f"calls{size}", plots, timeout)
            time.sleep(0.5)  # let the access log flush
            counts[size] = count_requests(server_log.read_text()[before:])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    return counts


def _render(res: DaemonResult, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        *machine_lines("cpu"),
        "- model: examples/modular_addition/model.py:make_model (16,853 parameters), probe 256 pairs, "
        f"fisher=both on CPU, plots {'on' if args.plots else 'off (--no-plots)'}; MLflow SQLite store "
        f"in a temporary directory; polled every {args.poll_ms:g} ms",
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    if res.latencies:
        lat = sorted(res.latencies)
        lines += [
            f"| latency, `os.replace` -> `{args.metric}` readable in MLflow (median of {len(lat)}) | "
            f"**{statistics.median(lat):.2f} s** (min {lat[0]:.2f}, max {lat[-1]:.2f}) |",
        ]
    if res.latency_note:
        lines.append(f"| latency | not measured: {res.latency_note} |")
    if res.scan_seconds is not None:
        rate = res.scan_count / res.scan_seconds * 60
        lines.append(
            f"| backfill `ddsmon scan` of {res.scan_count} checkpoints, whole command | "
            f"{res.scan_seconds:.1f} s = **{rate:.0f} checkpoints/min** |"
        )
        if res.scan_empty_seconds is not None:
            net = res.scan_seconds - res.scan_empty_seconds
            rest = (
                f"without it {res.scan_count / net * 60:.0f} checkpoints/min, "
                f"{1000 * net / res.scan_count:.0f} ms per checkpoint"
                if net > 0
                else "start-up varied more than the backfill took: no per-checkpoint figure"
            )
            lines.append(
                "| same command on an empty directory (start-up, MLflow run set-up, close) | "
                f"{res.scan_empty_seconds:.1f} s; {rest} |"
            )
        if res.scan_logged is not None:
            lines.append(
                f"| steps of `{args.metric}` found in the run afterwards | {res.scan_logged} |"
            )
    if res.scan_note:
        lines.append(f"| backfill | not measured: {res.scan_note} |")
    if len(res.calls) >= 2:
        (small, c_small), (big, c_big) = sorted(res.calls.items())[:2]
        n_small, n_big = sum(c_small.values()), sum(c_big.values())
        per = (n_big - n_small) / (big - small)
        fixed = n_small - per * small
        lines.append(
            f"| MLflow HTTP requests (real `mlflow server`), backfill of {small} / {big} | "
            f"{n_small} / {n_big}: **{per:.2f} per checkpoint** + {fixed:.0f} per run |"
        )
        diff = c_big - c_small
        top = ", ".join(f"{k} {v / (big - small):.2f}" for k, v in diff.most_common())
        lines.append(f"| per-checkpoint requests by endpoint | {top or 'none'} |")
    if res.calls_note:
        lines.append(f"| MLflow calls | not measured: {res.calls_note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-checkpoints", type=int, default=10)
    ap.add_argument("--scan-checkpoints", type=int, default=200)
    ap.add_argument(
        "--call-sizes", default="10,30", help="two backfill sizes for the request count"
    )
    ap.add_argument("--no-server", action="store_true", help="skip the mlflow server request count")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the scan of an empty directory"
    )
    ap.add_argument(
        "--metric", default=CHECKPOINT_METRIC, help="the metric whose arrival ends the clock"
    )
    ap.add_argument("--poll-ms", type=float, default=25.0)
    ap.add_argument(
        "--no-plots", dest="plots", action="store_false", help="pass --no-plots to ddsmon"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for any one command")
    ap.add_argument("--write", default=None, help="put the table into this markdown file")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_daemon.py " + " ".join(
        a if re.fullmatch(r"[\w.,:=/+-]+", a) else repr(a)
        for a in (argv if argv is not None else sys.argv[1:])
    )
    res = DaemonResult(scan_count=args.scan_checkpoints)
    with tempfile.TemporaryDirectory(prefix="bench_daemon_") as tmp:
        work = Path(tmp)
        probe = work / "probe.pt"
        _write_probe(probe)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        if args.latency_checkpoints > 0:
            res.latencies, res.latency_note = measure_latency(
                work, probe, uri, args.latency_checkpoints, args.metric, args.poll_ms / 1000,
                args.plots, args.timeout,
            )  # fmt: skip
        if args.scan_checkpoints > 0:
            try:
                res.scan_empty_seconds, _ = measure_scan(
                    work, probe, uri, 0, "empty", args.plots, args.timeout
                )
                res.scan_seconds, summary = measure_scan(
                    work, probe, uri, args.scan_checkpoints, "backfill", args.plots, args.timeout
                )
                print(f"  {summary}", file=sys.stderr)
                res.scan_logged = _logged_steps(uri, "backfill", args.metric)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res.scan_note = str(exc)
        if not args.no_server:
            try:
                sizes = [int(s) for s in args.call_sizes.split(",")][:2]
                res.calls = measure_calls(work, probe, sizes, args.plots, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res.calls_note = str(exc)
    text = _render(res, args, command.strip())
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)
    failed = (args.latency_checkpoints > 0 and not res.latencies) or (
        args.scan_checkpoints > 0 and res.scan_seconds is None
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
