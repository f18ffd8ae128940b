"""The resumable epoch loop of the stages that train on a fixed data set (`sft`, `reward`).

Each stage brings its step and its metrics; the loop, per-step history, logging, progress bar
and checkpoints (a rerun resumes exactly, mid-epoch included: `rlhf.checkpoints`) are shared.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from torch.utils.data import DataLoader

from rlhf import checkpoints as ckpt
from rlhf.progress import progress_bar
from rlhf.tracking import MetricsLogger


def train_epochs(stage: str, model, loader: DataLoader, optimizer, scheduler, accelerator,
                 checkpoints: ckpt.Checkpoints, total_steps: int, logger: MetricsLogger, *,
                 train_step: Callable[[Any], Any], loss_of: Callable[[Any], float],
                 recent_metrics: Callable[[list], dict], log_every: int, checkpoint_every: int,
                 history_key: str) -> tuple[list, int, float]:
    """`total_steps` optimizer steps over epochs of `loader` (shuffled by its `generator`),
    resumed from the newest checkpoint. `train_step(batch)` does the backward passes and returns
    the step's record; `loss_of(record)` goes on the progress bar; `recent_metrics` of the last
    `log_every` records are logged. Returns (history: a record per step, step, seconds trained)."""
    history, step, skip = [], 0, 0
    resumed = checkpoints.resume(accelerator)
    if resumed is not None:
        history, step, skip = resumed[history_key], resumed["step"], resumed["batches_into_epoch"]
        # Replay the interrupted epoch's shuffle from its start, then skip what was done.
        ckpt.set_generator_state(loader.generator, resumed["epoch_shuffler"])

    model.train()
    start = time.perf_counter()
    with progress_bar(stage, total_steps, completed=step) as bar:
        while step < total_steps:
            epoch_shuffler = ckpt.generator_state(loader.generator)
            for index, batch in enumerate(loader):
                if index < skip:
                    continue
                record = train_step(batch)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                history.append(record)
                if step % log_every == 0 or step == total_steps:
                    logger.log_metrics({**recent_metrics(history[-log_every:]),
                                        f"{stage}/lr": scheduler.get_last_lr()[0]}, step=step)
                bar.advance(f"loss {loss_of(record):.3f}")
                if step % checkpoint_every == 0 or step == total_steps:
                    checkpoints.save(accelerator, step, {
                        history_key: history, "epoch_shuffler": epoch_shuffler,
                        "batches_into_epoch": index + 1})
                if step >= total_steps:
                    break
            skip = 0
    return history, step, time.perf_counter() - start
