"""compute_signatures against the bare minimum, on one fixed model and probe.

The bare minimum is written plainly here, sharing no code with ddsmon: a float64 copy
of the model, one forward and one backward pass capturing every selected layer's output
and output gradient, then per layer one symmetric eigensolve of the smaller-side Gram of
the output gradients (what lambda_min and logdet need) and one SVD of the outputs (what
sigma_min and the dead direction need). ddsmon's full activation-side reading does the
same work plus floors, ranks, u_dead_gain and the bookkeeping; "both" adds the
parameter-side Gram K per Linear layer; "none" reads X alone from forward passes (no
loss, no backward pass).

    python benchmarks/bench_engine.py [--repeats 7] [--write BENCHMARKS.md]

With ``--write`` the table replaces the ``bench_engine`` block of that file.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from ddsmon import compute_signatures

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import machine_lines, median_seconds, write_section


def make_model(width: int, depth: int, d_in: int, classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def bare_minimum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eigen_only: bool) -> list:
    work = copy.deepcopy(model).double().eval()
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, name=name: outs.__setitem__(name, o))
        for name, m in work.named_modules()
        if isinstance(m, nn.Linear)
    ]
    logits = work(x.double())
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    grads = torch.autograd.grad(loss, list(outs.values()))
    for h in hooks:
        h.remove()
    n = x.shape[0]
    results = []
    for out, g in zip(outs.values(), grads):
        gram = g.T @ g / n if g.shape[0] >= g.shape[1] else g @ g.T / n
        results.append(torch.linalg.eigvalsh(gram))
        if not eigen_only:
            results.append(torch.linalg.svd(out.detach(), full_matrices=False))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--write", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model(args.width, args.depth, 64, 10)
    x, y = torch.randn(args.n, 64), torch.randint(0, 10, (args.n,))
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]

    rows = [
        ("bare minimum: fwd+bwd, eigvalsh(G) per layer", lambda: bare_minimum(model, x, y, True)),
        ("bare minimum: fwd+bwd, eigvalsh(G) + svd(X) per layer", lambda: bare_minimum(model, x, y, False)),
        ("ddsmon fisher=none (X readings, forward passes only)",
         lambda: compute_signatures(model, x, y, "ce", layers, "cpu", fisher="none")),
        ("ddsmon fisher=activation (X and G readings)",
         lambda: compute_signatures(model, x, y, "ce", layers, "cpu", fisher="activation")),
        ("ddsmon fisher=both (X, G and K readings)",
         lambda: compute_signatures(model, x, y, "ce", layers, "cpu", fisher="both")),
    ]  # fmt: skip
    medians = [(label, median_seconds(fn, args.repeats)) for label, fn in rows]
    eig_only, ref = medians[0][1], medians[1][1]
    command = "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:])
    lines = [
        f"- command: `{command.strip()}`",
        *machine_lines(),
        f"- model: MLP of {args.depth} Linear layers, width {args.width}, probe n={args.n}, "
        f"CPU; median of {args.repeats} after one warm-up",
        "",
        "| variant | median s | ratio to eigvalsh-only minimum | ratio to eigvalsh + svd minimum |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {t:.3f} | {t / eig_only:.2f}x | {t / ref:.2f}x |" for label, t in medians
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "bench_engine", text)


if __name__ == "__main__":
    main()
