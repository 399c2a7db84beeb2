"""Train the tiny GPT-2 with transformers' Trainer, as a user's script would.

    python hf_train.py OUT MANIFEST [--max-steps 40] [--save-steps 5] [--logging-steps 3]
                       [--eval-steps 10] [--save-total-limit 2] [--slow-after 20]
                       [--step-seconds 0.15] [--hold STEP:FILE ...]

Writes ``checkpoint-N/`` folders into OUT (created by the Trainer) and appends one JSON
line per save to MANIFEST: ``{"step": N}`` (after the save and its rotation). Steps
after ``--slow-after`` sleep ``--step-seconds`` each. ``--hold STEP:FILE``: after the
save at STEP, wait until FILE exists (a test paces the trainer against its watcher).
One CPU thread, no downloads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import tiny_gpt2, token_data  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.seq = token_data(n, 7, seed)  # (n, 8) tokens

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.seq[i], "labels": self.seq[i]}


class Manifest(TrainerCallback):
    def __init__(self, path: Path, slow_after: int, seconds: float, holds: dict[int, Path]) -> None:
        self.path, self.slow_after, self.seconds, self.holds = path, slow_after, seconds, holds

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": state.global_step}) + "\n")
        gate = self.holds.get(state.global_step)
        deadline = time.monotonic() + 300
        while gate is not None and not gate.exists():
            if time.monotonic() > deadline:
                sys.exit(f"hf_train: {gate} did not appear within 300 s")
            time.sleep(0.05)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step > self.slow_after:
            time.sleep(self.seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--logging-steps", type=int, default=3)
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--save-total-limit", type=int, default=2)
    ap.add_argument("--slow-after", type=int, default=20)
    ap.add_argument("--step-seconds", type=float, default=0.15)
    ap.add_argument("--hold", action="append", default=[], metavar="STEP:FILE")
    a = ap.parse_args()
    holds = {int(h.split(":", 1)[0]): Path(h.split(":", 1)[1]) for h in a.hold}
    args = TrainingArguments(
        output_dir=str(a.out),
        max_steps=a.max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        logging_steps=a.logging_steps,
        save_steps=a.save_steps,
        save_total_limit=a.save_total_limit,
        eval_strategy="steps",
        eval_steps=a.eval_steps,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=tiny_gpt2(seed=0),
        args=args,
        train_dataset=Tokens(256, seed=1),
        eval_dataset=Tokens(16, seed=2),
        callbacks=[Manifest(a.manifest, a.slow_after, a.step_seconds, holds)],
    )
    trainer.train()


if __name__ == "__main__":
    main()
