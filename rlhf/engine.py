"""The distributed engine every training stage runs under: Hugging Face Accelerate.

One process by default; `accelerate launch` (or torchrun) with several processes gives DDP,
and an Accelerate config gives DeepSpeed or FSDP on GPUs, without changes to the stages.
Only the main process writes outputs; every process takes part in a checkpoint (save
and exact resume: `rlhf.checkpoints`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup

from rlhf.config import TrainConfig
from rlhf.errors import ParamsError


def make_accelerator(cfg: TrainConfig, seed_offset: int = 0) -> Accelerator:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed + seed_offset)
    # Not Accelerate's own "no": YAML 1.1 dumpers (DVC's `exp run -S`) rewrite it as false.
    mixed_precision = "no" if cfg.precision == "fp32" else cfg.precision
    # With no GPU, a launched multi-process run is MULTI_CPU on gloo (Accelerator(cpu=True)).
    # split_batches: a stage's batch_size is the global batch, which the ranks share
    # (rlhf.distributed); Accelerate then steps a prepared scheduler once per optimizer step,
    # not once per process.
    accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(),
                              mixed_precision=mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    # An Accelerate config asking for a sharded engine reaches the ranks as these variables.
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true":
            check_engine_runs(engine, accelerator.distributed_type.value)
    return accelerator


def check_engine_runs(asked: str, runs: str) -> None:
    """A sharded engine (FSDP, DeepSpeed) that would not be the one running is an error:
    without GPUs Accelerate ignores it and runs DDP, every model whole on every process."""
    if asked in ("FSDP", "DEEPSPEED") and runs != asked:
        raise ParamsError(
            f"the Accelerate config asks for {asked}, which Accelerate runs on GPUs only; here "
            f"it would run {runs} instead, every model whole on every process: run on GPUs, "
            "or drop train.accelerate_config for DDP")


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (one kernel per step over every tensor on CPU and
    GPU alike; the default runs several ops per tensor, a tenth of a small model's step)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def adamw_with_cosine_schedule(model: torch.nn.Module, cfg: Any, steps_per_epoch: int):
    """AdamW over the trainable parameters, with linear warmup then cosine decay over
    `cfg.epochs` passes of `steps_per_epoch` steps; returns (optimizer, scheduler, total steps).

    `cfg` is a stage section with `epochs`, `lr`, `weight_decay` and `warmup_ratio` (sft, reward).
    """
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                      weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler, total_steps
