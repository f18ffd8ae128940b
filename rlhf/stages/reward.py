"""Stage `reward`: train the reward model on preference pairs.

The SFT trunk with its LM head swapped for a scalar head, read at the last non-padding
token. Loss: -log sigmoid(r(x, y_w) - r(x, y_l)). Only score differences are learned, so
afterwards the head's bias is shifted until the mean score of SFT samples is 0, and their
std is recorded. Writes `models/reward/` and `metrics/reward.json`.

With `model.lora`, the trunk is frozen and carries LoRA adapters while the head is trained in
full; the adapters are merged into the trunk before saving, so `models/reward/` is the same
standard `AutoModelForSequenceClassification` checkpoint either way (the normalisation shift
and the std in its config: `rlhf_score_bias`, `rlhf_score_std`; see `ScalarHeadModel`).

Every `reward.checkpoint_every` steps a checkpoint goes under `checkpoints/reward/`, from which
a rerun resumes exactly, mid-epoch included (`rlhf.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from rlhf import checkpoints as ckpt
from rlhf import distributed as dist
from rlhf import rl_math as rl
from rlhf.artifacts import require_model, verify_record, write_record
from rlhf.config import Params
from rlhf.data.tokenize import collate_sequences, encode, encode_response
from rlhf.engine import adamw_with_cosine_schedule, make_accelerator
from rlhf.errors import DataError
from rlhf.generation import derive_seed, generate
from rlhf.io import atomic_dir, read_json, read_jsonl, write_json
from rlhf.models import lora
from rlhf.models.loading import ScalarHeadModel, last_token_index, load_causal_lm, load_tokenizer
from rlhf.paths import Paths
from rlhf.tracking import MetricsLogger, NullLogger
from rlhf.training import train_epochs

HASH_FILE = "reward.json"  # sha256 of every file defining the reward model (see rlhf.artifacts)


def verify(directory: Path) -> str:
    """The reward model's recorded hash, after checking every defining file still matches
    it: PPO optimises whatever this model scores, so a silent change would redirect PPO."""
    return verify_record(directory, HASH_FILE, produced_by="reward", what="reward model")


def encode_pairs(tokenizer, rows: list[dict]) -> list[dict]:
    return [{"chosen": encode_response(tokenizer, r["prompt"], r["chosen"]),
             "rejected": encode_response(tokenizer, r["prompt"], r["rejected"])} for r in rows]


def collate_pairs(batch: list[dict], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one padded batch of 2B sequences."""
    return collate_sequences([b["chosen"] for b in batch] + [b["rejected"] for b in batch],
                             pad_token_id)


def pair_margins(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y_w) - r(x, y_l) per pair. `model` is called, not its `.score`: under DDP only a
    call of the wrapped module all-reduces the gradients."""
    values = model(input_ids, attention_mask)  # (2B, T)
    scores = values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)  # (2B,)
    chosen, rejected = scores.chunk(2)
    return chosen - rejected  # (B,)


def accumulate_gradients(model, pairs: list, pad_token_id: int, accelerator,
                         grad_accum: int) -> tuple[float, float]:
    """Backward passes over this rank's shard of a global batch of pairs, micro-batch by
    micro-batch, of -log sigmoid(margin) summed / the global batch size (times the world size,
    which DDP's averaging divides out). Returns the global batch's (mean loss, accuracy)."""
    mine = dist.shard(pairs, accelerator)
    parts = dist.micro_slices(len(mine), grad_accum)
    loss_sum, correct = 0.0, 0.0
    for i, part in enumerate(parts):
        input_ids, attention_mask = collate_pairs(mine[part], pad_token_id)
        with dist.sync_gradients_if(i == len(parts) - 1, accelerator, model):
            margins = pair_margins(model, input_ids.to(accelerator.device),
                                   attention_mask.to(accelerator.device))
            loss = -F.logsigmoid(margins).sum() / len(pairs)
            accelerator.backward(loss * accelerator.num_processes)
        loss_sum += loss.item()
        correct += (margins > 0).float().sum().item()
    loss_sum, correct = dist.sum_over_ranks(accelerator, [loss_sum, correct]).tolist()
    return loss_sum, correct / len(pairs)


@torch.no_grad()
def score_pairs(model: ScalarHeadModel, encoded: list[dict], pad_token_id: int,
                device: torch.device, batch_size: int = 512) -> torch.Tensor:
    margins = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = collate_pairs(encoded[start:start + batch_size], pad_token_id)
        margins.append(pair_margins(model, ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(margins)


FINGERPRINT_PARAMS = ("model", "train", "reward", "ppo.max_new_tokens", "ppo.temperature")
"""The params a reward checkpoint must agree on to be resumed (normalisation samples like PPO)."""


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    cfg = params.reward
    train_rows = read_jsonl(paths.prepared / "preference_train.jsonl", produced_by="prepare")
    eval_rows = read_jsonl(paths.prepared / "preference_eval.jsonl", produced_by="prepare")
    manifest = read_json(paths.prepared / "manifest.json", produced_by="prepare")
    require_model(paths.sft, produced_by="sft")
    if len(train_rows) < cfg.batch_size:  # drop_last would leave no batch at all
        raise DataError(f"{len(train_rows)} training preference pairs are fewer than "
                        f"reward.batch_size ({cfg.batch_size}); lower reward.batch_size to at "
                        f"most {len(train_rows)} or add pairs")
    trust = params.model.trust_remote_code
    accelerator = make_accelerator(params.train, seed_offset=1)
    dist.check_batches("reward", params, accelerator.num_processes)
    tokenizer = load_tokenizer(paths.sft, trust)

    def build() -> ScalarHeadModel:
        model = ScalarHeadModel.from_causal_lm(paths.sft, trust)
        lora.prepare_for_training(model.trunk, params.model)
        if params.model.lora:
            model.trunk = lora.add_adapters(model.trunk, params.model)
        return model

    model = accelerator.shard(build())

    shuffler = torch.Generator().manual_seed(params.train.seed)
    # Not prepared by Accelerate: every rank reads the same global batches of pairs and
    # collates its own shard of each (`accumulate_gradients`).
    loader = DataLoader(encode_pairs(tokenizer, train_rows), batch_size=cfg.batch_size,
                        shuffle=True, drop_last=True, collate_fn=list, generator=shuffler)
    optimizer, scheduler, total_steps = adamw_with_cosine_schedule(model, cfg, len(loader))
    model, optimizer, scheduler = accelerator.prepare_training(model, optimizer, scheduler)

    # Resume from the newest checkpoint of an interrupted run with the same params and inputs.
    checkpoints = ckpt.Checkpoints(
        paths.checkpoints / "reward",
        ckpt.fingerprint(params.flat(), FINGERPRINT_PARAMS,
                         [paths.prepared / "preference_train.jsonl",
                          paths.prepared / "preference_eval.jsonl",
                          paths.prepared / "rl_prompts.jsonl", paths.sft], paths.root),
        params.train.checkpoint_keep, tracking_run_id=getattr(logger, "run_id", None))
    history, step, seconds = train_epochs(  # history: (loss, accuracy) per step
        "reward", model, loader, optimizer, scheduler, accelerator, checkpoints, total_steps,
        logger, train_step=lambda pairs: accumulate_gradients(
            model, pairs, tokenizer.pad_token_id, accelerator, params.train.grad_accum),
        loss_of=lambda record: record[0], recent_metrics=lambda recent: {
            "reward/loss": sum(h[0] for h in recent) / len(recent),
            "reward/accuracy_train": sum(h[1] for h in recent) / len(recent)},
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, history_key="history")

    # Every process scores the evaluation pairs and the normalisation samples whole.
    model = accelerator.whole(model, build, everywhere=True).merge_adapters().eval()
    lora.restore_config(model.trunk)
    device = accelerator.device
    margins = score_pairs(model, encode_pairs(tokenizer, eval_rows), tokenizer.pad_token_id, device)
    gold_gap = torch.tensor([r["gold_chosen"] - r["gold_rejected"] for r in eval_rows]
                            if "gold_chosen" in eval_rows[0] else [])
    metrics = {
        "reward/accuracy": (margins > 0).float().mean().item(),
        "reward/steps": float(step),
        "reward/seconds": seconds,
        "reward/loss_final": sum(h[0] for h in history[-20:]) / len(history[-20:]),
        "reward/world_size": float(accelerator.num_processes),
    }
    if "noise_ceiling" in manifest:
        metrics["reward/noise_ceiling"] = manifest["noise_ceiling"]
        metrics["reward/gap_to_ceiling"] = manifest["noise_ceiling"] - metrics["reward/accuracy"]
    if len(gold_gap):
        decided = gold_gap != 0
        metrics["reward/accuracy_gold"] = (
            (margins[decided] > 0) == (gold_gap[decided] > 0)).float().mean().item()

    metrics.update(normalise(model, tokenizer, params, paths, device))
    if accelerator.is_main_process:
        with atomic_dir(paths.reward) as out:
            model.save(out, tokenizer)  # a standard seq-cls checkpoint and its tokenizer
            write_record(out, HASH_FILE)
        write_json(paths.metrics_file("reward"),
                   {**metrics, "reward/sharding": accelerator.sharding})
    checkpoints.finish(accelerator)
    logger.log_metrics(metrics)
    return metrics


@torch.no_grad()
def normalise(model: ScalarHeadModel, tokenizer, params: Params, paths: Paths,
              device: torch.device) -> dict:
    """Shift the head's bias so SFT samples score 0 on average; record their std."""
    prompts = read_jsonl(paths.prepared / "rl_prompts.jsonl", produced_by="prepare")
    prompts = [encode(tokenizer, row["prompt"]) for row in prompts[:params.reward.n_normalise_samples]]
    policy = load_causal_lm(paths.sft, params.model.trust_remote_code).to(device).eval()
    query, query_mask, responses = generate(policy, tokenizer, prompts, params.ppo.max_new_tokens,
                                            params.ppo.temperature, device,
                                            seed=derive_seed(params.train.seed, "reward-normalise"))
    responses = rl.truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    response_mask = rl.mask_from_lengths(rl.response_lengths(responses, tokenizer.eos_token_id),
                                         responses.shape[1])
    scores = model.score(torch.cat([query, responses], 1),
                         torch.cat([query_mask, response_mask.long()], 1))
    mean, std = scores.mean().item(), scores.std().item()
    model.head.bias -= mean
    model.score_std = std
    return {"reward/sft_score_mean_before": mean, "reward/sft_score_std": std}
