"""Wall time and peak memory of ``compute_signatures`` against width, probe rows and depth.

Every configuration runs in a fresh subprocess (so its peak RSS is its own), reports
the median seconds of the reading (one checkpoint: float64 copy, probe pass, spectra),
the process's peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; on
CUDA ``torch.cuda.max_memory_allocated``), and a breakdown of where the time goes,
measured with ddsmon's own steps (``ddsmon.probe.run_probe_pass``, ``ddsmon.spectra``,
``ddsmon.param_gram``) one after another on the same captures.

Sweeps (defaults; every size is a flag):

* width: an MLP of ``L`` Linear(d, d) layers (ReLU between, a Linear(d, 10) head),
  probe N rows; d = 256 .. 8192 at N = 1024, L = 2;
* rows:  the same, N = 256 .. 8192 at d = 1024 (the smaller-side Gram: the G and X
  terms follow min(N, d), the K term follows n^3 since K is n x n);
* layers: L = 1 .. 16 at d = N = 1024;
* gpt2: a GPT-2-small-shaped transformer (12 blocks, d_model 768, 12 heads, vocab 50257,
  context 128, tied embeddings, ~124M parameters, random init, plain torch), probe
  32 sequences x 128 tokens (N = 4096 rows per layer), rows chosen by ``--gpt2-configs``
  (:data:`GPT2_CONFIGS`; default ``activation,parameter,both``): every block output
  (``blocks\\.\\d+$``) with fisher="activation" as called by default (the probe
  streamed in micro-batches sized by the memory budget), ``one-pass`` (the whole probe
  in one pass, ``probe_batch=n``), ``none`` (forward only), and ``floor``, the bare
  float64 forward and backward to the same outputs (:func:`float64_floor`), also in
  micro-batches of 4 sequences (``floor-micro``); every
  Linear/Embedding with fisher="parameter" and "both".

Cost model per layer with N rows (n samples x T positions), width d, input width
d_in, m = min(N, d): probe pass O(N d d_in) (forward and backward, float64); X side
O(N d m) + O(m^3) (a QR of the tall side, X or X^T, then the SVD of the m x m factor);
G side O(N d m) to form the Gram plus O(m^3) to eigensolve; K side O(N^2 (d_in + d)) for
the row Grams or O(d_in d (N + n^2)) for per-sample gradients, whichever
``ddsmon.param_gram.cheaper_gram_method`` picks, plus O(n^3) to eigensolve.

    python benchmarks/bench_scaling.py [--sweeps width,rows,layers,gpt2] [--device cpu]
        [--budget 150] [--repeats 3] [--write BENCHMARKS.md]
    python benchmarks/bench_scaling.py --sweeps gpt2 \\
        --gpt2-configs floor,activation,one-pass,none --repeats 1 --no-breakdown
    python benchmarks/bench_scaling.py --device cuda --write BENCHMARKS.md   # on a GPU

A configuration still running after ``--budget`` seconds is killed and reported as
skipped, with whatever it finished before.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = (
    "GPT",
    "Builder",
    "GPTConfig",
    "Row",
    "float64_floor",
    "machine_lines",
    "main",
    "make_mlp",
    "run_config",
    "write_section",
)

SECTION = "bench_scaling"

#: 1-minute load average when the benchmark started (reported beside the one at the end).
START_LOAD = os.getloadavg()[0]


# ---------------------------------------------------------------- shared report helpers


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_lines(device: str = "cpu") -> list[str]:
    """The machine a table was measured on: cores, CPU model, memory, torch, threads, load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    lines = [
        f"- machine: `nproc` = {len(os.sched_getaffinity(0))}, CPU {cpu}{mem}; 1-minute load "
        f"average {START_LOAD:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"(a load above {len(os.sched_getaffinity(0))} means other work shared the cores)",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    return lines


def write_section(path: str | Path, key: str, text: str) -> None:
    """Put ``text`` between ``<!-- BEGIN key -->`` / ``<!-- END key -->`` in ``path``.

    A rerun replaces its own block and leaves the rest of the file (hand-written
    readings, other benchmarks' blocks) alone; a missing block is appended.
    """
    path = Path(path)
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


# ---------------------------------------------------------------- models


class _MLP(nn.Module):
    def __init__(self, d: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


def make_mlp(d: int, depth: int, classes: int = 10) -> nn.Module:
    """``depth`` Linear(d, d) layers named ``layers.i`` with ReLU between, a Linear(d, 10) head."""
    return _MLP(d, depth, classes)


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 small: 12 layers, 12 heads, d_model 768, vocab 50257 (context 128 here)."""

    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    vocab: int = 50257
    context: int = 128


class _Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = _FeedForward(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-shaped decoder (pre-LN blocks, learned positions, lm_head tied to wte)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(
                    p, std=0.02 / (2 * cfg.n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02
                )

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


GPT2_SMALL = GPTConfig()
GPT2_TINY = GPTConfig(n_layer=2, n_head=2, d_model=32, vocab=101, context=8)

# ---------------------------------------------------------------- one configuration (child)


def _build(spec: dict[str, Any]) -> tuple[nn.Module, Tensor, Tensor, str | None, str]:
    """Model, probe inputs and targets, layer selection and loss for a config spec."""
    torch.manual_seed(0)
    if spec["kind"] == "mlp":
        d, n, depth = spec["d"], spec["N"], spec["L"]
        model = make_mlp(d, depth)
        return model, torch.randn(n, d), torch.randint(0, 10, (n,)), r"^layers\.\d+$", "ce"
    cfg = GPT2_SMALL if spec["kind"] == "gpt2" else GPT2_TINY
    model = GPT(cfg)
    seqs = spec.get("seqs", 32 if spec["kind"] == "gpt2" else 4)
    tokens = torch.randint(0, cfg.vocab, (seqs, cfg.context + 1))
    layers = spec["layers"]
    return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), layers, "ce"


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


#: What builds a configuration's model and probe: ``spec -> (model, inputs, targets,
#: layers, loss)``; :func:`_build` here, bench_transformers' for Hugging Face models.
Builder = Callable[[dict[str, Any]], tuple[nn.Module, Tensor, Tensor, str | None, str]]


class _MicroBatches(logging.Handler):
    """Keeps what ``compute_signatures`` logs at DEBUG about its probe pass: passes,
    micro-batches and samples per micro-batch (None before a reading)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: tuple[int, int, int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("probe read in") and isinstance(record.args, tuple):
            passes, batches, size = record.args
            self.last = (int(passes), int(batches), int(size))


def _child(spec: dict[str, Any], build: Builder | None = None) -> None:
    """Measure one configuration and print JSON lines (a partial record survives a kill)."""
    from ddsmon import compute_signatures

    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    micro = _MicroBatches()
    engine_log = logging.getLogger("ddsmon.engine")
    engine_log.addHandler(micro)
    engine_log.setLevel(logging.DEBUG)
    model, x, y, layers, loss = (build or _build)(spec)
    params = sum(p.numel() for p in model.parameters())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _emit(event="ready", params=params, base=_rss_bytes() if not device.startswith("cuda") else 0)
    fisher = spec["fisher"]
    probe_batch = x.shape[0] if spec.get("probe_batch") == "all" else spec.get("probe_batch")

    cpu: list[float] = []  # process CPU seconds of each reading (all threads)

    def reading() -> tuple[float, Any]:
        _sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        if spec.get("floor"):
            result: Any = float64_floor(
                model, x, y, layers, device, spec.get("floor_batch"),
                forward_only=bool(spec.get("floor_forward")),
            )  # fmt: skip
        else:
            result = compute_signatures(
                model, x, y, loss, layers, device, fisher=fisher, probe_batch=probe_batch,
                memory_budget=spec.get("memory_budget"),
            )  # fmt: skip
        _sync(device)
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0, result

    warm, sig = reading()  # warm-up (also the only reading of a slow configuration)
    _emit(event="run", i=0, seconds=warm, cpu=cpu[-1], peak=_peak_bytes(device))
    times: list[float] = []
    if warm <= spec["single_above"]:
        while len(times) < spec["repeats"] and (not times or sum(times) < spec["time_cap"]):
            seconds, sig = reading()
            times.append(seconds)
            _emit(event="run", i=len(times), seconds=seconds, cpu=cpu[-1], peak=_peak_bytes(device))
    kept = times or [warm]
    if spec.get("floor"):
        widths, with_k, read = sorted({tuple(g.shape) for g in sig}), 0, len(sig)
    else:
        widths = sorted({(s.N, s.d) for s in sig.layers.values()})
        with_k = sum(1 for s in sig.layers.values() if s.param_rank is not None)
        read = len(sig.layers)
    _emit(
        event="reading",
        seconds=statistics.median(kept),
        cpu=statistics.median(cpu[1:] if times else cpu[:1]),
        runs=len(kept),
        peak=_peak_bytes(device),
        layers=read,
        shapes=widths[:4],
        with_k=with_k,
        micro=micro.last,
    )
    if spec.get("breakdown") and not spec.get("floor") and fisher != "none":
        passes: list[dict[str, float]] = []
        started = time.perf_counter()
        while len(passes) < max(1, spec["repeats"]) and (
            not passes or time.perf_counter() - started < spec["time_cap"] / 2
        ):
            passes.append(_breakdown(model, x, y, loss, layers, device, fisher))
        median = {k: statistics.median(p[k] for p in passes) for k in passes[0]}
        _emit(event="breakdown", passes=len(passes), **median)


def float64_floor(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: str | None,
    device: str,
    batch: int | None = None,
    *,
    forward_only: bool = False,
) -> list[Tensor]:
    """The floor of an activation-side reading, written plainly (no ddsmon code): a
    float64 copy of the model (none when every parameter and buffer already is float64
    on ``device``: the model itself, as ``compute_signatures`` reads it in place), one
    forward pass of the whole probe (or of each ``batch`` samples) and one backward pass
    of the summed per-sample cross-entropy to the selected outputs, with every parameter
    frozen (no weight gradients are built or computed). Returns those gradients (the
    last micro-batch's when batched).

    ``forward_only``: the floor of ``fisher="none"``: the forward pass alone, without a
    graph (``torch.no_grad``), stopped at the last selected output (no head, no loss);
    returns those outputs as meta tensors (their shapes; nothing is kept).

    The model's output may be a tensor, a tuple (its first element) or an object with
    ``.logits`` (a Hugging Face ModelOutput); a selected module's output may be a tuple
    (its first element is the layer's output).
    """
    dev = torch.device(device)
    in_place = all(
        t.device.type == dev.type and (not t.is_floating_point() or t.dtype == torch.float64)
        for t in chain(model.parameters(), model.buffers())
    )
    work = model if in_place else copy.deepcopy(model).to(device=dev, dtype=torch.float64)
    flags = [(p, p.requires_grad) for p in work.parameters()]
    training = {m: m.training for m in work.modules()}
    work.eval()
    try:
        grads: list[Tensor] = []
        step = batch or x.shape[0]
        for start in range(0, x.shape[0], step):
            part = slice(start, start + step)
            grads = _floor_pass(work, x[part], y[part], layers, device, forward_only)
        return grads
    finally:
        for p, wanted in flags:
            p.requires_grad_(wanted)
        for m, mode in training.items():
            m.training = mode


class _StopForward(Exception):
    """Raised by the forward-only floor's hook after the last selected output."""


def _floor_pass(
    work: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: str | None,
    device: str,
    forward_only: bool = False,
) -> list[Tensor]:
    for p in work.parameters():
        p.requires_grad_(False)
    pattern = re.compile(layers or ".")
    outs: list[Tensor] = []
    selected = [m for name, m in work.named_modules() if name and pattern.search(name)]

    def keep(_m: nn.Module, _a: Any, out: Any) -> Any:
        first = out[0] if isinstance(out, (tuple, list)) else out
        if forward_only:
            outs.append(first.to("meta"))
            if len(outs) == len(selected):
                raise _StopForward
            return out
        if not first.requires_grad:  # the first selected output: a leaf of its own
            first = first.detach().requires_grad_(True)
        outs.append(first)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    handles = [m.register_forward_hook(keep) for m in selected]
    try:
        if forward_only:
            with torch.no_grad():
                try:
                    work(x.to(device))
                except _StopForward:
                    pass
            return outs
        out = work(x.to(device))
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        t = logits.shape[1]
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum") / t
        return list(torch.autograd.grad(loss, outs))
    finally:
        for h in handles:
            h.remove()


def _breakdown(
    model: nn.Module, x: Tensor, y: Tensor, loss: str, layers: str | None, device: str, fisher: str
) -> dict[str, float]:
    """Seconds of each step of a reading, with ddsmon's own functions, run once each."""
    from ddsmon.losses import per_sample_loss_fn
    from ddsmon.param_gram import is_structured, param_gram_structured
    from ddsmon.probe import run_probe_pass, select_layers
    from ddsmon.spectra import gram_of_rows, read_gram, read_singular_values

    dev = torch.device(device)
    eps = torch.finfo(torch.float64).eps
    out: dict[str, float] = dict.fromkeys(
        ("copy", "probe", "x_svd", "g_gram", "g_eig", "k_gram", "k_eig"), 0.0
    )
    want_act = fisher in ("both", "activation")
    want_k = fisher in ("both", "parameter")

    def clock(key: str, fn: Callable[[], Any]) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        out[key] += time.perf_counter() - t0
        return result

    work = clock("copy", lambda: copy.deepcopy(model).to(device=dev, dtype=torch.float64).eval())
    xd = x.to(dev) if not x.is_floating_point() else x.to(dev, torch.float64)
    yd = y.to(dev)
    names = select_layers(work, layers)
    owns = lambda m: next(m.parameters(recurse=False), None) is not None  # noqa: E731
    caps = clock(
        "probe",
        lambda: run_probe_pass(
            work, xd, yd, per_sample_loss_fn(loss), names, n=x.shape[0],
            keep_inputs=lambda m: want_k and is_structured(m) and owns(m),
        ).captures,
    )  # fmt: skip
    n = x.shape[0]
    for cap in caps.values():
        if want_act:
            clock("x_svd", lambda cap=cap: read_singular_values(cap.output, eps))
            gram = clock("g_gram", lambda cap=cap: gram_of_rows(cap.grad, n))
            clock("g_eig", lambda gram=gram: read_gram(gram, eps))
        if want_k and is_structured(cap.module) and owns(cap.module) and cap.inputs is not None:
            k = clock("k_gram", lambda cap=cap: param_gram_structured(cap, n))
            clock("k_eig", lambda k=k: read_gram(k, eps))
    return out


# ---------------------------------------------------------------- parent


@dataclass
class Row:
    """One configuration's measurement (None where it did not finish)."""

    sweep: str
    label: str
    spec: dict[str, Any]
    seconds: float | None = None
    runs: int = 0
    peak: int | None = None
    base: int | None = None
    params: int | None = None
    layers: int | None = None
    with_k: int | None = None
    breakdown: dict[str, float] | None = None
    note: str = ""
    cpu: float | None = None  # median process CPU seconds of the kept readings
    micro: tuple[int, int, int] | None = None  # passes, micro-batches, samples per batch


def run_config(row: Row, budget: float, script: str | Path | None = None) -> Row:
    """Run ``row.spec`` in a fresh interpreter, at most ``budget`` seconds; fill ``row``.

    The child is ``script --child SPEC`` (this file by default; another benchmark that
    passes its own builder to :func:`_child`)."""
    path = os.path.abspath(script or __file__)
    cmd = [sys.executable, path, "--child", json.dumps(row.spec)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env)
        stdout, rc = proc.stdout, proc.returncode
        err = proc.stderr
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, err = None, ""
    runs: list[float] = []
    for line in stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = rec.pop("event", None)
        if kind == "ready":
            row.params, row.base = rec["params"], rec["base"]
        elif kind == "run":
            runs.append(rec["seconds"])
            row.peak = rec["peak"]
        elif kind == "reading":
            row.seconds, row.runs, row.peak = rec["seconds"], rec["runs"], rec["peak"]
            row.cpu = rec.get("cpu")
            row.layers, row.with_k = rec["layers"], rec["with_k"]
            row.micro = tuple(rec["micro"]) if rec.get("micro") else None  # type: ignore[assignment]
        elif kind == "breakdown":
            row.breakdown = rec
    if rc is None:
        if row.seconds is None and runs:
            row.seconds, row.runs = runs[0], 1
        what = "reading" if row.seconds is None else "breakdown"
        row.note = f"killed at the {budget:.0f} s budget during the {what}"
    elif rc != 0:
        tail = (err or "").strip().splitlines()[-1:] or ["?"]
        row.note = f"failed (exit {rc}): {tail[0][:160]}"
    elapsed = time.perf_counter() - started
    print(f"  {row.sweep:7s} {row.label:38s} {_fmt_s(row.seconds):>9s} s  peak {_fmt_mb(row.peak):>9s}"
          f"  ({elapsed:.0f} s wall, reading CPU {_fmt_s(row.cpu)} s) {row.note}",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def _dominant(b: dict[str, float] | None) -> str:
    if not b:
        return "-"
    groups = {
        "probe pass": b["copy"] + b["probe"],
        "X svd": b["x_svd"],
        "G gram": b["g_gram"],
        "G eig": b["g_eig"],
        "K gram": b["k_gram"],
        "K eig": b["k_eig"],
    }
    total = sum(groups.values()) or 1.0
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:2]
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top if v > 0)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _mlp_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []

    def add(sweep: str, d: int, n: int, depth: int) -> None:
        for fisher in args.fishers.split(","):
            spec = {"kind": "mlp", "d": d, "N": n, "L": depth, "fisher": fisher}
            rows.append(Row(sweep, f"d={d} N={n} L={depth} {fisher}", spec))

    sweeps = args.sweeps.split(",")
    if "width" in sweeps:
        for d in _ints(args.widths):
            add("width", d, args.base_rows, args.base_layers)
    if "rows" in sweeps:
        for n in _ints(args.rows):
            add("rows", args.base_width, n, args.base_layers)
    if "layers" in sweeps:
        for depth in _ints(args.layer_counts):
            add("layers", args.base_width, args.base_rows, depth)
    return rows


_BLOCKS = r"^blocks\.\d+$"
_LINEARS = r"^(wte|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj)))$"
#: The GPT-2 rows by ``--gpt2-configs`` key: (label, layers, fisher, extra spec).
#: Blocks own no parameters themselves (their Linear children do), so at block outputs
#: fisher="both" does exactly the work of "activation": not run twice. "activation"
#: is compute_signatures as called by default (the probe streamed in micro-batches
#: sized by its memory budget); "one-pass" reads the whole probe in one pass
#: (probe_batch = n); "floor" is :func:`float64_floor` on the same outputs.
GPT2_CONFIGS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "floor": ("every block output, bare float64 fwd+bwd (floor)", _BLOCKS, "activation",
              {"floor": True}),
    "floor-micro": ("every block output, floor in micro-batches of 4", _BLOCKS, "activation",
                    {"floor": True, "floor_batch": 4}),
    "activation": ("every block output, activation", _BLOCKS, "activation", {}),
    "one-pass": ("every block output, activation, one pass", _BLOCKS, "activation",
                 {"probe_batch": "all"}),
    "none": ("every block output, none (forward only)", _BLOCKS, "none", {}),
    "parameter": ("every Linear + wte, parameter", _LINEARS, "parameter", {}),
    "both": ("every Linear + wte, both", _LINEARS, "both", {}),
}  # fmt: skip


def _gpt_rows(args: argparse.Namespace) -> list[Row]:
    if "gpt2" not in args.sweeps.split(",") or args.gpt2 == "none":
        return []
    kind = "gpt2" if args.gpt2 == "small" else "gpt2_tiny"
    rows = []
    for key in args.gpt2_configs.split(","):
        if key not in GPT2_CONFIGS:
            raise SystemExit(f"--gpt2-configs: unknown {key!r}; choose from {sorted(GPT2_CONFIGS)}")
        label, layers, fisher, extra = GPT2_CONFIGS[key]
        rows.append(Row("gpt2", label, {"kind": kind, "layers": layers, "fisher": fisher, **extra}))
    return rows


def _render(rows: list[Row], args: argparse.Namespace, command: str) -> str:
    dev = args.device
    mem = "peak CUDA memory" if dev.startswith("cuda") else "peak RSS"
    lines = [
        f"Command: `{command}`",
        "",
        *machine_lines(dev),
        f"- device {dev}; each configuration in a fresh process; seconds = median of up to "
        f"{args.repeats} timed readings after one warm-up (fewer once they took "
        f"{args.time_cap:g} s; the warm-up alone when it took over {args.single_above:g} s; "
        f"the number of readings in brackets); budget {args.budget:g} s per MLP and "
        f"{args.gpt2_budget:g} s per GPT-2 configuration, "
        + ("no breakdown (--no-breakdown)" if args.no_breakdown else "breakdown included"),
        f"- {mem} is the whole process's (model, probe, reading); `base` is the RSS "
        "before the reading (the user's float32 model and the probe)",
        "",
        "Breakdown (ddsmon's own steps run one after another on the same captures; median "
        "per term of up to as many passes as readings, within half the time cap): probe = float64 "
        "copy + forward + backward of the whole probe in one pass (ddsmon.probe.run_probe_pass; "
        "the reading itself may stream it in micro-batches); X = QR/SVD of the outputs; G = form + eigensolve the "
        "smaller-side Gram of the output gradients; K = form + eigensolve the n x n "
        "parameter-side Gram.",
        "",
        f"| sweep | configuration | s / checkpoint | {mem} | base | probe s | X svd s | G gram+eig s | K gram+eig s | largest terms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b = r.breakdown
        cells = [
            r.sweep,
            r.label + (f" ({r.params:,} params)" if r.sweep == "gpt2" and r.params else ""),
            _fmt_s(r.seconds) + (f" ({r.runs} runs)" if r.runs > 1 else ""),
            _fmt_mb(r.peak),
            _fmt_mb(r.base) if r.base else "-",
            _fmt_s(b["copy"] + b["probe"]) if b else "-",
            _fmt_s(b["x_svd"]) if b else "-",
            f"{_fmt_s(b['g_gram'])} + {_fmt_s(b['g_eig'])}" if b else "-",
            f"{_fmt_s(b['k_gram'])} + {_fmt_s(b['k_eig'])}" if b else "-",
            _dominant(b) + (f"; {r.note}" if r.note else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", default="width,rows,layers,gpt2")
    ap.add_argument("--widths", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--rows", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--layer-counts", default="1,2,4,8,16")
    ap.add_argument("--base-width", type=int, default=1024)
    ap.add_argument("--base-rows", type=int, default=1024)
    ap.add_argument("--base-layers", type=int, default=2)
    ap.add_argument("--fishers", default="activation,both", help="for the MLP sweeps")
    ap.add_argument("--gpt2", choices=["small", "tiny", "none"], default="small")
    ap.add_argument(
        "--gpt2-configs",
        default="activation,parameter,both",
        help=f"comma-separated GPT-2 rows, of {','.join(GPT2_CONFIGS)}",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        help="compute_signatures' memory_budget in bytes (default: its own)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5, help="timed readings after the warm-up")
    ap.add_argument(
        "--time-cap",
        type=float,
        default=30.0,
        help="stop repeating once the timed readings took this many seconds",
    )
    ap.add_argument(
        "--single-above",
        type=float,
        default=30.0,
        help="a warm-up slower than this many seconds is the only reading",
    )
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per MLP configuration")
    ap.add_argument(
        "--gpt2-budget", type=float, default=300.0, help="seconds per GPT-2 configuration"
    )
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--write", default=None, help="put the table into this markdown file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)  # fmt: skip
    if args.child:
        _child(json.loads(args.child))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = _mlp_rows(args) + _gpt_rows(args)
    for row in rows:
        row.spec.update(
            device=args.device,
            repeats=args.repeats,
            single_above=args.single_above,
            time_cap=args.time_cap,
            threads=args.threads,
            breakdown=not args.no_breakdown,
            memory_budget=args.memory_budget,
        )
        run_config(row, args.gpt2_budget if row.sweep == "gpt2" else args.budget)
    command = "python benchmarks/bench_scaling.py " + " ".join(
        a if re.fullmatch(r"[\w.,:=/+-]+", a) else repr(a)
        for a in (argv if argv is not None else sys.argv[1:])
    )
    # One block per sweep (``bench_scaling:width`` ...), so a sweep can be rerun alone.
    for sweep in dict.fromkeys(r.sweep for r in rows):
        text = _render([r for r in rows if r.sweep == sweep], args, command.strip())
        print(text + "\n")
        if args.write:
            key = f"{SECTION}:{sweep}" + ("" if args.device == "cpu" else f":{args.device}")
            write_section(args.write, key, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
