"""Train the modular-addition MLP full batch with AdamW, writing a checkpoint every K steps.

With weight decay (default 1.0) the model memorises its training pairs within about 100
steps and generalises to the held-out pairs only hundreds of steps later (grokking);
with ``--weight-decay 0`` (the control) it memorises and never generalises.

Each checkpoint is ``DIR/step_XXXXXX.pt`` holding
``{"model": state_dict, "step", "train_acc", "val_acc", "loss", "val_loss"}``, written
atomically (a temporary dot-name, then ``os.replace``) so a watcher never sees half a
file. The probe ddsmon reads every checkpoint with, ``{"inputs": (n, 2) int64,
"targets": (n,) int64}``, is written before the first step to ``--probe-out``
(default ``probe.pt`` beside DIR, so it is not taken for a checkpoint). It is a fixed
random sample of *all* p^2 pairs, about half of them held out from training: the
held-out pairs' gradients are what changes when the model generalises.

    python examples/modular_addition/train.py --out runs/grok/ckpts
    python examples/modular_addition/train.py --out runs/control/ckpts --weight-decay 0
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import ModularAdditionMLP, P

__all__ = ("all_pairs", "main", "make_probe", "make_split", "train")

log = logging.getLogger("modular_addition.train")

#: Seed of the probe sample: the same probe for every run and seed.
PROBE_SEED = 1234


def all_pairs(p: int) -> tuple[Tensor, Tensor]:
    """Every pair ``(a, b)`` in row-major order, (p^2, 2) int64, and ``(a + b) mod p``."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten()], dim=1)
    return x, (x[:, 0] + x[:, 1]) % p


def make_split(p: int, train_frac: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All p^2 pairs split at random: ``(x_train, y_train, x_val, y_val)``."""
    x, y = all_pairs(p)
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_frac * p * p)
    tr, va = order[:n_train], order[n_train:]
    return x[tr], y[tr], x[va], y[va]


def make_probe(p: int, size: int = 256) -> dict[str, Tensor]:
    """A fixed sample of ``size`` pairs out of all p^2 (independent of the split)."""
    x, y = all_pairs(p)
    pick = torch.randperm(p * p, generator=torch.Generator().manual_seed(PROBE_SEED))
    pick = pick[: min(size, p * p)].sort().values
    return {"inputs": x[pick].clone(), "targets": y[pick].clone()}


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).double().mean().item()


def train(
    out: Path,
    *,
    steps: int = 1000,
    every: int = 25,
    weight_decay: float = 1.0,
    lr: float = 1e-2,
    seed: int = 0,
    p: int = P,
    train_frac: float = 0.5,
    probe_out: Path | None = None,
    probe_size: int = 256,
    delay: float = 0.0,
    init: Path | None = None,
) -> list[dict[str, float]]:
    """Train and checkpoint; return one ``{"step", "train_acc", "val_acc", "loss",
    "val_loss"}`` row per checkpoint. ``delay`` sleeps that many seconds after each
    checkpoint (to watch a run live). ``init``: a checkpoint of this script to start
    from (its weights and its step: ``steps`` more are trained, numbered on from it;
    the optimiser starts fresh), e.g. a converged model trained on at a small ``lr``."""
    if every <= 0 or steps < 0:
        raise ValueError(f"need every > 0 and steps >= 0, got every={every}, steps={steps}")
    out.mkdir(parents=True, exist_ok=True)
    probe_path = probe_out or out.parent / "probe.pt"
    probe_path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(make_probe(p, probe_size), probe_path)

    x_tr, y_tr, x_va, y_va = make_split(p, train_frac, seed)
    torch.manual_seed(seed)
    model = ModularAdditionMLP(p=p)
    first = 0
    if init is not None:
        start = torch.load(init, weights_only=True)
        model.load_state_dict(start["model"])
        first = int(start["step"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    history: list[dict[str, float]] = []
    for step in range(first, first + steps + 1):
        model.train()
        logits = model(x_tr)
        loss = F.cross_entropy(logits, y_tr)
        if (step - first) % every == 0 or step == first + steps:
            model.eval()
            with torch.no_grad():
                val_logits = model(x_va)
            row = {
                "step": step,
                "train_acc": _accuracy(logits.detach(), y_tr),
                "val_acc": _accuracy(val_logits, y_va),
                "loss": loss.item(),
                "val_loss": F.cross_entropy(val_logits, y_va).item(),
            }
            history.append(row)
            _save_atomic({"model": model.state_dict(), **row}, out / f"step_{step:06d}.pt")
            log.info(
                "step %6d  train_acc %.3f  val_acc %.3f  loss %.2e  val_loss %.2e",
                step, row["train_acc"], row["val_acc"], row["loss"], row["val_loss"],
            )  # fmt: skip
            if delay:
                time.sleep(delay)
        if step == first + steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=25, help="checkpoint every K steps")
    ap.add_argument("--weight-decay", type=float, default=1.0, help="0 gives the control run")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p", type=int, default=P, help="the modulus (the model's vocabulary)")
    ap.add_argument("--train-frac", type=float, default=0.5)
    ap.add_argument("--probe-out", type=Path, default=None, help="default: DIR/../probe.pt")
    ap.add_argument("--probe-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds to wait per checkpoint")
    ap.add_argument(
        "--init", type=Path, default=None, help="start from this checkpoint (weights and step)"
    )
    ap.add_argument(
        "--probe-only", action="store_true",
        help="write the probe and exit (to start the watcher, which needs it, before training)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.probe_only:
        probe_path = args.probe_out or args.out.parent / "probe.pt"
        probe_path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(make_probe(args.p, args.probe_size), probe_path)
        log.info("probe: %s", probe_path)
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    hist = train(
        args.out,
        steps=args.steps,
        every=args.every,
        weight_decay=args.weight_decay,
        lr=args.lr,
        seed=args.seed,
        p=args.p,
        train_frac=args.train_frac,
        probe_out=args.probe_out,
        probe_size=args.probe_size,
        delay=args.delay,
        init=args.init,
    )
    log.info("done: %d checkpoints in %.1f s", len(hist), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
