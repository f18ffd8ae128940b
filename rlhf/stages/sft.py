"""Stage `sft`: supervised fine-tuning of the base model on the demonstrations.

Causal-LM loss on the response tokens only (prompt tokens are masked out of the labels).
Writes the policy initialisation to `models/sft/` and `metrics/sft.json`, and every
`sft.checkpoint_every` steps a checkpoint under `checkpoints/sft/` from which a rerun resumes
exactly, mid-epoch included (`rlhf.checkpoints`).

With `model.lora`, the base is frozen and LoRA adapters are trained; they are merged into the
weights before saving, so `models/sft/` is a plain Hugging Face model either way.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from rlhf import checkpoints as ckpt
from rlhf.config import Params
from rlhf.data.tokenize import collate_sft, encode_sft
from rlhf.engine import adamw_with_cosine_schedule, make_accelerator
from rlhf.errors import DataError
from rlhf.io import atomic_dir, read_jsonl, write_json
from rlhf.models import lora
from rlhf.models.base import resolve_base_model
from rlhf.models.loading import load_causal_lm, load_tokenizer, position_kwargs
from rlhf.paths import Paths
from rlhf.progress import progress_bar
from rlhf.tracking import MetricsLogger, NullLogger


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
    base = resolve_base_model(params.model, paths)
    # model.revision pins a hub base model (a local folder, models/base included, ignores it).
    tokenizer = load_tokenizer(base, params.model.trust_remote_code, params.model.revision)
    model = lora.prepare_for_training(load_causal_lm(base, params.model.trust_remote_code,
                                                     params.model.revision),
                                      params.model)
    if params.model.lora:
        model = lora.add_adapters(model, params.model, "CAUSAL_LM")

    examples = [encode_sft(tokenizer, row["prompt"], row["completion"]) for row in rows]
    shuffler = torch.Generator().manual_seed(params.train.seed)
    loader = DataLoader(examples, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=partial(collate_sft, pad_token_id=tokenizer.pad_token_id),
                        generator=shuffler)
    optimizer, scheduler, total_steps = adamw_with_cosine_schedule(model, cfg, len(loader))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # Resume from the newest checkpoint of an interrupted run with the same params and inputs.
    checkpoints = ckpt.Checkpoints(
        paths.checkpoints / "sft",
        ckpt.fingerprint(params.flat(), FINGERPRINT_PARAMS, [paths.prepared / "sft.jsonl", Path(base)]),
        params.train.checkpoint_keep, tracking_run_id=getattr(logger, "run_id", None))
    losses: list[float] = []
    step, skip = 0, 0
    resumed = checkpoints.resume(accelerator)
    if resumed is not None:
        losses, step, skip = resumed["losses"], resumed["step"], resumed["batches_into_epoch"]
        # Replay the interrupted epoch's shuffle from its start, then skip what was done.
        ckpt.set_generator_state(shuffler, resumed["epoch_shuffler"])

    model.train()
    start = time.perf_counter()
    with progress_bar("sft", total_steps, completed=step) as bar:
        while step < total_steps:
            epoch_shuffler = ckpt.generator_state(shuffler)
            for index, batch in enumerate(loader):
                if index < skip:
                    continue
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            **position_kwargs(model, batch["attention_mask"]),
                            labels=batch["labels"], use_cache=False)
                accelerator.backward(out.loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                losses.append(out.loss.item())
                if step % cfg.log_every == 0 or step == total_steps:
                    logger.log_metrics({"sft/loss": sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                                        "sft/lr": scheduler.get_last_lr()[0]}, step=step)
                bar.advance(f"loss {losses[-1]:.3f}")
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    checkpoints.save(accelerator, step, {
                        "losses": losses, "epoch_shuffler": epoch_shuffler,
                        "batches_into_epoch": index + 1})
                if step >= total_steps:
                    break
            skip = 0

    window = max(1, min(50, len(losses) // 4))
    metrics = {
        "sft/loss_first": sum(losses[:window]) / window,
        "sft/loss_final": sum(losses[-window:]) / window,
        "sft/steps": float(step),
        "sft/seconds": time.perf_counter() - start,
    }
    if accelerator.is_main_process:
        with atomic_dir(paths.sft) as out:
            trained = lora.restore_config(lora.merged(accelerator.unwrap_model(model)))
            trained.save_pretrained(out)
            tokenizer.save_pretrained(out)
        write_json(paths.metrics_file("sft"), metrics)
    checkpoints.finish(accelerator)
    logger.log_metrics(metrics)
    return metrics
