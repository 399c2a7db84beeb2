"""Reduced-rank regression against a closed-form answer (the DDS paper's Figures 2 and 3).

Cells ``(M, N, H, r)``: input ``M = 10``, output ``N = 5``, hidden (bottleneck) ``H = 2..5``,
true rank ``r = 1..H`` (the paper's 14 cells; ``--with-r0`` adds ``r = 0``), noise
``sigma = 0.1``. The rank deficit ``H - r`` is the number of dead directions at the
bottleneck. Each cell's real log canonical threshold ``lambda`` has a closed form
(Aoyagi & Watanabe 2005, :func:`ddsmon.rlct.rrr_rlct`).

Model: ``x -> h1 = A x`` (``H``, the bottleneck) ``-> h2 = B h1`` (``N``, the output: the
dimension-fixed boundary layer), both bias-free ``nn.Linear``. Data: ``x ~ N(0, I_M)``,
``y = T x + sigma * eps`` with teacher ``T = U_r V_r^T`` (unit singular values, random
orthonormal ``U``, ``V``); the same ``x``, ``eps``, ``U``, ``V`` serve every cell of a seed.

Fit: **closed form, no training.** The minimum of ``||Y - X W||^2`` over rank-``H`` maps is
the reduced-rank regression solution ``W_H = W_ols V_H V_H^T`` (``V_H``: top ``H`` right
singular vectors of the fitted values ``X W_ols``). It is factored *balanced*,
``A = S^{1/2} R^T``, ``B = P S^{1/2}`` for ``W_H^T = P S R^T``: the factorisation gradient
flow from a small initialisation, or a vanishing weight decay, converges to. Every
``(B G^{-1}, G A)`` is an equally good minimum, and the bottleneck readings depend on
that gauge; the balanced point is the canonical one. The script prints the gradient
norm at each fitted point (it should be at rounding level), so no fine-tuning is done.

Readings (``ddsmon.compute_signatures``, MSE = mean over the N outputs, float64) at
``h1`` and ``h2``: ``lambda+_min(G)``, ``sigma_min(X)``, ``log det+(G)``. With
``G_h2 = Sigma_res (2/N)^2`` (the residual covariance) and ``G_h1 = B^T G_h2 B``, each
dead direction's eigenvalue at ``h1`` is the noise-fitted singular value of ``W_H``
times ``sigma^2 (2/N)^2``, while with no deficit the smallest is a teacher singular
value's: the collapse grows like ``sqrt(n)``.

    python examples/reduced_rank_regression/run.py            # 14 cells x 5 seeds, n = 4000
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddsmon import compute_signatures
from ddsmon.rlct import rrr_rlct

# Second-hand numbers for the paper's 14-cell grid (see ../shared/REFERENCE-NOTES.md).
PAPER = {
    "collapse": 246.0,
    "boundary_drift": 0.003,
    "rho": {
        "sigma_min_x_h2_with_zeros": 0.895,
        "lambda_min_h1": -0.978,
        "logdet_h1": -0.947,
        "capacity_H_times_r": 0.99,
    },
}
READINGS = {
    "lambda_min_h1": "lambda+_min(G_h1)",
    "logdet_h1": "log det+(G_h1)",
    "sigma_min_x_h1": "sigma_min(X_h1)",
    "sigma_min_x_h2": "sigma_min+(X_h2)",
    "sigma_min_x_h2_with_zeros": "sigma_min(X_h2), 0 if rank < N",
    "lambda_min_h2": "lambda+_min(G_h2)",
    "capacity_H_times_r": "H * r (naive proxy)",
}


def grid(with_r0: bool) -> list[tuple[int, int]]:
    """(H, r) cells: H = 2..5, r = 1..H (0..H with ``with_r0``)."""
    return [(h, r) for h in range(2, 6) for r in range(0 if with_r0 else 1, h + 1)]


def orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def fit_rrr(x: torch.Tensor, y: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form rank-``hidden`` least squares, factored balanced: ``(A, B)``, ``BA = W_H^T``."""
    w_ols = torch.linalg.lstsq(x, y).solution  # M x N
    _, _, vh = torch.linalg.svd(x @ w_ols, full_matrices=False)
    v_h = vh[:hidden].T
    w_map = (w_ols @ v_h @ v_h.T).T  # N x M
    p, s, rh = torch.linalg.svd(w_map, full_matrices=False)
    root = s[:hidden].clamp_min(0.0).sqrt()
    return root[:, None] * rh[:hidden], p[:, :hidden] * root[None, :]


def two_layer(a: torch.Tensor, b: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("h1", nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=torch.float64))
    model.add_module("h2", nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=torch.float64))
    with torch.no_grad():
        model.h1.weight.copy_(a)
        model.h2.weight.copy_(b)
    return model


def grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Norm of the gradient of the mean squared error at the fitted point."""
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    model.zero_grad()
    return total


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..k-1 with ties given their average rank."""
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):
        tie = values == v
        out[tie] = out[tie].mean()
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of the tie-averaged ranks); nan if constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def llc_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("devinterp", "datasets"))


def llc_estimate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, args: argparse.Namespace
) -> float:
    """devinterp's SGLD estimate of the LLC at the fitted point (optional extra).

    devinterp 2.x samples language models: its dataset is a Hugging Face ``Dataset`` with
    ``input_ids`` and ``loss_fn(model, input_ids)`` returns a (batch, seq - 1) loss. Each
    regression sample is therefore one sequence ``[i, i]`` whose "per-token" loss is its
    Gaussian negative log-likelihood ``||y_i - f(x_i)||^2 / (2 sigma^2)``.
    """
    from datasets import Dataset
    from devinterp.slt.llc import llc

    n = x.shape[0]
    ds = Dataset.from_dict({"input_ids": [[i, i] for i in range(n)]})
    ds.set_format("torch")
    work = copy.deepcopy(model).float()
    x32, y32 = x.float(), y.float()

    def loss_fn(m: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        idx = input_ids[:, 0].long().cpu()
        dev = next(m.parameters()).device
        pred = m(x32[idx].to(dev))
        return ((pred - y32[idx].to(dev)) ** 2).sum(-1, keepdim=True) / (2.0 * sigma**2)

    n_beta = args.llc_nbeta if args.llc_nbeta is not None else n / math.log(n)
    with tempfile.TemporaryDirectory() as tmp:
        result = llc(
            model=work,
            dataset=ds,
            observables={"train": ds},
            lr=args.llc_lr,
            n_beta=n_beta,
            loss_fn=loss_fn,
            num_chains=args.llc_chains,
            num_draws=args.llc_draws,
            localization=args.llc_localization,
            device="cpu",
            output_path=str(Path(tmp) / "samples.zarr"),
        )
        return float(np.asarray(result["llc_mean"]))


def run_seed(
    seed: int, cells: list[tuple[int, int]], args: argparse.Namespace, use_llc: bool
) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    m, n_out = args.M, args.N
    x = torch.randn(args.n, m, generator=gen, dtype=torch.float64)
    noise = args.sigma * torch.randn(args.n, n_out, generator=gen, dtype=torch.float64)
    u, v = orthogonal(n_out, gen), orthogonal(m, gen)
    out = []
    for hidden, r in cells:
        lam, mult = rrr_rlct(m, n_out, hidden, r)
        y = x @ (u[:, :r] @ v[:, :r].T).T + noise
        model = two_layer(*fit_rrr(x, y, hidden))
        sig = compute_signatures(
            model, x, y, loss="mse", layers=["h1", "h2"], device=args.device, fisher="activation"
        )
        h1, h2 = sig.layers["h1"], sig.layers["h2"]
        smallest_x2 = float(h2.x_spectrum[-1])
        row = {
            "seed": seed,
            "H": hidden,
            "r": r,
            "deficit": hidden - r,
            "lambda": lam,
            "multiplicity": mult,
            "lambda_min_h1": h1.lambda_min,
            "lambda_min_h2": h2.lambda_min,
            "sigma_min_x_h1": h1.sigma_min,
            "logdet_h1": h1.logdet,
            "g_rank_h1": h1.g_rank,
            "sigma_min_x_h2": h2.sigma_min,
            "sigma_min_x_h2_with_zeros": 0.0 if smallest_x2 <= h2.floor_x else smallest_x2,
            "x_rank_h2": h2.x_rank,
            "capacity_H_times_r": float(hidden * r),
            "grad_norm": grad_norm(model, x, y),
            "dds_seconds": sig.seconds,
            "llc": None,
            "llc_seconds": None,
        }
        if use_llc:
            started = time.perf_counter()
            try:
                row["llc"] = llc_estimate(model, x, y, args.sigma, args)
            except Exception as exc:  # optional, unverified path: report, keep going
                print(f"  LLC failed for H={hidden} r={r}: {type(exc).__name__}: {exc}")
            row["llc_seconds"] = time.perf_counter() - started
        out.append(row)
    return out


def summarise(rows: list[dict], seeds: int) -> dict:
    """Collapse, boundary drift and cross-cell Spearman rho, per seed then across seeds."""
    per_seed = []
    for seed in range(seeds):
        rs = [row for row in rows if row["seed"] == seed]
        lam = np.array([row["lambda"] for row in rs])
        b1 = np.array([row["lambda_min_h1"] for row in rs])
        b2 = np.array([row["lambda_min_h2"] for row in rs])
        dead = np.array([row["deficit"] >= 1 for row in rs])
        rho = {
            key: spearman(np.array([row[key] for row in rs], dtype=float), lam) for key in READINGS
        }
        if any(row["llc"] is not None for row in rs):
            rho["llc"] = spearman(np.array([row["llc"] or np.nan for row in rs]), lam)
        within = []
        for hidden in sorted({row["H"] for row in rs}):
            sub = [row for row in rs if row["H"] == hidden]
            if len(sub) >= 3:
                within.append(
                    spearman(
                        np.array([row["lambda_min_h1"] for row in sub]),
                        np.array([row["lambda"] for row in sub]),
                    )
                )
        per_seed.append(
            {
                "collapse_median": float(np.median(b1[~dead]) / np.median(b1[dead])),
                "collapse_worst": float(b1[~dead].min() / b1[dead].max()),
                "boundary_drift": float((b2.max() - b2.min()) / b2.mean()),
                "bottleneck_drift": float((b1.max() - b1.min()) / b1.mean()),
                "rho": rho,
                "rho_within_width_lambda_min_h1": float(np.mean(within)) if within else None,
            }
        )

    def spread(values: list[float]) -> dict:
        arr = np.asarray(values, dtype=float)
        return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}

    keys = per_seed[0]["rho"].keys()
    return {
        "collapse_median": spread([s["collapse_median"] for s in per_seed]),
        "collapse_worst": spread([s["collapse_worst"] for s in per_seed]),
        "boundary_drift": spread([s["boundary_drift"] for s in per_seed]),
        "bottleneck_drift": spread([s["bottleneck_drift"] for s in per_seed]),
        "rho": {k: spread([s["rho"][k] for s in per_seed]) for k in keys},
        "rho_within_width_lambda_min_h1": spread(
            [s["rho_within_width_lambda_min_h1"] for s in per_seed]
        ),
        "grad_norm_max": max(row["grad_norm"] for row in rows),
    }


def fmt(value: float | None, spec: str = ".3e") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small run for tests (n=1000, 1 seed)")
    ap.add_argument("--n", type=int, default=4000, help="samples per cell")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--M", type=int, default=10)
    ap.add_argument("--N", type=int, default=5)
    ap.add_argument("--with-r0", action="store_true", help="add the r = 0 cells")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--llc", choices=("auto", "off"), default="auto")
    ap.add_argument("--llc-lr", type=float, default=1e-6)
    ap.add_argument("--llc-nbeta", type=float, default=None, help="default n / log n")
    ap.add_argument("--llc-chains", type=int, default=4)
    ap.add_argument("--llc-draws", type=int, default=200)
    ap.add_argument("--llc-localization", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.seeds = 1000, 1
    if args.M != 10 or args.N != 5:
        print(f"note: M={args.M}, N={args.N} is not the paper's grid (M=10, N=5)")

    started = time.perf_counter()
    cells = grid(args.with_r0)
    use_llc = args.llc == "auto" and llc_available()
    rows = [row for seed in range(args.seeds) for row in run_seed(seed, cells, args, use_llc)]
    summary = summarise(rows, args.seeds)
    seconds = time.perf_counter() - started

    print(
        f"reduced-rank regression, M={args.M}, N={args.N}, sigma={args.sigma}, n={args.n}, "
        f"{len(cells)} cells x {args.seeds} seed(s); closed-form balanced fit "
        f"(max grad norm {summary['grad_norm_max']:.1e})"
    )
    print("per cell: median over seeds; lambda from Aoyagi & Watanabe (2005)\n")
    head = (
        f"{'H':>2} {'r':>2} {'lambda':>6} {'H-r':>3} | {'l+min(G_h1)':>11} {'l+min(G_h2)':>12} | "
        f"{'smin(X_h1)':>10} {'logdet(G_h1)':>12} {'smin(X_h2)':>10} | {'DDS s':>6}"
    )
    if use_llc:
        head += f" | {'LLC':>7} {'LLC s':>7}"
    print(head)
    print("-" * len(head))
    for hidden, r in cells:
        sub = [row for row in rows if row["H"] == hidden and row["r"] == r]

        def med(key: str, sub: list[dict] = sub) -> float | None:
            vals = [row[key] for row in sub if row[key] is not None]
            return float(np.median(vals)) if vals else None

        line = (
            f"{hidden:>2} {r:>2} {sub[0]['lambda']:>6.2f} {hidden - r:>3} | "
            f"{fmt(med('lambda_min_h1')):>11} {fmt(med('lambda_min_h2'), '.6e'):>12} | "
            f"{fmt(med('sigma_min_x_h1')):>10} {fmt(med('logdet_h1'), '.2f'):>12} "
            f"{fmt(med('sigma_min_x_h2_with_zeros')):>10} | {fmt(med('dds_seconds'), '.3f'):>6}"
        )
        if use_llc:
            line += f" | {fmt(med('llc'), '.2f'):>7} {fmt(med('llc_seconds'), '.1f'):>7}"
        print(line)

    s = summary
    print(
        f"\nbottleneck collapse, median(l+min | H-r = 0) / median(l+min | H-r >= 1): "
        f"{s['collapse_median']['median']:.0f}x "
        f"(seeds {s['collapse_median']['min']:.0f}-{s['collapse_median']['max']:.0f}x; "
        f"paper ~{PAPER['collapse']:.0f}x)"
    )
    print(
        f"worst-case gap, min(l+min | H-r = 0) / max(l+min | H-r >= 1): "
        f"{s['collapse_worst']['median']:.0f}x (lowest seed {s['collapse_worst']['min']:.0f}x)"
    )
    print(
        f"boundary layer h2 drift across cells, (max - min) / mean of l+min(G_h2): "
        f"{100 * s['boundary_drift']['median']:.2f}% (worst seed "
        f"{100 * s['boundary_drift']['max']:.2f}%; paper < 0.3%); "
        f"bottleneck h1 drift {100 * s['bottleneck_drift']['median']:.0f}%"
    )
    print(f"\nSpearman rho against closed-form lambda across the {len(cells)} cells:")
    for key, label in READINGS.items():
        rho = s["rho"][key]
        paper = PAPER["rho"].get(key)
        print(
            f"  {label:<34} {rho['median']:+.3f}  [{rho['min']:+.3f}, {rho['max']:+.3f}]"
            + ("" if paper is None else f"   paper (14 cells) {paper:+.3f}")
        )
    if "llc" in s["rho"]:
        print(f"  {'LLC (devinterp)':<34} {s['rho']['llc']['median']:+.3f}")
    within = s["rho_within_width_lambda_min_h1"]
    print(
        f"  {'lambda+_min(G_h1) within each H>=3':<34} {within['median']:+.3f}  (mean over H of "
        f"rho across r)"
    )
    if use_llc:
        dds = sum(row["dds_seconds"] for row in rows)
        llc_s = sum(row["llc_seconds"] or 0.0 for row in rows)
        print(f"\nwall time, all cells: DDS {dds:.2f} s, LLC {llc_s:.1f} s")
    else:
        print(
            "\nLLC: skipped (devinterp not installed). To compare with calibrated LLC: "
            "pip install 'ddsmon[llc]' (devinterp>=2.0, with datasets) and rerun; "
            "tune --llc-lr / --llc-nbeta."
        )
    print(f"total {seconds:.1f} s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        "M": args.M,
                        "N": args.N,
                        "sigma": args.sigma,
                        "n": args.n,
                        "seeds": args.seeds,
                        "cells": cells,
                        "fit": "closed-form reduced-rank regression, balanced factorisation",
                    },
                    "rows": rows,
                    "summary": summary,
                    "paper": PAPER,
                    "llc": "ran" if use_llc else "skipped",
                    "seconds": seconds,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
