"""ddsmon's full reading against devinterp's local learning coefficient, same checkpoint.

Both run in one process on the same checkpoint of the modular-addition example
(``examples/modular_addition``: ``train.py`` writes it, ``model.py`` builds the model)
and the same probe (the example's 256 pairs):

* ddsmon: ``compute_signatures(model, inputs, targets, "ce", fisher="both")``, every
  default layer (embed, hidden, act, unembed): one float64 forward and backward of the
  256 samples, the X, G and K spectra;
* devinterp 2.0.1: ``devinterp.slt.llc.llc`` at its default sampling budget (4 chains x
  200 draws, batch 32, 32 init-loss batches per chain, no burn-in), with the step
  size, inverse temperature and localization devinterp's own modular-addition grokking
  example uses (``lr=3e-3, n_beta=2.0, localization=5.0``; ``lr`` and ``n_beta`` have no
  default). The 256 probe pairs are its dataset: ``input_ids`` rows ``[a, b, (a+b) mod p]``
  and ``loss_fn(model, ids)`` = the per-sample cross-entropy of ``model(ids[:, :2])``
  against ``ids[:, 2]``, repeated over devinterp's two "next-token" positions so that
  its token mean is the per-sample loss. Rows: ``observables={}`` (all the LLC needs)
  and one observable on the same data (devinterp's quickstart shape: 3 more forward
  batches per draw).

Then the same for the hidden width of the family (``ModularAdditionMLP(d_hidden=w)``),
each width trained briefly with the example's recipe and read from its checkpoint on
the example's probe; and for other shapes of the family (``--shapes``, each
``d_embed x d_hidden x probe pairs``, default ``128x256x512``: embedding 128, hidden
256, a probe of 512 pairs from ``train.make_probe``, both methods on that probe),
trained the same way.
Medians of ``--repeats`` ddsmon readings (after a warm-up) and ``--llc-repeats`` LLC
calls (after a small warm-up call that imports and compiles what LLC needs).

Needs devinterp, which ddsmon does not depend on; run it from a separate environment::

    python3 -m venv /tmp/llcvenv && /tmp/llcvenv/bin/pip install torch==2.13.0
    /tmp/llcvenv/bin/pip install -e . devinterp==2.0.1
    /tmp/llcvenv/bin/python benchmarks/bench_llc.py --write BENCHMARKS.md

``--write`` takes any markdown file (its ``bench_llc`` block is replaced or appended);
``--no-example --widths ''`` times the ``--shapes`` rows alone.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsmon import compute_signatures

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import machine_lines, median_seconds, write_section

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "modular_addition"
sys.path.insert(0, str(EXAMPLE))
from model import D_EMBED, ModularAdditionMLP  # noqa: E402

__all__ = ("LLC_SETTINGS", "LlcRow", "main", "time_ddsmon", "time_llc")

SECTION = "bench_llc"

#: devinterp's grokking example (modular addition, p = 53): lr 3e-3, nbeta 2, gamma 5.
LLC_SETTINGS: dict[str, Any] = {"lr": 3e-3, "n_beta": 2.0, "localization": 5.0}


@dataclass
class LlcRow:
    """One checkpoint's timings (seconds) and what each method computed."""

    label: str
    params: int
    probe: int
    ddsmon_both: float
    ddsmon_activation: float
    llc: float | None = None
    llc_forwards: int | None = None
    llc_value: str = ""
    note: str = ""


def time_ddsmon(model: nn.Module, x: Tensor, y: Tensor, fisher: str, repeats: int) -> float:
    """Median seconds of ddsmon's reading of ``model`` on the probe (CPU, float64)."""
    return median_seconds(
        lambda: compute_signatures(model, x, y, "ce", None, "cpu", fisher=fisher), repeats
    )


def _llc_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """devinterp loss_fn: (batch, 2) per-"token" loss, each column the pair's CE."""
    per_sample = F.cross_entropy(model(ids[:, :2]), ids[:, 2], reduction="none")
    return per_sample[:, None].expand(-1, ids.shape[1] - 1)


def time_llc(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    workdir: Path,
    *,
    observables: bool,
    repeats: int,
    **budget: Any,
) -> tuple[float, int, str]:
    """Median seconds of ``devinterp.slt.llc.llc`` on the probe pairs; forward batches; value."""
    from datasets import Dataset
    from devinterp.slt.llc import llc

    ds = Dataset.from_dict({"input_ids": torch.cat([x, y[:, None]], 1).tolist()}).with_format(
        "torch"
    )
    obs = {"probe": ds} if observables else {}
    calls = [0]
    hook = model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    times, values = [], []
    try:
        for i in range(repeats):
            calls[0] = 0
            out = workdir / f"llc_{time.monotonic_ns()}_{i}.zarr"
            t0 = time.perf_counter()
            res = llc(
                model,
                ds,
                obs,
                loss_fn=_llc_loss,
                device="cpu",
                output_path=out,
                **LLC_SETTINGS,
                **budget,
            )
            times.append(time.perf_counter() - t0)
            values.append((float(res.llc_mean), float(res.llc_std)))
    finally:
        hook.remove()
    mean, std = values[len(values) // 2]
    return statistics.median(times), calls[0], f"{mean:.1f} ± {std:.1f}"


def _train_width(width: int, steps: int, path: Path, p: int = 53, d_embed: int = D_EMBED) -> None:
    """The example's recipe (full batch AdamW, lr 1e-2, wd 1.0, betas 0.9/0.98) at
    ``d_hidden = width`` and ``d_embed``."""
    from train import make_split

    x_tr, y_tr, _, _ = make_split(p, 0.5, 0)
    torch.manual_seed(0)
    model = ModularAdditionMLP(p=p, d_embed=d_embed, d_hidden=width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0, betas=(0.9, 0.98))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "step": steps}, path)


def _load(path: Path, width: int, d_embed: int = D_EMBED) -> nn.Module:
    model = ModularAdditionMLP(d_embed=d_embed, d_hidden=width)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return model


def _measure(
    label: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    args: argparse.Namespace,
    work: Path,
    observables: bool,
) -> LlcRow:
    row = LlcRow(
        label=label,
        params=sum(p.numel() for p in model.parameters()),
        probe=int(x.shape[0]),
        ddsmon_both=time_ddsmon(model, x, y, "both", args.repeats),
        ddsmon_activation=time_ddsmon(model, x, y, "activation", args.repeats),
    )
    if args.skip_llc:
        row.note = "LLC skipped (--skip-llc)"
        return row
    budget = {"num_chains": args.chains, "num_draws": args.draws}
    row.llc, row.llc_forwards, row.llc_value = time_llc(
        model, x, y, work, observables=observables, repeats=args.llc_repeats, **budget
    )
    print(
        f"  {label}: ddsmon {row.ddsmon_both:.4f} s, llc {row.llc:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def _render(
    rows: list[LlcRow], args: argparse.Namespace, command: str, ckpt: str, llc_error: str
) -> str:
    try:
        dv = f"devinterp {metadata.version('devinterp')}"
    except metadata.PackageNotFoundError:
        dv = "devinterp not installed"
    lines = [
        f"Command: `{command}`",
        "",
        *machine_lines("cpu"),
        f"- {dv}; LLC budget {args.chains} chains x {args.draws} draws, batch 32, "
        f"lr {LLC_SETTINGS['lr']:g}, n_beta {LLC_SETTINGS['n_beta']:g}, localization "
        f"{LLC_SETTINGS['localization']:g}; ddsmon fisher=both, float64, every default layer",
        f"- checkpoint: {ckpt}; probe: the example's pairs (train.make_probe) for both "
        "methods, as many as the probe column says",
        f"- seconds: ddsmon median of {args.repeats} after a warm-up; LLC median of "
        f"{args.llc_repeats} call(s) after a small warm-up call; both in this one process",
        "",
    ]
    if llc_error:
        lines += [f"**LLC not measured: {llc_error}**", ""]
    lines += [
        "| checkpoint | params | ddsmon both s | ddsmon activation s | LLC s | LLC / ddsmon both | "
        "LLC forward batches | LLC estimate (mean ± std over chains) | probe pairs | "
        "LLC / ddsmon activation |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        ratio = f"**{r.llc / r.ddsmon_both:,.0f}x**" if r.llc else "-"
        ratio_act = f"{r.llc / r.ddsmon_activation:,.0f}x" if r.llc else "-"
        lines.append(
            f"| {r.label} | {r.params:,} | {r.ddsmon_both:.4f} | {r.ddsmon_activation:.4f} | "
            f"{f'{r.llc:.2f}' if r.llc else '-'} | {ratio} | {r.llc_forwards or '-'} | "
            f"{r.llc_value or r.note or '-'} | {r.probe} | {ratio_act} |"
        )
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, int, int]:
    """``"128x256x512"`` -> (d_embed, d_hidden, probe pairs)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--shapes: {text!r} is not d_embed x d_hidden x probe (e.g. 128x256x512)")
    d_embed, width, pairs = (int(p) for p in parts)
    return d_embed, width, pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a modular-addition checkpoint (default: train one with the example's train.py)",
    )
    ap.add_argument(
        "--probe", type=Path, default=None, help="its probe file (default: the one train.py writes)"
    )
    ap.add_argument(
        "--steps", type=int, default=600, help="train.py steps for the default checkpoint"
    )
    ap.add_argument(
        "--widths", default="128,512,2048,8192", help="hidden widths of the family ('' for none)"
    )
    ap.add_argument("--width-steps", type=int, default=300, help="training steps per width")
    ap.add_argument(
        "--shapes",
        default="128x256x512",
        help="other shapes, d_embed x d_hidden x probe pairs, comma-separated ('' for none)",
    )
    ap.add_argument(
        "--no-example", action="store_true", help="skip the example checkpoint's two rows"
    )
    ap.add_argument("--chains", type=int, default=4, help="LLC chains (devinterp default 4)")
    ap.add_argument(
        "--draws", type=int, default=200, help="LLC draws per chain (devinterp default 200)"
    )
    ap.add_argument("--repeats", type=int, default=7, help="ddsmon readings per checkpoint")
    ap.add_argument("--llc-repeats", type=int, default=1, help="LLC calls per checkpoint")
    ap.add_argument("--skip-llc", action="store_true", help="time ddsmon only")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads for both (0: torch's default)"
    )
    ap.add_argument("--write", default=None, help="put the table into this markdown file")
    args = ap.parse_args(argv)  # fmt: skip
    shapes = [_parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    command = "python benchmarks/bench_llc.py " + " ".join(
        a if re.fullmatch(r"[\w.,:=/+-]+", a) else repr(a)
        for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    llc_error = ""
    if not args.skip_llc:
        try:
            import devinterp.slt.llc  # noqa: F401
        except ImportError as exc:
            llc_error = f"devinterp cannot be imported here ({exc}); see the docstring for its venv"
            args.skip_llc = True
    with tempfile.TemporaryDirectory(prefix="bench_llc_") as tmp:
        work = Path(tmp)
        ckpt, probe = args.checkpoint, args.probe
        if args.no_example:
            ckpt_label = "each row's own, trained here with the example's recipe (--no-example)"
            probe = None
        elif ckpt is None:
            subprocess.run(
                [sys.executable, str(EXAMPLE / "train.py"), "--out", str(work / "ckpts"),
                 "--steps", str(args.steps), "--every", str(args.steps)],
                check=True, capture_output=True,
            )  # fmt: skip
            ckpt, probe = work / "ckpts" / f"step_{args.steps:06d}.pt", work / "probe.pt"
            ckpt_label = (
                f"examples/modular_addition/train.py --steps {args.steps} (step {args.steps})"
            )
        else:
            ckpt_label = str(ckpt)
        if probe is None and not args.no_example:
            raise SystemExit("--probe is needed with --checkpoint")
        from train import make_probe

        probe_data = torch.load(probe, weights_only=True) if probe is not None else make_probe(53)
        x, y = probe_data["inputs"], probe_data["targets"]
        if not args.skip_llc:  # warm-up: imports, zarr, dataset formatting
            time_llc(
                ModularAdditionMLP(),
                x,
                y,
                work,
                observables=True,
                repeats=1,
                num_chains=1,
                num_draws=2,
            )
        rows = []
        if not args.no_example:
            model = ModularAdditionMLP()
            model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
            width0 = model.hidden.out_features
            rows += [
                _measure(
                    f"example, d_hidden {width0}, observables={{}}", model, x, y, args, work, False
                ),
                _measure(
                    f"example, d_hidden {width0}, 1 observable", model, x, y, args, work, True
                ),
            ]
        for width in [int(w) for w in args.widths.split(",") if w.strip()]:
            path = work / f"width_{width}.pt"
            _train_width(width, args.width_steps, path)
            label = f"d_hidden {width} ({args.width_steps} steps), observables={{}}"
            rows.append(_measure(label, _load(path, width), x, y, args, work, False))
        for d_embed, width, pairs in shapes:
            path = work / f"shape_{d_embed}_{width}.pt"
            _train_width(width, args.width_steps, path, d_embed=d_embed)
            shape_probe = make_probe(53, pairs)
            model = _load(path, width, d_embed)
            for observables in (False, True):
                label = (
                    f"d_embed {d_embed}, d_hidden {width} ({args.width_steps} steps), "
                    f"probe {pairs}, {'1 observable' if observables else 'observables={}'}"
                )
                rows.append(
                    _measure(
                        label,
                        model,
                        shape_probe["inputs"],
                        shape_probe["targets"],
                        args,
                        work,
                        observables,
                    )
                )
    text = _render(rows, args, command.strip(), ckpt_label, llc_error)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
