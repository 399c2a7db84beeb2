"""The training runs of ``bench_events.py`` beyond the modular-addition MLP, CPU-sized.

Each task trains one model and writes what the example's ``train`` writes: a checkpoint
``DIR/step_XXXXXX.pt`` every ``every`` steps holding ``{"model": state_dict, "step",
"train_acc", "val_acc", "loss", "val_loss", "lr"}`` (``loss`` the training loss of that
step's batch), and the fixed probe ``{"inputs", "targets"}`` ddsmon reads every
checkpoint with. :data:`TASKS` maps a task's name to it.

``parity``
    Sparse parity (Barak et al. 2022, "Hidden progress in deep learning: SGD learns
    parities near the computational limit"): ``n_bits`` = 40 uniform +-1 bits, the label
    the product of the first k = 3; a 2-layer ReLU MLP (width 256) trained by online
    SGD (a fresh batch of 32 each step, lr 0.05, cross-entropy over the two classes).
    The loss sits at ln 2 for thousands of steps, then falls within a few hundred.
    Validation: 4096 fresh samples; chance is 50%.
``transformer``
    A Nanda-style one-layer transformer (Nanda et al. 2023, "Progress measures for
    grokking via mechanistic interpretability") on ``a + b mod p`` (p = 53), tokens
    ``a, b, =``, d_model 64, 4 heads, a ReLU MLP of 256, no layer norm, logits read at
    ``=`` (only that position's attention and MLP are computed: the rest is unused);
    AdamW lr 3e-3 (a linear warm-up of 10 steps), weight decay 1.0, betas (0.9, 0.98),
    full batch on half of the p^2 pairs. The probe: 256 of all p^2 pairs. At seed 0 it
    memorises within 500 steps and groks near step 4000 (validation accuracy 0.52 at
    step 3000, 0.89 at 4000, 1.0 at 4500; 7000 steps took 843 s at a 1-minute load
    average of 7-14 on the shared 2-core machine). With
    d_model 128, lr 1e-3 and 40% of the pairs it had not grokked by step 4000
    (validation accuracy 0.35).
``schedule``
    An ordinary task: a 10-class Gaussian mixture in 32 dimensions (class means fixed,
    unit noise, the samples drawn per seed), 20000 training samples, minibatch SGD
    (batch 64, momentum 0.9) of a 2-layer MLP with a linear warm-up of the learning
    rate over the first 10% of the steps to 0.05 and a step decay (x0.1) at 50% and
    75%. It learns at once and smoothly (nothing to grok; validation accuracy about
    0.95); the schedule's steps jolt the training loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ("TASKS", "Task")

PROBE_SEED = 1234


@dataclass(frozen=True)
class Task:
    """A training run's recipe: ``train(dir, steps, every, seed)``, the zero-argument
    model factory ddsmon loads the checkpoints into, and validation accuracy at chance."""

    name: str
    train: Callable[[Path, int, int, int], None]
    make_model: Callable[[], nn.Module]
    chance: float


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).double().mean().item()


def _checkpoint(
    out: Path, model: nn.Module, step: int, loss: Tensor, logits: Tensor, y: Tensor,
    x_val: Tensor, y_val: Tensor, lr: float,
) -> None:  # fmt: skip
    model.eval()
    with torch.no_grad():
        val = model(x_val)
    model.train()
    row = {
        "step": step,
        "train_acc": _accuracy(logits.detach(), y),
        "val_acc": _accuracy(val, y_val),
        "loss": float(loss.item()),
        "val_loss": F.cross_entropy(val, y_val).item(),
        "lr": lr,
    }
    _save_atomic({"model": model.state_dict(), **row}, out / f"step_{step:06d}.pt")


# ------------------------------------------------------------------ sparse parity

N_BITS, K_BITS, PARITY_WIDTH = 40, 3, 256


def make_parity_model() -> nn.Module:
    return nn.Sequential(nn.Linear(N_BITS, PARITY_WIDTH), nn.ReLU(), nn.Linear(PARITY_WIDTH, 2))


def _parity_batch(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, 2, (n, N_BITS), generator=gen).float() * 2 - 1
    y = (x[:, :K_BITS].prod(1) > 0).long()
    return x, y


def train_parity(out: Path, steps: int, every: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x_probe, y_probe = _parity_batch(256, torch.Generator().manual_seed(PROBE_SEED))
    _save_atomic({"inputs": x_probe, "targets": y_probe}, out.parent / "probe.pt")
    x_val, y_val = _parity_batch(4096, torch.Generator().manual_seed(PROBE_SEED + 1))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_parity_model()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps + 1):
        x, y = _parity_batch(32, gen)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if step % every == 0:
            _checkpoint(out, model, step, loss, logits, y, x_val, y_val, lr)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# ------------------------------------------------------------------ one-layer transformer

P_MOD, D_MODEL, N_HEADS, D_MLP = 53, 64, 4, 256


class OneLayerTransformer(nn.Module):
    """Tokens (n, 3) -> logits (n, p) at the last position; every piece a named module
    (``embed``, ``q``, ``k``, ``v``, ``o``, ``mlp_in``, ``mlp_act``, ``mlp_out``,
    ``unembed``), so ddsmon reads each; the position embedding is a parameter."""

    def __init__(self, p: int = P_MOD, d: int = D_MODEL, heads: int = N_HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(p + 1, d)
        self.pos = nn.Parameter(torch.randn(3, d) / math.sqrt(d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.mlp_in = nn.Linear(d, D_MLP)
        self.mlp_act = nn.ReLU()
        self.mlp_out = nn.Linear(D_MLP, d)
        self.unembed = nn.Linear(d, p, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        n, t, d = h.shape
        hd = d // self.heads
        # one layer: only the last position's output is read, so only its query, its
        # attention and its MLP are computed (the other positions' outputs are unused)
        q = self.q(h[:, -1]).view(n, self.heads, 1, hd)
        k = self.k(h).view(n, t, self.heads, hd).transpose(1, 2)
        v = self.v(h).view(n, t, self.heads, hd).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1)
        last = h[:, -1] + self.o((att @ v).reshape(n, d))
        last = last + self.mlp_out(self.mlp_act(self.mlp_in(last)))
        return self.unembed(last)


def _all_sums(p: int) -> tuple[Tensor, Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    return x, (x[:, 0] + x[:, 1]) % p


def train_transformer(out: Path, steps: int, every: int, seed: int, frac: float = 0.5) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x, y = _all_sums(P_MOD)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(PROBE_SEED))[:256]
    pick = pick.sort().values
    _save_atomic({"inputs": x[pick].clone(), "targets": y[pick].clone()}, out.parent / "probe.pt")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = round(frac * len(x))
    x_tr, y_tr = x[order[:n_train]], y[order[:n_train]]
    x_va, y_va = x[order[n_train:]], y[order[n_train:]]
    torch.manual_seed(seed)
    model = OneLayerTransformer()
    base = 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=base, weight_decay=1.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for step in range(steps + 1):
        logits = model(x_tr)
        loss = F.cross_entropy(logits, y_tr)
        if step % every == 0:
            _checkpoint(out, model, step, loss, logits, y_tr, x_va, y_va, sched.get_last_lr()[0])
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


# ------------------------------------------------------------------ warm-up and step decay

MIX_DIM, MIX_CLASSES, MIX_WIDTH = 32, 10, 128


def make_mixture_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(MIX_DIM, MIX_WIDTH), nn.ReLU(), nn.Linear(MIX_WIDTH, MIX_CLASSES)
    )


def _mixture(n: int, means: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, MIX_CLASSES, (n,), generator=gen)
    return means[y] + torch.randn(n, MIX_DIM, generator=gen), y


def schedule_lr(step: int, steps: int, peak: float = 0.05) -> float:
    """A linear warm-up over the first 10% of the steps, then x0.1 at 50% and at 75%."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 if step >= steps // 2 else 1.0) * (0.1 if step >= 3 * steps // 4 else 1.0)


def train_schedule(out: Path, steps: int, every: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    means = 0.7 * torch.randn(MIX_CLASSES, MIX_DIM, generator=torch.Generator().manual_seed(7))
    x_probe, y_probe = _mixture(256, means, torch.Generator().manual_seed(PROBE_SEED))
    _save_atomic({"inputs": x_probe, "targets": y_probe}, out.parent / "probe.pt")
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = _mixture(20000, means, gen)
    x_va, y_va = _mixture(2000, means, gen)
    torch.manual_seed(seed)
    model = make_mixture_model()
    opt = torch.optim.SGD(model.parameters(), lr=schedule_lr(0, steps), momentum=0.9)
    for step in range(steps + 1):
        lr = schedule_lr(step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_tr), (64,), generator=gen)
        logits = model(x_tr[idx])
        loss = F.cross_entropy(logits, y_tr[idx])
        if step % every == 0:
            _checkpoint(out, model, step, loss, logits, y_tr[idx], x_va, y_va, lr)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


TASKS: dict[str, Task] = {
    "parity": Task("parity", train_parity, make_parity_model, 0.5),
    "transformer": Task("transformer", train_transformer, OneLayerTransformer, 1.0 / P_MOD),
    "schedule": Task("schedule", train_schedule, make_mixture_model, 1.0 / MIX_CLASSES),
}
