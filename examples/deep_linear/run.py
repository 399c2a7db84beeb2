"""Counting dead directions: the deep-linear bridge of the DDS paper's Figure 4.

A deep linear network ``f(x) = W_L ... W_1 x`` (L = 4 layers, width D = 20), MSE loss,
targets from a teacher of rank ``D - r`` plus Gaussian noise (sd 0.1). Every layer is
built as ``W_l = Q_l diag(s) Q_{l-1}^T`` with random orthogonal ``Q_0..Q_L``, so the
singular directions of consecutive layers chain-align; the teacher is
``T = Q_L diag(s^L with r zeros) Q_0^T``. The student equals the teacher except that the
``r`` smallest singular values of *every* layer are ``t`` instead of 0, and ``t`` runs
from ``10^-0.5`` down to ``10^-2``: a straight path into a singular set with ``r`` dead
directions.

Reading at the first hidden layer ``h1 = W_1 x`` (through ``ddsmon.compute_signatures``):
the per-sample output gradient there is ``delta = W_2^T ... W_L^T grad_out``, whose
component along each dead direction carries ``t^(L-1)``, so ``r`` eigenvalues of
``G = Delta^T Delta / n`` fall as ``t^(2(L-1)) = t^6`` together. Hence

* ``log det+(G)`` falls with slope ``2(L-1) r`` in ``log t``: the ratio to the ``r = 1``
  slope counts the dead directions (the paper reports 2.0 / 3.1 / 4.0 at r = 2, 3, 4);
* ``log lambda+_min(G)`` falls with slope ``2(L-1)`` whatever ``r`` is: rank-blind.

``ddsmon.dying_directions`` (what the daemon's event detector computes between
checkpoints, ``EventDetector.last_derived``) reads the same count from each pair of
consecutive points.

    python examples/deep_linear/run.py --out examples/deep_linear/out/figure4.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddsmon import compute_signatures, dying_directions
from ddsmon.signature import LayerSignature

PAPER_RATIOS = {1: 1.0, 2: 2.0, 3: 3.1, 4: 4.0}
PAPER_SLOPES_PER_DECADE = {1: 6.9, 2: 13.8, 3: 21.0, 4: 27.8}
LAYER = "h1"


def orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random d x d orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def deep_linear(weights: list[torch.Tensor]) -> nn.Sequential:
    """``nn.Sequential`` of bias-free Linear layers named h1..hL holding ``weights``."""
    model = nn.Sequential()
    for i, w in enumerate(weights, start=1):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(w)
        model.add_module(f"h{i}", layer)
    return model


def path_signatures(
    r: int, seed: int, ts: np.ndarray, *, depth: int, width: int, n: int, noise: float, device: str
) -> Iterator[LayerSignature]:
    """The reading at h1 at each point of the path t -> 0 for rank deficit r (one seed),
    as ``compute_signatures`` gives it: what a monitor would read at each checkpoint of a
    run walking into the singular set."""
    gen = torch.Generator().manual_seed(seed)
    qs = [orthogonal(width, gen) for _ in range(depth + 1)]
    s_live = torch.linspace(1.2, 0.8, width, dtype=torch.float64)
    x = torch.randn(n, width, generator=gen, dtype=torch.float64)
    eps = noise * torch.randn(n, width, generator=gen, dtype=torch.float64)
    s_teacher = s_live.clone()
    s_teacher[width - r :] = 0.0
    teacher = qs[depth] @ torch.diag(s_teacher**depth) @ qs[0].T
    y = x @ teacher.T + eps
    for t in ts:
        s = s_live.clone()
        s[width - r :] = float(t)
        weights = [qs[k + 1] @ torch.diag(s) @ qs[k].T for k in range(depth)]
        sig = compute_signatures(
            deep_linear(weights),
            x,
            y,
            loss="mse",
            layers=[LAYER],
            device=device,
            fisher="activation",
        )
        cur = sig.layers[LAYER]
        if cur.lambda_min is None or cur.logdet is None:
            raise RuntimeError(f"r={r} t={t:.3g}: layer {LAYER} has no resolved eigenvalue")
        yield cur


def sweep(
    r: int, seed: int, ts: np.ndarray, *, depth: int, width: int, n: int, noise: float, device: str
) -> dict[str, list[float]]:
    """Readings at h1 along the path t -> 0 for rank deficit r (one seed)."""
    out: dict[str, list[float]] = {"logdet": [], "log_lambda_min": [], "r_hat": [], "g_rank": []}
    prev = None
    path = path_signatures(r, seed, ts, depth=depth, width=width, n=n, noise=noise, device=device)
    for cur in path:
        assert cur.lambda_min is not None and cur.logdet is not None
        out["logdet"].append(cur.logdet)
        out["log_lambda_min"].append(math.log(cur.lambda_min))
        out["g_rank"].append(cur.g_rank)
        if prev is not None:
            r_hat = dying_directions(prev, cur)
            out["r_hat"].append(float("nan") if r_hat is None else r_hat)
        prev = cur
    return out


def slope(x: np.ndarray, y: list[float]) -> float:
    """Least-squares slope of y against x."""
    return float(np.polyfit(x, np.asarray(y), 1)[0])


def plot(path: Path, ts: np.ndarray, curves: dict[int, dict[str, list[float]]], depth: int) -> None:
    """Panels A (normalised log det+ descent per r) and B (log lambda+_min per r)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lt = np.log10(ts)
    per_decade = 2 * (depth - 1) * math.log(10.0)  # predicted r = 1 slope per decade
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
    for r, c in curves.items():
        ld = np.asarray(c["logdet"])
        ax_a.plot(lt, (ld - ld[0]) / per_decade, "o-", label=f"r = {r}")
        ax_b.plot(lt, np.asarray(c["log_lambda_min"]) / math.log(10.0), "o-", label=f"r = {r}")
    for ax in (ax_a, ax_b):
        ax.invert_xaxis()
        ax.set_xlabel("log10 t  (toward the singular set ->)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_a.set_ylabel(f"[log det+ G(t) - log det+ G(t0)] / ({2 * (depth - 1)} ln 10)")
    ax_a.set_title("A  log det+(G_h1): slope fans 1x/2x/3x/4x")
    ax_b.set_ylabel("log10 lambda+_min(G_h1)")
    ax_b.set_title("B  lambda+_min(G_h1): same slope for every r")
    fig.suptitle(f"deep linear net, L={depth}, layer h1: dead directions r = 1..{len(curves)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "figure4.png")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small run for tests (1 seed, 4 points)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--points", type=int, default=9, help="values of t on the log grid")
    ap.add_argument("--n", type=int, default=512, help="probe samples")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=20)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--max-r", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.points, args.n = 1, 4, 128
    if args.max_r < 1 or args.max_r >= args.width:
        ap.error(f"--max-r must be in 1..{args.width - 1}")
    if not args.noise > 0:
        # a noiseless student equal to the teacher has zero residual on the live
        # directions: G then holds only the r dead eigenvalues and rounding noise
        ap.error("--noise must be > 0 (the live directions of G are the noise's covariance)")
    if args.depth < 2:
        ap.error("--depth must be >= 2 (h1 needs a layer above it)")

    started = time.perf_counter()
    ts = np.logspace(-0.5, -2.0, args.points)
    lnt = np.log(ts)
    rs = list(range(1, args.max_r + 1))
    runs = {
        r: [
            sweep(
                r,
                seed,
                ts,
                depth=args.depth,
                width=args.width,
                n=args.n,
                noise=args.noise,
                device=args.device,
            )
            for seed in range(args.seeds)
        ]
        for r in rs
    }
    ld_slopes = {r: [slope(lnt, c["logdet"]) for c in runs[r]] for r in rs}
    lm_slopes = {r: [slope(lnt, c["log_lambda_min"]) for c in runs[r]] for r in rs}
    rows = []
    for r in rs:
        ld_ratio = [a / b for a, b in zip(ld_slopes[r], ld_slopes[1])]
        lm_ratio = [a / b for a, b in zip(lm_slopes[r], lm_slopes[1])]
        r_hat = [v for c in runs[r] for v in c["r_hat"]]
        rows.append(
            {
                "r": r,
                "logdet_slope": float(np.mean(ld_slopes[r])),
                "logdet_slope_per_decade": float(np.mean(ld_slopes[r]) * math.log(10.0)),
                "ratio": float(np.mean(ld_ratio)),
                "ratio_sd": float(np.std(ld_ratio)),
                "paper_ratio": PAPER_RATIOS.get(r),
                "paper_slope_per_decade": PAPER_SLOPES_PER_DECADE.get(r),
                "predicted_slope": 2 * (args.depth - 1) * r,
                "lambda_min_slope": float(np.mean(lm_slopes[r])),
                "lambda_min_ratio": float(np.mean(lm_ratio)),
                "r_hat_median": float(np.nanmedian(r_hat)) if r_hat else None,
                "g_rank": sorted({g for c in runs[r] for g in c["g_rank"]}),
            }
        )

    print(
        f"deep linear net: L={args.depth}, D={args.width}, MSE, noise {args.noise}, "
        f"n={args.n}, layer {LAYER}; t = 10^-0.5 .. 10^-2 ({args.points} points), "
        f"{args.seeds} seed(s)"
    )
    print("slopes are d(.)/d(ln t) of natural logs; predicted 2(L-1) r for log det+, 2(L-1) for")
    print("log lambda+_min. r_hat: ddsmon.dying_directions between consecutive points.\n")
    head = (
        f"{'r':>2} | {'logdet slope':>12} | {'ratio to r=1':>14} | {'paper':>5} | "
        f"{'r_hat':>6} | {'log lmin slope':>14} | {'ratio to r=1':>12}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        paper = "" if row["paper_ratio"] is None else f"{row['paper_ratio']:.1f}"
        r_hat = "" if row["r_hat_median"] is None else f"{row['r_hat_median']:.3f}"
        print(
            f"{row['r']:>2} | {row['logdet_slope']:>12.3f} | "
            f"{row['ratio']:>7.3f} ± {row['ratio_sd']:.3f} | {paper:>5} | {r_hat:>6} | "
            f"{row['lambda_min_slope']:>14.3f} | {row['lambda_min_ratio']:>12.3f}"
        )
    per_dec = ", ".join(f"{row['logdet_slope_per_decade']:.1f}" for row in rows)
    paper_dec = ", ".join(
        f"{PAPER_SLOPES_PER_DECADE[r]}" for r in rs if r in PAPER_SLOPES_PER_DECADE
    )
    print(f"\nlog det+ slope per decade of t: {per_dec} (paper's Figure 4A quotes {paper_dec})")

    plot(args.out, ts, {r: runs[r][0] for r in rs}, args.depth)
    seconds = time.perf_counter() - started
    print(f"figure: {args.out}   ({seconds:.1f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        "depth": args.depth,
                        "width": args.width,
                        "n": args.n,
                        "noise": args.noise,
                        "seeds": args.seeds,
                        "t": ts.tolist(),
                        "layer": LAYER,
                    },
                    "rows": rows,
                    "figure": str(args.out),
                    "seconds": seconds,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
