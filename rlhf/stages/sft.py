"""Stage `sft`: supervised fine-tuning of the base model on the demonstrations.

Causal-LM loss on the response tokens only (prompt tokens are masked out of the labels),
averaged over the tokens of the global batch: with `train.num_processes` > 1 each rank
trains on its shard of every batch (`rlhf.distributed`), and the all-reduced gradient is the
one a single process computes.
Writes the policy initialisation to `models/sft/` and `metrics/sft.json`, and every
`sft.checkpoint_every` steps a checkpoint under `checkpoints/sft/` from which a rerun resumes
exactly, mid-epoch included (`rlhf.checkpoints`).

With `model.lora`, the base is frozen and LoRA adapters are trained; they are merged into the
weights before saving, so `models/sft/` is a plain Hugging Face model either way.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from rlhf import checkpoints as ckpt
from rlhf import distributed as dist
from rlhf.config import Params
from rlhf.data.tokenize import IGNORE_INDEX, collate_sft, encode_sft
from rlhf.engine import adamw_with_cosine_schedule, make_accelerator
from rlhf.errors import DataError
from rlhf.io import atomic_dir, read_jsonl, write_json
from rlhf.models import lora
from rlhf.models.base import resolve_base_model
from rlhf.models.loading import load_causal_lm, load_tokenizer, position_kwargs
from rlhf.paths import Paths
from rlhf.tracking import MetricsLogger, NullLogger
from rlhf.training import train_epochs


def summed_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over labelled tokens of -log p(token): the logit at t predicts the label at t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def accumulate_gradients(model, batch: dict, accelerator, grad_accum: int) -> float:
    """Backward passes over this rank's shard of a global batch, micro-batch by micro-batch,
    of the loss summed per token / the global batch's token count (times the world size, which
    DDP's averaging divides out). Returns the global batch's mean token loss."""
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    rows = dist.shard_slice(len(batch["labels"]), accelerator)
    parts = dist.micro_slices(rows.stop - rows.start, grad_accum)
    total = 0.0
    for i, part in enumerate(parts):
        micro = {k: v[rows][part].to(accelerator.device) for k, v in batch.items()}
        with dist.sync_gradients_if(i == len(parts) - 1, accelerator, model):
            logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"],
                           **position_kwargs(model, micro["attention_mask"]),
                           use_cache=False).logits
            loss = summed_token_nll(logits, micro["labels"]) / max(1, n_tokens)
            accelerator.backward(loss * accelerator.num_processes)
        total += loss.item()
    return dist.sum_over_ranks(accelerator, total).item()


FINGERPRINT_PARAMS = ("model", "train", "sft")
"""The params an SFT checkpoint must agree on to be resumed."""


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    cfg = params.sft
    rows = read_jsonl(paths.prepared / "sft.jsonl", produced_by="prepare")
    if len(rows) < cfg.batch_size:  # drop_last would leave no batch at all
        raise DataError(f"{len(rows)} SFT demonstrations are fewer than sft.batch_size "
                        f"({cfg.batch_size}); lower sft.batch_size to at most {len(rows)} "
                        "or add demonstrations")
    accelerator = make_accelerator(params.train)
    dist.check_batches("sft", params, accelerator.num_processes)
    # Rank 0 writes models/base; the others read it once it is there.
    base = resolve_base_model(params.model, paths, write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    # model.revision pins a hub base model (a local folder, models/base included, ignores it).
    tokenizer = load_tokenizer(base, params.model.trust_remote_code, params.model.revision)

    def build() -> torch.nn.Module:
        model = lora.prepare_for_training(load_causal_lm(base, params.model.trust_remote_code,
                                                         params.model.revision), params.model)
        return lora.add_adapters(model, params.model, "CAUSAL_LM") if params.model.lora else model

    model = accelerator.shard(build())

    examples = [encode_sft(tokenizer, row["prompt"], row["completion"]) for row in rows]
    # Not prepared by Accelerate: every rank reads the same global batches and takes its shard.
    loader = DataLoader(examples, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=partial(collate_sft, pad_token_id=tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(params.train.seed))
    optimizer, scheduler, total_steps = adamw_with_cosine_schedule(model, cfg, len(loader))
    model, optimizer, scheduler = accelerator.prepare_training(model, optimizer, scheduler)

    # Resume from the newest checkpoint of an interrupted run with the same params and inputs.
    checkpoints = ckpt.Checkpoints(
        paths.checkpoints / "sft",
        ckpt.fingerprint(params.flat(), FINGERPRINT_PARAMS, [paths.prepared / "sft.jsonl", Path(base)],
                         paths.root),
        params.train.checkpoint_keep, tracking_run_id=getattr(logger, "run_id", None))
    losses, step, seconds = train_epochs(
        "sft", model, loader, optimizer, scheduler, accelerator, checkpoints, total_steps, logger,
        train_step=lambda batch: accumulate_gradients(model, batch, accelerator,
                                                      params.train.grad_accum),
        loss_of=float, recent_metrics=lambda recent: {"sft/loss": sum(recent) / len(recent)},
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, history_key="losses")

    window = max(1, min(50, len(losses) // 4))
    metrics = {
        "sft/loss_first": sum(losses[:window]) / window,
        "sft/loss_final": sum(losses[-window:]) / window,
        "sft/steps": float(step),
        "sft/seconds": seconds,
        "sft/world_size": float(accelerator.num_processes),
    }
    trained = accelerator.whole(model, build)
    if accelerator.is_main_process:
        with atomic_dir(paths.sft) as out:
            lora.restore_config(lora.merged(trained)).save_pretrained(out)
            tokenizer.save_pretrained(out)
        write_json(paths.metrics_file("sft"), {**metrics, "sft/sharding": accelerator.sharding})
    checkpoints.finish(accelerator)
    logger.log_metrics(metrics)
    return metrics
