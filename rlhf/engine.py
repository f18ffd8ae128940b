"""The distributed engine every training stage runs under: Hugging Face Accelerate, and
PyTorch's FSDP2 for sharding.

One process by default; `accelerate launch` (or torchrun) with several processes gives DDP:
every model whole on every process. `train.sharding=fsdp` shards them instead with FSDP2
(`fully_shard`): each transformer block is a unit whose parameters (and, for a trained model,
gradients and optimizer state) are split over the processes and gathered for its forward and
backward only. Accelerate runs FSDP on GPUs alone (on CPU it silently runs DDP), so the
sharding is applied here, the same code on gloo (CPU) and NCCL (GPUs); Accelerate still owns
the process group, devices, autocast and the RNG states of a checkpoint.

Only the main process writes outputs; every process takes part in a checkpoint (save and exact
resume: `rlhf.checkpoints`). A sharded checkpoint holds the whole model and optimizer state,
gathered collectively, so it resumes on any number of processes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, convert_to_fp32, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from rlhf.config import TrainConfig
from rlhf.errors import ParamsError


class Engine(Accelerator):
    """Accelerate's Accelerator, and `train.sharding`: with `fsdp`, `prepare_training` shards
    instead of wrapping in DDP, and a checkpoint saves and loads the sharded state."""

    def __init__(self, sharding: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.sharding = sharding
        self._sharded: Optional[tuple[nn.Module, Any, Any]] = None  # model, optimizer, scheduler

    @property
    def splits_weights(self) -> bool:
        """Whether models are split over processes (FSDP on more than one process)."""
        return self.sharding == "fsdp" and self.num_processes > 1

    def shard(self, module: nn.Module, *methods: str) -> nn.Module:
        """Shard `module` in place (each transformer block a unit, `module` the root unit
        of the rest), or move it to the device where nothing is split. Methods other than
        forward that run it (`generate`) gather its root's weights too. Call on each model a
        stage calls directly, before making an optimizer over it."""
        if not self.splits_weights:
            return module.to(self.device)
        blocks = {name for m in module.modules()
                  for name in getattr(m, "_no_split_modules", None) or ()}
        for block in [m for m in module.modules() if type(m).__name__ in blocks]:
            fully_shard(block)
        fully_shard(module)
        for method in methods:
            register_fsdp_forward_method(module, method)
        return module

    def prepare_training(self, model: nn.Module, optimizer, scheduler):
        """Accelerate's `prepare` (DDP where there are several processes), or, sharded, the
        objects as they are: FSDP syncs the gradients, and `save_state` saves them whole."""
        if self.sharding != "fsdp":
            return self.prepare(model, optimizer, scheduler)
        if self.mixed_precision != "no":  # what `prepare` does to a model's forward
            forward = model.forward

            def autocast_forward(*args, **kwargs):
                with self.autocast():
                    return convert_to_fp32(forward(*args, **kwargs))

            model.forward = autocast_forward
        self._sharded = (model, optimizer, scheduler)
        return model, optimizer, scheduler

    def whole(self, model: nn.Module, build: Callable[[], nn.Module],
              everywhere: bool = False) -> Optional[nn.Module]:
        """`model` with all its weights, to save (on the main process, None elsewhere) or,
        `everywhere`, to evaluate (on every process, on its device): itself where nothing is
        split, else a fresh `build()` (the model as built before training) loaded with the
        weights gathered from every process (a collective). To save, the gathered weights stay
        in the main process's CPU memory, so no GPU holds a whole model beside its shards."""
        if not self.splits_weights:
            return self.unwrap_model(model)
        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=not everywhere))
        if not (everywhere or self.is_main_process):
            return None
        fresh = build().to(self.device) if everywhere else build()
        fresh.load_state_dict(state)  # copies each tensor to where the fresh model's is
        return fresh

    def save_state(self, output_dir: str, **kwargs: Any):
        out = super().save_state(output_dir, **kwargs)
        if self._sharded is not None:
            model, optimizer, scheduler = self._sharded
            weights, moments = get_state_dict(model, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))  # whole, on the main process only
            if self.is_main_process:
                folder = Path(output_dir)
                save_file(_unshared(weights), folder / SHARDED_FILES[0])
                torch.save(moments, folder / SHARDED_FILES[1])
                torch.save(scheduler.state_dict(), folder / SHARDED_FILES[2])
            self.wait_for_everyone()
        return out

    def load_state(self, input_dir: str, **kwargs: Any):
        out = super().load_state(input_dir, **kwargs)
        if self._sharded is not None:
            model, optimizer, scheduler = self._sharded
            folder = Path(input_dir)
            # Every process reads the whole state and keeps its own shard of it.
            set_state_dict(model, optimizer,
                           model_state_dict=load_file(folder / SHARDED_FILES[0]),
                           optim_state_dict=torch.load(folder / SHARDED_FILES[1],
                                                       weights_only=True),
                           options=StateDictOptions(full_state_dict=True))
            scheduler.load_state_dict(torch.load(folder / SHARDED_FILES[2], weights_only=True))
        return out


SHARDED_FILES = ("sharded_model.safetensors", "sharded_optimizer.bin", "sharded_scheduler.bin")
"""A sharded run's model, optimizer and scheduler in a checkpoint, whole."""


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights (embeddings and LM head) are one tensor under two names; safetensors
    # stores each name's own copy.
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        pointer = tensor.data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return out


def make_accelerator(cfg: TrainConfig, seed_offset: int = 0) -> Engine:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed + seed_offset)
    # Not Accelerate's own "no": YAML 1.1 dumpers (DVC's `exp run -S`) rewrite it as false.
    mixed_precision = "no" if cfg.precision == "fp32" else cfg.precision
    # With no GPU, a launched multi-process run is MULTI_CPU on gloo (Accelerator(cpu=True)).
    # split_batches: a stage's batch_size is the global batch, which the ranks share
    # (rlhf.distributed); Accelerate then steps a prepared scheduler once per optimizer step,
    # not once per process.
    accelerator = Engine(cfg.sharding, cpu=cfg.cpu or not torch.cuda.is_available(),
                         mixed_precision=mixed_precision,
                         dataloader_config=DataLoaderConfiguration(split_batches=True))
    # An Accelerate config asking for a sharded engine reaches the ranks as these variables.
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true":
            check_engine_runs(engine, accelerator.distributed_type.value)
    return accelerator


def check_engine_runs(asked: str, runs: str) -> None:
    """An Accelerate config asking for FSDP is an error: Accelerate would run it on GPUs only
    (without them DDP, every model whole on every process), and never shards the frozen
    models; `train.sharding=fsdp` shards them all, anywhere. DeepSpeed runs on GPUs only."""
    if asked == "FSDP":
        raise ParamsError(
            "the Accelerate config asks for FSDP, which rlhf does itself: set "
            "train.sharding=fsdp (FSDP2 on CPU and GPUs alike) and drop the FSDP config")
    if asked == "DEEPSPEED" and runs != asked:
        raise ParamsError(
            f"the Accelerate config asks for DeepSpeed, which Accelerate runs on GPUs only; here "
            f"it would run {runs} instead, every model whole on every process: run on GPUs, "
            "use train.sharding=fsdp, or drop train.accelerate_config for DDP")


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (one kernel per step over every tensor on CPU and
    GPU alike; the default runs several ops per tensor, a tenth of a small model's step)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def adamw_with_cosine_schedule(model: torch.nn.Module, cfg: Any, steps_per_epoch: int):
    """AdamW over the trainable parameters, with linear warmup then cosine decay over
    `cfg.epochs` passes of `steps_per_epoch` steps; returns (optimizer, scheduler, total steps).

    `cfg` is a stage section with `epochs`, `lr`, `weight_decay` and `warmup_ratio` (sft, reward).
    """
    # Here, not at the top: a launcher process imports this module for its checks alone, and
    # transformers would cost it two seconds.
    from transformers import get_cosine_schedule_with_warmup

    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                      weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler, total_steps
