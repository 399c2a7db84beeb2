"""Activation-side readings of Hugging Face decoders built from a config: time and peak RSS.

Scale rows for GPT-2 small (124M), a GPT-2-medium-shaped model (355M) and a
Pythia-1B-shaped decoder (1.0B), each built from its transformers config with random
weights (no download; ``use_cache=False``, attention as the config picks, ``sdpa``):

=============== ============================================ ======================
``--models``    config                                       layers read
=============== ============================================ ======================
``gpt2``        GPT2Config(): 12 x 768, 12 heads, vocab 50257 ``transformer.h.<i>``
``gpt2-medium`` GPT2Config(n_layer=24, n_embd=1024, n_head=16) ``transformer.h.<i>``
``pythia-1b``   GPTNeoXConfig(hidden 2048, 16 layers, 8 heads,  ``gpt_neox.layers.<i>``
                intermediate 8192, vocab 50304, rotary 0.25,
                parallel residual, untied embeddings)
``gpt2-tiny``,  2 x 32 versions of the two, for the smoke test
``pythia-tiny``
=============== ============================================ ======================

Every block output is read (as the GPT-2-small rows of ``bench_scaling.py``), probe
``--seqs`` sequences x ``--context`` tokens (32 x 128 by default: N = 4096 rows per
layer), next-token cross-entropy. Configurations (``--configs``; an entry
``model:config`` runs for that model only, ``config@float64`` builds the model in
float64 first, so ``compute_signatures`` reads it in place instead of copying it):

* ``activation``: ``compute_signatures(..., fisher="activation")`` as called by
  default (the probe streamed in micro-batches sized by its 1 GiB memory budget);
* ``one-pass``: the same with ``probe_batch=n`` (the whole probe's graph at once);
* ``none``: ``fisher="none"``, forward passes only (X side);
* ``floor``: the bare float64 forward and backward of the whole probe to the block
  outputs (``bench_scaling.float64_floor``: a float64 copy, frozen parameters, one
  ``autograd.grad`` to the outputs; no ddsmon code);
* ``floor-micro``: that floor in micro-batches of as many samples as the last
  ``activation`` row of the same model used (``--floor-batch`` when there is none),
  so the streamed reading has a floor that streams too;
* ``floor-forward``: the floor of ``none``: the float64 forward alone, no graph,
  stopped at the last block output.

Each configuration runs in a fresh subprocess (``bench_scaling.run_config``), so its
peak RSS (``ru_maxrss`` of that process: model build, float64 copy, probe and reading)
is its own; ``base`` is its RSS before the reading (the model as built and the probe);
``MemAvailable`` is read before each one is started. Seconds: the median of up to
``--repeats`` timed readings after one warm-up, or the warm-up alone when it took more
than ``--single-above`` seconds.

    python benchmarks/bench_transformers.py --models gpt2,gpt2-medium,pythia-1b \\
        --configs activation,floor-micro,none,floor-forward,gpt2:one-pass,gpt2:floor \\
        --write /tmp/scale.md

A whole-probe row (``one-pass``, ``floor``) of a model larger than GPT-2 small does not
fit 24 GiB: its float64 graph grows with the probe (11.5-12 GiB for GPT-2 small).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_scaling import Row, _child, _fmt_mb, _fmt_s, machine_lines, run_config, write_section
from torch import Tensor, nn

__all__ = ("CONFIGS", "MODELS", "Measured", "Model", "build", "main", "parse_configs")

SECTION = "bench_transformers"


@dataclass(frozen=True)
class Model:
    """A decoder shape: how to build it from its transformers config, which outputs to read."""

    label: str
    make: Callable[[], nn.Module]
    layers: str  # regex of the block outputs
    vocab: int


def _gpt2(**shape: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(use_cache=False, **shape))

    return make


def _neox(**shape: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            use_cache=False,
            **shape,
        )
        return GPTNeoXForCausalLM(cfg)

    return make


_GPT2_BLOCKS = r"^transformer\.h\.\d+$"
_NEOX_BLOCKS = r"^gpt_neox\.layers\.\d+$"
_TINY = {"vocab_size": 101}

MODELS: dict[str, Model] = {
    "gpt2": Model("GPT-2 small", _gpt2(), _GPT2_BLOCKS, 50257),
    "gpt2-medium": Model(
        "GPT-2-medium-shaped", _gpt2(n_layer=24, n_embd=1024, n_head=16), _GPT2_BLOCKS, 50257
    ),
    "pythia-1b": Model(
        "Pythia-1B-shaped",
        _neox(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=8,
            intermediate_size=8192,
            vocab_size=50304,
            max_position_embeddings=2048,
        ),
        _NEOX_BLOCKS,
        50304,
    ),
    "gpt2-tiny": Model(
        "GPT-2-tiny", _gpt2(n_layer=2, n_embd=32, n_head=2, n_positions=64, **_TINY),
        _GPT2_BLOCKS, 101,
    ),
    "pythia-tiny": Model(
        "Pythia-tiny",
        _neox(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, **_TINY),
        _NEOX_BLOCKS, 101,
    ),
}  # fmt: skip

#: ``--configs`` keys: (label, fisher, extra spec for bench_scaling's child).
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "activation": ("activation, streamed (default budget)", "activation", {}),
    "one-pass": ("activation, one pass (`probe_batch=n`)", "activation", {"probe_batch": "all"}),
    "none": ('`fisher="none"` (forward only)', "none", {}),
    "floor": ("floor: float64 fwd+bwd, whole probe", "activation", {"floor": True}),
    "floor-micro": ("floor: float64 fwd+bwd, micro-batches", "activation", {"floor": True}),
    "floor-forward": (
        "floor: float64 forward only",
        "none",
        {"floor": True, "floor_forward": True},
    ),
}


def parse_configs(text: str, models: list[str]) -> list[tuple[str, str, str]]:
    """``[model:]config[@dtype]`` entries -> (model, config, build dtype), in model order
    and, within a model, in the order given."""
    entries = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        m = re.fullmatch(r"(?:([\w.-]+):)?([\w-]+)(?:@(float32|float64))?", raw)
        if not m or m.group(2) not in CONFIGS:
            raise SystemExit(f"--configs: cannot read {raw!r}; configs are {sorted(CONFIGS)}")
        if m.group(1) and m.group(1) not in MODELS:
            raise SystemExit(f"--configs: unknown model {m.group(1)!r} in {raw!r}")
        entries.append((m.group(1), m.group(2), m.group(3) or "float32"))
    return [
        (model, config, dtype)
        for model in models
        for only, config, dtype in entries
        if only in (None, model)
    ]


def build(spec: dict[str, Any]) -> tuple[nn.Module, Tensor, Tensor, str | None, str]:
    """The model of ``spec["model"]`` (random init, seed 0, eval) in ``spec["dtype"]``
    and a probe of ``spec["seqs"]`` random token sequences of ``spec["context"]``
    tokens (targets: the next tokens)."""
    shape = MODELS[spec["model"]]
    torch.manual_seed(0)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype directly: no float32 copy first
    try:
        model = shape.make()
    finally:
        torch.set_default_dtype(default)
    model = model.to(dtype).eval()  # buffers too (rotary inv_freq is made float32)
    tokens = torch.randint(0, shape.vocab, (spec["seqs"], spec["context"] + 1))
    return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), shape.layers, "ce"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fmt_params(count: int | None) -> str:
    if not count:
        return "-"
    return f"{count / 1e6:,.0f}M" if count >= 1e6 else f"{count:,}"


@dataclass
class Measured:
    """A row with the machine around it: MemAvailable before its process started and
    the 1-minute load average before and after it."""

    row: Row
    available: int | None
    load: tuple[float, float]


def _render(rows: list[Measured], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        *machine_lines(args.device),
        f"- device {args.device}; probe {args.seqs} x {args.context} tokens (N = "
        f"{args.seqs * args.context} rows per layer)"
        + "".join(f", {m}: {k} x {args.context}" for m, k in _model_seqs(args).items())
        + "; every block output; each configuration "
        f"in a fresh process, one after another; seconds = median of up to {args.repeats} "
        f"timed readings after one warm-up (the warm-up alone when it took over "
        f"{args.single_above:g} s; readings in brackets); budget {args.budget:g} s each",
        (
            "- peak CUDA memory: `torch.cuda.max_memory_allocated` of the configuration's "
            "process (float64 copy, probe, reading; the model is built on the host); "
            if args.device.startswith("cuda")
            else "- peak RSS: `ru_maxrss` of the configuration's process (model build, "
            "float64 copy, probe, reading); "
        )
        + "base: its RSS before the reading (the model as built, the probe); "
        "available: MemAvailable before it started; micro-batches: passes x micro-batches "
        "of up to k samples (ddsmon's log; the floor's own batch for floor rows); CPU s: "
        "process CPU seconds of the reading (all threads; less sensitive to other work on "
        "the cores than wall seconds); load: 1-minute load average before -> after",
        "",
        "| model | params | probe | configuration | built as | s / checkpoint | CPU s | "
        + ("peak CUDA memory" if args.device.startswith("cuda") else "peak RSS")
        + " | base | available | micro-batches | load | note |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for m in rows:
        r, spec = m.row, m.row.spec
        if r.micro:
            micro = f"{r.micro[0]} x {r.micro[1]} of <= {r.micro[2]}"
        elif spec.get("floor"):
            batch = spec.get("floor_batch")
            micro = f"{-(-spec['seqs'] // batch)} of {batch}" if batch else "1 of all"
        else:
            micro = "-"
        cells = [
            MODELS[spec["model"]].label,
            _fmt_params(r.params),
            f"{spec['seqs']} x {spec['context']}",
            r.label,
            spec.get("dtype", "float32"),
            _fmt_s(r.seconds) + (f" ({r.runs})" if r.runs > 1 else ""),
            _fmt_s(r.cpu),
            _fmt_mb(r.peak),
            _fmt_mb(r.base) if r.base else "-",
            _fmt_mb(m.available),
            micro,
            f"{m.load[0]:.1f} -> {m.load[1]:.1f}",
            r.note or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _model_seqs(args: argparse.Namespace) -> dict[str, int]:
    """``--model-seqs gpt2-medium=16,pythia-1b=8`` -> {model: probe sequences}."""
    out = {}
    for item in (t.strip() for t in args.model_seqs.split(",")):
        if item:
            model, _, count = item.partition("=")
            if model not in MODELS or not count.isdigit() or int(count) < 1:
                raise SystemExit(f"--model-seqs: cannot read {item!r} (model=sequences)")
            out[model] = int(count)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default="gpt2,gpt2-medium,pythia-1b",
        help=f"comma-separated, of {','.join(MODELS)}",
    )
    ap.add_argument(
        "--configs",
        default="activation,floor-micro,none,floor-forward",
        help=f"comma-separated [model:]config[@float64] entries, configs of {','.join(CONFIGS)}",
    )
    ap.add_argument("--seqs", type=int, default=32, help="probe sequences")
    ap.add_argument(
        "--model-seqs",
        default="",
        help="probe sequences of some models, e.g. pythia-1b=8 (the others: --seqs)",
    )
    ap.add_argument("--context", type=int, default=128, help="tokens per probe sequence")
    ap.add_argument(
        "--floor-batch",
        type=int,
        default=4,
        help="floor-micro's samples per batch when no activation row ran before it",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="timed readings after the warm-up")
    ap.add_argument(
        "--time-cap",
        type=float,
        default=120.0,
        help="stop repeating once the timed readings took this many seconds",
    )
    ap.add_argument(
        "--single-above",
        type=float,
        default=60.0,
        help="a warm-up slower than this many seconds is the only reading",
    )
    ap.add_argument("--budget", type=float, default=1500.0, help="seconds per configuration")
    ap.add_argument("--write", default=None, help="put the table into this markdown file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)  # fmt: skip
    if args.child:
        import json

        _child(json.loads(args.child), build)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown {m!r}; choose from {sorted(MODELS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    plan = parse_configs(args.configs, models)
    seqs = _model_seqs(args)
    command = "python benchmarks/bench_transformers.py " + " ".join(
        a if re.fullmatch(r"[\w.,:=/@+-]+", a) else repr(a)
        for a in (argv if argv is not None else sys.argv[1:])
    )
    measured: list[Measured] = []
    micro_of: dict[str, int] = {}  # model -> samples per micro-batch of its activation row
    for model, config, dtype in plan:
        label, fisher, extra = CONFIGS[config]
        spec: dict[str, Any] = {
            "model": model, "dtype": dtype, "seqs": seqs.get(model, args.seqs),
            "context": args.context,
            "layers": MODELS[model].layers, "fisher": fisher, **extra,
            "device": args.device, "repeats": args.repeats, "single_above": args.single_above,
            "time_cap": args.time_cap, "threads": args.threads, "breakdown": False,
        }  # fmt: skip
        if config == "floor-micro":
            spec["floor_batch"] = micro_of.get(model, args.floor_batch)
            label = f"floor: float64 fwd+bwd, micro-batches of {spec['floor_batch']}"
        available = _mem_available()
        print(f"{time.strftime('%H:%M:%S')} {model} {config}@{dtype}: MemAvailable "
              f"{_fmt_mb(available)}", file=sys.stderr, flush=True)  # fmt: skip
        load = os.getloadavg()[0]
        row = run_config(Row(model, label, spec), args.budget, script=__file__)
        if config == "activation" and row.micro:
            micro_of[model] = row.micro[2]
        measured.append(Measured(row, available, (load, os.getloadavg()[0])))
        text = _render(measured, args, command.strip())
        if args.write:  # after every row: a long run stopped early keeps what it measured
            key = SECTION + ("" if args.device == "cpu" else f":{args.device}")
            write_section(Path(args.write), key, text)
    print(_render(measured, args, command.strip()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
